"""The Ollama routes that Open WebUI and the `ollama` client use: /api/chat,
/api/generate, /api/tags, /api/show, /api/ps, /api/version. Streaming is
NDJSON, on by default as in Ollama."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from datetime import datetime, timezone
from typing import Any

import msgspec
from quart import Blueprint, Response, request

from tightwad_core.chat.answer import tool_deltas
from tightwad_core.chat.tools import (
    merge_deltas,
    ollama_from_openai,
    openai_from_ollama,
    tool_names,
)
from tightwad_core.chat.truncate import drop_oldest
from tightwad_core.errors import BadRequest, ContextOverflow, TightwadError, UnsupportedParam
from tightwad_core.http.common import (
    ServerState,
    check_messages,
    check_sampling,
    check_stop,
    check_tools,
    decode_body,
    json_line,
)
from tightwad_core.http.openai import state
from tightwad_core.http.serving import json_response
from tightwad_core.records import Delta, GenRequest, Kind

bp = Blueprint("ollama", __name__)
log = logging.getLogger("tightwad.api")

#: The Ollama API version whose wire format these routes follow.
OLLAMA_API_VERSION = "0.11.0"

#: Ollama sampling options -> the llama.cpp request field they become.
SAMPLING_OPTIONS = {
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}
#: Options that configure how Ollama loads a model; the proxy's backends are
#: configured in the profile instead, so these are accepted and have no effect.
LOAD_OPTIONS = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock",
    "numa", "low_vram", "vocab_only", "f16_kv", "num_keep", "penalize_newline",
})
HANDLED = frozenset({"num_predict", "temperature", "top_p", "top_k", "seed", "stop"})


class ChatBody(msgspec.Struct, kw_only=True):
    model: str
    messages: list[dict[str, Any]] = []
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Any = None
    tools: list[dict[str, Any]] | None = None
    keep_alive: Any = None
    think: Any = None


class GenerateBody(msgspec.Struct, kw_only=True):
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Any = None
    keep_alive: Any = None
    suffix: str | None = None
    template: str | None = None
    images: list[str] | None = None
    context: list[int] | None = None
    think: Any = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _options(st: ServerState, options: dict[str, Any] | None, fmt: Any) -> dict[str, Any]:
    opts = dict(options or {})
    extra: dict[str, Any] = {}
    for name, value in opts.items():
        if name in HANDLED or name in LOAD_OPTIONS:
            continue
        if name in SAMPLING_OPTIONS:
            extra[SAMPLING_OPTIONS[name]] = value
        else:
            raise UnsupportedParam(f"option {name!r} is not supported", param=f"options.{name}")
    if fmt not in (None, ""):
        if fmt == "json":
            extra["response_format"] = {"type": "json_object"}
        elif isinstance(fmt, dict):
            extra["response_format"] = {"type": "json_schema",
                                        "json_schema": {"name": "output", "schema": fmt}}
        else:
            raise BadRequest("format must be \"json\" or a JSON schema", param="format")
    return extra


def _typed(opts: dict[str, Any], name: str, kind: type) -> Any:
    value = opts.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f"options.{name} must be a {kind.__name__}", param=f"options.{name}")
    return value


def _request(st: ServerState, kind: Kind, options: dict[str, Any] | None, fmt: Any,
             **kw: Any) -> GenRequest:
    opts = options or {}
    num_predict = _typed(opts, "num_predict", int)
    if num_predict is not None and num_predict < 0:
        num_predict = None  # Ollama: -1 = until the model stops (bounded by our limit)
    stop = opts.get("stop")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadRequest("options.stop must be a list of strings", param="options.stop")
    temperature = _typed(opts, "temperature", float)
    top_p = _typed(opts, "top_p", float)
    top_k = _typed(opts, "top_k", int)
    max_tokens = check_sampling(st.profile, num_predict, temperature, top_p, top_k)
    req = GenRequest(kind=kind, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                     top_k=top_k, seed=_typed(opts, "seed", int), stop=check_stop(stop),
                     extra=_options(st, options, fmt), **kw)
    st.mode.check(req)
    return req


def _think(value: Any) -> None:
    if value not in (None, False):
        raise UnsupportedParam("think is not supported by this proxy", param="think")


@bp.post("/api/chat")
async def chat() -> Response:
    t0 = time.perf_counter()
    st = state()
    body = decode_body(await request.get_data(cache=False), ChatBody)
    model = await st.check_model(body.model)
    _think(body.think)
    if not body.messages:  # Ollama: an empty chat loads the model
        return json_response({"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                      "done_reason": "load", "done": True})
    check_messages(body.messages)
    for i, m in enumerate(body.messages):
        if m.get("images"):
            raise UnsupportedParam("images are not supported by this proxy", param=f"messages[{i}].images")
    options = body.options
    fmt = body.format
    req = _request(st, "chat", options, fmt, messages=[_chat_message(m) for m in body.messages],
                   tools=check_tools(body.tools))
    return await _answer(st, req, model, body.stream, "message", t0)


def _chat_message(m: dict[str, Any]) -> dict[str, Any]:
    """An Ollama message as the OpenAI form the backends and templates take:
    tool calls with JSON-text arguments, a tool result with its function's name."""
    out = {k: v for k, v in m.items() if k not in ("images", "thinking", "tool_name")}
    if m.get("tool_calls"):
        out["tool_calls"] = openai_from_ollama(m["tool_calls"])
    if m.get("role") == "tool" and m.get("tool_name") and "name" not in out:
        out["name"] = m["tool_name"]
    return out


@bp.post("/api/generate")
async def generate() -> Response:
    t0 = time.perf_counter()
    st = state()
    body = decode_body(await request.get_data(cache=False), GenerateBody)
    model = await st.check_model(body.model)
    _think(body.think)
    for name in ("suffix", "template", "images", "context"):
        if getattr(body, name):
            raise UnsupportedParam(f"{name} is not supported by this proxy", param=name)
    if not body.prompt:
        return json_response({"model": model, "created_at": _now(), "response": "", "done": True,
                      "done_reason": "load"})
    if body.raw:
        if body.system:
            raise BadRequest("system cannot be combined with raw", param="system")
        req = _request(st, "completion", body.options, body.format, prompt=body.prompt)
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else [])
        messages.append({"role": "user", "content": body.prompt})
        req = _request(st, "chat", body.options, body.format, messages=messages)
    return await _answer(st, req, model, body.stream, "response", t0)


class _Clock:
    """Ollama's durations, measured: ``load_duration`` from the request's arrival
    until the mode has it (reading and checking it, and any retry after
    truncation), ``prompt_eval_duration`` until the first output,
    ``eval_duration`` from there to the end."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.handed = t0
        self.first: float | None = None

    def ns(self, a: float, b: float) -> int:
        return max(0, int((b - a) * 1e9))

    def final(self, model: str, field: str, text: str, finish: str, usage: Any,
              calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        end = time.perf_counter()
        first = self.first or end
        out: dict[str, Any] = {"model": model, "created_at": _now()}
        if field == "message":
            out[field] = {"role": "assistant", "content": text}
            if calls:
                out[field]["tool_calls"] = ollama_from_openai(calls)
        else:
            out[field] = text
        out.update({
            "done": True, "done_reason": "stop" if finish == "tool_calls" else finish,
            "total_duration": self.ns(self.t0, end), "load_duration": self.ns(self.t0, self.handed),
            "prompt_eval_count": usage.prompt_tokens if usage else 0,
            "prompt_eval_duration": self.ns(self.handed, first),
            "eval_count": usage.completion_tokens if usage else 0,
            "eval_duration": self.ns(first, end),
        })
        return out


async def _start(st: ServerState, req: GenRequest, clock: _Clock
                 ) -> tuple[Delta, AsyncGenerator[Delta, None]]:
    """The mode's stream and its first delta; with ``truncate = "oldest"``, a chat
    that does not fit the context loses its oldest turns until it does."""
    fmt = await st.tool_format() if req.tools else None
    while True:
        clock.handed = time.perf_counter()
        stream = st.mode.stream(req)
        if req.tools:
            stream = tool_deltas(stream, fmt, tool_names(req.tools))
        try:
            first = await stream.__anext__()
        except ContextOverflow:
            await stream.aclose()
            shorter = drop_oldest(req.messages) if st.profile.truncate == "oldest" else None
            if shorter is None:
                raise
            log.info("request does not fit the context: dropped the oldest turn (%d messages left)",
                     len(shorter))
            req = msgspec.structs.replace(req, messages=shorter)
            continue
        clock.first = time.perf_counter()
        return first, stream


async def _answer(st: ServerState, req: GenRequest, model: str, stream: bool, field: str,
                  t0: float) -> Response:
    clock = _Clock(t0)
    first, it = await _start(st, req, clock)
    if not stream:  # the same stream, gathered: one path for timings, truncation and tools
        parts: list[str] = []
        calls: list[dict[str, Any]] = []
        async with aclosing(it):
            delta: Delta | None = first
            while delta is not None:
                parts.append(delta.text)
                calls += (delta.extra or {}).get("tool_calls") or []
                if delta.finish_reason is not None:
                    return json_response(clock.final(model, field, "".join(parts), delta.finish_reason,
                                                     delta.usage, merge_deltas(calls) if calls else None))
                delta = await anext(it, None)
        raise TightwadError("the answer ended without finishing")
    resp = Response(_lines(model, field, first, it, clock, st.public),
                    content_type="application/x-ndjson")
    resp.timeout = None
    return resp


async def _lines(model: str, field: str, first: Delta, it: AsyncGenerator[Delta, None],
                 clock: _Clock, public: Callable[[TightwadError], TightwadError],
                 ) -> AsyncGenerator[bytes, None]:
    calls: list[dict[str, Any]] = []
    async with aclosing(it):
        try:
            delta: Delta | None = first
            while delta is not None:
                calls += (delta.extra or {}).get("tool_calls") or []
                if delta.text:
                    piece: dict[str, Any] = {"model": model, "created_at": _now()}
                    piece[field] = ({"role": "assistant", "content": delta.text}
                                    if field == "message" else delta.text)
                    piece["done"] = False
                    yield json_line(piece) + b"\n"
                if delta.finish_reason is not None:
                    if calls:  # Ollama sends the calls in a message of their own before the end
                        yield json_line({"model": model, "created_at": _now(), "message": {
                            "role": "assistant", "content": "",
                            "tool_calls": ollama_from_openai(merge_deltas(calls))}, "done": False}) + b"\n"
                    yield json_line(clock.final(model, field, "", delta.finish_reason, delta.usage)) + b"\n"
                    return
                delta = await anext(it, None)
        except TightwadError as exc:
            log.warning("ollama stream failed: %s", exc.message)
            yield json_line({"error": public(exc).message}) + b"\n"

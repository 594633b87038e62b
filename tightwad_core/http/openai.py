"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import msgspec
from quart import Blueprint, Response, current_app, request

from tightwad_core.chat.answer import tool_deltas, tool_result
from tightwad_core.chat.tools import tool_names
from tightwad_core.errors import BadRequest, TightwadError
from tightwad_core.http.common import (
    ServerState,
    check_messages,
    check_sampling,
    check_stop,
    check_tools,
    decode_body,
    extras,
    json_line,
    new_id,
)
from tightwad_core.http.serving import json_response
from tightwad_core.records import Delta, GenRequest, Kind, Result

bp = Blueprint("openai", __name__)
log = logging.getLogger("tightwad.api")


class _Common(msgspec.Struct, kw_only=True):
    """Fields both OpenAI generation routes take."""

    model: str | None = None
    max_tokens: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension llama.cpp and vLLM accept
    seed: int | None = None
    n: int = 1
    user: str | None = None


class ChatBody(_Common, kw_only=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None


class CompletionBody(_Common, kw_only=True):
    prompt: str | list[str | int]


CHAT_FIELDS = frozenset(ChatBody.__struct_fields__)
COMPLETION_FIELDS = frozenset(CompletionBody.__struct_fields__)


def state() -> ServerState:
    st: ServerState = current_app.config["TIGHTWAD_STATE"]
    return st


def _usage(u: Any) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _sse(obj: Any) -> bytes:
    return b"data: " + json_line(obj) + b"\n\n"


async def _parse(kind: Kind) -> tuple[GenRequest, Any, str]:
    st = state()
    raw = await request.get_data(cache=False)
    if kind == "chat":
        body = decode_body(raw, ChatBody)
        check_messages(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        extra = extras(raw, CHAT_FIELDS, frozenset(st.profile.passthrough))
    else:
        body = decode_body(raw, CompletionBody)
        max_tokens = body.max_tokens
        extra = extras(raw, COMPLETION_FIELDS, frozenset(st.profile.passthrough))
        prompt = body.prompt
        if isinstance(prompt, list) and any(isinstance(p, str) for p in prompt):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise BadRequest("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        elif isinstance(prompt, list) and any(isinstance(p, int) and p < 0 for p in prompt):
            raise BadRequest("token ids must not be negative", param="prompt")
        if prompt == "" or prompt == []:
            raise BadRequest("prompt must not be empty", param="prompt")
    if body.n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    model = await st.check_model(body.model)
    max_tokens = check_sampling(st.profile, max_tokens, body.temperature, body.top_p, body.top_k)
    req = GenRequest(
        kind=kind,
        messages=body.messages if kind == "chat" else None,
        prompt=None if kind == "chat" else prompt,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=check_stop(body.stop),
        tools=check_tools(body.tools) if kind == "chat" else None,
        tool_choice=body.tool_choice if kind == "chat" else None,
        extra=extra,
    )
    st.mode.check(req)
    return req, body, model


@bp.post("/v1/chat/completions")
async def chat_completions() -> Response:
    return await _handle("chat")


@bp.post("/v1/completions")
async def completions() -> Response:
    return await _handle("completion")


async def _handle(kind: Kind) -> Response:
    req, body, model = await _parse(kind)
    st = state()
    rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
    created = int(time.time())
    fmt = await st.tool_format() if req.tools else None
    allowed = tool_names(req.tools)
    if not body.stream:
        result = await st.mode.generate(req)
        if req.tools:
            result = tool_result(result, fmt, allowed)
        return json_response(_whole(kind, rid, created, model, result))
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    stream = st.mode.stream(req)
    if req.tools:
        stream = tool_deltas(stream, fmt, allowed)
    first = await stream.__anext__()  # errors before any output are plain HTTP errors
    resp = Response(_events(kind, rid, created, model, first, stream, include_usage, st.public),
                    content_type="text/event-stream")
    resp.timeout = None
    resp.headers["cache-control"] = "no-cache"
    resp.headers["x-accel-buffering"] = "no"
    return resp


def _whole(kind: Kind, rid: str, created: int, model: str, r: Result) -> dict[str, Any]:
    extra = dict(r.extra or {})
    logprobs = extra.pop("logprobs", None)
    if kind == "chat":
        content = None if extra.get("tool_calls") and not r.text else r.text
        choice = {"index": 0, "message": {"role": "assistant", "content": content, **extra},
                  "logprobs": logprobs, "finish_reason": r.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": r.text, "logprobs": logprobs, "finish_reason": r.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model,
            "choices": [choice], "usage": _usage(r.usage)}


async def _events(kind: Kind, rid: str, created: int, model: str, first: Delta,
                  stream: AsyncGenerator[Delta, None], include_usage: bool,
                  public: Callable[[TightwadError], TightwadError]) -> AsyncGenerator[bytes, None]:
    chat = kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": rid, "object": obj, "created": created, "model": model}

    def chunk(text: str, finish: str | None, delta: Delta | None = None) -> bytes:
        lp = (delta.extra or {}).get("logprobs") if delta is not None else None
        if chat:
            choice = {"index": 0, "delta": {"content": text} if text or finish is None else {},
                      "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})

    async with aclosing(stream):
        try:
            if chat:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
            delta: Delta | None = first
            while delta is not None:
                if delta.finish_reason is not None:
                    yield chunk(delta.text, delta.finish_reason, delta)
                    if include_usage and delta.usage is not None:
                        yield _sse({**head, "choices": [], "usage": _usage(delta.usage)})
                    break
                calls = (delta.extra or {}).get("tool_calls") if chat else None
                if calls:
                    yield _sse({**head, "choices": [{"index": 0, "delta": {"tool_calls": calls},
                                                      "logprobs": None, "finish_reason": None}]})
                elif delta.text or (delta.extra or {}).get("logprobs"):
                    yield chunk(delta.text, None, delta)
                delta = await anext(stream, None)
        except TightwadError as exc:
            log.warning("stream %s failed: %s", rid, exc.message)
            yield _sse(public(exc).body())
        yield b"data: [DONE]\n\n"


@bp.get("/v1/models")
async def models() -> Response:
    st = state()
    name = await st.served_model()
    data = {"object": "list", "data": [{
        "id": name, "object": "model", "created": int(st.started), "owned_by": "tightwad",
        "meta": {"profile": st.profile_name, "mode": st.mode.name,
                 "target": getattr(st.backends.get("target"), "kind", None),
                 "verifier": st.mode.status().get("verifier")},
    }]}
    return json_response(data)

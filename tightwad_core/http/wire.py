"""Talking to an OpenAI-compatible server (llama-server's /v1 routes, vLLM,
hosted APIs): request bodies from `GenRequest`, answers into `Result` and
`Delta`, foreign exceptions mapped to ours at this boundary."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec

from tightwad_core.errors import BackendError, BackendUnavailable, BadRequest, ContextOverflow
from tightwad_core.records import Delta, GenRequest, Result, Usage

_json = msgspec.json.Decoder()


def request_body(req: GenRequest, model: str | None, stream: bool, top_k: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if model:
        body["model"] = model
    if req.kind == "chat":
        body["messages"] = req.messages
    else:
        body["prompt"] = req.prompt
    body["max_tokens"] = req.max_tokens
    for name in ("temperature", "top_p", "seed"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if req.top_k is not None and top_k:
        body["top_k"] = req.top_k
    if req.stop:
        body["stop"] = list(req.stop)
    if req.tools:
        body["tools"] = req.tools
        if req.tool_choice is not None:
            body["tool_choice"] = req.tool_choice
    body.update(req.extra)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _error(resp_body: bytes) -> dict[str, Any]:
    """The upstream's error object (``{"message": ...}`` at least)."""
    try:
        data = _json.decode(resp_body)
        err = data.get("error", data)
        return err if isinstance(err, dict) else {"message": str(err)}
    except (msgspec.DecodeError, AttributeError):
        return {"message": resp_body[:300].decode("utf-8", "replace")}


def _error_message(resp_body: bytes) -> str:
    err = _error(resp_body)
    return str(err.get("message") or err)


def overflow(err: dict[str, Any], role: str) -> ContextOverflow | None:
    """llama-server's and the worker's "does not fit the context" error, as ours."""
    if err.get("type") != "exceed_context_size_error" and err.get("code") != "context_length_exceeded":
        return None
    try:
        return ContextOverflow(int(err["n_prompt_tokens"]), int(err["n_ctx"]), f"{role}.ctx_size")
    except (KeyError, TypeError, ValueError):
        return None


def raise_for_status(resp: httpx.Response, body: bytes, where: str, role: str = "target") -> None:
    if resp.status_code < 400:
        return
    err = _error(body)
    if resp.status_code == 400 and (too_long := overflow(err, role)) is not None:
        raise too_long
    msg = f"{where} answered {resp.status_code}: {err.get('message') or err}"
    exc: BackendError | BadRequest
    if resp.status_code in (400, 404, 413, 422):
        exc = BadRequest(msg, code="upstream_rejected")
    elif resp.status_code == 503:
        after = resp.headers.get("retry-after", "")
        exc = BackendUnavailable(msg, retry_after=int(after) if after.isdigit() else None)
    else:
        exc = BackendError(msg)
    code = err.get("code")
    exc.upstream_code = code if isinstance(code, str) else None
    raise exc


def _usage(data: dict[str, Any] | None) -> Usage | None:
    if not data:
        return None
    return Usage(int(data.get("prompt_tokens", 0)), int(data.get("completion_tokens", 0)))


def parse_result(kind: str, data: dict[str, Any]) -> Result:
    try:
        choice = data["choices"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise BackendError(f"upstream answer has no choices: {str(data)[:200]}") from exc
    extra: dict[str, Any] = {}
    if kind == "chat":
        message = dict(choice.get("message") or {})
        text = message.pop("content", None) or ""
        message.pop("role", None)
        extra.update({k: v for k, v in message.items() if v not in (None, [], "")})
    else:
        text = choice.get("text") or ""
    if choice.get("logprobs") is not None:
        extra["logprobs"] = choice["logprobs"]
    usage = _usage(data.get("usage")) or Usage(0, 0)
    return Result(text=text, finish_reason=choice.get("finish_reason") or "stop", usage=usage,
                  extra=extra or None)


async def post_json(client: httpx.AsyncClient, path: str, body: dict[str, Any], where: str,
                    role: str = "target") -> Any:
    try:
        resp = await client.post(path, content=msgspec.json.encode(body),
                                 headers={"content-type": "application/json"})
    except httpx.TimeoutException as exc:
        raise BackendError(f"{where} timed out") from exc
    except httpx.TransportError as exc:
        raise BackendUnavailable(f"{where} is unreachable: {exc}") from exc
    raise_for_status(resp, resp.content, where, role)
    try:
        return _json.decode(resp.content)
    except msgspec.DecodeError as exc:
        raise BackendError(f"{where} sent invalid JSON") from exc


@contextmanager
def stream_errors(where: str) -> Iterator[None]:
    """httpx's failures while streaming from ``where``, as our errors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise BackendError(f"{where} timed out") from exc
    except httpx.TransportError as exc:
        raise BackendUnavailable(f"{where} connection failed mid-stream: {exc}") from exc


async def stream_sse(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], kind: str, where: str,
    role: str = "target",
) -> AsyncGenerator[Delta, None]:
    """POST with ``stream: true`` and yield deltas; the final one has the
    finish reason and usage. Events that arrive in one read are merged into
    one delta (fewer, larger chunks when the client side lags). Leaving the
    generator closes the upstream request."""
    finish: str | None = None
    usage: Usage | None = None
    buf = b""
    done = False
    with stream_errors(where):
        async with client.stream(
            "POST", path, content=msgspec.json.encode(body), headers={"content-type": "application/json"}
        ) as resp:
            if resp.status_code >= 400:
                raise_for_status(resp, await resp.aread(), where, role)
            async for chunk in resp.aiter_raw():
                buf += chunk
                *events, buf = buf.replace(b"\r\n", b"\n").split(b"\n\n")
                texts: list[str] = []
                for event in events:
                    for line in event.split(b"\n"):
                        if line.startswith(b"error:"):
                            raise BackendError(f"{where} stream error: {line[6:].strip().decode(errors='replace')}")
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        try:
                            data = _json.decode(payload)
                        except msgspec.DecodeError as exc:
                            raise BackendError(f"{where} sent a malformed stream event") from exc
                        if "error" in data:
                            too_long = overflow(_error(payload), role)
                            if too_long is not None:
                                raise too_long
                            raise BackendError(f"{where} stream error: {_error_message(payload)}")
                        usage = _usage(data.get("usage")) or usage
                        for choice in data.get("choices") or ():
                            calls = (choice.get("delta") or {}).get("tool_calls") if kind == "chat" else None
                            if calls:  # the server parsed tool calls itself: pass them on as they come
                                if texts:
                                    yield Delta(text="".join(texts))
                                    texts = []
                                yield Delta(extra={"tool_calls": calls})
                            if kind == "chat":
                                text = (choice.get("delta") or {}).get("content") or ""
                            else:
                                text = choice.get("text") or ""
                            if choice.get("finish_reason"):
                                finish = choice["finish_reason"]
                            lp = choice.get("logprobs")
                            if lp:
                                if texts:
                                    yield Delta(text="".join(texts))
                                    texts = []
                                yield Delta(text=text, extra={"logprobs": lp})
                            elif text:
                                texts.append(text)
                if texts:
                    yield Delta(text="".join(texts))
                if done:
                    break
    if finish is None:
        raise BackendError(f"{where} ended the stream without finishing")
    yield Delta(finish_reason=finish, usage=usage)

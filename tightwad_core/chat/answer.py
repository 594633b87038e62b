"""Answers to requests that offered tools: the model's tool-call markup turned
into ``extra["tool_calls"]`` (OpenAI's form) with ``finish_reason`` set to
``"tool_calls"``, for whole results and for streams alike. A server that
parsed the calls itself (llama-server with ``--jinja``) is passed through."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import msgspec

from tightwad_core.chat.tools import ToolFormat, ToolStream
from tightwad_core.records import Delta, Result


def tool_result(result: Result, fmt: ToolFormat | None, allowed: frozenset[str]) -> Result:
    if fmt is None or (result.extra or {}).get("tool_calls"):
        return result
    content, calls = fmt.split(result.text, allowed)
    if not calls:
        return result
    extra = {**(result.extra or {}), "tool_calls": [c.openai(i) for i, c in enumerate(calls)]}
    return msgspec.structs.replace(result, text=content, finish_reason="tool_calls", extra=extra)


async def tool_deltas(stream: AsyncGenerator[Delta, None], fmt: ToolFormat | None,
                      allowed: frozenset[str]) -> AsyncGenerator[Delta, None]:
    """``stream`` with tool markup held back and, at the end, the calls as one
    delta before the finish. Closing this generator closes ``stream``."""
    splitter = ToolStream(fmt, allowed) if fmt is not None else None
    upstream = False  # the server sends structured calls: do not parse text
    try:
        async for d in stream:
            if (d.extra or {}).get("tool_calls"):
                upstream = True
            if splitter is None or upstream:
                yield d
                continue
            text = splitter.feed(d.text)
            if d.finish_reason is None:
                if text or d.extra:
                    yield msgspec.structs.replace(d, text=text)
                continue
            rest, calls = splitter.finish()
            if not calls:
                yield msgspec.structs.replace(d, text=text + rest)
                return
            if text + rest:
                yield Delta(text=text + rest)
            yield Delta(extra={"tool_calls": [c.openai(i) for i, c in enumerate(calls)]})
            yield msgspec.structs.replace(d, text="", finish_reason="tool_calls")
            return
    finally:
        await stream.aclose()

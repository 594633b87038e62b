"""Small frozen records that cross boundaries between the API layer, modes and
backends. The API layer turns OpenAI and Ollama bodies into a `GenRequest`;
backends answer with `Delta` streams or a `Result`."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

#: What a request asks for: "chat" (messages through the model's template) or
#: "completion" (a raw prompt).
Kind = Literal["chat", "completion"]


class GenRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One generation request, whichever API it came from."""

    kind: Kind  # chat: `messages` go through the model's template
    messages: list[dict[str, Any]] | None = None  # OpenAI-shaped messages (chat only)
    prompt: str | list[int] | None = None  # raw prompt text or token ids (completion only)
    max_tokens: int  # exact cap on generated tokens
    temperature: float | None = None  # None: the backend's default
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, not included in the output
    # Function tools the model may call (OpenAI form, which Ollama shares), rendered
    # by the model's own chat template; calls come back in `extra["tool_calls"]`.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # OpenAI's "auto" / "none" / "required" / a named function
    # Sample with temperature/top_k/top_p alone, none of a server's extra default
    # samplers (min_p, penalties): the distribution a verifier checks against.
    exact_sampler: bool = False
    extra: dict[str, Any] = {}  # further OpenAI parameters the mode agreed to pass on


class Usage(msgspec.Struct, frozen=True):
    """Token counts as the target's tokenizer sees them."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Delta(msgspec.Struct, frozen=True, kw_only=True):
    """One piece of a streamed answer. The last one carries `finish_reason`
    (and `usage` when the backend knows it)."""

    text: str = ""  # whole UTF-8 characters only
    finish_reason: str | None = None  # "stop" or "length" on the last delta
    usage: Usage | None = None
    extra: dict[str, Any] | None = None  # backend fields passed through (e.g. logprobs)


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """A whole answer."""

    text: str
    finish_reason: str  # "stop" or "length"
    usage: Usage
    extra: dict[str, Any] | None = None  # backend fields passed through (e.g. logprobs)


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """What a backend reports about itself."""

    ok: bool
    detail: str = ""  # why not, or what it is
    url: str | None = None  # where it is reached


class TokenRun(msgspec.Struct, frozen=True, kw_only=True):
    """A greedy generation from token ids, as the target reports it."""

    text: str  # the generated text
    count: int  # generated tokens (end-of-generation tokens not counted)
    tokens: list[int] | None = None  # their ids, when the server sends them
    gaps: list[float | None] | None = None  # top-2 log-probability gap per token, when asked

"""``echo-example``: a backend that needs no model. It answers with the last
user message, word by word.

It has no tokenizer, so every count it reports is in *words*: ``max_tokens``
caps the number of words echoed and ``usage`` counts words, not tokens.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import trio

from tightwad_core.config.profiles import BackendConfig
from tightwad_core.errors import UnsupportedParam
from tightwad_core.records import Delta, GenRequest, Health, Result, Usage
from tightwad_core.roles import BackendContext


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def prompt_text(req: GenRequest) -> str:
    """What gets echoed: the last user message (chat) or the prompt (completion)."""
    if req.kind == "chat":
        for message in reversed(req.messages or []):
            if message.get("role") == "user":
                return _text(message.get("content"))
        return ""
    return req.prompt if isinstance(req.prompt, str) else " ".join(map(str, req.prompt or []))


class EchoBackend:
    """Echoes the prompt back; implements tightwad_core.roles.Backend."""

    kind = "echo-example"
    passthrough: frozenset[str] | None = frozenset()  # no extra OpenAI parameters
    capabilities: frozenset[str] = frozenset()  # text only: no token ids, no verify protocol

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        self.config = config
        self.role = context.role
        self._open = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._open = True
        task_status.started()
        await trio.sleep_forever()

    async def health(self) -> Health:
        if not self._open:
            return Health(ok=False, detail="not started")
        return Health(ok=True, detail="echoing (no model)")

    async def model_name(self) -> str:
        return self.config.model or "echo"

    async def model_info(self) -> dict[str, Any]:
        # The keys the Ollama routes (/api/show, /api/tags) read; all optional.
        return {"name": await self.model_name(), "context_length": self.config.ctx_size,
                "chat_template": ""}

    def check(self, req: GenRequest) -> None:
        for name in req.extra:
            raise UnsupportedParam(f"{name} is not supported by the {self.kind} backend",
                                   param=name)

    def _answer(self, req: GenRequest) -> tuple[list[str], str, Usage]:
        """The words to send, the finish reason and the (word) counts."""
        prompt = prompt_text(req).split()
        words = prompt[: req.max_tokens]
        finish = "length" if len(prompt) > req.max_tokens else "stop"
        text = " ".join(words)
        cuts = [text.find(s) for s in req.stop if s in text]
        if cuts:  # a stop string ends the answer early and is not included
            text, finish = text[: min(cuts)], "stop"
        pieces = [w if i == 0 else " " + w for i, w in enumerate(text.split(" ")) if text]
        return pieces, finish, Usage(prompt_tokens=len(prompt), completion_tokens=len(text.split()))

    async def generate(self, req: GenRequest) -> Result:
        pieces, finish, usage = self._answer(req)
        return Result(text="".join(pieces), finish_reason=finish, usage=usage)

    async def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        pieces, finish, usage = self._answer(req)
        for piece in pieces:
            await trio.lowlevel.checkpoint()
            yield Delta(text=piece)
        yield Delta(finish_reason=finish, usage=usage)

    async def aclose(self) -> None:
        self._open = False

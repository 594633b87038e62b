"""The target's tokenizer as the speculation loop sees it: prompts tokenized
and chat templates applied by the target itself (one request each, once per
request), token bytes and end-of-generation ids from its vocabulary."""

from __future__ import annotations

import logging
from typing import Any

from tightwad_core.config.profiles import ConfigError
from tightwad_core.errors import BadRequest
from tightwad_core.records import GenRequest
from tightwad_core.roles import Backend, TokenBackend
from tightwad_core.spec.interfaces import SamplingParams
from tightwad_core.vocab import Vocab

log = logging.getLogger("tightwad.spec")
#: Text that exercises bytes, UTF-8 and digits, for checking a borrowed vocabulary.
PROBE = "def main():\n    print('héllo, 世界')  # 123"


async def vocab_of(backend: Backend) -> Vocab | None:
    """The vocabulary of a backend that can tell (None for text-only backends)."""
    return await backend.vocab() if isinstance(backend, TokenBackend) else None


def sampling_of(req: GenRequest) -> SamplingParams:
    """The request's sampler with OpenAI's defaults (temperature 1, top_p 1),
    the settings a drafter and the target's check both use."""
    return SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p,
                          top_k=req.top_k or 0, seed=req.seed)


class TargetTokenizer:
    def __init__(self, backend: TokenBackend) -> None:
        self.backend = backend
        self._vocab: Vocab | None = None

    @property
    def vocab(self) -> Vocab:
        if self._vocab is None:
            raise RuntimeError("the target's vocabulary is not loaded yet")
        return self._vocab

    @property
    def eos(self) -> frozenset[int]:
        return self.vocab.eos

    async def load(self, fallback: Vocab | None) -> None:
        """The target's own vocabulary, or else ``fallback`` (the draft's), checked
        on a probe text against the target's tokenizer."""
        self._vocab = await self.backend.vocab()
        if self._vocab is not None:
            return
        if fallback is not None:
            theirs = await self.backend.tokenize(PROBE, add_special=False)
            ours = [t for t in theirs if t < fallback.n_vocab]
            if len(ours) == len(theirs) and fallback.decode(ours).decode("utf-8", "replace") == PROBE:
                log.warning("target vocabulary taken from the draft's model file (checked on a probe)")
                self._vocab = fallback
                return
        raise ConfigError("cannot learn the target's vocabulary: launch it with model_path, use a worker "
                          "target, or a draft of the same family whose GGUF is on this machine")

    async def tokenize(self, text: str, special: bool = True) -> list[int]:
        return list(await self.backend.tokenize(text, add_special=special))

    async def apply_template(self, messages: list[dict[str, Any]],
                             tools: list[dict[str, Any]] | None = None) -> str:
        return str(await self.backend.apply_template(messages, tools))

    async def prompt_ids(self, req: GenRequest) -> list[int]:
        """The request's prompt as the target's token ids: a chat through the
        target's own template (tools section included), a text tokenized, a
        token-id prompt checked against the vocabulary."""
        if req.kind == "chat":
            templated = await self.apply_template(req.messages or [], req.tools)
            return await self.tokenize(templated, special=True)
        if isinstance(req.prompt, list):
            if any(not 0 <= t < self.vocab.n_vocab for t in req.prompt):
                raise BadRequest("prompt has token ids outside the vocabulary", param="prompt")
            return list(req.prompt)
        return await self.tokenize(req.prompt or "", special=True)

    def piece(self, token: int) -> bytes:
        return self.vocab.piece(token)

"""The target's tokenizer as the speculation loop sees it: prompts tokenized
and chat templates applied by the target itself (one request each, once per
request), token bytes and end-of-generation ids from its vocabulary."""

from __future__ import annotations

import logging
from typing import Any

from tightwad_core.errors import BackendError
from tightwad_core.config.profiles import ConfigError
from tightwad_core.vocab import Vocab, from_pieces, load_vocab

log = logging.getLogger("tightwad.spec")


def local_vocab(backend: Any) -> Vocab | None:
    """The vocabulary of a backend whose GGUF file is on this machine."""
    path = getattr(backend, "model_file", None)
    if path is None or not path.exists():
        return None
    return load_vocab(path)


class TargetTokenizer:
    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.vocab: Vocab = None  # type: ignore[assignment]

    @property
    def eos(self) -> frozenset[int]:
        return self.vocab.eos

    async def load(self, fallback_files: list[Vocab | None]) -> None:
        own = local_vocab(self.backend)
        if own is not None:
            self.vocab = own
            return
        if self.backend.kind == "worker":
            data = await self.backend.get_json("/v1/tightwad/vocab")
            try:
                self.vocab = from_pieces([bytes.fromhex(p) for p in data["pieces"]], data["eos"],
                                         data.get("bos"), data["fingerprint"])
            except (KeyError, ValueError, TypeError) as exc:
                raise BackendError("the worker sent a malformed vocabulary") from exc
            return
        for v in fallback_files:
            if v is not None:
                probe = "def main():\n    print('héllo, 世界')  # 123"
                theirs = await self.backend.tokenize(probe, add_special=False)
                ours = [t for t in theirs if t < v.n_vocab]
                text = b"".join(v.piece(t) for t in ours).decode("utf-8", "replace")
                if len(ours) == len(theirs) and text == probe:
                    log.warning("target vocabulary taken from the draft's model file (checked on a probe)")
                    self.vocab = v
                    return
        raise ConfigError("cannot learn the target's vocabulary: launch it with model_path, use a worker "
                          "target, or a draft of the same family whose GGUF is on this machine")

    async def tokenize(self, text: str, special: bool = True) -> list[int]:
        return list(await self.backend.tokenize(text, add_special=special))

    async def apply_template(self, messages: list[dict[str, Any]]) -> str:
        return str(await self.backend.apply_template(messages))

    def piece(self, token: int) -> bytes:
        return self.vocab.piece(token)

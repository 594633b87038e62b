"""One vocabulary record for every side: the bytes each token stands for,
which tokens end generation, and a fingerprint that says whether two models
share one vocabulary (computed from the GGUF's token texts and types, so a
file read here, a llama.cpp engine and a worker over HTTP agree)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
#: Control tokens that end a turn in common chat templates.
EOG_TEXTS = frozenset({"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "</s>",
                       "<end_of_turn>", "<|end_of_text|>", "<|eom_id|>", "<|return|>"})


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


@dataclass(frozen=True)
class Vocab:
    pieces: tuple[bytes, ...]  # bytes each token adds to generated text (control tokens: b"")
    eos: frozenset[int]  # ids that end generation
    bos: int | None
    fingerprint: str  # sha256 over every token's GGUF text and type, in id order
    specials: tuple[bytes, ...] = ()  # pieces with control tokens as their text (empty: same as pieces)
    add_bos: bool = True  # whether prompts start with `bos`

    @property
    def n_vocab(self) -> int:
        return len(self.pieces)

    def piece(self, token: int) -> bytes:
        return self.pieces[token] if 0 <= token < len(self.pieces) else b""

    def special(self, token: int) -> bytes:
        """The token's bytes with control tokens spelled out (for re-tokenizing a context)."""
        table = self.specials or self.pieces
        return table[token] if 0 <= token < len(table) else b""

    def decode(self, tokens: Iterable[int]) -> bytes:
        return b"".join(self.piece(t) for t in tokens)


def fingerprint(texts: Sequence[str], types: Sequence[int]) -> str:
    """The vocabulary fingerprint: sha256 over each token's text and type."""
    h = hashlib.sha256()
    for t, ty in zip(texts, types):
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00%d\x00" % ty)
    return h.hexdigest()


def _field(reader: Any, name: str) -> Any:
    f = reader.fields.get(name)
    if f is None:
        return None
    return f


def _scalar(reader: Any, name: str) -> int | None:
    f = _field(reader, name)
    if f is None:
        return None
    return int(f.parts[f.data[0]][0])


@lru_cache(maxsize=8)
def _load(path: str, mtime: float, size: int) -> Vocab:
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")
    tok_field = _field(reader, "tokenizer.ggml.tokens")
    if tok_field is None:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens in this GGUF")
    texts = [bytes(tok_field.parts[i]).decode("utf-8", "replace") for i in tok_field.data]
    type_field = _field(reader, "tokenizer.ggml.token_type")
    types = ([int(type_field.parts[i][0]) for i in type_field.data] if type_field is not None
             else [NORMAL] * len(texts))
    model_field = _field(reader, "tokenizer.ggml.model")
    model = bytes(model_field.parts[model_field.data[0]]).decode() if model_field else "gpt2"
    pieces = _pieces(texts, types, model)
    eos = {i for i in (_scalar(reader, "tokenizer.ggml.eos_token_id"),
                       _scalar(reader, "tokenizer.ggml.eot_token_id"),
                       _scalar(reader, "tokenizer.ggml.eom_token_id")) if i is not None}
    eos |= {i for i, (t, ty) in enumerate(zip(texts, types)) if ty == CONTROL and t in EOG_TEXTS}
    specials = tuple(t.encode() if ty in (CONTROL, USER_DEFINED) else p
                     for p, t, ty in zip(pieces, texts, types))
    add_bos = reader.fields.get("tokenizer.ggml.add_bos_token")
    return Vocab(tuple(pieces), frozenset(eos), _scalar(reader, "tokenizer.ggml.bos_token_id"),
                 fingerprint(texts, types), specials,
                 bool(add_bos.parts[add_bos.data[0]][0]) if add_bos is not None else True)


def _pieces(texts: list[str], types: list[int], model: str) -> list[bytes]:
    out: list[bytes] = []
    if model == "gpt2":
        dec = _byte_decoder()
        for t, ty in zip(texts, types):
            if ty in (CONTROL, UNUSED):
                out.append(b"")
            elif ty == USER_DEFINED:
                out.append(t.encode())
            else:
                try:
                    out.append(bytes(dec[c] for c in t))
                except KeyError:
                    out.append(t.encode())
        return out
    for t, ty in zip(texts, types):
        if ty in (CONTROL, UNUSED):
            out.append(b"")
        elif ty == BYTE and t.startswith("<0x") and t.endswith(">"):
            out.append(bytes([int(t[3:-1], 16)]))
        else:
            out.append(t.replace("\u2581", " ").encode())
    return out


def load_vocab(path: str | Path) -> Vocab:
    p = Path(path)
    st = p.stat()
    return _load(str(p.resolve()), st.st_mtime, st.st_size)


def from_pieces(pieces: list[bytes], eos: list[int], bos: int | None, fingerprint: str,
                specials: list[bytes] | None = None) -> Vocab:
    """A vocabulary served over HTTP (the worker's /v1/tightwad/vocab)."""
    return Vocab(tuple(pieces), frozenset(eos), bos, fingerprint, tuple(specials or ()))


def same_vocab(a: Vocab, b: Vocab) -> bool:
    """Whether token ids mean the same in both models."""
    return a.fingerprint == b.fingerprint


__all__ = ["Vocab", "fingerprint", "from_pieces", "load_vocab", "same_vocab"]

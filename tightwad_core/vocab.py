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
from struct import error as struct_error
from typing import Any

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
#: Tokens that end generation by their text, when llama.cpp itself cannot be
#: asked (see `engine_eog`): turn ends of common chat templates, and the
#: fill-in-the-middle pad / repository / file separators, which llama.cpp
#: also treats as the end.
EOG_TEXTS = frozenset({"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "</s>",
                       "<end_of_turn>", "<|end_of_text|>", "<|eom_id|>", "<|return|>",
                       "<|call|>", "<EOT>", "<eos>", "<end_of_utterance>",
                       "<|fim_pad|>", "<|repo_name|>", "<|fim_repo|>", "<|file_sep|>"})
#: GGUF keys whose token ids end generation.
EOG_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id", "tokenizer.ggml.fim_pad_token_id",
            "tokenizer.ggml.fim_rep_token_id", "tokenizer.ggml.fim_sep_token_id")


def engine_eog(path: str) -> frozenset[int] | None:
    """The end-of-generation set exactly as llama.cpp computes it, from a
    vocabulary-only load through the binding (the same engine the servers
    run); None where the binding is not installed or cannot read the file."""
    try:
        import llama_cpp
        from llama_cpp import _logger
    except ImportError:
        return None
    _logger.set_verbose(False)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not model:
        return None
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n = int(llama_cpp.llama_vocab_n_tokens(vocab))
        return frozenset(t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t))
    finally:
        llama_cpp.llama_model_free(model)


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


def read_metadata(path: str) -> dict[str, Any]:
    """A GGUF file's key/value metadata (strings decoded, arrays as lists),
    read straight from the header: the tensors are never touched, so this
    takes a fraction of a second where the gguf package's reader, which maps
    every array element, takes seconds on a 150k-token vocabulary."""
    from tightwad_core.runtime.ggufio import read_header

    return read_header(Path(path), arrays=True, tensors=False).kv


def _int(meta: dict[str, Any], key: str) -> int | None:
    v = meta.get(key)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _tokens(path: str) -> tuple[dict[str, Any], list[str], list[int]]:
    """The metadata, token texts and token types of a GGUF file."""
    try:
        meta = read_metadata(path)
    except (OSError, ValueError, struct_error) as exc:
        raise ValueError(f"{path}: cannot read its GGUF metadata: {exc}") from exc
    texts = meta.get("tokenizer.ggml.tokens")
    if not isinstance(texts, list):
        raise ValueError(f"{path}: no tokenizer.ggml.tokens in this GGUF")
    types = meta.get("tokenizer.ggml.token_type")
    if not isinstance(types, list) or len(types) != len(texts):
        types = [NORMAL] * len(texts)
    return meta, texts, types


def file_fingerprint(path: str | Path) -> str:
    """The vocabulary fingerprint of a GGUF file, from its metadata alone (for
    a caller that has the rest of the vocabulary from llama.cpp already)."""
    _, texts, types = _tokens(str(path))
    return fingerprint(texts, types)


@lru_cache(maxsize=8)
def _load(path: str, mtime: float, size: int) -> Vocab:
    meta, texts, types = _tokens(path)
    model = meta.get("tokenizer.ggml.model") or "gpt2"
    pieces = _pieces(texts, types, str(model))
    eos = set(engine_eog(path) or ())
    if not eos:  # no engine to ask: the GGUF's own ids, and the known texts
        eos = {i for i in (_int(meta, k) for k in EOG_KEYS)
               if i is not None and 0 <= i < len(texts)}
        eos |= {i for i, t in enumerate(texts) if t in EOG_TEXTS}
    specials = tuple(t.encode() if ty in (CONTROL, USER_DEFINED) else p
                     for p, t, ty in zip(pieces, texts, types))
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return Vocab(tuple(pieces), frozenset(eos), _int(meta, "tokenizer.ggml.bos_token_id"),
                 fingerprint(texts, types), specials,
                 bool(add_bos) if add_bos is not None else True)


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

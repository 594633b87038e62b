"""llama.cpp through llama-cpp-python's low-level bindings: one model, one
context per slot, and evaluation that returns logits only where asked.

Everything here is synchronous and may block for a long time; the engine
calls it through ``trio.to_thread.run_sync`` only. ctypes releases the GIL
during native calls, so slots evaluate in parallel.

The high-level ``llama_cpp.Llama`` is not used: with ``logits_all`` it keeps
an ``n_ctx x n_vocab`` score matrix per instance (gigabytes for a 150k
vocabulary). Instead each decode marks the positions whose logits are
needed in the batch, which is llama.cpp's per-batch equivalent.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tightwad_core.runtime.procs import usable_cores
from tightwad_core.vocab import Vocab, load_vocab

#: Most positions whose logits one decode call returns (bounds the output buffer).
MAX_OUTPUTS_PER_DECODE = 64


def _lib() -> Any:
    import llama_cpp

    return llama_cpp


def _quiet(verbose: bool) -> None:
    """llama.cpp's own log lines: errors only unless verbose."""
    from llama_cpp import _logger

    _logger.set_verbose(verbose)


class Model:
    """The loaded weights, the vocabulary and the chat template."""

    def __init__(self, path: Path, *, threads: int | None = None, verbose: bool = False) -> None:
        llama_cpp = _lib()
        _quiet(verbose)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.path = Path(path)
        self.threads = threads
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.ptr = model
        self.vocab_ptr = llama_cpp.llama_model_get_vocab(model)
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        self.metadata = self._metadata()
        self.vocab = self._vocab()
        self.chat_template: str | None = self.metadata.get("tokenizer.chat_template")

    def _metadata(self) -> dict[str, str]:
        llama_cpp = _lib()
        out: dict[str, str] = {}
        size = 1 << 14
        buf = ctypes.create_string_buffer(size)
        for i in range(llama_cpp.llama_model_meta_count(self.ptr)):
            n = llama_cpp.llama_model_meta_key_by_index(self.ptr, i, buf, size)
            if n < 0:
                continue
            key = buf.value.decode("utf-8", "replace")
            n = llama_cpp.llama_model_meta_val_str_by_index(self.ptr, i, buf, size)
            if n >= size:  # long values (chat templates): fetch again with room
                big = ctypes.create_string_buffer(n + 1)
                llama_cpp.llama_model_meta_val_str_by_index(self.ptr, i, big, n + 1)
                out[key] = big.value.decode("utf-8", "replace")
            elif n >= 0:
                out[key] = buf.value.decode("utf-8", "replace")
        return out

    def piece(self, token: int, special: bool) -> bytes:
        llama_cpp = _lib()
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab_ptr, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab_ptr, token, buf, -n, 0, special)
        return buf.raw[:n]

    def _vocab(self) -> Vocab:
        """The core vocabulary record: llama.cpp's own pieces and end-of-generation
        set, and the fingerprint of the GGUF's token list (what every side compares)."""
        llama_cpp = _lib()
        n = int(llama_cpp.llama_vocab_n_tokens(self.vocab_ptr))
        specials = tuple(self.piece(t, True) for t in range(n))
        text = tuple(self.piece(t, False) for t in range(n))
        eos = frozenset(t for t in range(n) if llama_cpp.llama_vocab_is_eog(self.vocab_ptr, t))
        bos = int(llama_cpp.llama_vocab_bos(self.vocab_ptr))
        return Vocab(pieces=text, eos=eos, bos=bos if 0 <= bos < n else None,
                     fingerprint=load_vocab(self.path).fingerprint, specials=specials,
                     add_bos=bool(llama_cpp.llama_vocab_get_add_bos(self.vocab_ptr)))

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        llama_cpp = _lib()
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab_ptr, data, len(data), buf, cap, add_special,
                                     parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab_ptr, data, len(data), buf, cap,
                                         add_special, parse_special)
            if n < 0:
                raise RuntimeError("tokenization failed")
        return list(buf[:n])

    def system_info(self) -> str:
        """llama.cpp's own line about the build and CPU features it runs with."""
        raw = _lib().llama_print_system_info()
        return (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).strip()

    def new_context(self, n_ctx: int, n_batch: int) -> Context:
        return Context(self, n_ctx, n_batch)

    def close(self) -> None:
        if self.ptr:
            _lib().llama_model_free(self.ptr)
            self.ptr = None


class Context:
    """One llama.cpp context (one slot's KV cache) and what it holds.

    ``tokens`` is exactly the sequence whose keys and values are in the
    cache, position 0 first; it only changes together with the cache.
    """

    def __init__(self, model: Model, n_ctx: int, n_batch: int) -> None:
        llama_cpp = _lib()
        self.model = model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = 1
        # llama.cpp's own default is a fixed 4 threads, which oversubscribes small machines
        threads = model.threads or usable_cores()
        params.n_threads = threads
        params.n_threads_batch = threads
        ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.ptr = ctx
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.tokens: list[int] = []

    def truncate(self, keep: int) -> None:
        """Drop the cache entries at positions >= keep."""
        llama_cpp = _lib()
        if keep >= len(self.tokens):
            return
        if keep == 0 or not llama_cpp.llama_memory_seq_rm(self.mem, 0, keep, -1):
            llama_cpp.llama_memory_clear(self.mem, True)
            keep = 0
        del self.tokens[keep:]

    def eval(self, past: int, new: Sequence[int], need: int,
             on_row: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray | None:
        """Make the cache hold ``tokens[:past] + new`` and return the logits of
        its last ``need`` positions (rows in order).

        Cache entries shared with the wanted sequence are kept (so a repeated
        prompt prefix is not evaluated again), except that the last ``need``
        positions are always evaluated. With ``on_row`` the rows are handed
        over one at a time as ``on_row(position, row)`` (the row is only valid
        during the call) and nothing is returned. On any failure the cache is
        cleared, so ``tokens`` never disagrees with it.
        """
        llama_cpp = _lib()
        want = self.tokens[:past] + list(new)
        if len(want) > self.n_ctx:
            raise ValueError(f"{len(want)} tokens do not fit the context of {self.n_ctx}")
        need = max(1, min(need, len(want)))
        first_out = len(want) - need
        limit = min(len(self.tokens), first_out)
        common = min(past, limit)  # want[:past] is tokens[:past] by construction
        while common < limit and self.tokens[common] == want[common]:
            common += 1
        try:
            self.truncate(common)
            start = len(self.tokens)
            n_vocab = self.model.vocab.n_vocab
            rows: list[np.ndarray] = []
            pos = start
            while pos < len(want):
                end = min(len(want), pos + self.n_batch)
                if end > first_out:  # bound the outputs of one decode
                    end = min(end, max(first_out, pos) + MAX_OUTPUTS_PER_DECODE)
                b = self.batch
                outs: list[tuple[int, int]] = []
                for i, p in enumerate(range(pos, end)):
                    b.token[i] = want[p]
                    b.pos[i] = p
                    b.n_seq_id[i] = 1
                    b.seq_id[i][0] = 0
                    b.logits[i] = p >= first_out
                    if p >= first_out:
                        outs.append((i, p))
                b.n_tokens = end - pos
                rc = llama_cpp.llama_decode(self.ptr, b)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
                self.tokens.extend(want[pos:end])
                for i, p in outs:
                    ptr = llama_cpp.llama_get_logits_ith(self.ptr, i)
                    row = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
                    if on_row is not None:
                        on_row(p, row)
                    else:
                        rows.append(row.copy())
                pos = end
        except BaseException:
            llama_cpp.llama_memory_clear(self.mem, True)
            self.tokens.clear()
            raise
        return None if on_row is not None else np.stack(rows)

    def close(self) -> None:
        llama_cpp = _lib()
        if self.ptr:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None


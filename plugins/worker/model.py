"""llama.cpp through llama-cpp-python's low-level bindings: one model, one
context whose sequences are the sessions' KV caches, and evaluation of many
sequences' tokens in one ``llama_decode`` that returns logits only where
asked.

Everything here is synchronous and may block for a long time; only the
scheduler calls it, through ``trio.to_thread.run_sync``, one call at a time
(one thread owns the context at any moment).

The high-level ``llama_cpp.Llama`` is not used: with ``logits_all`` it keeps
an ``n_ctx x n_vocab`` score matrix per instance (gigabytes for a 150k
vocabulary). Instead each decode marks the positions whose logits are
needed in the batch, which is llama.cpp's per-batch equivalent.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tightwad_core.cluster.pool import OUTPUT_LAYER
from tightwad_core.runtime.procs import usable_cores
from tightwad_core.vocab import Vocab, file_fingerprint
from tightwad_plugins.worker import devices as devs
from tightwad_plugins.worker.routing import recorder_for

#: Most positions whose logits one decode call returns (bounds the output buffer;
#: a context recording routing asks llama.cpp for every position of a batch, see Context.step).
MAX_OUTPUTS_PER_DECODE = 128
#: A prefix another sequence holds is copied when it saves at least this many evaluations.
MIN_COPY = 16


def _lib() -> Any:
    import llama_cpp

    return llama_cpp


def _quiet(verbose: bool) -> None:
    """llama.cpp's own log lines: errors only unless verbose."""
    from llama_cpp import _logger

    _logger.set_verbose(verbose)


class Model:
    """The loaded weights, the vocabulary and the chat template."""

    def __init__(self, path: Path, *, threads: int | None = None, verbose: bool = False,
                 n_gpu_layers: int | None = None, devices: list[str] | None = None,
                 rpc: list[str] | None = None, tensor_split: list[float] | None = None,
                 overrides: list[tuple[str, str]] | None = None) -> None:
        llama_cpp = _lib()
        _quiet(verbose)
        llama_cpp.llama_backend_init()
        self.path = Path(path)
        self.threads = threads
        pool = devs.add_rpc_servers(rpc) if rpc else []
        self.available = devs.list_devices()
        # the devices layers are offloaded to: the ones named, else the rpc-servers, else every GPU
        named = None if devices is None else [d for d in devices if d.lower() not in ("cpu", "none")]
        self.devices = pool if named is None and pool else devs.pick(named, self.available)
        overrides = list(overrides or [])
        if n_gpu_layers is None and pool and self.devices == pool:
            # llama.cpp offloads the last N of the n + 1 layers (the output layer is the
            # last): offload all, and keep the output layer here, or the last rpc-server
            # sends float32 logits for every position back over the network
            blocks = _block_count(self.path)
            if blocks is not None:
                n_gpu_layers = blocks + 1
                if not overrides:
                    overrides = [(OUTPUT_LAYER, "CPU")]
        n_layers = -1 if n_gpu_layers is None else n_gpu_layers
        self.n_gpu_layers = n_layers if self.devices else 0
        self.overrides = overrides
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = self.n_gpu_layers
        self._dev_list = devs.c_list(self.devices)  # referenced until the model is freed
        params.devices = ctypes.cast(self._dev_list, ctypes.c_void_p)
        if tensor_split:  # share of the offloaded layers per device, in device order
            self._split = (ctypes.c_float * max(len(tensor_split), 128))(*tensor_split)
            params.tensor_split = ctypes.cast(self._split, ctypes.POINTER(ctypes.c_float))
        if overrides:  # tensors whose name matches a pattern go to that device's buffers
            self._overrides = devs.c_overrides(overrides, self.available)
            params.tensor_buft_overrides = ctypes.cast(self._overrides, ctypes.c_void_p)
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.ptr = model
        self.n_layer = int(llama_cpp.llama_model_n_layer(model))
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
                     fingerprint=file_fingerprint(self.path), specials=specials,
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

    def placement(self) -> str:
        """Where the layers run, for the start-up log and /v1/tightwad/info."""
        if not self.devices or self.n_gpu_layers == 0:
            return "all layers on the CPU"
        n = self.n_layer + 1 if self.n_gpu_layers < 0 else min(self.n_gpu_layers, self.n_layer + 1)
        names = ", ".join(d.line() for d in self.devices)
        text = f"the last {n} of {self.n_layer + 1} layers (the output layer is the last) on {names}"
        if self.overrides:
            text += "; overridden: " + ", ".join(f"{p}={d}" for p, d in self.overrides)
        return text

    def close(self) -> None:
        if self.ptr:
            _lib().llama_model_free(self.ptr)
            self.ptr = None


def _block_count(path: Path) -> int | None:
    from tightwad_core.vocab import read_metadata

    meta = read_metadata(str(path))
    arch = meta.get("general.architecture")
    n = meta.get(f"{arch}.block_count")
    return int(n) if isinstance(n, int) else None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(eq=False)
class Sequence:
    """One sequence of the context. ``tokens`` is exactly what its KV cache
    holds, position 0 first; it only changes together with the cache."""

    index: int
    limit: int  # most tokens it may hold
    tokens: list[int] = field(default_factory=list)
    prompt_lps: Any = None  # log-probabilities of a prompt echoed on it (see generate.py)


class JobCancelled(Exception):
    """The job's caller went away before it was evaluated to the end."""


@dataclass(eq=False)
class Job:
    """"Make ``seq`` hold ``seq.tokens[:past] + new`` and hand over the logits of
    its last ``need`` positions": one request's part of a batched decode.

    Cache entries shared with the wanted sequence are kept (a repeated prefix
    is not evaluated again), except that the last ``need`` positions are
    always evaluated. Rows go to ``on_row(position, row)`` as they come (valid
    during the call only) or are collected; ``finish(rows)`` then runs in the
    engine thread and its value is the job's result. Long inputs take several
    decodes; other jobs' tokens share each one.
    """

    seq: Sequence
    past: int
    new: list[int]
    need: int
    on_row: Callable[[int, np.ndarray], None] | None = None
    finish: Callable[[list[np.ndarray]], Any] | None = None
    # set by the context
    want: list[int] = field(default_factory=list)
    first_out: int = 0
    pos: int = -1  # next position to evaluate; -1 until prepared
    rows: list[np.ndarray] = field(default_factory=list)
    result: Any = None
    error: BaseException | None = None
    finished: bool = False
    cancelled: bool = False  # set by the caller, read at the next step


class Context:
    """One llama.cpp context with ``n_seq`` sequences of up to ``n_ctx_seq``
    tokens each over one KV cache (unified: sequences may share cells)."""

    def __init__(self, model: Model, n_seq: int, n_ctx_seq: int, n_batch: int,
                 unified: bool = True, record_routing: bool = False) -> None:
        llama_cpp = _lib()
        self.model = model
        params = llama_cpp.llama_context_default_params()
        # --record-routing: count the router's choices (None for a model without experts)
        self.record_routing = record_routing
        self.routing = recorder_for(model.path, model.metadata) if record_routing else None
        if self.routing is not None:  # the recorder holds the callback as long as we live
            params.cb_eval = self.routing.callback
        params.n_ctx = n_ctx_seq * n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.kv_unified = unified
        # llama.cpp's own default is a fixed 4 threads, which oversubscribes small machines
        threads = model.threads or usable_cores()
        params.n_threads = threads
        params.n_threads_batch = threads
        ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.ptr = ctx
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.unified = unified
        self.n_ctx_seq = min(n_ctx_seq, int(llama_cpp.llama_n_ctx_seq(ctx)))
        self.n_batch = n_batch
        # a token may belong to every sequence at once (tree verification, see tree.py)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq)
        self.seqs = [Sequence(i, self.n_ctx_seq) for i in range(n_seq)]
        self.decodes = 0  # llama_decode calls
        self.batched = 0  # decodes that carried more than one sequence
        self.evaluated = 0  # tokens evaluated, all sequences together
        self.tree_decodes = 0  # decodes that checked a tree of branches

    # ------------------------------------------------------------ sequences

    def truncate(self, seq: Sequence, keep: int) -> None:
        """Drop ``seq``'s cache entries at positions >= keep."""
        llama_cpp = _lib()
        if keep >= len(seq.tokens):
            return
        if keep == 0 or not llama_cpp.llama_memory_seq_rm(self.mem, seq.index, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.mem, seq.index, -1, -1)
            keep = 0
        del seq.tokens[keep:]

    def clear(self, seq: Sequence) -> None:
        _lib().llama_memory_seq_rm(self.mem, seq.index, -1, -1)
        seq.tokens.clear()

    def _prepare(self, job: Job) -> None:
        seq = job.seq
        want = seq.tokens[:job.past] + list(job.new)
        if len(want) > seq.limit:
            raise ValueError(f"{len(want)} tokens do not fit the context of {seq.limit}")
        need = max(1, min(job.need, len(want)))
        first_out = len(want) - need
        limit = min(len(seq.tokens), first_out)
        common = min(job.past, limit)  # want[:past] is tokens[:past] by construction
        while common < limit and seq.tokens[common] == want[common]:
            common += 1
        self.truncate(seq, common)
        if self.unified:  # a longer shared prefix in another sequence is copied, not evaluated
            best, best_n = None, len(seq.tokens)
            for other in self.seqs:
                if other is not seq:
                    n = common_prefix(other.tokens, want[:first_out])
                    if n > best_n:
                        best, best_n = other, n
            if best is not None and best_n - len(seq.tokens) >= MIN_COPY:
                llama_cpp = _lib()
                self.clear(seq)
                llama_cpp.llama_memory_seq_cp(self.mem, best.index, seq.index, 0, best_n)
                seq.tokens[:] = want[:best_n]
        job.want, job.first_out, job.pos = want, first_out, len(seq.tokens)

    # ------------------------------------------------------------ one step

    def step(self, jobs: list[Job]) -> None:
        """One ``llama_decode`` over as many of the jobs' next tokens as fit in
        a batch: the short ones (verify, draft and generation steps) first,
        then prompt chunks. Jobs that are done get ``finished``; a failed
        decode fails every job in it and clears their sequences."""
        llama_cpp = _lib()
        live: list[Job] = []
        for j in jobs:
            if j.finished:
                continue
            if j.cancelled:
                j.error, j.finished = JobCancelled(), True
                continue
            if j.pos < 0:
                try:
                    self._prepare(j)
                except Exception as exc:  # noqa: BLE001 (handed to the caller)
                    j.error, j.finished = exc, True
                    continue
            live.append(j)
        live.sort(key=lambda j: len(j.want) - j.pos)
        b = self.batch
        n = outs_total = 0
        plan: list[tuple[Job, int, int]] = []
        outs: list[tuple[int, Job, int]] = []
        for j in live:
            room = self.n_batch - n
            if room <= 0:
                break
            end = min(len(j.want), j.pos + room)
            if end > j.first_out:  # bound the outputs of one decode
                end = min(end, max(j.first_out, j.pos) + MAX_OUTPUTS_PER_DECODE - outs_total)
            if end <= j.pos:
                continue
            for p in range(j.pos, end):
                b.token[n] = j.want[p]
                b.pos[n] = p
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = j.seq.index
                # a recording context asks for every position, or llama.cpp skips the
                # last layer (and its routing) for the others
                b.logits[n] = p >= j.first_out or self.routing is not None
                if p >= j.first_out:
                    outs.append((n, j, p))
                n += 1
            outs_total = len(outs)
            plan.append((j, j.pos, end))
        if not plan:
            return
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self.ptr, b)
        self.decodes += 1
        self.evaluated += n
        self.batched += len(plan) > 1
        if rc != 0:
            for j, _, _ in plan:
                self.clear(j.seq)
                j.error, j.finished = RuntimeError(f"llama_decode returned {rc}"), True
            return
        n_vocab = self.model.vocab.n_vocab
        for j, start, end in plan:
            j.seq.tokens.extend(j.want[start:end])
            j.pos = end
        for i, j, p in outs:
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ptr, i),
                                        shape=(n_vocab,))
            try:
                if j.error is None:
                    if j.on_row is not None:
                        j.on_row(p, row)
                    else:
                        j.rows.append(row)  # a view: valid until the next decode
            except Exception as exc:  # noqa: BLE001
                j.error = exc
        for j, _, end in plan:
            if j.error is None and end < len(j.want):
                j.rows = [r.copy() for r in j.rows]  # kept across decodes
                continue
            j.finished = True
            if j.error is None and j.finish is not None:
                try:
                    j.result = j.finish(j.rows)
                except Exception as exc:  # noqa: BLE001
                    j.error = exc
            j.rows = []

    def close(self) -> None:
        llama_cpp = _lib()
        if self.ptr:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

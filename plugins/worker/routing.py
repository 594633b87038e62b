"""Which experts a Mixture-of-Experts model routes each token to, counted
while the worker runs (``tightwad worker --record-routing``).

llama.cpp names the router's choice of each MoE layer ``ffn_moe_topk-<layer>``
(an I32 tensor of ``[n_expert_used, n_tokens]``, see ``build_moe_ffn`` in
``src/llama-graph.cpp``). The context's graph evaluation callback
(``llama_context_params.cb_eval``) asks for exactly those tensors; the
scheduler then computes the graph up to each of them, hands it over, and goes
on. The callback runs inside ``llama_decode`` in the engine thread, so it only
reads the ids and adds them up; a ubatch's counts join the totals when its
last MoE layer has been seen, under a lock, so a reader always sees whole
ubatches.

llama.cpp evaluates the last layer only for positions whose logits are asked
for; a recording context asks for every position (see ``Context.step``), so
every MoE layer sees every evaluated token.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from tightwad_core.errors import NotFound, TightwadError

log = logging.getLogger("tightwad.worker")

TOPK_PREFIX = b"ffn_moe_topk-"
GGML_TYPE_I32 = 26  # enum ggml_type (ggml/include/ggml.h)
GGML_MAX_DIMS = 4
GGML_MAX_OP_PARAMS = 64
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object): offs, size, next, type, padding[4]


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml/include/ggml.h (the pinned source)."""

    _fields_ = [
        ("type", ctypes.c_int),  # enum ggml_type
        ("buffer", ctypes.c_void_p),  # struct ggml_backend_buffer *
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),  # elements per dimension
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),  # stride in bytes per dimension
        ("op", ctypes.c_int),  # enum ggml_op
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


NAME_OFFSET: int = GgmlTensor.name.offset

_base: Any = None


def _ggml_base() -> Any:
    """libggml-base from the directory the binding loaded libllama from, with the
    tensor functions the callback uses; checks the struct layout against it."""
    global _base
    if _base is None:
        import llama_cpp.llama_cpp as ll

        lib = ctypes.CDLL(str(Path(ll._lib._name).parent / "libggml-base.so"))
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_get_name.restype = ctypes.c_void_p
        lib.ggml_tensor_overhead.argtypes = []
        lib.ggml_tensor_overhead.restype = ctypes.c_size_t
        size = int(lib.ggml_tensor_overhead()) - GGML_OBJECT_SIZE
        if size != ctypes.sizeof(GgmlTensor):
            raise RuntimeError(f"this llama.cpp's ggml_tensor is {size} bytes, not the "
                               f"{ctypes.sizeof(GgmlTensor)} routing recording was written for")
        _base = lib
    return _base


class RoutingNotRecorded(NotFound):
    """GET /v1/tightwad/routing on a worker started without --record-routing."""

    code = "routing_not_recorded"


class NoExperts(TightwadError):
    """Routing asked of a model that has no experts."""

    status = 409
    type = "invalid_request_error"
    code = "not_moe"


class RoutingRecorder:
    """Per-layer, per-expert counts of the router's top-K choices."""

    def __init__(self, model: str, architecture: str, layers: list[int], n_expert: int,
                 n_used: int) -> None:
        self.model = model  # the GGUF's file name
        self.architecture = architecture
        self.layers = list(layers)  # the MoE layers, in order
        self.n_expert = n_expert
        self.n_used = n_used
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._lib = _ggml_base()
        self._lock = threading.Lock()  # guards the totals (read by the HTTP side)
        self.counts = np.zeros((len(self.layers), n_expert), dtype=np.int64)
        self.tokens = 0
        self.batches = 0
        self.error: str | None = None  # set once something unexpected was seen; recording stops
        # the ubatch being evaluated (engine thread only)
        self._pending = np.zeros_like(self.counts)
        self._pending_tokens = -1  # -1: no ubatch open
        self._next = 0  # row of the MoE layer expected next
        self._checked = False
        # keep the ctypes function object alive as long as the context that calls it
        import llama_cpp

        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._eval)

    # ------------------------------------------------------------ engine thread

    def _eval(self, t: int, ask: bool, _user: Any) -> bool:
        if self.error is not None:
            return not ask  # asking for nothing; never stop a computation
        if ask:
            return bool(ctypes.string_at(t + NAME_OFFSET, len(TOPK_PREFIX)) == TOPK_PREFIX)
        try:
            self._take(t)
        except Exception as exc:  # noqa: BLE001 (an exception must not cross into C)
            self.error = f"routing recording stopped: {exc}"
            log.error("%s", self.error)
        return True  # go on computing the graph

    def _take(self, t: int) -> None:
        if not self._checked:
            name_at = int(self._lib.ggml_get_name(t))
            if name_at != t + NAME_OFFSET:
                raise RuntimeError("ggml_tensor's layout differs from the one expected")
            self._checked = True
        name = ctypes.string_at(t + NAME_OFFSET).decode("ascii", "replace")
        layer = int(name[len(TOPK_PREFIX):])
        tensor = GgmlTensor.from_address(t)
        if tensor.type != GGML_TYPE_I32:
            raise RuntimeError(f"{name} has ggml type {tensor.type}, not I32")
        k, n_tokens = int(tensor.ne[0]), int(tensor.ne[1])
        if k != self.n_used or tensor.ne[2] != 1 or tensor.ne[3] != 1:
            raise RuntimeError(f"{name} has shape {list(tensor.ne)}, expected "
                               f"[{self.n_used}, n_tokens, 1, 1]")
        row = self._row.get(layer)
        if row is None:
            raise RuntimeError(f"{name}: layer {layer} has no experts in the GGUF")
        if row == 0:  # a new ubatch
            self._pending[:] = 0
            self._pending_tokens, self._next = n_tokens, 0
        if row != self._next or n_tokens != self._pending_tokens:
            raise RuntimeError(f"{name}: {n_tokens} tokens out of order in the ubatch "
                               f"(expected layer {self.layers[self._next]}, "
                               f"{self._pending_tokens} tokens)")
        stride = int(tensor.nb[1])  # the top-K is a view of the full argsort: rows are wider
        if tensor.nb[0] != 4 or stride % 4 or stride < 4 * k:
            raise RuntimeError(f"{name} has strides {list(tensor.nb)}")
        if n_tokens:
            buf = np.empty(n_tokens * (stride // 4), dtype=np.int32)
            nbytes = int(self._lib.ggml_nbytes(t))
            if nbytes > buf.nbytes:
                raise RuntimeError(f"{name} holds {nbytes} bytes, more than its shape")
            self._lib.ggml_backend_tensor_get(t, buf.ctypes.data, 0, nbytes)
            ids = buf.reshape(n_tokens, stride // 4)[:, :k]
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.n_expert:
                raise RuntimeError(f"{name} names expert {lo if lo < 0 else hi} of "
                                   f"{self.n_expert}")
            self._pending[row] += np.bincount(ids.ravel(), minlength=self.n_expert)
        self._next = row + 1
        if self._next == len(self.layers):  # the ubatch's last MoE layer: commit it
            with self._lock:
                self.counts += self._pending
                self.tokens += n_tokens
                self.batches += 1
            self._pending_tokens = -1

    # ------------------------------------------------------------ any thread

    def profile(self, *, reset: bool = False) -> dict[str, Any]:
        """The counts so far in the routing profile format (whole ubatches only);
        with ``reset`` the totals start again from zero."""
        with self._lock:
            counts, tokens, batches = self.counts.copy(), self.tokens, self.batches
            if reset:
                self.counts[:] = 0
                self.tokens = self.batches = 0
        return {"format": "tightwad-moe-routing", "version": 1, "model": self.model,
                "architecture": self.architecture, "expert_count": self.n_expert,
                "expert_used_count": self.n_used, "tokens": tokens, "batches": batches,
                "layers": [{"layer": layer, "counts": [int(c) for c in counts[i]]}
                           for i, layer in enumerate(self.layers)]}


def shard_paths(path: Path, metadata: dict[str, str]) -> list[Path]:
    """Every file of a split GGUF (``NAME-00001-of-00003.gguf`` ...), else ``path``."""
    try:
        count = int(metadata.get("split.count", "1"))
    except ValueError:
        count = 1
    m = re.fullmatch(r"(.*)-\d{5}-of-\d{5}\.gguf", path.name)
    if count <= 1 or m is None:
        return [path]
    return [path.with_name(f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf")
            for i in range(1, count + 1)]


def recorder_for(path: Path, metadata: dict[str, str]) -> RoutingRecorder | None:
    """A recorder for the GGUF at ``path`` (whose llama.cpp metadata is given),
    or None when it has no experts. The MoE layers are those with a router and
    expert tensors, in any file of a split GGUF."""
    from tightwad_core.moe.inspect import inspect_file

    arch = metadata.get("general.architecture", "unknown")
    found: set[int] = set()
    for shard in shard_paths(path, metadata):
        info = inspect_file(shard)
        routers = {x["layer"] for x in info["layers"] if x["router"]}
        experts = {x["layer"] for x in info["layers"]
                   if any(t["kind"] != "shared" for t in x["tensors"])}
        found |= routers | experts
    layers = sorted(found)
    try:
        n_expert = int(metadata.get(f"{arch}.expert_count", "0"))
        n_used = int(metadata.get(f"{arch}.expert_used_count", "0"))
    except ValueError:
        return None
    if not (layers and 0 < n_used <= n_expert):
        return None
    return RoutingRecorder(path.name, arch, layers, n_expert, n_used)

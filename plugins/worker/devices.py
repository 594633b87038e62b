"""The compute devices llama.cpp's backends offer (ggml's device registry),
read through ctypes from the same libraries the binding loaded.

A worker built for CPU lists ``CPU`` alone; a CUDA, ROCm, Metal or Vulkan
build adds its GPUs (``CUDA0``, ``ROCm0``, ``MTL0``, ``Vulkan0``, ...), and
an RPC build lists the ``RPC[host:port]`` devices that were registered.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ggml_backend_dev_type values (ggml-backend.h)
KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
OFFLOAD_KINDS = frozenset({"gpu", "igpu"})


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str  # cpu | gpu | igpu | accel | meta
    free: int  # bytes of memory free on it now (0 when the backend does not say)
    total: int
    handle: int  # ggml_backend_dev_t

    def line(self) -> str:
        mem = f", {self.free / 2**30:.1f}/{self.total / 2**30:.1f} GiB free" if self.total else ""
        return f"{self.name} ({self.kind}: {self.description}{mem})"


_ggml: Any = None


def _lib() -> Any:
    """libggml (the device registry), from the directory the binding loaded libllama from."""
    global _ggml
    if _ggml is None:
        import llama_cpp.llama_cpp as ll

        here = Path(ll._lib._name).parent
        lib = ctypes.CDLL(str(here / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_type.restype = ctypes.c_int
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.POINTER(ctypes.c_size_t)]
        lib.ggml_backend_dev_memory.restype = None
        _ggml = lib
    return _ggml


def _device(dev: int) -> Device:
    lib = _lib()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return Device(
        name=(lib.ggml_backend_dev_name(dev) or b"?").decode("utf-8", "replace"),
        description=(lib.ggml_backend_dev_description(dev) or b"").decode("utf-8", "replace"),
        kind=KINDS.get(lib.ggml_backend_dev_type(dev), "other"),
        free=int(free.value), total=int(total.value), handle=int(dev))


def list_devices() -> list[Device]:
    """Every device llama.cpp can load onto now (call after llama_backend_init)."""
    lib = _lib()
    return [_device(lib.ggml_backend_dev_get(i)) for i in range(lib.ggml_backend_dev_count())]


def add_rpc_servers(endpoints: list[str]) -> list[Device]:
    """Register each rpc-server with llama.cpp's RPC backend (call after
    llama_backend_init) and return their devices (all of each server's), in
    the order given."""
    import llama_cpp.llama_cpp as ll

    here = Path(ll._lib._name).parent
    rpc = ctypes.CDLL(str(here / "libggml-rpc.so"), mode=ctypes.RTLD_GLOBAL)
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    lib = _lib()
    lib.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    out = []
    for ep in endpoints:
        reg = rpc.ggml_backend_rpc_add_server(ep.encode())
        if not reg or lib.ggml_backend_reg_dev_count(reg) < 1:
            raise ValueError(f"llama.cpp could not add the rpc-server {ep}")
        for i in range(lib.ggml_backend_reg_dev_count(reg)):
            out.append(_device(lib.ggml_backend_reg_dev_get(reg, i)))
    return out


def pick(names: list[str] | None, available: list[Device]) -> list[Device]:
    """The devices named (case-insensitive), in the order given; ``ValueError``
    naming what exists when one is unknown. ``None``: every offload device."""
    if names is None:
        return [d for d in available if d.kind in OFFLOAD_KINDS]
    by_name = {d.name.lower(): d for d in available}
    chosen = []
    for n in names:
        d = by_name.get(n.strip().lower())
        if d is None:
            have = ", ".join(d.name for d in available) or "none"
            raise ValueError(f"no device named {n!r}; this build of llama.cpp has: {have}")
        if d not in chosen:
            chosen.append(d)
    return chosen


class _Override(ctypes.Structure):
    """llama_model_tensor_buft_override: a tensor-name pattern and a buffer type."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def c_overrides(pairs: list[tuple[str, str]], available: list[Device]) -> Any:
    """A NULL-terminated override array for llama_model_params.tensor_buft_overrides:
    each (pattern, device name) puts matching tensors in that device's buffers
    (keep a reference to it until the model is loaded)."""
    lib = _lib()
    lib.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    by_name = {d.name.lower(): d for d in available}
    arr = (_Override * (len(pairs) + 1))()
    for i, (pattern, name) in enumerate(pairs):
        dev = by_name.get(name.lower())
        if dev is None:
            have = ", ".join(d.name for d in available) or "none"
            raise ValueError(f"--override-tensor: no device named {name!r}; this build has: {have}")
        arr[i].pattern = pattern.encode()
        arr[i].buft = lib.ggml_backend_dev_buffer_type(dev.handle)
    return arr


def c_list(devices: list[Device]) -> Any:
    """A NULL-terminated ``ggml_backend_dev_t`` array for llama_model_params.devices
    (keep a reference to it until the model is loaded)."""
    arr = (ctypes.c_void_p * (len(devices) + 1))(*[d.handle for d in devices], None)
    return arr

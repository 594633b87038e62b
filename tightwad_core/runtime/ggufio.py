"""The GGUF header reader: metadata, tensor infos, and where each lies.

One parser for the whole project (the vocabulary, the cluster's layer
sizes, the MoE tools), because none of the existing ones fits all three:

gguf-py's reader maps every array element (seconds on a 150k-token
vocabulary) and rejects tensor types newer than its release (llama-quantize
of the pinned engine writes ``Q1_0`` and ``Q2_0``, types 41 and 42, before
gguf-py knows them), and a tool that only moves bytes must not care. This
reader parses the header from a memory map (the data is never read),
records where the key/value section lies so it can be copied verbatim, and
takes each type's block and byte size from gguf-py when it knows the type,
else asks the engine's own GGUF parser (``libggml-base``) for the sizes.
Every problem is a `GgufError` (a ``ValueError``) with one line for the user.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types: struct code of each fixed-size one; 8 string, 9 array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4
SMALL_ARRAY = 64  # without ``arrays``: arrays up to this length are kept as lists
MAX_NESTING = 8    # arrays of arrays deeper than this are refused as corrupt


class GgufError(ValueError):
    """A file that cannot be read as GGUF; the message is one line for the user."""


MoeError = GgufError  # the MoE tools' name for it


@dataclass(frozen=True)
class LongArray:
    """A metadata array left unread (``read_header(arrays=False)``)."""

    item_type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost first
    ggml_type: int
    type_name: str
    offset: int              # absolute, in the file
    nbytes: int


@dataclass
class Header:
    path: Path
    size: int
    version: int
    endian: str                   # struct prefix, "<" or ">"
    kv: dict[str, Any]            # scalars, strings and arrays as lists (long ones as LongArray unless read)
    kv_span: tuple[int, int]      # the raw key/value section
    alignment: int
    data_offset: int
    tensors: list[TensorInfo]

    def meta(self, key: str) -> Any:
        return self.kv.get(key)


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@lru_cache(maxsize=1)
def _engine_ggml() -> Any:
    """The engine's libggml-base (where llama-cpp-python loads it from), or None."""
    try:
        import llama_cpp.llama_cpp as ll

        here = Path(ll._lib._name).parent
        lib = ctypes.CDLL(str(here / "libggml-base.so"))
    except (ImportError, OSError, AttributeError):
        return None
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.gguf_free.restype = None
    lib.gguf_find_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_find_tensor.restype = ctypes.c_int64
    lib.gguf_get_tensor_size.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_size.restype = ctypes.c_size_t
    lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_type.restype = ctypes.c_int
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_log_get.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
    lib.ggml_log_get.restype = None
    lib.ggml_log_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_log_set.restype = None
    return lib


_LogCallback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_SILENT = _LogCallback(lambda level, text, user: None)  # the engine's parser complains on stderr


def _known(ggml_type: int) -> tuple[str, int, int] | None:
    """(name, elements per block, bytes per block) of a type gguf-py knows, or None."""
    import gguf

    try:
        t = gguf.GGMLQuantizationType(ggml_type)
        block, size = gguf.GGML_QUANT_SIZES[t]
    except (ValueError, KeyError):
        return None
    return t.name, block, size


def _engine_sizes(path: Path, names: list[str]) -> dict[str, tuple[str, int]]:
    """Type name and byte size of the named tensors as the engine's own GGUF
    parser sees them (it checks every tensor type against the engine's list)."""
    lib = _engine_ggml()
    if lib is None:
        return {}
    prev_cb, prev_ud = ctypes.c_void_p(), ctypes.c_void_p()
    lib.ggml_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_ud))
    lib.ggml_log_set(ctypes.cast(_SILENT, ctypes.c_void_p), None)
    try:
        ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    finally:
        lib.ggml_log_set(prev_cb, prev_ud)
    if not ctx:
        return {}
    try:
        out = {}
        for name in names:
            i = lib.gguf_find_tensor(ctx, name.encode())
            if i >= 0:
                type_name = lib.ggml_type_name(lib.gguf_get_tensor_type(ctx, i)) or b"?"
                out[name] = (type_name.decode().upper(), int(lib.gguf_get_tensor_size(ctx, i)))
        return out
    finally:
        lib.gguf_free(ctx)


class _Cursor:
    def __init__(self, buf: mmap.mmap, endian: str, path: Path) -> None:
        self.buf, self.e, self.at, self.path = buf, endian, 0, path

    def take(self, code: str) -> Any:
        fmt = self.e + code
        n = struct.calcsize(fmt)
        if self.at + n > len(self.buf):
            raise GgufError(f"{self.path} is truncated inside its header")
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += n
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.at + n > len(self.buf):
            raise GgufError(f"{self.path} is truncated or corrupt: a {n:,}-byte string in its header")
        raw = bytes(self.buf[self.at:self.at + n])
        self.at += n
        return raw.decode("utf-8", "replace")

    def value(self, vtype: int, keep: bool = True, full: bool = False, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise GgufError(f"{self.path} is corrupt: unknown metadata value type {vtype}")
        if depth >= MAX_NESTING:
            raise GgufError(f"{self.path} is corrupt: arrays nested {depth} deep in its header")
        itype, count = self.take("I"), self.take("Q")
        if count > len(self.buf) - self.at:  # every item takes at least a byte
            raise GgufError(f"{self.path} is corrupt: an array of {count:,} items in its header")
        keep = keep and (full or count <= SMALL_ARRAY)
        if itype in _SCALAR:
            n = count * struct.calcsize(_SCALAR[itype])
            if self.at + n > len(self.buf):
                raise GgufError(f"{self.path} is truncated inside its header")
            if keep:
                import numpy as np

                dtype = np.dtype(_SCALAR[itype] if itype != 7 else "?").newbyteorder("<" if self.e == "<" else ">")
                items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.at).tolist()
            self.at += n
            return items if keep else LongArray(itype, count)
        items = [self.value(itype, keep, full, depth + 1) for _ in range(count)]
        return items if keep else LongArray(itype, count)


def read_header(path: Path, *, arrays: bool = False, tensors: bool = True) -> Header:
    """Parse ``path``'s GGUF header; `GgufError` (one line) when it is missing,
    unreadable, not GGUF, truncated or corrupt, or holds a tensor type the
    engine does not know. ``arrays``: read every metadata array (a vocabulary's
    token list); else arrays longer than `SMALL_ARRAY` are `LongArray`.
    ``tensors``: parse the tensor infos too (else ``Header.tensors`` is empty)."""
    path = Path(path)
    if not path.is_file():
        raise GgufError(f"{path} is not a file")
    try:
        size = path.stat().st_size
        if size < 24:
            raise GgufError(f"{path} is not a GGUF file (only {size} bytes)")
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise GgufError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if buf[:4] != MAGIC:
            raise GgufError(f"{path} is not a GGUF file (it does not start with GGUF)")
        (version,) = struct.unpack_from("<I", buf, 4)
        endian = "<"
        if version & 0xFFFF == 0:
            endian = ">"
            (version,) = struct.unpack_from(">I", buf, 4)
        if version not in (2, 3):
            raise GgufError(f"{path} is GGUF version {version}; versions 2 and 3 are read")
        cur = _Cursor(buf, endian, path)
        cur.at = 8
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        if n_tensors > size // 24 or n_kv > size // 12:
            raise GgufError(f"{path} is corrupt: it claims {n_tensors:,} tensors and {n_kv:,} keys")
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            kv[key] = cur.value(cur.take("I"), full=arrays)
        kv_span = (24, cur.at)
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors if tensors else 0):
            name = cur.string()
            n_dims = cur.take("I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GgufError(f"{path} is corrupt: tensor {name} has {n_dims} dimensions")
            shape = tuple(cur.take("Q") for _ in range(n_dims))
            raw.append((name, shape, cur.take("I"), cur.take("Q")))
        alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
                or alignment & (alignment - 1)):
            raise GgufError(f"{path} is corrupt: general.alignment is {alignment!r}")
        data_offset = (cur.at + alignment - 1) // alignment * alignment
    finally:
        buf.close()
    seen: set[str] = set()
    for name, *_ in raw:
        if name in seen:
            raise GgufError(f"{path} is corrupt: tensor {name} appears twice")
        seen.add(name)
    newer = [name for name, _, ggml_type, _ in raw if _known(ggml_type) is None]
    engine = _engine_sizes(path, newer) if newer else {}
    infos: list[TensorInfo] = []
    for name, shape, ggml_type, rel in raw:
        n = 1
        for d in shape:
            n *= d
        known = _known(ggml_type)
        if known is not None:
            type_name, block, per_block = known
            if shape[0] % block:
                raise GgufError(f"{path} is corrupt: tensor {name} rows of {shape[0]} do not fill "
                                f"{type_name} blocks of {block}")
            nbytes = n // block * per_block
        elif name in engine:
            type_name, nbytes = engine[name]
        else:
            raise GgufError(f"{path}: tensor {name} has ggml type {ggml_type}, which this engine "
                            "does not know")
        start = data_offset + rel
        if rel % alignment:
            raise GgufError(f"{path} is corrupt: tensor {name} starts at a misaligned offset")
        if start + nbytes > size:
            raise GgufError(f"{path} is truncated: tensor {name} ends at byte {start + nbytes:,} "
                            f"but the file has {size:,} bytes")
        infos.append(TensorInfo(name, shape, ggml_type, type_name, start, nbytes))
    return Header(path, size, version, endian, kv, kv_span, alignment, data_offset, infos)


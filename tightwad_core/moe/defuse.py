"""`tightwad moe defuse` and `tightwad moe fuse`: rewrite a GGUF between one
tensor per projection holding every expert (fused, what llama.cpp loads) and
one tensor per expert (indexed).

A fused tensor keeps the expert as its outermost dimension, so expert ``e``
is the ``e``-th of ``n_expert`` equal, contiguous byte ranges, whatever the
quantization (blocks run along the innermost dimension): splitting and
joining are byte copies, never a dequantization. The rewrite keeps

* the key/value metadata section byte for byte (copied raw, never re-encoded),
* the tensor order: a fused tensor's experts take its place, in expert
  order, and joining puts the fused tensor where its first expert was,
* the layout: offsets aligned as the file's ``general.alignment`` says,
  tensors in order, the last one padded when the input's was,

so ``fuse(defuse(x))`` is byte-identical to ``x`` for any file laid out that
way (what llama.cpp's tools and gguf-py write). Data moves from file to file
in the kernel (``copy_file_range``), in chunks, so memory stays small however
large the model. The output appears only when complete (`tightwad_core.runtime.atomic`:
written beside it under a hidden name, flushed, then renamed).
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tightwad_core.moe.inspect import FUSED, INDEXED
from tightwad_core.runtime.atomic import atomic_output
from tightwad_core.runtime.ggufio import MAX_DIMS, Header, MoeError, read_header

CHUNK = 64 << 20  # bytes per kernel copy: progress and Ctrl-C granularity


@dataclass
class OutTensor:
    """One tensor of the output: its header entry and where its bytes come from."""

    name: str
    shape: list[int]  # GGUF order, innermost first
    ggml_type: int
    pieces: list[tuple[int, int]] = field(default_factory=list)  # (absolute source offset, bytes)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.pieces)


@dataclass
class Source:
    """What the rewrite needs of the input, read from its header."""

    header: Header
    tensors: list[OutTensor]  # as they are, in header order
    pad_last: bool       # the last tensor's data is padded to the alignment
    canonical: bool      # offsets are exactly the aligned running sums of the sizes

    @property
    def path(self) -> Path:
        return self.header.path


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def read_source(path: Path) -> Source:
    """Parse ``path``'s header (every tensor's bytes checked to be inside the file)."""
    header = read_header(path)
    if not header.tensors:
        raise MoeError(f"{path} holds no tensors")
    a = header.alignment
    tensors, expect, canonical = [], 0, True
    for t in header.tensors:
        canonical = canonical and t.offset - header.data_offset == expect
        expect = _align(expect + t.nbytes, a)
        tensors.append(OutTensor(t.name, list(t.shape), t.ggml_type, [(t.offset, t.nbytes)]))
    last = header.tensors[-1]
    end = last.offset + last.nbytes
    return Source(header, tensors, pad_last=header.size >= _align(end, a) > end,
                  canonical=canonical)


def plan_defuse(src: Source) -> tuple[list[OutTensor], int]:
    """The output tensors of splitting every fused expert tensor, and how many were split."""
    out: list[OutTensor] = []
    split = 0
    names = {t.name for t in src.tensors}
    for t in src.tensors:
        m = FUSED.match(t.name)
        if not m or m.group(3) != "exps" or len(t.shape) < 2:
            out.append(t)
            continue
        layer, proj, _, suffix = m.groups()
        n_expert = t.shape[-1]
        (offset, nbytes), = t.pieces
        if n_expert < 1 or nbytes % n_expert:
            raise MoeError(f"{t.name}: {nbytes} bytes do not split into {n_expert} experts")
        each = nbytes // n_expert
        for e in range(n_expert):
            name = f"blk.{layer}.ffn_{proj}.{e}.{suffix}"
            if name in names:
                raise MoeError(f"{src.path} has both {t.name} and {name}; refusing to merge them")
            out.append(OutTensor(name, t.shape[:-1], t.ggml_type, [(offset + e * each, each)]))
        split += 1
    if not split:
        raise MoeError(_nothing(src, "fused"))
    return out, split


def plan_fuse(src: Source) -> tuple[list[OutTensor], int]:
    """The output tensors of joining every complete set of per-expert tensors."""
    groups: dict[tuple[str, str, str], dict[int, OutTensor]] = {}
    for t in src.tensors:
        if m := INDEXED.match(t.name):
            layer, proj, e, suffix = m.groups()
            groups.setdefault((layer, proj, suffix), {})[int(e)] = t
    if not groups:
        raise MoeError(_nothing(src, "indexed"))
    names = {t.name for t in src.tensors}
    position = {t.name: i for i, t in enumerate(src.tensors)}
    fused: dict[str, OutTensor] = {}  # by the name of its first member in header order
    for (layer, proj, suffix), members in groups.items():
        name = f"blk.{layer}.ffn_{proj}_exps.{suffix}"
        if name in names:
            raise MoeError(f"{src.path} has both {name} and per-expert tensors for it")
        n_expert = len(members)
        if sorted(members) != list(range(n_expert)):
            missing = sorted(set(range(max(members) + 1)) - set(members))
            raise MoeError(f"{name}: experts {', '.join(map(str, missing))} are missing")
        first = members[0]
        if len(first.shape) >= MAX_DIMS:
            raise MoeError(f"{first.name} has {len(first.shape)} dimensions; a fused tensor "
                           f"with its experts would have more than GGUF's {MAX_DIMS}")
        for e, t in members.items():
            if t.shape != first.shape or t.ggml_type != first.ggml_type:
                raise MoeError(f"{t.name} differs in shape or type from expert 0 "
                               f"({t.shape} vs {first.shape}); cannot join them")
        head = min(members.values(), key=lambda t: position[t.name])
        fused[head.name] = OutTensor(name, first.shape + [n_expert], first.ggml_type,
                                     [p for e in range(n_expert) for p in members[e].pieces])
    out = []
    for t in src.tensors:
        if t.name in fused:
            out.append(fused[t.name])
        elif not INDEXED.match(t.name):
            out.append(t)
    return out, len(fused)


def _nothing(src: Source, kind: str) -> str:
    from tightwad_core.moe.inspect import inspect_file

    layout = inspect_file(src.path)["layout"]
    if layout == "none":
        return f"{src.path} is not a Mixture-of-Experts model: it has no expert tensors"
    other = "fuse" if kind == "fused" else "defuse"
    return f"{src.path} has no {kind} expert tensors (its layout is {layout}; see `tightwad moe {other}`)"


def _header(src: Source, tensors: list[OutTensor]) -> tuple[bytes, list[int]]:
    """Everything before the tensor data, and each tensor's offset in the data."""
    e, span = src.header.endian, src.header.kv_span
    with open(src.path, "rb") as f:
        head = f.read(24)
        f.seek(span[0])
        kv = f.read(span[1] - span[0])
    parts = [head[:8], struct.pack(e + "Q", len(tensors)), head[16:24], kv]
    offsets, at = [], 0
    for t in tensors:
        name = t.name.encode()
        parts.append(struct.pack(f"{e}Q", len(name)) + name + struct.pack(f"{e}I", len(t.shape)) +
                     struct.pack(f"{e}{len(t.shape)}Q", *t.shape) +
                     struct.pack(f"{e}IQ", t.ggml_type, at))
        offsets.append(at)
        at = _align(at + t.nbytes, src.header.alignment)
    blob = b"".join(parts)
    return blob + bytes(_align(len(blob), src.header.alignment) - len(blob)), offsets


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy(src_fd: int, dst_fd: int, offset: int, n: int, advance: Callable[[int], None]) -> None:
    """Copy ``n`` bytes at ``offset`` of the source to the destination's position."""
    kernel = hasattr(os, "copy_file_range")
    while n > 0:
        step = min(n, CHUNK)
        done = 0
        if kernel:
            try:
                done = os.copy_file_range(src_fd, dst_fd, step, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                kernel = False
        if not kernel:
            data = os.pread(src_fd, min(step, 8 << 20), offset)
            _write_all(dst_fd, data)
            done = len(data)
        if done <= 0:
            raise MoeError("the input ended while copying (was it changed meanwhile?)")
        offset += done
        n -= done
        advance(done)


def rewrite(src_path: Path, dst_path: Path, direction: str, *, force: bool = False,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Defuse (``direction="defuse"``) or fuse ``src_path`` into ``dst_path``.
    ``progress(done, total)`` is called as data bytes are copied."""
    src_path, dst_path = Path(src_path), Path(dst_path)
    if not src_path.is_file():
        raise MoeError(f"{src_path} is not a file")
    if dst_path.exists():
        if dst_path.is_dir():
            raise MoeError(f"{dst_path} is a folder; name the output file")
        if os.path.samefile(src_path, dst_path):
            raise MoeError("the output would overwrite the input; name another file")
        if not force:
            raise MoeError(f"{dst_path} exists; pass --force to replace it")
    if not dst_path.parent.is_dir():
        raise MoeError(f"{dst_path.parent} is not a folder")
    started = time.monotonic()
    src = read_source(src_path)
    tensors, changed = (plan_defuse if direction == "defuse" else plan_fuse)(src)
    header, offsets = _header(src, tensors)
    total = sum(t.nbytes for t in tensors)
    need = len(header) + sum(_align(t.nbytes, src.header.alignment) for t in tensors)
    free = shutil.disk_usage(dst_path.parent).free
    if need > free:
        raise MoeError(f"{dst_path.parent} has {free:,} bytes free; the output needs {need:,}")
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    src_fd = os.open(src_path, os.O_RDONLY)
    try:
        with atomic_output(dst_path) as dst_fd:
            _write_all(dst_fd, header)
            at = 0
            for i, (t, off) in enumerate(zip(tensors, offsets)):
                _write_all(dst_fd, bytes(off - at))
                for offset, n in t.pieces:
                    _copy(src_fd, dst_fd, offset, n, advance)
                at = off + t.nbytes
                if i == len(tensors) - 1 and src.pad_last:
                    _write_all(dst_fd, bytes(_align(at, src.header.alignment) - at))
    finally:
        os.close(src_fd)
    return {"input": str(src_path), "output": str(dst_path), "direction": direction,
            "architecture": src.header.meta("general.architecture"), "tensors_in": len(src.tensors),
            "tensors_out": len(tensors), "expert_tensors": changed, "data_bytes": total,
            "file_bytes": os.path.getsize(dst_path), "input_canonical": src.canonical,
            "seconds": round(time.monotonic() - started, 3)}

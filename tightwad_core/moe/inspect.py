"""`tightwad moe inspect`: what a GGUF's experts look like.

llama.cpp stores a layer's experts *fused*: one tensor per projection,
``blk.N.ffn_{gate,up,down}_exps.weight``, with the expert as its outermost
dimension. An *indexed* file keeps one tensor per expert,
``blk.N.ffn_{gate,up,down}.E.weight``. Shared experts (``*_shexp``) and the
router (``ffn_gate_inp``) are reported beside them. Only the header is read
(memory-mapped; the tensor data is never loaded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tightwad_core.runtime.ggufio import MoeError, read_header

__all__ = ["MoeError", "inspect_file"]

#: a layer's experts fused (``_exps``) or its shared experts (``_shexp``): weight, bias, scale
FUSED = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_(exps|shexp)\.([a-z_]+)$")
#: one expert's tensor of the indexed form
INDEXED = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)\.(\d+)\.([a-z_]+)$")
ROUTER = re.compile(r"^blk\.(\d+)\.ffn_gate_inp\.weight$")


@dataclass
class ExpertTensor:
    name: str
    kind: str          # "fused", "shared" or "indexed"
    projection: str    # gate, up, down (gate_up: both in one)
    expert: int | None  # indexed: which expert
    type: str          # ggml type name (F16, Q4_K, ...)
    shape: list[int]   # GGUF order: innermost first (experts last when fused)
    bytes: int


@dataclass
class Layer:
    index: int
    router: str | None = None
    tensors: list[ExpertTensor] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)


def inspect_file(path: Path) -> dict[str, Any]:
    """The MoE facts of a GGUF as a JSON-ready dict (``moe`` false when the
    file has no expert tensors)."""
    path = Path(path)
    header = read_header(path)
    meta = header.meta
    arch = meta("general.architecture") or "unknown"
    layers: dict[int, Layer] = {}
    total = 0
    for t in header.tensors:
        total += t.nbytes
        name = t.name
        kind = projection = None
        expert = None
        if m := FUSED.match(name):
            kind = "fused" if m.group(3) == "exps" else "shared"
            projection = m.group(2)
        elif m := INDEXED.match(name):
            kind, projection, expert = "indexed", m.group(2), int(m.group(3))
        elif m := ROUTER.match(name):
            layers.setdefault(int(m.group(1)), Layer(int(m.group(1)))).router = name
            continue
        else:
            continue
        layer = layers.setdefault(int(m.group(1)), Layer(int(m.group(1))))
        layer.tensors.append(ExpertTensor(name, kind, projection, expert, t.type_name,
                                          list(t.shape), t.nbytes))
    kinds = {x.kind for layer in layers.values() for x in layer.tensors} - {"shared"}
    layout = "fused" if kinds == {"fused"} else "indexed" if kinds == {"indexed"} else (
        "mixed" if kinds else "none")
    expert_bytes = sum(layer.bytes for layer in layers.values())
    return {
        "file": str(path), "architecture": arch,
        "moe": bool(kinds),
        "expert_count": meta(f"{arch}.expert_count"),
        "expert_used_count": meta(f"{arch}.expert_used_count"),
        "shared_expert_count": meta(f"{arch}.expert_shared_count"),
        "block_count": meta(f"{arch}.block_count"),
        "layout": layout,
        "total_bytes": total, "expert_bytes": expert_bytes,
        "layers": [{"layer": layer.index, "router": layer.router, "bytes": layer.bytes,
                    "tensors": [vars(x) for x in layer.tensors]}
                   for layer in sorted(layers.values(), key=lambda x: x.index)],
    }

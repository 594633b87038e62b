"""Tiny random-weight Mixture-of-Experts GGUFs: each layer's feed-forward
block is a router (``ffn_gate_inp``) and fused expert tensors
``ffn_{gate,up,down}_exps``. Two architectures llama.cpp runs: ``llama``
with experts (as Mixtral is stored) and ``qwen2moe``, which adds a shared
expert (``ffn_{gate,up,down}_shexp`` and its gate ``ffn_gate_inp_shexp``)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tightwad_core.testing.tinymodels import (
    DEFAULT_TEMPLATE,
    TinyVocab,
    _config,
    _random_weights,
    _write,
)


def write_tiny_moe(path: Path, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64,
                   n_ff: int = 64, n_expert: int = 4, n_expert_used: int = 2,
                   dtype: str = "f32", arch: str = "llama",
                   router_bias: dict[int, list[int]] | None = None) -> Path:
    """Write a MoE GGUF with seeded random weights; returns ``path``.
    ``dtype`` as for `write_tiny_model`; ``arch`` is ``llama`` or ``qwen2moe``.
    ``router_bias`` maps a layer to experts its router always picks: their router
    rows weigh the constant hidden dimension heavily (give ``n_expert_used`` of them)."""
    if not 0 < n_expert_used <= n_expert:
        raise ValueError("n_expert_used must be from 1 to n_expert")
    if arch not in ("llama", "qwen2moe"):
        raise ValueError(f"arch must be llama or qwen2moe, not {arch!r}")
    vocab = TinyVocab.build()
    cfg = _config(vocab, n_layer, n_embd, 4, 2, n_ff)
    w = _random_weights(cfg, vocab, seed)
    rng = np.random.default_rng(seed + 77)
    for i in range(n_layer):
        p = f"blk.{i}."
        for name in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"):
            del w[p + name]

        def experts(rows: int, cols: int) -> np.ndarray:
            return (rng.standard_normal((n_expert, rows, cols)) / np.sqrt(cols)).astype(np.float32)

        w[p + "ffn_gate_inp.weight"] = (rng.standard_normal((n_expert, n_embd)) /
                                        np.sqrt(n_embd)).astype(np.float32)
        for e in (router_bias or {}).get(i, ()):
            w[p + "ffn_gate_inp.weight"][e, 0] = 30.0  # the constant dimension (see tinymodels)
        w[p + "ffn_gate_exps.weight"] = experts(n_ff, n_embd)
        w[p + "ffn_up_exps.weight"] = experts(n_ff, n_embd)
        down = experts(n_embd, n_ff) * np.float32(0.7)
        down[:, 0, :] = 0.0  # keep the constant dimension constant (see tinymodels)
        w[p + "ffn_down_exps.weight"] = down
        if arch == "qwen2moe":
            w[p + "ffn_gate_inp_shexp.weight"] = (rng.standard_normal(n_embd) /
                                                  np.sqrt(n_embd)).astype(np.float32)
            w[p + "ffn_gate_shexp.weight"] = experts(n_ff, n_embd)[0]
            w[p + "ffn_up_shexp.weight"] = experts(n_ff, n_embd)[0]
            shared = experts(n_embd, n_ff)[0] * np.float32(0.7)
            shared[0, :] = 0.0
            w[p + "ffn_down_shexp.weight"] = shared

    def moe_keys(writer: gguf.GGUFWriter) -> None:
        writer.add_expert_count(n_expert)
        writer.add_expert_used_count(n_expert_used)
        if arch == "qwen2moe":
            writer.add_expert_feed_forward_length(n_ff)
            writer.add_expert_shared_feed_forward_length(n_ff)

    return _write(path, cfg, vocab, w, n_ctx=512, chat_template=DEFAULT_TEMPLATE, dtype=dtype,
                  name=f"tiny-{arch}-moe-{n_layer}x{n_expert}e-s{seed}", extra=moe_keys,
                  arch=arch)


def write_uniform_imatrix(model: Path, path: Path) -> Path:
    """An importance matrix for ``model`` that weighs every input column alike,
    in the GGUF form llama-quantize reads (``<tensor>.in_sum2`` and
    ``<tensor>.counts`` per matrix, one count per expert for fused experts).
    The quantization types that refuse to run without an importance matrix
    (IQ1_*, IQ2_XXS/XS/S, IQ3_XXS/XS, Q2_K_S) take it."""
    reader = gguf.GGUFReader(str(model))
    writer = gguf.GGUFWriter(str(path), "imatrix")
    writer.add_array("imatrix.datasets", ["uniform"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 1)
    for t in reader.tensors:
        shape = [int(x) for x in t.shape]
        if len(shape) < 2:
            continue
        n_mat = shape[2] if len(shape) > 2 else 1
        writer.add_tensor(t.name + ".in_sum2", np.ones((n_mat, shape[0]), dtype=np.float32))
        writer.add_tensor(t.name + ".counts", np.ones((n_mat, 1), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)

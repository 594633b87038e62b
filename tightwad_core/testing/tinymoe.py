"""Tiny random-weight Mixture-of-Experts GGUFs (llama architecture with
experts, as Mixtral is stored): each layer's feed-forward block is a router
(``ffn_gate_inp``) and fused expert tensors ``ffn_{gate,up,down}_exps``."""

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
                   dtype: str = "f32") -> Path:
    """Write a MoE GGUF with seeded random weights; returns ``path``.
    ``dtype`` as for `write_tiny_model`."""
    if not 0 < n_expert_used <= n_expert:
        raise ValueError("n_expert_used must be from 1 to n_expert")
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
        w[p + "ffn_gate_exps.weight"] = experts(n_ff, n_embd)
        w[p + "ffn_up_exps.weight"] = experts(n_ff, n_embd)
        down = experts(n_embd, n_ff) * np.float32(0.7)
        down[:, 0, :] = 0.0  # keep the constant dimension constant (see tinymodels)
        w[p + "ffn_down_exps.weight"] = down

    def moe_keys(writer: gguf.GGUFWriter) -> None:
        writer.add_expert_count(n_expert)
        writer.add_expert_used_count(n_expert_used)

    return _write(path, cfg, vocab, w, n_ctx=512, chat_template=DEFAULT_TEMPLATE, dtype=dtype,
                  name=f"tiny-moe-{n_layer}x{n_expert}e-s{seed}", extra=moe_keys)

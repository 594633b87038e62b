"""Greedy equivalence on the real pair: Qwen2.5-Coder 0.5B drafts, 1.5B on the
worker verifies, K pinned to 8. Every prompt's output is token-identical to
the target decoding alone, or first differs at a numeric near-tie (top-2
log-probability gap under 1.0 in the target-alone run): llama.cpp is not
batch-invariant, so a batched verify may flip a near-tie argmax."""

from __future__ import annotations

from pathlib import Path

from conftest import qwen

from tightwad_core.bench.prompts import load_prompts
from tightwad_core.bench.run import run_bench
from tightwad_core.cli.main import builtin_config
from tightwad_core.config.profiles import load_profile
from tightwad_core.runtime import catalog


async def test_speculative_greedy_equals_target_alone(tmp_path: Path) -> None:
    qwen(catalog.DEFAULT_TARGET)
    qwen(catalog.DEFAULT_DRAFT)
    name, profile = load_profile(builtin_config(), "speculative")
    every = load_prompts()
    by_cat: dict[str, list[dict[str, str]]] = {}
    for item in every:
        by_cat.setdefault(item["category"], []).append(item)
    prompts = [p for group in zip(*by_cat.values()) for p in group][:20]  # round-robin over categories
    prompts += [p for p in every if p not in prompts][: 20 - len(prompts)]
    assert len(prompts) == 20 and len({p["category"] for p in prompts}) >= 5
    report = await run_bench(name, profile, config_dir=tmp_path, prompts=prompts, max_tokens=64,
                             draft_tokens=8, run_dir=tmp_path)
    rows = report["prompts"]
    diverged = [(r["prompt"][:40], r["first_divergence"], r["divergence_gap"]) for r in rows if not r["identical"]]
    print(f"identical {len(rows) - len(diverged)}/{len(rows)}; diverged at near-ties: {diverged}; "
          f"acceptance {report['totals']['acceptance']:.2f}, tokens/round {report['totals']['tokens_per_round']:.2f}")
    for prompt, index, gap in diverged:
        assert gap is not None and gap < 1.0, f"{prompt!r} diverged at token {index} with gap {gap}: a bug"
    assert report["totals"]["acceptance"] > 0.3  # the same family agrees often

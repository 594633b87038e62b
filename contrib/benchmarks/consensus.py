"""Multi-drafter consensus against one drafter and the target alone.

Target: the 1.5B coder model on a worker. Drafters: the 0.5B coder model at
its shipped Q4_K_M and copies requantized lower (Q3_K_M and Q2_K by
default, ``--requantize``) with the engine's ``llama-quantize`` (cached next
to the model). Every server starts once;
each configuration is a proxy in front of them, and the configurations are
measured in alternation (the order rotating every round) on the shipped
bench prompts, greedy:

- ``target``: the target alone (the relay);
- ``single:<drafter>``: the ``speculative`` mode with that drafter;
- ``verified:<rule>``: the ``consensus`` mode, exact;
- ``approximate:<rule>``: the ``consensus-approximate`` mode (APPROXIMATE).

Per configuration: tokens per second (median over prompts and rounds), the
ratio to the best single drafter, acceptance, tokens per round, how many
answers are identical to the target's (with the target's top-2 gap at the
first divergence) and, for approximate runs, the divergence rate (share of
prompts whose answer differs; share of tokens after the first divergence)::

    python contrib/benchmarks/consensus.py --prompts 6 --max-tokens 48 --rounds 1 --out consensus.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from tightwad_core.bench.prompts import load_prompts
from tightwad_core.config.profiles import BackendConfig, Profile, SpeculationConfig
from tightwad_core.http.server import Running, serve_profile
from tightwad_core.runtime import catalog
from tightwad_core.runtime.procs import find_engine

TARGET = "qwen2.5-coder-1.5b"
DRAFT = "qwen2.5-coder-0.5b"
RULES = ("strict", "majority", "any_disagree")


def requantized(src: Path, kind: str = "Q2_K") -> Path:
    """``src`` requantized to ``kind`` with the engine's llama-quantize, cached next to it."""
    out = src.with_name(src.name.replace("q4_k_m", kind.lower()) if "q4_k_m" in src.name
                        else f"{src.stem}-{kind.lower()}.gguf")
    if not out.exists():
        tmp = out.with_suffix(".part")
        subprocess.run([str(find_engine("llama-quantize")), "--allow-requantize", str(src), str(tmp),
                        kind], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(out)
    return out


async def serve(nursery: trio.Nursery, name: str, profile: Profile, run_dir: Path) -> Running:
    running: Running = await nursery.start(partial(serve_profile, name, profile, config_dir=run_dir,
                                                   run_dir=run_dir))
    return running


def base(backend: str, url: str) -> BackendConfig:
    return BackendConfig(backend=backend, url=url, request_timeout=600)


def configs(target_url: str, drafts: dict[str, str], k: int) -> dict[str, Profile]:
    """Every configuration measured, as a profile in front of the running servers."""
    def prof(mode: str, fleet: list[str], rule: str = "strict") -> Profile:
        spec = SpeculationConfig(max_draft_tokens=k, verifier="worker", consensus=rule,
                                 consensus_wait=2.0, draft_timeout=30.0)
        members = [base("llama-server", drafts[d]) for d in fleet]
        return Profile(mode=mode, listen="127.0.0.1:0", max_tokens_limit=4096,
                       target=base("worker", target_url),
                       draft=members[0] if mode == "speculative" else None,
                       drafters=members if mode != "speculative" else [], speculation=spec)
    out = {f"single:{d}": prof("speculative", [d]) for d in drafts}
    for rule in RULES:
        out[f"verified:{rule}"] = prof("consensus", list(drafts), rule)
    for rule in RULES:
        out[f"approximate:{rule}"] = prof("consensus-approximate", list(drafts), rule)
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    src = catalog.model_path(DRAFT)
    drafts = {"0.5b-q4_k_m": src, **{f"0.5b-{q.lower()}": requantized(src, q) for q in args.requantize}}
    prompts = [p["prompt"] for p in load_prompts(limit=args.prompts)]
    run_dir = Path(tempfile.mkdtemp(prefix="tw-consensus-"))
    results: dict[str, dict[str, Any]] = {}
    async with trio.open_nursery() as nursery, AsyncExitStack():
        # the servers, once: the target's worker and one llama-server per drafter
        holder = await serve(nursery, "target", Profile(
            mode="direct", listen="127.0.0.1:0", target=BackendConfig(
                backend="worker", model_path=str(catalog.model_path(TARGET)), ctx_size=4096,
                parallel=2, threads=args.threads)), run_dir)
        target = holder.state.backends["target"]
        urls = {}
        for name, path in drafts.items():
            # idle drafters sleep instead of spinning (--poll 0): on one machine they share
            # the cores with the target and with each other
            r = await serve(nursery, name, Profile(mode="direct", listen="127.0.0.1:0", target=BackendConfig(
                backend="llama-server", model_path=str(path), ctx_size=4096, parallel=2,
                threads=args.draft_threads, extra_args=["--poll", "0"])), run_dir)
            urls[name] = r.state.backends["target"].base_url
        proxies = {name: await serve(nursery, name, p, run_dir)
                   for name, p in configs(target.base_url, urls, args.k).items()}
        # the target's own answers (ids and top-2 gaps), untimed
        ids = []
        refs: list[tuple[list[int], list[float | None]]] = []
        for p in prompts:
            templated = await target.apply_template([{"role": "user", "content": p}])
            ids.append([int(t) for t in await target.tokenize(templated, add_special=True)])
            run = await target.complete_ids(ids[-1], args.max_tokens, gaps=True)
            refs.append((list(run.tokens or []), list(run.gaps or [])))
        names = ["target", *proxies]
        rates: dict[str, list[float]] = {n: [] for n in names}
        answers: dict[str, list[list[int]]] = {n: [[] for _ in prompts] for n in names}
        async with httpx.AsyncClient(timeout=900) as c:
            for rnd in range(args.rounds):
                for pi, prompt_ids in enumerate(ids):
                    shift = (rnd * len(ids) + pi) % len(names)
                    for name in names[shift:] + names[:shift]:
                        url = target.base_url if name == "target" else proxies[name].url
                        t0 = time.perf_counter()
                        r = await c.post(url + "/v1/completions", json={
                            "prompt": prompt_ids, "max_tokens": args.max_tokens, "temperature": 0})
                        seconds = time.perf_counter() - t0
                        r.raise_for_status()
                        n = int(r.json()["usage"]["completion_tokens"])
                        rates[name].append(n / seconds)
                        if name == "target":
                            answers[name][pi] = refs[pi][0]
                        else:
                            answers[name][pi] = list(proxies[name].state.mode.last_tokens() or [])
                    print(f"round {rnd + 1} prompt {pi + 1}/{len(ids)} done", file=sys.stderr)
        for name in names:
            st = {} if name == "target" else proxies[name].state.mode.status()
            identical, gaps, differ_tokens, total_tokens = 0, [], 0, 0
            for (ref, ref_gaps), got in zip(refs, answers[name]):
                d = first_divergence(ref, got)
                total_tokens += len(ref)
                if d is None:
                    identical += 1
                else:
                    differ_tokens += max(len(ref), len(got)) - d
                    if d < len(ref_gaps) and ref_gaps[d] is not None:
                        gaps.append(round(float(ref_gaps[d] or 0.0), 4))
            cons = st.get("consensus") or {}
            results[name] = {
                "tok_s": round(statistics.median(rates[name]), 3),
                "tok_s_each": [round(r, 3) for r in rates[name]],
                "acceptance": st.get("acceptance"), "tokens_per_round": st.get("tokens_per_round"),
                "identical": identical, "prompts": len(prompts), "gap_at_divergence": gaps,
                "approximate": bool(st.get("approximate")),
                "divergence": {"prompts": round(1 - identical / len(prompts), 4),
                               "tokens_after_first": round(differ_tokens / max(1, total_tokens), 4)},
                "consensus": {k: cons.get(k) for k in ("rounds", "agreed", "trusted", "fallbacks",
                                                       "tree_rounds", "branches")} if cons else None,
                "drafters": [{k: d.get(k) for k in ("name", "answered", "dropped", "failed", "agreement")}
                             for d in cons.get("drafters", [])] if cons else None,
            }
        for r in (holder, *proxies.values()):
            r.shutdown.set()
        nursery.cancel_scope.cancel()
    best = max(v["tok_s"] for k, v in results.items() if k.startswith("single:"))
    for v in results.values():
        v["vs_best_single"] = round(v["tok_s"] / best, 3) if best else None
    return {"config": {"target": TARGET, "drafters": list(drafts), "prompts": len(prompts),
                       "max_tokens": args.max_tokens, "rounds": args.rounds, "k": args.k,
                       "threads": args.threads, "draft_threads": args.draft_threads},
            "results": results}


def table(report: dict[str, Any]) -> str:
    rows = [f"{'config':<34}{'tok/s':>8}{'x best1':>9}{'accept':>8}{'tok/rd':>8}{'same':>7}"
            f"{'div prompts':>12}{'div tokens':>11}"]
    for name, v in report["results"].items():
        acc = "-" if v["acceptance"] is None else f"{v['acceptance']:.2f}"
        tpr = "-" if v["tokens_per_round"] is None else f"{v['tokens_per_round']:.2f}"
        label = name + (" (APPROX)" if v["approximate"] else "")
        rows.append(f"{label:<34}{v['tok_s']:>8.2f}{v['vs_best_single'] or 0:>9.2f}{acc:>8}{tpr:>8}"
                    f"{v['identical']:>4}/{v['prompts']:<2}{v['divergence']['prompts']:>12.2f}"
                    f"{v['divergence']['tokens_after_first']:>11.2f}")
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per round (pinned)")
    ap.add_argument("--threads", type=int, default=None, help="the target's threads (default: all cores)")
    ap.add_argument("--draft-threads", type=int, default=1, help="each drafter's threads (default 1)")
    ap.add_argument("--requantize", default="Q3_K_M,Q2_K", type=lambda v: [q for q in v.split(",") if q],
                    help="lower quantizations of the 0.5B drafter to add to the fleet (default Q3_K_M,Q2_K)")
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    a = ap.parse_args()
    rep = trio.run(main, a)
    print(table(rep))
    if a.out is not None:
        a.out.write_text(json.dumps(rep, indent=2))

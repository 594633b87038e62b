"""The quality gate on the bench prompts: how many drafts the target approves,
corrects or rejects, and how much target time that saves.

Serves the gate profile in this process (a worker target, a llama-server
drafter; by default the Qwen2.5-Coder 1.5B / 0.5B pair from `tightwad
setup`, or the tiny generated pair with ``--tiny``) and sends each bench
prompt twice, greedy: once to the target alone (the worker's own chat route)
and once through the gate, alternating which goes first so drift hits both
alike. Per prompt it prints the verdict, draft tokens kept and the target's
time both ways (the gate's target time is the review plus any continuation
the target generated); totals give the split, the measured target time
saved and the gate's own running estimate, with the threshold used.

    python contrib/benchmarks/gate.py --prompts 12 --max-tokens 96 --out gate.json
    python contrib/benchmarks/gate.py --tiny --prompts 4 --max-tokens 24
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from tightwad_core.bench.prompts import load_prompts
from tightwad_core.config.profiles import BackendConfig, Profile
from tightwad_core.config.schema import GateConfig
from tightwad_core.http.server import serve_profile
from tightwad_core.runtime import catalog


def profile(args: argparse.Namespace, workdir: Path) -> Profile:
    if args.tiny:
        from tightwad_core.testing.tinymodels import tiny_pair

        draft, target = (str(p) for p in tiny_pair(workdir, seed=2))
    else:
        target, draft = "@qwen2.5-coder-1.5b", "@qwen2.5-coder-0.5b"
        for name in (target, draft):
            if not catalog.model_path(name[1:]).exists():
                raise SystemExit(f"{name} is missing: run `tightwad setup` first (or use --tiny)")
    ctx = 512 if args.tiny else 4096
    return Profile(mode="gate", listen="127.0.0.1:0", max_tokens_limit=args.max_tokens,
                   target=BackendConfig(backend="worker", model_path=target, ctx_size=ctx, parallel=1,
                                        startup_timeout=600),
                   drafters=[BackendConfig(backend="llama-server", model_path=draft, ctx_size=ctx,
                                           parallel=1)],
                   gate=GateConfig(threshold=args.threshold, min_prefix=args.min_prefix, cache_entries=0))


async def timed_chat(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]],
                     max_tokens: int) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    resp = await client.post(url + "/v1/chat/completions", json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    seconds = time.perf_counter() - t0
    if resp.status_code != 200:
        raise SystemExit(f"{url} answered {resp.status_code}: {resp.text[:300]}")
    return seconds, resp.json()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prompts = load_prompts(Path(args.prompts_file) if args.prompts_file else None, limit=args.prompts)
    workdir = Path(tempfile.mkdtemp(prefix="tightwad-gate-bench-"))
    prof = profile(args, workdir)
    rows: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        running = await nursery.start(partial(serve_profile, "gate-bench", prof, config_dir=workdir,
                                              run_dir=workdir))
        mode = running.state.mode
        target_url = running.state.backends["target"].base_url
        async with httpx.AsyncClient(timeout=600) as client:
            warm = [{"role": "user", "content": "Say hello."}]  # first requests pay start-up costs
            await timed_chat(client, target_url, warm, 8)
            await timed_chat(client, running.url, warm, 8)
            for i, p in enumerate(prompts):
                messages = [{"role": "user", "content": p["prompt"]}]
                order = ("alone", "gate") if i % 2 == 0 else ("gate", "alone")
                got: dict[str, tuple[float, dict[str, Any]]] = {}
                for which in order:
                    url = target_url if which == "alone" else running.url
                    got[which] = await timed_chat(client, url, messages, args.max_tokens)
                last = mode.status()["gate"]["last"]
                alone_s, alone = got["alone"]
                gate_s, gated = got["gate"]
                target_s = (last["review_s"] or 0.0) + last["target_s"]
                row = {"category": p["category"], "verdict": last["verdict"],
                       "draft_tokens": last["draft_tokens"], "kept": last["kept"],
                       "target_tokens": last["target_tokens"],
                       "completion_tokens": gated["usage"]["completion_tokens"],
                       "alone_tokens": alone["usage"]["completion_tokens"],
                       "same_text": gated["choices"][0]["message"]["content"]
                       == alone["choices"][0]["message"]["content"],
                       "alone_s": round(alone_s, 3), "gate_wall_s": round(gate_s, 3),
                       "gate_target_s": round(target_s, 3), "review_s": round(last["review_s"] or 0.0, 3),
                       "draft_s": round(last["draft_s"] or 0.0, 3)}
                rows.append(row)
                print(f"{i + 1:2d} {p['category'][:10]:10s} {row['verdict']:9s} kept {row['kept']:4d}/"
                      f"{row['draft_tokens']:<4d} target alone {alone_s:6.2f} s  gate: target "
                      f"{target_s:6.2f} s, wall {gate_s:6.2f} s", flush=True)
        g = mode.status()["gate"]
        running.shutdown.set()
    n = len(rows)
    split = {v: sum(r["verdict"] == v for r in rows) for v in ("approved", "corrected", "rejected")}
    alone_total = sum(r["alone_s"] for r in rows)
    gate_target = sum(r["gate_target_s"] for r in rows)
    return {
        "model": "tiny pair" if args.tiny else "qwen2.5-coder-1.5b target (worker), 0.5b drafter",
        "threshold": args.threshold, "min_prefix": args.min_prefix, "max_tokens": args.max_tokens,
        "prompts": n, "split": split, "split_share": {k: v / n for k, v in split.items()} if n else {},
        "target_alone_s": round(alone_total, 3), "gate_target_s": round(gate_target, 3),
        "target_time_saved_s": round(alone_total - gate_target, 3),
        "target_time_saved_share": (alone_total - gate_target) / alone_total if alone_total else None,
        "gate_wall_s": round(sum(r["gate_wall_s"] for r in rows), 3),
        "gate_estimate_saved_s": g["target_time_saved_s"],
        "draft_tokens_kept": g["draft_tokens_kept"], "target_tokens_generated": g["target_tokens_generated"],
        "same_text_as_alone": sum(r["same_text"] for r in rows), "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=12, help="how many bench prompts (default 12)")
    ap.add_argument("--prompts-file", default=None, help="a prompts file (default: the shipped set)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threshold", type=float, default=2.0, help="gate.threshold (nats)")
    ap.add_argument("--min-prefix", type=float, default=0.25, help="gate.min_prefix")
    ap.add_argument("--tiny", action="store_true", help="the tiny generated pair instead of Qwen")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    res = trio.run(run, args)
    s = res["split"]
    print(f"\nthreshold {res['threshold']} nats, min_prefix {res['min_prefix']}, {res['prompts']} prompts, "
          f"max_tokens {res['max_tokens']}")
    print(f"approved {s['approved']}  corrected {s['corrected']}  rejected {s['rejected']}")
    print(f"target time: alone {res['target_alone_s']:.2f} s, behind the gate {res['gate_target_s']:.2f} s "
          f"-> saved {res['target_time_saved_s']:.2f} s"
          + (f" ({res['target_time_saved_share']:.0%})" if res["target_time_saved_share"] is not None else ""))
    est = res["gate_estimate_saved_s"]
    print(f"gate's own estimate of target time saved: {'-' if est is None else f'{est:.2f}'} s; "
          f"gate wall time {res['gate_wall_s']:.2f} s; answers identical to the target's: "
          f"{res['same_text_as_alone']}/{res['prompts']}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

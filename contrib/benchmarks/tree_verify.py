"""What a tree of branches costs the worker against a single chain.

One worker (in this process, ``--slots`` >= the largest B) holds a session on
a code prompt. Every measurement is one ``/v1/tightwad/verify`` on that
session at the same cached prefix (each rolls the last back):

- the chain (B = 1): K draft tokens, ``draft = K``, as a plain round sends;
- trees of B branches of K tokens each, ``shared``: all branches start with
  the target's own first token (1 + B x (K - 1) positions), and ``split``:
  every branch starts differently (B x K positions).

Branch 0 (the chain's draft) is always the target's own greedy continuation,
so a verify accepts about K (a near-tie may stop it earlier), every tree's
answer is checked against the chain's, and the tokens a round emits
(``tokens_per_round`` in the JSON) are the chain's: this measures what a
tree costs, not what real drafters' branches gain. Configurations are measured in alternation, the order rotating
every repetition, so drift on the machine hits them alike. Printed: the
median ``engine_ms`` per verify (and the fastest, the least disturbed by
other load) and per evaluated position (the tree's positions plus the one
pending accepted token), and tree / chain of the medians.

    python contrib/benchmarks/tree_verify.py --reps 10 --out tree-verify.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from tightwad_core.runtime import catalog
from tightwad_core.runtime.procs import usable_cores

PROMPT = ("def quicksort(items):\n    \"\"\"Sort a list with quicksort and return it.\"\"\"\n"
          "    if len(items) <= 1:\n        return items\n")


def branch_sets(k: int, b: int, good: list[int], rng: random.Random,
                n_vocab: int) -> dict[str, list[list[int]]]:
    """The branches of each shape for K = k, B = b (branch 0: the target's own
    continuation after the pending token, ``good[:k]``)."""
    if b == 1:
        return {"chain": [good[:k]]}
    out: dict[str, list[list[int]]] = {}
    rand = [[rng.randrange(n_vocab) for _ in range(k)] for _ in range(b - 1)]
    out["shared"] = [good[:k]] + [[good[0]] + r[1:] for r in rand]
    firsts = {good[0]}
    split = [good[:k]]
    for r in rand:
        while r[0] in firsts:
            r[0] = rng.randrange(n_vocab)
        firsts.add(r[0])
        split.append(r)
    out["split"] = split
    return out


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tightwad_plugins.worker.cli import serve_worker

    model = catalog.resolve_model(args.model)
    if not model.is_file():
        raise SystemExit(f"error: model file not found: {model} (run `tightwad setup`)")
    ks = [int(x) for x in args.k.split(",")]
    bs = [int(x) for x in args.b.split(",")]
    threads = args.threads or usable_cores()
    rng = random.Random(args.seed)
    async with trio.open_nursery() as nursery:
        w = await nursery.start(partial(serve_worker, model, "127.0.0.1", 0,
                                        slots=max(bs), ctx=2048, threads=threads))
        async with httpx.AsyncClient(base_url=w.url, timeout=600) as c:
            async def post(**body: Any) -> dict[str, Any]:
                r = await c.post("/v1/tightwad/verify", json=body)
                r.raise_for_status()
                return r.json()  # type: ignore[no-any-return]

            info = (await c.get("/v1/tightwad/info")).json()
            ids = (await c.post("/tokenize", json={"content": PROMPT, "add_special": True})
                   ).json()["tokens"]
            first = await post(tokens=ids)
            sid, past, tok = first["session"], first["n_past"], first["token"]
            good: list[int] = []  # the target's own continuation after tok
            at, last = past, tok
            while len(good) < max(ks) + 1:
                r = await post(session=sid, past=at, tokens=[last])
                at, last = r["n_past"], r["token"]
                good.append(last)
            configs: list[tuple[int, int, str, list[list[int]]]] = []
            for k in ks:
                for b in bs:
                    for shape, branches in branch_sets(k, b, good, rng, info["n_vocab"]).items():
                        configs.append((k, b, shape, branches))
            figures: dict[str, list[float]] = {}
            emitted: dict[str, list[int]] = {}  # tokens each verify emits (accepted + 1)
            chain_says: dict[int, tuple[int, int]] = {}  # K -> the chain's (accepted, token)
            bad = 0

            async def once(k: int, b: int, shape: str, branches: list[list[int]]) -> None:
                nonlocal bad
                if shape == "chain":
                    r = await post(session=sid, past=past, tokens=[tok, *branches[0]], draft=k)
                    nodes = k
                    chain_says.setdefault(k, (r["accepted"], r["token"]))
                else:
                    r = await post(session=sid, past=past, tokens=[tok], branches=branches)
                    nodes = r["tree_nodes"]
                    bad += r["branches_verified"] != b or r["branch"] != 0
                # a tree's answer is the chain's (branch 0 is the chain's draft)
                bad += chain_says.get(k, (r["accepted"], r["token"])) != (r["accepted"], r["token"])
                key = f"{k}/{b}/{shape}/{nodes}"
                figures.setdefault(key, []).append(float(r["engine_ms"]))
                emitted.setdefault(key, []).append(r["accepted"] + 1)

            for c0 in configs:  # warm-up: one of each
                await once(*c0)
            figures.clear()
            emitted.clear()
            for rep in range(args.reps):
                shift = rep % len(configs)
                for c0 in configs[shift:] + configs[:shift]:
                    await once(*c0)
        w.shutdown.set()
    rows = []
    chain = {int(key.split("/")[0]): statistics.median(v) for key, v in figures.items()
             if key.split("/")[2] == "chain"}
    for key, v in figures.items():
        k, b, shape, nodes = key.split("/")
        med = statistics.median(v)
        rows.append({"k": int(k), "branches": int(b), "shape": shape, "positions": int(nodes) + 1,
                     "engine_ms": med, "min_ms": min(v), "ms_per_position": med / (int(nodes) + 1),
                     "vs_chain": med / chain[int(k)] if int(k) in chain else None,
                     "tokens_per_round": statistics.mean(emitted[key]), "samples": len(v)})
    rows.sort(key=lambda r: (r["k"], r["branches"], r["shape"]))
    return {"model": str(model), "threads": threads, "reps": args.reps,
            "placement": info["placement"], "mismatches": bad, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="@" + catalog.DEFAULT_TARGET, help="GGUF path or @name")
    ap.add_argument("--k", default="2,4,8", help="tokens per branch")
    ap.add_argument("--b", default="1,2,4", help="branches per verify (1: the chain)")
    ap.add_argument("--reps", type=int, default=6, help="alternating repetitions")
    ap.add_argument("--threads", type=int, default=None, help="threads (default: usable cores)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random branches")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    report = trio.run(measure, args)
    print(f"{report['model']}  threads={report['threads']}  reps={report['reps']}  "
          f"{report['placement']}")
    print(f"{'K':>3} {'B':>3} {'shape':<7} {'positions':>9} {'engine ms':>10} {'min ms':>8} "
          f"{'ms/position':>12} {'tree/chain':>10}")
    for r in report["rows"]:
        ratio = "" if r["vs_chain"] is None else f"{r['vs_chain']:.2f}"
        print(f"{r['k']:>3} {r['branches']:>3} {r['shape']:<7} {r['positions']:>9} "
              f"{r['engine_ms']:>10.1f} {r['min_ms']:>8.1f} {r['ms_per_position']:>12.2f} "
              f"{ratio:>10}")
    if report["mismatches"]:
        print(f"warning: {report['mismatches']} verifies disagreed with the chain", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`auto` draft length against pinned K on the combined-mode test bed.

Starts the shipped `combined-demo` profile once (two rpc-servers behind
emulated links, the 1.5B worker on them, the 0.5B draft here) with K =
"auto", then one more proxy per pinned K over the same target and draft.
Each prompt goes to every proxy, the order rotating from prompt to prompt;
greedy, the same max tokens. The report gives each proxy's tokens per
second (wall time of whole requests, prefill included, as a user sees it)
and auto's ratio to the best pinned K.

    python contrib/benchmarks/auto_k.py [--delay 100ms] [--ks 2,3,4,5] [--limit 6]
                                        [--max-tokens 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from tightwad_core.config.profiles import load_profile
from tightwad_core.config.shipped import builtin_config
from tightwad_core.http.server import serve_profile

HERE = Path(__file__).parent


async def main(args: argparse.Namespace) -> dict[str, Any]:
    name, prof = load_profile(builtin_config(), "combined-demo")
    assert prof.cluster is not None and prof.target is not None and prof.draft is not None
    workers = [msgspec.structs.replace(w, delay=args.delay) for w in prof.cluster.workers]
    prof = msgspec.structs.replace(
        prof, listen="127.0.0.1:0", cluster=msgspec.structs.replace(prof.cluster, workers=workers),
        speculation=msgspec.structs.replace(prof.speculation, max_draft_tokens="auto"))
    prompts = json.loads((HERE / "prompts-spread8.json").read_text())[: args.limit]
    out: dict[str, Any] = {"delay": args.delay, "max_tokens": args.max_tokens, "prompts": len(prompts)}
    async with trio.open_nursery() as nursery:
        auto = await nursery.start(partial(serve_profile, name, prof, config_dir=Path.cwd()))
        target, draft = auto.state.backends["target"], auto.state.backends["draft"]
        proxies = {"auto": auto}
        for k in args.ks:
            pinned = msgspec.structs.replace(
                prof, cluster=None,
                target=msgspec.structs.replace(prof.target, url=target.base_url),
                draft=msgspec.structs.replace(prof.draft, url=draft.base_url),
                speculation=msgspec.structs.replace(prof.speculation, max_draft_tokens=k))
            proxies[f"K={k}"] = await nursery.start(partial(serve_profile, f"k{k}", pinned,
                                                            config_dir=Path.cwd()))
        times = {p: 0.0 for p in proxies}
        tokens = {p: 0 for p in proxies}
        names = list(proxies)
        async with httpx.AsyncClient(timeout=1200) as c:
            for i, item in enumerate([prompts[0], *prompts]):  # the first once more: warm-up
                order = names[i % len(names):] + names[:i % len(names)]
                for p in order:
                    body = {"messages": [{"role": "user", "content": item["prompt"]}],
                            "max_tokens": args.max_tokens, "temperature": 0}
                    t0 = time.perf_counter()
                    r = await c.post(proxies[p].url + "/v1/chat/completions", json=body)
                    dt = time.perf_counter() - t0
                    r.raise_for_status()
                    if i > 0:
                        times[p] += dt
                        tokens[p] += r.json()["usage"]["completion_tokens"]
                print(f"prompt {i}/{len(prompts)} done", file=sys.stderr)
        rates = {p: tokens[p] / times[p] for p in proxies}
        best = max((p for p in proxies if p != "auto"), key=lambda p: rates[p])
        dl = auto.state.mode.status()["draft_length"]
        out.update({"tok_s": {p: round(v, 3) for p, v in rates.items()}, "best_pinned": best,
                    "auto_vs_best": round(rates["auto"] / rates[best], 3), "auto_state": dl})
        nursery.cancel_scope.cancel()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay", default="100ms", help="one-way delay of each worker's link")
    ap.add_argument("--ks", default="2,3,4,5", help="pinned K values to compare with auto")
    ap.add_argument("--limit", type=int, default=6, help="prompts (from prompts-spread8.json)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    a.ks = [int(k) for k in a.ks.split(",") if k.strip()]
    report = trio.run(main, a)
    for p, v in report["tok_s"].items():
        print(f"{p:>6}: {v:.2f} tok/s")
    print(f"auto / best pinned ({report['best_pinned']}): {report['auto_vs_best']:.3f}; "
          f"auto settled on K {report['auto_state']['k']}, tried {report['auto_state']['ks_measured']}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))

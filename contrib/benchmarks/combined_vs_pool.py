"""Combined mode against the pool alone, side by side, on one machine.

Two rpc-servers per side (rpc-server serves one client at a time, so each
side has its own), each behind an emulated link (`tightwad link --delay`):

- pool alone: a stock llama-server coordinator with ``--rpc`` over its two
  links and ``-dev RPC0,RPC1 -ngl 99`` (what a user runs without Tightwad;
  ``--pool-ngl 28`` keeps its output layer local, as combined mode does);
- combined: the speculative proxy, the draft on a local llama-server, the
  target on a Tightwad worker whose layers sit on the other two rpc-servers
  (``--rpc``; the output layer stays on the worker), K pinned.

Every prompt goes to both, greedy, alternating which goes first; the script
prints each side's tokens per second of wall time, their ratio, and whether
the answers were identical, and writes the figures as JSON::

    python contrib/benchmarks/combined_vs_pool.py --delay 100ms --k 3 --limit 6 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tightwad_core.bench.prompts import load_prompts
from tightwad_core.runtime import catalog
from tightwad_core.runtime.procs import find_engine, free_port

BIN = Path(sys.executable).parent


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited: see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy: see {log}")


class Procs:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.all: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.all.append(proc)
        return proc, log

    def rpc_behind_link(self, name: str, delay: str) -> str:
        port, link = free_port(), free_port()
        self.start(f"{name}-rpc", [str(find_engine("rpc-server")), "-H", "127.0.0.1", "-p",
                                   str(port), "-t", "1"])
        self.start(f"{name}-link", [str(BIN / "tightwad"), "link", "--listen", f"127.0.0.1:{link}",
                                    "--to", f"127.0.0.1:{port}", "--delay", delay])
        time.sleep(0.5)
        return f"127.0.0.1:{link}"

    def stop(self) -> None:
        for p in reversed(self.all):
            p.terminate()
        for p in self.all:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def chat(c: httpx.Client, url: str, prompt: str, n: int) -> tuple[float, str, int]:
    t0 = time.perf_counter()
    r = c.post(url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0})
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    data = r.json()
    return seconds, data["choices"][0]["message"]["content"], int(data["usage"]["completion_tokens"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay", default="100ms", help="one-way delay of every link (default 100ms)")
    ap.add_argument("--k", type=int, default=3, help="draft tokens per round in combined mode")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per answer")
    ap.add_argument("--limit", type=int, default=6, help="shipped prompts to run")
    ap.add_argument("--pool-ngl", default="99",
                    help="-ngl of the pool's coordinator: 99 puts the output layer on the last "
                         "rpc-server too (llama-server's usual set-up); the target's block count "
                         "keeps it on the coordinator, as combined mode does")
    ap.add_argument("--overlap", action="store_true",
                    help="combined mode drafts the next round while the pool verifies this one")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    target = catalog.model_path(catalog.DEFAULT_TARGET)
    draft = catalog.model_path(catalog.DEFAULT_DRAFT)
    logs = Path(tempfile.mkdtemp(prefix="combined-vs-pool-"))
    procs = Procs(logs)
    try:
        pool_eps = [procs.rpc_behind_link(f"pool{i}", args.delay) for i in range(2)]
        comb_eps = [procs.rpc_behind_link(f"comb{i}", args.delay) for i in range(2)]
        pool_port = free_port()
        pool, pool_log = procs.start("pool-coordinator", [
            str(find_engine("llama-server")), "-m", str(target), "--port", str(pool_port),
            "--rpc", ",".join(pool_eps), "-dev", "RPC0,RPC1", "-ngl", args.pool_ngl, "-c", "2048",
            "-np", "1", "--no-webui", "--jinja"])
        cfg = logs / "tightwad.toml"
        proxy_port = free_port()
        cfg.write_text(
            '[profiles.combined]\nmode = "speculative"\n'
            f'listen = "127.0.0.1:{proxy_port}"\n'
            f'[profiles.combined.target]\nbackend = "worker"\nmodel_path = "{target}"\n'
            f'ctx_size = 2048\nparallel = 1\nstartup_timeout = 900\n'
            f'extra_args = ["--rpc", "{",".join(comb_eps)}"]\n'
            f'[profiles.combined.draft]\nbackend = "llama-server"\nmodel_path = "{draft}"\n'
            'ctx_size = 2048\nparallel = 1\n'
            f'[profiles.combined.speculation]\nmax_draft_tokens = {args.k}\nverifier = "worker"\n'
            'draft_timeout = 30\n'
            f'overlap_draft = {"true" if args.overlap else "false"}\n')
        proxy, proxy_log = procs.start("combined-proxy", [
            str(BIN / "tightwad"), "run", "--config", str(cfg), "--profile", "combined"])
        wait_http(f"http://127.0.0.1:{pool_port}/health", pool, pool_log)
        wait_http(f"http://127.0.0.1:{proxy_port}/health", proxy, proxy_log)
        sides = {"pool": f"http://127.0.0.1:{pool_port}", "combined": f"http://127.0.0.1:{proxy_port}"}
        prompts = load_prompts(None, args.limit)
        rows: list[dict[str, Any]] = []
        with httpx.Client(timeout=1800) as c:
            for url in sides.values():  # warm-up: graph shapes over RPC, caches
                chat(c, url, "hello", 8)
            for i, item in enumerate(prompts):
                order = list(sides) if i % 2 == 0 else list(reversed(sides))
                got: dict[str, tuple[float, str, int]] = {}
                for side in order:
                    got[side] = chat(c, sides[side], item["prompt"], args.tokens)
                row = {"prompt": item["prompt"], **{f"{s}_s": round(got[s][0], 3) for s in sides},
                       **{f"{s}_tokens": got[s][2] for s in sides},
                       "identical": got["pool"][1] == got["combined"][1]}
                row["speedup"] = round((got["pool"][0] / got["pool"][2]) /
                                       (got["combined"][0] / max(1, got["combined"][2])), 3)
                rows.append(row)
                print(f"{i + 1}/{len(prompts)} pool {got['pool'][2] / got['pool'][0]:.2f} tok/s, "
                      f"combined {got['combined'][2] / got['combined'][0]:.2f} tok/s, "
                      f"{row['speedup']:.2f}x, identical {row['identical']}", flush=True)
            status = c.get(sides["combined"] + "/v1/tightwad/status").json()
    finally:
        procs.stop()
    pool_rate = sum(r["pool_tokens"] for r in rows) / sum(r["pool_s"] for r in rows)
    comb_rate = sum(r["combined_tokens"] for r in rows) / sum(r["combined_s"] for r in rows)
    mode = status.get("mode_status") or {}
    report = {"delay": args.delay, "k": args.k, "tokens": args.tokens, "pool_ngl": args.pool_ngl,
              "overlap": args.overlap, "ahead_hits": mode.get("ahead_hits"),
              "prompts": rows,
              "pool_tok_s": round(pool_rate, 3), "combined_tok_s": round(comb_rate, 3),
              "speedup": round(comb_rate / pool_rate, 3),
              "median_speedup": statistics.median(r["speedup"] for r in rows),
              "identical": sum(r["identical"] for r in rows),
              "acceptance": mode.get("acceptance"), "tokens_per_round": mode.get("tokens_per_round"),
              "logs": str(logs)}
    print(json.dumps({k: v for k, v in report.items() if k != "prompts"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the proxy adds on top of calling llama-server directly.

Starts a real llama-server (on a tiny random-weight model by default, so the
engine is fast and the proxy's own cost is visible; ``--model`` for a real
one), puts a direct-mode proxy in front of it (`tightwad run`, its own process), and sends the
same requests both ways with many concurrent clients, alternating direct and
proxied batches so drift hits both alike. Prints medians and writes JSON.

    python contrib/benchmarks/proxy_overhead.py --clients 16 --rounds 6 --json bench-overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from tightwad_core.runtime.procs import find_engine, free_port


def start_llama_server(model: Path, log: Path, parallel: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [str(find_engine("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port",
            str(port), "-c", str(512 * parallel), "-np", str(parallel), "--jinja", "--no-webui", "-t", "1"]
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"llama-server did not start; see {log}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_health(url: str) -> None:
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the proxy at {url} did not start")


BODY = {"prompt": "The quick brown fox", "temperature": 0, "ignore_eos": True}


async def one(client: httpx.AsyncClient, base: str, stream: bool, tokens: int) -> tuple[float, int]:
    body = {**BODY, "max_tokens": tokens, "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        r = await client.post(base + "/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]
    n = 0
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                n += 1
    return time.perf_counter() - t0, n


async def batch(client: httpx.AsyncClient, base: str, clients: int, per: int, stream: bool,
                tokens: int) -> list[tuple[float, int]]:
    out: list[tuple[float, int]] = []

    async def worker() -> None:
        for _ in range(per):
            out.append(await one(client, base, stream, tokens))

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(worker)
    return out


async def main(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="tightwad-bench-"))
    if args.model:
        model = Path(args.model)
    else:
        from tightwad_core.testing.tinymodels import write_tiny_model

        model = write_tiny_model(tmp / "tiny.gguf", seed=3)
    proc, direct = await trio.to_thread.run_sync(start_llama_server, model, tmp / "llama-server.log",
                                                 args.parallel)
    try:
        port = free_port()
        cfg = tmp / "tightwad.toml"
        cfg.write_text(f'[profiles.bench]\nlisten = "127.0.0.1:{port}"\n'
                       f'[profiles.bench.target]\nbackend = "llama-server"\nurl = "{direct}"\n')
        exe = Path(sys.executable).parent / "tightwad"
        proxy_proc = subprocess.Popen([str(exe), "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                                      stderr=(tmp / "proxy.log").open("wb"))
        proxy = f"http://127.0.0.1:{port}"
        await trio.to_thread.run_sync(_wait_health, proxy)
        try:
            limits = httpx.Limits(max_connections=args.clients * 2, max_keepalive_connections=args.clients * 2)
            async with httpx.AsyncClient(timeout=300, limits=limits) as client:
                await batch(client, direct, args.clients, 1, False, 4)  # warm up both paths
                await batch(client, proxy, args.clients, 1, True, 4)
                cpu = {"request": 0.0, "stream": 0.0}
                units = {"request": 0, "stream": 0}
                res: dict[str, dict[str, list[tuple[float, int]]]] = {
                    k: {"direct": [], "proxy": []} for k in ("request", "stream")}
                for rnd in range(args.rounds):
                    order = ("direct", "proxy") if rnd % 2 == 0 else ("proxy", "direct")
                    for kind, stream, tokens in (("request", False, args.request_tokens),
                                                 ("stream", True, args.stream_tokens)):
                        for arm in order:
                            base = direct if arm == "direct" else proxy
                            c0 = cpu_seconds(proxy_proc.pid)
                            got = await batch(client, base, args.clients, args.per_client, stream, tokens)
                            res[kind][arm] += got
                            if arm == "proxy":
                                cpu[kind] += cpu_seconds(proxy_proc.pid) - c0
                                units[kind] += len(got) if kind == "request" else sum(n for _, n in got)
        finally:
            proxy_proc.terminate()
            proxy_proc.wait()
    finally:
        proc.terminate()
        proc.wait()
    med = {k: {a: statistics.median(t for t, _ in v) for a, v in arms.items()} for k, arms in res.items()}
    tok = statistics.median(n for _, n in res["stream"]["proxy"])
    report = {
        "clients": args.clients, "rounds": args.rounds, "requests_per_arm": len(res["request"]["direct"]),
        "model": str(model),
        "request_tokens": args.request_tokens, "stream_tokens": args.stream_tokens,
        "median_request_s": med["request"], "median_stream_s": med["stream"],
        "added_ms_per_request": 1000 * (med["request"]["proxy"] - med["request"]["direct"]),
        "added_ms_per_streamed_token": 1000 * (med["stream"]["proxy"] - med["stream"]["direct"]) / max(tok, 1),
        "streamed_tokens_median": tok,
        "proxy_cpu_ms_per_request": 1000 * cpu["request"] / max(units["request"], 1),
        "proxy_cpu_ms_per_streamed_token": 1000 * cpu["stream"] / max(units["stream"], 1),
    }
    return report


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF to serve (default: a tiny generated model)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--parallel", type=int, default=8, help="llama-server slots (default 8)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    p.add_argument("--per-client", type=int, default=3, help="requests per client per batch (default 3)")
    p.add_argument("--request-tokens", type=int, default=8, help="max_tokens of non-streamed requests")
    p.add_argument("--stream-tokens", type=int, default=64, help="max_tokens of streamed requests")
    p.add_argument("--json", metavar="FILE", help="also write the report here")
    args = p.parse_args()
    report = trio.run(main, args)
    print(f"clients={report['clients']}  requests per arm={report['requests_per_arm']}")
    print(f"non-streamed ({args.request_tokens} tokens): direct {1000 * report['median_request_s']['direct']:.2f} ms, "
          f"proxy {1000 * report['median_request_s']['proxy']:.2f} ms  -> "
          f"added {report['added_ms_per_request']:.2f} ms per request (median)")
    print(f"streamed ({report['streamed_tokens_median']} tokens): direct {1000 * report['median_stream_s']['direct']:.1f} ms, "
          f"proxy {1000 * report['median_stream_s']['proxy']:.1f} ms  -> "
          f"added {report['added_ms_per_streamed_token']:.3f} ms per token (median)")
    print(f"proxy CPU: {report['proxy_cpu_ms_per_request']:.2f} ms per non-streamed request, "
          f"{report['proxy_cpu_ms_per_streamed_token']:.3f} ms per streamed token")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(cli())

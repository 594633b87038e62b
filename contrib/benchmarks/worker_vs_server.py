"""The worker against llama-server on the same GGUF and threads, side by side.

Both servers run at once (one slot each, the same thread count) and are
measured in alternation, which of the two goes first switching every round,
so drift on the machine hits both alike. Per round:

- decode: greedy generation of ``--tokens`` tokens from a short prompt; the
  figure is milliseconds per generated token after the first (llama-server's
  own ``timings``; the worker's from the wall time of a one-token run
  subtracted from the full run);
- prompt: evaluation of a ``--prompt-tokens``-token prompt, tokens per second;
- verify: the cost of checking K draft tokens on a cached prefix, for each K
  in ``--k``: the worker's ``/v1/tightwad/verify`` (engine time) next to
  llama-server evaluating the same K+1 new tokens (``timings.prompt_ms``).

- concurrent (``--clients N``, 0 to skip): both servers restarted with N
  slots (one KV cache shared by the slots on both sides), then N greedy
  clients at once, each with its own prompt and ``--tokens`` tokens: total
  generated tokens per second of wall time, and how many clients got exactly
  the output they get alone.

Medians and the worker/llama-server ratios are printed and written as JSON::

    python contrib/benchmarks/worker_vs_server.py --rounds 5 --json worker-vs-server.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from tightwad_core.runtime import catalog
from tightwad_core.runtime.procs import find_engine, free_port, usable_cores

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
FILLER = "The quick brown fox jumps over the lazy dog. "


def start(argv: list[str], url: str, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited: see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{argv[0]} did not become healthy: see {log}")


def tokens(client: httpx.Client, text: str) -> list[int]:
    return [int(t) for t in client.post("/tokenize", json={"content": text, "add_special": True}).json()["tokens"]]


def server_decode(c: httpx.Client, ids: list[int], n: int) -> float:
    t = c.post("/completion", json={"prompt": ids, "n_predict": n, "temperature": 0,
                                    "cache_prompt": False}).json()["timings"]
    return float(t["predicted_per_token_ms"])


def worker_decode(c: httpx.Client, ids: list[int], n: int) -> float:
    def run(k: int) -> float:
        t0 = time.perf_counter()
        c.post("/v1/completions", json={"prompt": ids, "max_tokens": k, "temperature": 0}).raise_for_status()
        return time.perf_counter() - t0
    return (run(n) - run(1)) / (n - 1) * 1e3


def server_prompt(c: httpx.Client, ids: list[int]) -> float:
    t = c.post("/completion", json={"prompt": ids, "n_predict": 1, "cache_prompt": False}).json()["timings"]
    return float(t["prompt_per_second"])


def worker_prompt(c: httpx.Client, ids: list[int]) -> float:
    body = {"tokens": ids, "past": 0, "draft": 0, "sampling": {"temperature": 0}}
    t0 = time.perf_counter()
    out = c.post("/v1/tightwad/verify", json=body).json()
    c.delete(f"/v1/tightwad/sessions/{out['session']}")
    return len(ids) / max(1e-9, float(out.get("engine_ms") or (time.perf_counter() - t0) * 1e3) / 1e3)


def server_verify(c: httpx.Client, ids: list[int], cont: list[int], k: int) -> float:
    c.post("/completion", json={"prompt": ids, "n_predict": 1, "cache_prompt": True})  # cache the prefix
    t = c.post("/completion", json={"prompt": ids + cont[:k + 1], "n_predict": 1,
                                    "cache_prompt": True}).json()["timings"]
    return float(t["prompt_ms"])


def worker_verify(c: httpx.Client, ids: list[int], cont: list[int], k: int) -> float:
    first = c.post("/v1/tightwad/verify", json={"tokens": ids, "past": 0, "draft": 0,
                                                "sampling": {"temperature": 0}}).json()
    out = c.post("/v1/tightwad/verify", json={"session": first["session"], "past": first["n_past"],
                                              "tokens": cont[:k + 1], "draft": k,
                                              "sampling": {"temperature": 0}}).json()
    c.delete(f"/v1/tightwad/sessions/{first['session']}")
    return float(out["engine_ms"])


CLIENT_PROMPTS = [
    "def quicksort(xs):\n", "# A shell script that backs up /etc\n", "SELECT name FROM users WHERE",
    "class Stack:\n    def __init__(self):\n", "The three laws of motion are", "fn main() {\n",
    "<!DOCTYPE html>\n<html>\n", "import numpy as np\n\ndef softmax(x):\n"]


def one_completion(side: str, base: str, ids: list[int], n: int) -> tuple[str, dict[str, Any]]:
    if side == "llama-server":
        return "/completion", {"prompt": ids, "n_predict": n, "temperature": 0, "cache_prompt": False,
                               "ignore_eos": True}
    return "/v1/completions", {"prompt": ids, "max_tokens": n, "temperature": 0}


def out_tokens(side: str, data: dict[str, Any]) -> tuple[str, int]:
    """The generated text and how many tokens it took."""
    if side == "llama-server":
        return str(data["content"]), int(data["tokens_predicted"])
    return str(data["choices"][0]["text"]), int(data["usage"]["completion_tokens"])


async def concurrent(side: str, base: str, prompts: list[list[int]], n: int) -> tuple[float, list[str]]:
    """N clients at once: (generated tokens per second of wall time, each client's text)."""
    outs: list[tuple[str, int]] = [("", 0) for _ in prompts]
    async with httpx.AsyncClient(base_url=base, timeout=600) as c:
        async def one(i: int) -> None:
            path, body = one_completion(side, base, prompts[i], n)
            r = await c.post(path, json=body)
            r.raise_for_status()
            outs[i] = out_tokens(side, r.json())

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(one, i)
        wall = time.perf_counter() - t0
    return sum(o[1] for o in outs) / wall, [o[0] for o in outs]


def alone(side: str, base: str, prompts: list[list[int]], n: int) -> list[str]:
    with httpx.Client(base_url=base, timeout=600) as c:
        result = []
        for ids in prompts:
            path, body = one_completion(side, base, ids, n)
            result.append(out_tokens(side, c.post(path, json=body).json())[0])
        return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="@" + catalog.DEFAULT_TARGET, help="GGUF path or @name")
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: usable cores)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per decode run")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="length of the prompt-eval prompt")
    ap.add_argument("--k", default="1,2,4,8", help="draft lengths whose verify is timed")
    ap.add_argument("--clients", type=int, default=4, help="concurrent greedy clients (0: skip)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    model = catalog.resolve_model(args.model)
    if not model.is_file():
        print(f"error: model file not found: {model} (run `tightwad setup`)", file=sys.stderr)
        return 2
    threads = args.threads or usable_cores()
    ks = [int(k) for k in args.k.split(",")]
    logs = Path("worker-vs-server-logs")
    logs.mkdir(exist_ok=True)
    sp, wp = free_port(), free_port()
    server = start([str(find_engine("llama-server")), "-m", str(model), "--port", str(sp), "-t", str(threads),
                    "-tb", str(threads), "-c", "4096", "-np", "1", "--no-webui"],
                   f"http://127.0.0.1:{sp}", logs / "llama-server.log")
    worker = start([str(Path(sys.executable).parent / "tightwad"), "worker", "--model", str(model),
                    "--port", str(wp), "--threads", str(threads), "--slots", "1", "--ctx-size", "4096"],
                   f"http://127.0.0.1:{wp}", logs / "worker.log")
    figures: dict[str, dict[str, list[float]]] = {"llama-server": {}, "worker": {}}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sp}", timeout=600) as s, \
                httpx.Client(base_url=f"http://127.0.0.1:{wp}", timeout=600) as w:
            ids = tokens(s, PROMPT)
            long_ids = tokens(s, FILLER * (args.prompt_tokens // 10 + 1))[: args.prompt_tokens]
            cont = [int(t) for t in s.post("/completion", json={
                "prompt": ids, "n_predict": max(ks) + 1, "temperature": 0, "return_tokens": True}).json()["tokens"]]
            sides: dict[str, Any] = {
                "llama-server": (s, server_decode, server_prompt, server_verify),
                "worker": (w, worker_decode, worker_prompt, worker_verify)}
            for r in range(args.rounds):
                order = ["llama-server", "worker"] if r % 2 == 0 else ["worker", "llama-server"]
                for name in order:
                    c, decode, prompt, verify = sides[name]
                    f = figures[name]
                    f.setdefault("decode_ms_per_token", []).append(decode(c, ids, args.tokens))
                    f.setdefault("prompt_tok_s", []).append(prompt(c, long_ids))
                    for k in ks:
                        f.setdefault(f"verify_k{k}_ms", []).append(verify(c, ids, cont, k))
    finally:
        for proc in (server, worker):
            proc.terminate()
            proc.wait(10)
    same_as_alone: dict[str, list[int]] = {"llama-server": [], "worker": []}
    if args.clients > 0:
        n = args.clients
        server = start([str(find_engine("llama-server")), "-m", str(model), "--port", str(sp), "-t",
                        str(threads), "-tb", str(threads), "-c", str(4096 * n), "-np", str(n),
                        "--kv-unified", "--no-webui"],
                       f"http://127.0.0.1:{sp}", logs / "llama-server-parallel.log")
        worker = start([str(Path(sys.executable).parent / "tightwad"), "worker", "--model", str(model),
                        "--port", str(wp), "--threads", str(threads), "--slots", str(n), "--ctx-size",
                        "4096"], f"http://127.0.0.1:{wp}", logs / "worker-parallel.log")
        bases = {"llama-server": f"http://127.0.0.1:{sp}", "worker": f"http://127.0.0.1:{wp}"}
        try:
            with httpx.Client(base_url=bases["llama-server"], timeout=600) as s:
                prompts = [tokens(s, CLIENT_PROMPTS[i % len(CLIENT_PROMPTS)]) for i in range(n)]
            refs = {side: alone(side, base, prompts, args.tokens) for side, base in bases.items()}
            for r in range(args.rounds):
                order = ["llama-server", "worker"] if r % 2 == 0 else ["worker", "llama-server"]
                for side in order:
                    rate, outs = trio.run(concurrent, side, bases[side], prompts, args.tokens)
                    figures[side].setdefault(f"concurrent{n}_tok_s", []).append(rate)
                    same_as_alone[side].append(sum(o == a for o, a in zip(outs, refs[side])))
        finally:
            for proc in (server, worker):
                proc.terminate()
                proc.wait(10)
    med = {side: {k: statistics.median(v) for k, v in f.items()} for side, f in figures.items()}
    report = {"model": str(model), "threads": threads, "usable_cores": usable_cores(), "rounds": args.rounds,
              "median": med, "worker_over_server": {k: med["worker"][k] / med["llama-server"][k]
                                                   for k in med["worker"]}, "runs": figures,
              "clients": args.clients, "clients_same_as_alone": same_as_alone}
    print(f"{model.name}, {threads} threads, {args.rounds} alternating rounds (medians)")
    print(f"{'figure':<22}{'llama-server':>14}{'worker':>12}{'worker/server':>15}")
    for k in med["worker"]:
        print(f"{k:<22}{med['llama-server'][k]:>14.1f}{med['worker'][k]:>12.1f}"
              f"{report['worker_over_server'][k]:>15.2f}")
    if args.clients:
        for side, hits in same_as_alone.items():
            print(f"{side}: clients whose concurrent output equals their output alone, per round: {hits} "
                  f"of {args.clients}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

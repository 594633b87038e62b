"""Defuse then fuse a generated MoE GGUF of about 1 GB: is the result
byte-identical, how long does each step take next to a plain `cp` of the
same file (and the `sync` that makes the copy durable, as the tool's fsync
does), and how much memory does it hold?

The model is written one tensor at a time (f16 experts, random bits), so
the generator itself stays small. Each step runs as the real CLI in its own
process; its memory is sampled from /proc every 10 ms: peak anonymous
resident memory (what the process holds beyond the page cache) and peak
total resident memory (anonymous plus the file pages it has mapped).

    python contrib/benchmarks/moe_roundtrip.py [--gb 1.0] [--dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np


def write_big_moe(path: Path, gb: float, n_embd: int = 1024, n_ff: int = 1024,
                  n_expert: int = 32) -> int:
    """A llama-style MoE GGUF whose expert tensors add up to about ``gb`` GB."""
    per_layer = 3 * n_embd * n_ff * n_expert * 2
    n_layer = max(1, round(gb * 1e9 / per_layer))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(2)
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (512, n_embd))]
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes += [(p + "attn_norm.weight", (n_embd,)), (p + "attn_q.weight", (n_embd, n_embd)),
                   (p + "ffn_gate_inp.weight", (n_expert, n_embd)),
                   (p + "ffn_gate_exps.weight", (n_expert, n_ff, n_embd)),
                   (p + "ffn_down_exps.weight", (n_expert, n_embd, n_ff)),
                   (p + "ffn_up_exps.weight", (n_expert, n_ff, n_embd))]
    shapes.append(("output.weight", (512, n_embd)))
    for name, shape in shapes:
        w.add_tensor_info(name, shape, np.dtype(np.float16), int(np.prod(shape)) * 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, shape in shapes:
        w.write_tensor_data(rng.integers(0, 0x7BFF, size=shape, dtype=np.uint16).view(np.float16))
    w.close()
    return n_layer


def _rss(pid: int) -> tuple[int, int]:
    anon = total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("VmRSS:"):
                total = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return anon, total


def timed(argv: list[str]) -> dict[str, float]:
    """Run ``argv``, sampling its memory; its stderr goes to a temporary file
    (a pipe nobody drains would stall a chatty child), shown if it fails."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        peak_anon = peak_total = 0
        while proc.poll() is None:
            anon, total = _rss(proc.pid)
            peak_anon, peak_total = max(peak_anon, anon), max(peak_total, total)
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{argv[0]} failed (exit {proc.returncode}): "
                             f"{err.read().decode(errors='replace')[-4000:]}")
    return {"seconds": round(seconds, 3), "peak_anon_mb": round(peak_anon / 1e6, 1),
            "peak_rss_mb": round(peak_total / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the experts (default 1.0)")
    ap.add_argument("--dir", type=Path, help="where to write the files (default: a temp dir)")
    ap.add_argument("--rounds", type=int, default=2, help="round trips to time (default 2)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    exe = str(Path(sys.executable).parent / "tightwad")
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="moe-rt-"))
    try:
        src = work / "model.gguf"
        t0 = time.perf_counter()
        n_layer = write_big_moe(src, args.gb)
        size = src.stat().st_size
        print(f"wrote {src.name}: {size / 1e9:.2f} GB, {n_layer} layers, "
              f"in {time.perf_counter() - t0:.1f} s")
        rows = []
        for r in range(args.rounds):
            split, back, copy = work / "split.gguf", work / "back.gguf", work / "copy.gguf"
            row = {"cp": timed(["cp", str(src), str(copy)])}
            row["cp"]["sync_seconds"] = timed(["sync", str(copy)])["seconds"]  # as the tool fsyncs
            row |= {"defuse": timed([exe, "moe", "defuse", str(src), str(split), "--force"]),
                   "fuse": timed([exe, "moe", "fuse", str(split), str(back), "--force"])}
            row["identical"] = filecmp.cmp(src, back, shallow=False)
            rows.append(row)
            print(f"round {r + 1}: cp {row['cp']['seconds']:.2f} s + sync "
                  f"{row['cp']['sync_seconds']:.2f} s; "
                  f"defuse {row['defuse']['seconds']:.2f} s (anon {row['defuse']['peak_anon_mb']} MB, "
                  f"rss {row['defuse']['peak_rss_mb']} MB); fuse {row['fuse']['seconds']:.2f} s "
                  f"(anon {row['fuse']['peak_anon_mb']} MB, rss {row['fuse']['peak_rss_mb']} MB); "
                  f"byte-identical: {row['identical']}")
            for p in (split, back, copy):
                p.unlink()
        report = {"file_bytes": size, "layers": n_layer, "rounds": rows}
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

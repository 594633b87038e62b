"""Pull one generated file from three rate-limited seeds and from one, on
loopback, and compare the throughput.

Each seed is a `tightwad swarm seed --rate RATE` process of its own; each
pull is a `tightwad swarm pull --json` into an empty folder (so nothing is
reused or resumed). One-seed and three-seed rounds alternate so drift on the
machine hits both alike; the report gives each round's MB/s (10^6 bytes/s),
the medians and the ratio three seeds / one seed (ideal: 3).

    python contrib/benchmarks/swarm_pull.py [--size-mb 200] [--rate 25MB] [--rounds 3]
                                            [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tightwad_core.swarm.manifest import make_manifest, manifest_path, write_manifest

EXE = str(Path(sys.executable).parent / "tightwad")


def generate(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 << 20))
            f.write(block)
            left -= len(block)
    write_manifest(make_manifest(path), manifest_path(path))


def start_seed(file: Path, rate: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([EXE, "swarm", "seed", str(file), "--listen", "127.0.0.1:0",
                             "--rate", rate], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if " at " not in line:
        proc.kill()
        raise SystemExit(f"seed did not start: {line!r}")
    return proc, line.rsplit(" at ", 1)[1].strip()


def pull_once(name: str, peers: list[str], work: Path) -> dict[str, object]:
    out = Path(tempfile.mkdtemp(dir=work, prefix="pull-"))
    try:
        argv = [EXE, "swarm", "pull", name, "--out", str(out), "--json"]
        for url in peers:
            argv += ["--peer", url]
        done = subprocess.run(argv, capture_output=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"pull failed: {done.stderr.decode().strip()}")
        result: dict[str, object] = json.loads(done.stdout)
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200, help="file size, MB (10^6 bytes)")
    ap.add_argument("--rate", default="25MB", help="each seed's cap, as `swarm seed --rate` takes it")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each kind")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    size = args.size_mb * 10**6
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "seed").mkdir()
        src = work / "seed" / "swarm-bench.bin"
        print(f"generating {args.size_mb} MB ...", flush=True)
        generate(src, size)
        seeds = [start_seed(src, args.rate) for _ in range(3)]
        urls = [u for _, u in seeds]
        rounds: dict[str, list[float]] = {"one_seed": [], "three_seeds": []}
        transfer: dict[str, list[float]] = {"one_seed": [], "three_seeds": []}
        try:
            for k in range(args.rounds):
                for kind, peers in (("one_seed", urls[:1]), ("three_seeds", urls)):
                    r = pull_once(src.name, peers, work)
                    mbps = size / float(r["seconds"]) / 1e6  # type: ignore[arg-type]
                    moving = size / float(r["transfer_seconds"]) / 1e6  # type: ignore[arg-type]
                    rounds[kind].append(round(mbps, 2))
                    transfer[kind].append(round(moving, 2))
                    print(f"round {k + 1} {kind:<11} {mbps:7.1f} MB/s end to end ({r['seconds']} s), "
                          f"{moving:7.1f} MB/s while transferring", flush=True)
        finally:
            for proc, _ in seeds:
                proc.terminate()
                proc.wait(timeout=10)
    one = statistics.median(rounds["one_seed"])
    three = statistics.median(rounds["three_seeds"])
    t_one = statistics.median(transfer["one_seed"])
    t_three = statistics.median(transfer["three_seeds"])
    report = {"size_mb": args.size_mb, "seed_rate": args.rate, "rounds": rounds,
              "transfer_rounds": transfer,
              "one_seed_mb_s": round(one, 2), "three_seeds_mb_s": round(three, 2),
              "ratio": round(three / one, 3),
              "transfer_one_seed_mb_s": round(t_one, 2), "transfer_three_seeds_mb_s": round(t_three, 2),
              "transfer_ratio": round(t_three / t_one, 3)}
    print(f"median end to end (manifests, download, whole-file check, rename): one seed "
          f"{one:.1f} MB/s, three seeds {three:.1f} MB/s, ratio {three / one:.2f}x (ideal 3x)")
    print(f"median while transferring: one seed {t_one:.1f} MB/s, three seeds {t_three:.1f} MB/s, "
          f"ratio {t_three / t_one:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Time one RPC round trip to a real rpc-server: straight over TCP, and
through the tls-token tunnel (`tightwad rpc-worker`'s), on loopback.

Each sample is one GET_DEVICE_MEMORY command and its answer on an open
connection (after the HELLO handshake), the smallest real round trip of
llama.cpp's RPC protocol. The two paths alternate in blocks so drift on the
machine hits both alike; the report gives medians and the tunnel's added
time per round trip.

    python contrib/benchmarks/tunnel_rtt.py [--samples 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from tightwad_core.runtime import rpc
from tightwad_core.runtime.procs import find_engine, free_port
from tightwad_plugins.transports.certs import load_or_create
from tightwad_plugins.transports.tls_token import open_tunnel, serve_tunnel

MEMORY = bytes([rpc.GET_DEVICE_MEMORY]) + struct.pack("<Q", 4) + struct.pack("<I", 0)


async def _exactly(stream: trio.abc.ReceiveStream, n: int) -> None:
    got = 0
    while got < n:
        chunk = await stream.receive_some(n - got)
        if not chunk:
            raise EOFError
        got += len(chunk)


async def _samples(stream: trio.abc.Stream, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await stream.send_all(MEMORY)
        await _exactly(stream, 8 + 16)
        out.append(time.perf_counter() - t0)
    return out


async def main(samples: int, block: int, out: Path | None) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "rpc.log", "wb")
        proc = subprocess.Popen([str(find_engine("rpc-server")), "-H", "127.0.0.1", "-p", str(port),
                                 "-t", "1"], stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(200):
                try:
                    await rpc.hello(f"127.0.0.1:{port}", timeout=1)
                    break
                except rpc.RpcError:
                    await trio.sleep(0.05)
            ident = load_or_create(Path(tmp) / "state")
            token = "benchmark-token-0123456789"
            async with trio.open_nursery() as nursery:
                tport, _ = await nursery.start(serve_tunnel, "127.0.0.1", 0, ident.server_context(),
                                               token, ("127.0.0.1", port))
                direct: list[float] = []
                tunnel: list[float] = []
                done = 0
                while done < samples:
                    n = min(block, samples - done)
                    for path in ("direct", "tunnel") if done // block % 2 == 0 else ("tunnel", "direct"):
                        if path == "direct":
                            stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
                        else:
                            stream = await open_tunnel("127.0.0.1", tport, ident.fingerprint, token, "bench")
                        async with stream:
                            await rpc.probe_stream(stream, path, memory=False)
                            await _samples(stream, 20)  # warm-up
                            (direct if path == "direct" else tunnel).extend(await _samples(stream, n))
                    done += n
                nursery.cancel_scope.cancel()
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
    d_ms, t_ms = statistics.median(direct) * 1e3, statistics.median(tunnel) * 1e3
    report = {"samples_each": samples, "direct_median_ms": round(d_ms, 4),
              "tunnel_median_ms": round(t_ms, 4), "added_ms": round(t_ms - d_ms, 4),
              "direct_p90_ms": round(statistics.quantiles(direct, n=10)[-1] * 1e3, 4),
              "tunnel_p90_ms": round(statistics.quantiles(tunnel, n=10)[-1] * 1e3, 4)}
    print(f"RPC round trip (GET_DEVICE_MEMORY), median of {samples} each, alternating blocks of {block}:")
    print(f"  straight TCP      {d_ms:.3f} ms (p90 {report['direct_p90_ms']:.3f})")
    print(f"  tls-token tunnel  {t_ms:.3f} ms (p90 {report['tunnel_p90_ms']:.3f})")
    print(f"  added by the tunnel: {t_ms - d_ms:.3f} ms per round trip")
    if out is not None:
        out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000, help="round trips per path (default 2000)")
    ap.add_argument("--block", type=int, default=250, help="round trips per block before switching")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.samples < 10 or args.block < 1:
        sys.exit("--samples must be at least 10 and --block at least 1")
    trio.run(main, args.samples, args.block, args.json)

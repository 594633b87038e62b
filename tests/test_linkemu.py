"""The link emulator on real sockets on 127.0.0.1: delay, pipelining, bandwidth,
integrity, close propagation, HTTP through it, and the `link` command."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from click.testing import CliRunner

from tightwad_core.bench import link as linkemu
from tightwad_core.bench.link import LinkHandle, LinkSpec, parse_bandwidth, parse_delay, serve_link
from tightwad_core.cli.link import link, parse_address


async def start_server(nursery: trio.Nursery,
                       handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def start_link(nursery: trio.Nursery, port: int, delay: float,
                     bandwidth: float | None = None) -> LinkHandle:
    return await nursery.start(serve_link, "127.0.0.1", 0, "127.0.0.1", port,
                               LinkSpec(delay, bandwidth))


async def connect(handle: LinkHandle) -> trio.SocketStream:
    return await trio.open_tcp_stream(handle.host, handle.port)


async def echo(stream: trio.SocketStream) -> None:
    try:
        async with stream:
            async for data in stream:
                await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        assert (data := await stream.receive_some(n - len(buf))), f"EOF after {len(buf)} bytes"
        buf += data
    return bytes(buf)


async def round_trip(stream: trio.SocketStream, message: bytes = b"ping") -> float:
    t0 = trio.current_time()
    await stream.send_all(message)
    assert await receive_exactly(stream, len(message)) == message
    return trio.current_time() - t0


async def closed_by_peer(stream: trio.SocketStream) -> bool:
    try:
        return await stream.receive_some() == b""
    except trio.BrokenResourceError:  # a reset is a close too
        return True


class Recorder:
    """A server that keeps what arrives with its arrival time, and notes the EOF."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.eof = trio.Event()

    async def __call__(self, stream: trio.SocketStream) -> None:
        async with stream:
            async for data in stream:
                self.chunks.append((trio.current_time(), data))
        self.eof.set()


DELAYS = {"10ms": 0.01, "0.5s": 0.5, "25": 0.025, "250us": 250e-6, "250µs": 250e-6, "0": 0.0,
          " 1.5 ms ": 0.0015, "2S": 2.0, "1e2ms": 0.1}
RATES = {"100mbit": 12.5e6, "1gbit": 125e6, "500kbit": 62.5e3, "100Mbit/s": 12.5e6, "8bit": 1.0,
         "10MB": 10e6, "10MB/s": 10e6, "512KiB": 512 * 1024, "1GiB": 2**30, "2kB": 2000.0,
         "1000": 1000.0}
ADDRESSES = {"127.0.0.1:9000": ("127.0.0.1", 9000), "[::1]:80": ("::1", 80),
             "localhost:0": ("localhost", 0)}
GOOD = [*((parse_delay, t, v) for t, v in DELAYS.items()),
        *((parse_bandwidth, t, v) for t, v in RATES.items()),
        *((parse_address, t, v) for t, v in ADDRESSES.items())]
BAD = [*((parse_delay, t) for t in ["", "nonsense", "-5ms", "10 minutes", "ms", "1e999s", "10m"]),
       *((parse_bandwidth, t) for t in ["", "fast", "0mbit", "10mb", "100mbps", "10Mbps", "-1MB",
                                        "10 furlongs", "1e999MB"]),
       *((parse_address, t) for t in ["nohost", ":80", "host:", "host:99999", "host:x"])]


@pytest.mark.parametrize(("parse", "text", "expected"), GOOD)
def test_parsers_accept(parse: Callable[[str], Any], text: str, expected: Any) -> None:
    assert parse(text) == pytest.approx(expected)


@pytest.mark.parametrize(("parse", "text"), BAD)
def test_parsers_reject_with_a_clear_message(parse: Callable[[str], Any], text: str) -> None:
    with pytest.raises(ValueError, match=repr(text)):
        parse(text)


def test_link_spec_validates() -> None:
    for bad in [(-0.1,), (float("inf"),), (0.01, 0.0), (0.01, -5.0)]:
        with pytest.raises(ValueError):
            LinkSpec(*bad)
    assert LinkSpec(0.01, 12.5e6).describe().startswith("10 ms each way, 100 Mbit/s")



async def test_round_trip_takes_both_one_way_delays(nursery: trio.Nursery) -> None:
    handle = await start_link(nursery, await start_server(nursery, echo), 0.05)
    assert handle.url == f"http://127.0.0.1:{handle.port}"
    with trio.fail_after(5):
        async with await connect(handle) as stream:
            elapsed = await round_trip(stream)
    assert 0.100 <= elapsed < 0.195  # each delay once; counted twice it would take 0.2 s


async def median_rtt(port: int, rounds: int = 40) -> float:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        times = [await round_trip(stream, b"x" * 64) for _ in range(rounds)]
    return statistics.median(times[5:])


async def test_relay_adds_under_a_millisecond(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, echo)
    plain = await start_link(nursery, port, 0.0)
    delayed = await start_link(nursery, port, 0.002)  # through the delay line
    with trio.fail_after(5):
        direct = await median_rtt(port)
        through_plain = await median_rtt(plain.port)
        through_line = await median_rtt(delayed.port, rounds=25)
    assert through_plain - direct < 0.001
    # the delay line is never early; how late it runs (the OS timer's millisecond rounding,
    # ~0.5 ms each way when idle) depends on the machine's load, so only a loose bound here
    assert 0.004 <= through_line < 0.004 + 0.05


async def test_delay_is_pipelined_not_cumulative(nursery: trio.Nursery) -> None:
    rec = Recorder()
    handle = await start_link(nursery, await start_server(nursery, rec), 0.05)
    sent: list[float] = []
    with trio.fail_after(5):
        async with await connect(handle) as stream:
            for i in range(20):  # one byte each, 10 ms apart: 200 ms of sending
                sent.append(trio.current_time())
                await stream.send_all(bytes([i]))
                await trio.sleep_until(sent[0] + (i + 1) * 0.01)
        await rec.eof.wait()
    arrivals = [t for t, data in rec.chunks for _ in data]
    assert [b for _, data in rec.chunks for b in data] == list(range(20))
    lags = [a - s for a, s in zip(arrivals, sent, strict=True)]
    assert all(0.045 <= lag <= 0.080 for lag in lags), [round(x, 4) for x in lags]


async def time_transfer(nursery: trio.Nursery, bandwidth: float | None, delay: float = 0.0,
                        total: int = 1_000_000) -> float:
    rec = Recorder()
    handle = await start_link(nursery, await start_server(nursery, rec), delay, bandwidth)
    payload = os.urandom(total)
    with trio.fail_after(5):
        async with await connect(handle) as stream:
            t0 = trio.current_time()
            await stream.send_all(payload)
        await rec.eof.wait()
    return rec.chunks[-1][0] - t0


async def test_bandwidth_cap_serializes(nursery: trio.Nursery) -> None:
    capped = await time_transfer(nursery, 10e6)
    uncapped = await time_transfer(nursery, None)
    assert 0.09 <= capped < 0.5
    assert uncapped < capped / 2
    # 100 kB at 1 MB/s is 0.1 s on the wire, then 50 ms of propagation
    assert 0.15 <= await time_transfer(nursery, 1e6, delay=0.05, total=100_000) < 0.3


async def test_bytes_in_flight_are_bounded(nursery: trio.Nursery,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # with at most 100 kB held in a 50 ms line, 1 MB needs about ten delays' worth of time
    monkeypatch.setattr(linkemu, "MAX_IN_FLIGHT", 100_000)
    assert await time_transfer(nursery, None, delay=0.05) >= 0.3



async def test_five_megabytes_both_ways_intact(nursery: trio.Nursery) -> None:
    handle = await start_link(nursery, await start_server(nursery, echo), 0.005)
    payload = os.urandom(5_000_000)
    received = bytearray()

    async def sender(stream: trio.SocketStream) -> None:
        for i in range(0, len(payload), 100_003):  # odd-sized writes
            await stream.send_all(payload[i:i + 100_003])
        await stream.send_eof()

    with trio.fail_after(15):
        async with await connect(handle) as stream:
            async with trio.open_nursery() as inner:
                inner.start_soon(sender, stream)
                async for data in stream:  # echoes arrive while the sender is still sending
                    received += data
    assert len(received) == len(payload) and bytes(received) == payload
    assert handle.stats.bytes_up == handle.stats.bytes_down == len(payload)
    assert handle.stats.connections == 1


async def test_closes_propagate_both_ways(nursery: trio.Nursery) -> None:
    async def answer_and_close(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(b"bye")

    rec = Recorder()
    answering = await start_link(nursery, await start_server(nursery, answer_and_close), 0.02)
    recording = await start_link(nursery, await start_server(nursery, rec), 0.02)
    with trio.fail_after(2):
        async with await connect(answering) as stream:  # the server closes: the client sees EOF
            await stream.send_all(b"hello")
            assert await receive_exactly(stream, 3) == b"bye"
            assert await stream.receive_some() == b""
        stream = await connect(recording)  # the client closes: the server sees EOF
        await stream.send_all(b"last words")
        t0 = trio.current_time()
        await stream.aclose()
        await rec.eof.wait()
        assert trio.current_time() - t0 >= 0.02  # the EOF travels the link too
        while answering.stats.active or recording.stats.active:
            await trio.sleep(0.01)
    assert b"".join(data for _, data in rec.chunks) == b"last words"


async def test_unreachable_target_closes_client(nursery: trio.Nursery) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    handle = await start_link(nursery, dead_port, 0.01)
    with trio.fail_after(2):
        for _ in range(2):  # the link keeps serving after a failed upstream
            async with await connect(handle) as stream:
                assert await closed_by_peer(stream)
    assert handle.stats.failed == 2


async def test_cancel_closes_everything_promptly(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, echo)
    with trio.fail_after(2):
        async with trio.open_nursery() as inner:
            handle = await start_link(inner, port, 1.0)
            stream = await connect(handle)
            await stream.send_all(b"x" * 1000)
            while handle.stats.active < 1:
                await trio.sleep(0.01)
            t0 = trio.current_time()
            inner.cancel_scope.cancel()
        assert trio.current_time() - t0 < 0.1
        async with stream:
            assert await closed_by_peer(stream)
    assert handle.stats.active == 0 and handle.stats.bytes_up == 0


async def test_http_get_through_the_link(nursery: trio.Nursery) -> None:
    async def http(stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            while b"\r\n\r\n" not in buf and (data := await stream.receive_some()):
                buf += data
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                  b"Content-Length: 5\r\nConnection: close\r\n\r\nhello")

    handle = await start_link(nursery, await start_server(nursery, http), 0.02)
    with trio.fail_after(5):
        async with httpx.AsyncClient(trust_env=False) as client:
            t0 = trio.current_time()
            resp = await client.get(f"{handle.url}/v1/models")
            elapsed = trio.current_time() - t0
    assert resp.status_code == 200 and resp.text == "hello"
    assert elapsed >= 0.04



def test_cli_help_says_what_it_is_for() -> None:  # `tightwad link --help`
    result = CliRunner().invoke(link, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split()).lower()
    assert "emulate a slow network link between the proxy and a model server" in text
    assert all(opt in result.output for opt in ("--listen", "--to", "--delay", "--bandwidth"))


@pytest.mark.parametrize(("args", "option"), [
    (["--to", "127.0.0.1:8080", "--delay", "nonsense"], "--delay"),
    (["--to", "127.0.0.1:8080", "--bandwidth", "fast"], "--bandwidth"),
    (["--to", "nowhere"], "--to"),
    (["--to", "127.0.0.1:8080", "--listen", "127.0.0.1:http"], "--listen"),
])
def test_cli_bad_arguments_give_one_line(args: list[str], option: str) -> None:
    result = CliRunner().invoke(link, args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and option in errors[0], result.output
    assert "Traceback" not in result.output


def test_cli_port_in_use_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(link, ["--listen", f"127.0.0.1:{port}", "--to", "127.0.0.1:1"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith("error: cannot listen on") and result.output.count("\n") == 1


async def test_cli_relays_until_ctrl_c(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, echo)
    argv = [sys.executable, "-c", "from tightwad_core.cli.link import link; link()",
            "--to", f"127.0.0.1:{port}", "--delay", "10ms"]
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    try:
        with trio.fail_after(10):
            while b"\n" not in out:
                assert (data := await proc.stdout.receive_some()), "exited before printing its URL"
                out += data
            host, _, link_port = out.split()[1].decode().removeprefix("http://").rpartition(":")
            async with await trio.open_tcp_stream(host, int(link_port)) as stream:
                assert await round_trip(stream) >= 0.02
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
            while data := await proc.stdout.receive_some():
                out += data
    finally:
        if proc.returncode is None:  # only on failure: do not leave it running
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
        await proc.stdout.aclose()
    assert b"link closed: 1 connection(s)" in out and b"Traceback" not in out


def test_cli_refuses_to_be_an_open_relay() -> None:
    """Beyond loopback the link would relay anyone to the target: refused without --allow-remote."""
    result = CliRunner().invoke(link, ["--to", "127.0.0.1:9", "--listen", "0.0.0.0:0"])
    assert result.exit_code == 2 and "--allow-remote" in result.output
    assert "Traceback" not in result.output

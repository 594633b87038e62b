"""A user-space network link emulator: a TCP relay that delays bytes like a slow link.

Benchmarks need a slow network between the proxy and a remote model server on
machines without netem. :func:`serve_link` accepts TCP connections, opens one
upstream connection for each, and relays both directions through delay lines:

* propagation delay is pipelined: bytes read from one side at time ``t`` are
  written to the other at ``t + delay`` whatever else is in flight, so a
  stream keeps its full rate and only gains latency;
* an optional bandwidth cap serializes each direction: a chunk of ``n`` bytes
  occupies the link for ``n / bandwidth`` seconds, queued behind earlier
  chunks, and the propagation delay is added after that.

A half close (EOF) travels through the same delay line, after the bytes before it.
"""

from __future__ import annotations

import logging
import math
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio

log = logging.getLogger("tightwad.link")

CHUNK = 64 * 1024                 # largest single read from a socket
SLICE = 16 * 1024                 # with a bandwidth cap, chunks are sent in slices this big
MAX_IN_FLIGHT = 64 * 1024 * 1024  # bytes held per direction before the relay stops reading

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(frozen=True)
class LinkSpec:
    """What the emulated link looks like, the same in each direction."""

    delay: float                      # one-way delay in seconds
    bandwidth: float | None = None    # bytes per second per direction; None = unlimited

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {self.delay!r}")
        bw = self.bandwidth
        if bw is not None and not (math.isfinite(bw) and bw > 0):
            raise ValueError(f"bandwidth must be a finite number of bytes/s > 0, not {bw!r}")

    def describe(self) -> str:
        text = f"{self.delay * 1000:g} ms each way"
        if self.bandwidth is None:
            return text + ", unlimited bandwidth"
        mbit, mbyte = self.bandwidth * 8 / 1e6, self.bandwidth / 1e6
        return text + f", {mbit:g} Mbit/s ({mbyte:g} MB/s) per direction"


# --------------------------------------------------------------------------- parsing

_NUMBER = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ/]*)\s*")
_TIME_UNITS = {"": 1e-3, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_BIT_PREFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BYTE_PREFIXES = {**_BIT_PREFIXES, "ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}


def parse_delay(text: str) -> float:
    """``"10ms"``, ``"0.5s"``, ``"250us"`` -> seconds. A bare number is milliseconds."""
    m = _NUMBER.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _TIME_UNITS:
        raise ValueError(f"bad delay {text!r}: expected a number with an optional unit "
                         "us, ms or s (a bare number is milliseconds), e.g. '10ms'")
    value = float(m.group(1)) * _TIME_UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"bad delay {text!r}: too large")
    return value


def parse_bandwidth(text: str) -> float:
    """``"100mbit"``, ``"1gbit"``, ``"10MB"``, ``"512KiB/s"`` -> bytes per second.

    ``bit`` units count bits and are case-insensitive; byte units need a capital
    ``B`` (``kB``, ``MB``, ``GB``, ``MiB``...). A bare number is bytes per second.
    ``mbps``-style units are refused because tools disagree on what they mean.
    """
    m = _NUMBER.fullmatch(text)
    hint = ("expected a number and a unit such as 500kbit, 100mbit, 1gbit (bits/s) "
            "or 10MB, 512KiB (bytes/s), e.g. '100mbit'")
    if m is None:
        raise ValueError(f"bad bandwidth {text!r}: {hint}")
    unit = m.group(2).removesuffix("/s")
    if unit.lower().endswith("bps"):
        raise ValueError(f"ambiguous bandwidth unit in {text!r}: write '{m.group(1)}mbit' "
                         f"for megabits or '{m.group(1)}MB' for megabytes per second")
    if unit.lower().endswith("bit") and unit[:-3].lower() in _BIT_PREFIXES:
        value = float(m.group(1)) * _BIT_PREFIXES[unit[:-3].lower()] / 8
    elif unit.endswith("B") and unit[:-1].lower() in _BYTE_PREFIXES:
        value = float(m.group(1)) * _BYTE_PREFIXES[unit[:-1].lower()]
    elif unit == "":
        value = float(m.group(1))
    else:
        raise ValueError(f"bad bandwidth {text!r}: {hint}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"bad bandwidth {text!r}: must be more than zero and finite")
    return value


# --------------------------------------------------------------------------- the relay


@dataclass
class LinkStats:
    """Counters for one running link (bytes are counted when delivered)."""

    connections: int = 0   # client connections accepted so far
    active: int = 0        # client connections open now
    failed: int = 0        # connections whose upstream connect failed
    bytes_up: int = 0      # client -> target
    bytes_down: int = 0    # target -> client
    round_trips: int = 0   # answers: bytes delivered down after bytes went up
    _last: str = "bytes_down"

    def delivered(self, counter: str, n: int) -> None:
        setattr(self, counter, getattr(self, counter) + n)
        if counter == "bytes_down" and self._last == "bytes_up":
            self.round_trips += 1
        self._last = counter


@dataclass(frozen=True)
class LinkHandle:
    """What :func:`serve_link` reports once it is listening."""

    host: str
    port: int
    stats: LinkStats = field(default_factory=LinkStats)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class _Budget:
    """Bounds the bytes held in one delay line."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = trio.Event()

    async def acquire(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            await self._changed.wait()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._changed.set()
        self._changed = trio.Event()


class _Line:
    """Departure and delivery times for one direction of the link."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self.free_at = -math.inf   # when the sender side of the link is idle again

    def schedule(self, arrival: float, n: int) -> float:
        departure = max(arrival, self.free_at)
        if self.spec.bandwidth is not None:
            departure += n / self.spec.bandwidth
        self.free_at = departure
        return departure + self.spec.delay


Opener = Callable[[], Awaitable[trio.abc.Stream]]


def _nodelay(stream: trio.abc.Stream) -> None:
    if not isinstance(stream, trio.SocketStream):
        return  # a TLS stream: its transport was tuned by whoever opened it
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    except OSError:  # not TCP (never here) or already closed; nothing to tune
        pass


async def _eof(dst: trio.abc.Stream) -> None:
    """Pass a half close on; a stream without one (TLS) is closed instead."""
    if isinstance(dst, trio.abc.HalfCloseableStream):
        await dst.send_eof()
    else:
        await dst.aclose()


async def _carry(src: trio.abc.Stream, out: trio.MemorySendChannel[tuple[float, bytes]],
                 line: _Line, budget: _Budget, ended: list[str], counter: str) -> None:
    """Read from ``src`` and put each piece on the delay line with its delivery time."""
    async with out:
        while True:
            data = await src.receive_some(CHUNK)
            if not data:
                ended.append(counter)
                await out.send((line.schedule(trio.current_time(), 0), b""))
                return
            step = SLICE if line.spec.bandwidth is not None else len(data)
            for i in range(0, len(data), step):
                piece = bytes(data[i:i + step])
                await budget.acquire(len(piece))
                await out.send((line.schedule(trio.current_time(), len(piece)), piece))


async def _deliver(inbox: trio.MemoryReceiveChannel[tuple[float, bytes]], dst: trio.abc.Stream,
                   budget: _Budget, stats: LinkStats, counter: str) -> None:
    """Write each piece to ``dst`` at its delivery time; an empty piece is the EOF."""
    async with inbox:
        async for deliver_at, data in inbox:
            if deliver_at > trio.current_time():
                await trio.sleep_until(deliver_at)
            if not data:
                await _eof(dst)
                continue
            await dst.send_all(data)
            stats.delivered(counter, len(data))
            budget.release(len(data))


async def _guarded(abort: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
    """A broken socket on either side ends the whole connection."""
    try:
        await fn()
    except _BROKEN as exc:
        log.debug("link connection ended: %r", exc)
        abort.cancel()


async def _pump(src: trio.abc.Stream, dst: trio.abc.Stream, stats: LinkStats,
                counter: str, ended: list[str]) -> None:
    """A link with no delay and no cap is a plain relay: no delay line, no extra hop."""
    while data := await src.receive_some(CHUNK):
        await dst.send_all(data)
        stats.delivered(counter, len(data))
    ended.append(counter)
    await _eof(dst)


async def _direction(src: trio.abc.Stream, dst: trio.abc.Stream, spec: LinkSpec,
                     stats: LinkStats, counter: str, abort: trio.CancelScope,
                     ended: list[str]) -> None:
    """``ended`` gets ``counter`` when this direction's source ends (its EOF,
    or a failure), so the first entry says which side ended the connection."""
    try:
        if spec.delay == 0 and spec.bandwidth is None:
            await _guarded(abort, partial(_pump, src, dst, stats, counter, ended))
            return
        out, inbox = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        budget = _Budget(MAX_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_guarded, abort, partial(_deliver, inbox, dst, budget, stats, counter))
            nursery.start_soon(_guarded, abort, partial(_carry, src, out, _Line(spec), budget,
                                                        ended, counter))
    finally:
        if not ended:  # failed or cancelled before either side said EOF
            ended.append(counter)


class _Ends(list[str]):
    """The directions that ended, in order; ``first`` hears of the first one
    the moment it ends, before the other side is closed."""

    def __init__(self, first: Callable[[str], None] | None) -> None:
        super().__init__()
        self.first = first

    def append(self, counter: str) -> None:
        if not self and self.first is not None:
            self.first("client" if counter == "bytes_up" else "upstream")
        super().append(counter)


async def relay(client: trio.abc.Stream, upstream: trio.abc.Stream, spec: LinkSpec,
                stats: LinkStats, on_end: Callable[[str], None] | None = None) -> str:
    """Relay both ways until the connection ends; which side ended it first:
    ``"client"`` or ``"upstream"`` (also told to ``on_end`` at once, before the
    other side learns of it: whoever watches the client then knows why)."""
    _nodelay(client)
    _nodelay(upstream)
    ended = _Ends(on_end)
    async with trio.open_nursery() as nursery:
        run = partial(_direction, spec=spec, stats=stats, abort=nursery.cancel_scope, ended=ended)
        nursery.start_soon(partial(run, client, upstream, counter="bytes_up"))
        nursery.start_soon(partial(run, upstream, client, counter="bytes_down"))
    return "client" if not ended or ended[0] == "bytes_up" else "upstream"


async def _connection(client: trio.SocketStream, *, target: tuple[str, int], spec: LinkSpec,
                      stats: LinkStats) -> None:
    stats.connections += 1
    stats.active += 1
    try:
        async with client:
            try:
                upstream = await trio.open_tcp_stream(*target)
            except OSError as exc:
                stats.failed += 1
                log.warning("link: cannot connect to %s:%d: %s", *target, exc)
                return
            async with upstream:
                await relay(client, upstream, spec, stats)
    finally:
        stats.active -= 1


async def serve_link(listen_host: str, listen_port: int, target_host: str, target_port: int,
                     spec: LinkSpec, *,
                     task_status: trio.TaskStatus[LinkHandle] = trio.TASK_STATUS_IGNORED) -> None:
    """Relay TCP connections on ``listen_host:listen_port`` to the target through the link.

    Port 0 picks a free port. Reports a :class:`LinkHandle` through ``task_status``
    once listening, then serves until cancelled; cancelling closes every connection.
    """
    listeners = await trio.open_tcp_listeners(listen_port, host=listen_host or None)
    try:
        host, port = listeners[0].socket.getsockname()[:2]
        handle = LinkHandle(host, port)
        handler = partial(_connection, target=(target_host, target_port), spec=spec,
                          stats=handle.stats)
        log.info("link %s -> %s:%d (%s)", handle.url, target_host, target_port, spec.describe())
        task_status.started(handle)
        await trio.serve_listeners(handler, listeners)
    finally:
        for listener in listeners:
            listener.socket.close()

"""``tcp``: a plain TCP connection to the rpc-server (loopback, or a network
you trust: rpc-server has no authentication), and ``emulated``: the same
through a user-space slow link (test beds; see docs/linkemu.md)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from tightwad_core.bench.link import LinkSpec, parse_bandwidth, parse_delay
from tightwad_core.config.schema import RpcWorkerConfig
from tightwad_core.hookspecs import hookimpl
from tightwad_core.roles import TransportFactory
from tightwad_core.runtime.rpc import RpcError


async def open_tcp(host: str, port: int, name: str, timeout: float = 5.0) -> trio.SocketStream:
    """A TCP stream with Nagle off; RpcError naming the worker when it cannot be opened."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        why = "no answer" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))
        raise RpcError(f"rpc worker {name!r} at {host}:{port} is unreachable: {why}") from exc
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return stream


class TcpTransport:
    name = "tcp"

    def __init__(self, worker: RpcWorkerConfig) -> None:
        self.worker = worker
        self.link = LinkSpec(0.0)

    def describe(self) -> str:
        return f"{self.name} to {self.worker.host}:{self.worker.port}"

    async def connect(self) -> trio.abc.Stream:
        return await open_tcp(self.worker.host, self.worker.port, self.worker.name)


class EmulatedTransport(TcpTransport):
    """TCP through a link with the worker's `delay` and `bandwidth`, each way."""

    name = "emulated"

    def __init__(self, worker: RpcWorkerConfig) -> None:
        super().__init__(worker)
        bw = parse_bandwidth(worker.bandwidth) if worker.bandwidth else None
        self.link = LinkSpec(parse_delay(worker.delay), bw)

    def describe(self) -> str:
        return f"{super().describe()} over an emulated link ({self.link.describe()})"


@hookimpl
def register_transports(register: Callable[[str, TransportFactory], None]) -> None:
    register(TcpTransport.name, TcpTransport)
    register(EmulatedTransport.name, EmulatedTransport)

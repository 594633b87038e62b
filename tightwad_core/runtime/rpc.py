"""llama.cpp's RPC protocol as far as Tightwad needs it: the HELLO handshake
that says a port is really an rpc-server and which protocol version it
speaks, and the version the local engine speaks.

A request is ``| command (1 byte) | size (8 bytes, little-endian) | data |``
and an answer ``| size (8 bytes) | data |``. HELLO (command 14) carries 24
bytes of transport capabilities (zeros: plain TCP); its answer is the major,
minor and patch version, one padding byte and the server's capabilities.
DEVICE_COUNT (15) and GET_DEVICE_MEMORY (11) say how much memory each of the
server's devices has free, as the server itself measures it. A
client refuses a server whose major version differs or whose minor version
is newer than its own. rpc-server serves one client at a time, so a server
that accepts the connection but does not answer is busy with another.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import trio

GET_DEVICE_MEMORY = 11
HELLO = 14
DEVICE_COUNT = 15
HELLO_MAJOR = 7  # the protocol major whose DEVICE_COUNT/GET_DEVICE_MEMORY layout is used here
CAPS_SIZE = 24
_HELLO_ANSWER = 4 + CAPS_SIZE


class RpcError(Exception):
    """An RPC endpoint that cannot be used; the message names it and why."""


@dataclass(frozen=True, order=True)
class RpcVersion:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    def serves(self, client: RpcVersion) -> bool:
        """Whether a client speaking ``client`` accepts a server speaking this."""
        return self.major == client.major and self.minor <= client.minor


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:50052``) -> (host, port); ValueError otherwise."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not m:
        raise ValueError(f"expected HOST:PORT for an rpc-server, got {text!r}")
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} of {text!r} is out of range")
    return m.group(1) or m.group(3), port


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


@dataclass(frozen=True)
class DeviceMemory:
    """One device of an rpc-server, as the server reports it."""

    free: int   # bytes
    total: int  # bytes


@dataclass(frozen=True)
class RpcInfo:
    """What an rpc-server says about itself after the handshake."""

    version: RpcVersion
    devices: tuple[DeviceMemory, ...] = ()

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)


async def _command(stream: trio.abc.Stream, cmd: int, body: bytes, answer: int,
                   name: str) -> bytes:
    await stream.send_all(bytes([cmd]) + struct.pack("<Q", len(body)) + body)
    size, = struct.unpack("<Q", await receive_exactly(stream, 8))
    if size != answer:
        raise RpcError(f"{name} answered RPC command {cmd} with {size} bytes, not {answer}: "
                       "not an rpc-server of this protocol")
    return await receive_exactly(stream, answer)


async def probe_stream(stream: trio.abc.Stream, name: str, timeout: float = 5.0, *,
                       memory: bool = True) -> RpcInfo:
    """HELLO over an open byte stream, then (``memory``) the device count and
    each device's free and total memory. ``name`` is used in errors."""
    try:
        with trio.fail_after(timeout):
            body = await _command(stream, HELLO, bytes(CAPS_SIZE), _HELLO_ANSWER, name)
            version = RpcVersion(body[0], body[1], body[2])
            devices: list[DeviceMemory] = []
            if memory and version.major == HELLO_MAJOR:  # the layout this module knows
                count, = struct.unpack("<I", await _command(stream, DEVICE_COUNT, b"", 4, name))
                for i in range(min(count, 64)):
                    free, total = struct.unpack(
                        "<QQ", await _command(stream, GET_DEVICE_MEMORY, struct.pack("<I", i), 16, name))
                    devices.append(DeviceMemory(free, total))
    except trio.TooSlowError as exc:
        raise RpcError(f"rpc-server {name} accepted the connection but did not answer the "
                       f"handshake within {timeout:g}s: it serves one client at a time and is "
                       "probably busy with another") from exc
    except (EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise RpcError(f"{name} closed the connection during the RPC handshake: not an "
                       "rpc-server, or one of an older protocol") from exc
    return RpcInfo(version, tuple(devices))


async def open_endpoint(endpoint: str, timeout: float = 5.0) -> trio.SocketStream:
    """A TCP stream to ``host:port``; RpcError naming it when it cannot be reached."""
    host, port = parse_endpoint(endpoint)
    try:
        with trio.fail_after(timeout):
            return await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        why = "no answer" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))
        raise RpcError(f"rpc-server {endpoint} is unreachable: {why}") from exc


async def probe(endpoint: str, timeout: float = 5.0) -> RpcInfo:
    """Handshake with the rpc-server at ``endpoint``, read its memory, hang up."""
    stream = await open_endpoint(endpoint, timeout)
    async with stream:
        return await probe_stream(stream, endpoint, timeout)


async def hello(endpoint: str, timeout: float = 5.0) -> RpcVersion:
    """Handshake with the rpc-server at ``endpoint`` and hang up; its version."""
    stream = await open_endpoint(endpoint, timeout)
    async with stream:
        return (await probe_stream(stream, endpoint, timeout, memory=False)).version


def refusal(name: str, server: RpcVersion, client: RpcVersion) -> str | None:
    """Why a client speaking ``client`` cannot use ``server`` (None if it can)."""
    if server.serves(client):
        return None
    return (f"rpc-server {name} speaks RPC protocol {server}, this engine {client}: build both "
            "from the same llama.cpp (run `tightwad setup` on that machine)")


def source_version(tree: Path) -> RpcVersion | None:
    """The protocol version a llama.cpp source tree speaks (``ggml-rpc.h``)."""
    header = next(iter(sorted(tree.glob("**/ggml/include/ggml-rpc.h"))), None)
    if header is None:
        return None
    text = header.read_text(errors="replace")
    parts = [re.search(rf"#define\s+RPC_PROTO_{k}_VERSION\s+(\d+)", text) for k in
             ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    return RpcVersion(*(int(m.group(1)) for m in parts if m))


def engine_version() -> RpcVersion | None:
    """The protocol version of the engine `tightwad setup` built (None before it)."""
    from tightwad_core.runtime import catalog

    src = catalog.engine_dir() / "src"
    return source_version(src) if src.is_dir() else None


async def check_servers(endpoints: list[str], client: RpcVersion | None,
                        timeout: float = 5.0) -> dict[str, RpcVersion]:
    """Handshake with every endpoint; RpcError naming the first that is down,
    busy, not an rpc-server, or of a version ``client`` refuses."""
    found: dict[str, RpcVersion] = {}
    for ep in endpoints:
        version = await hello(ep, timeout)
        why = refusal(ep, version, client) if client is not None else None
        if why:
            raise RpcError(why)
        found[ep] = version
    return found

"""llama.cpp's RPC protocol as far as Tightwad needs it: the HELLO handshake
that says a port is really an rpc-server and which protocol version it
speaks, and the version the local engine speaks.

A request is ``| command (1 byte) | size (8 bytes, little-endian) | data |``
and an answer ``| size (8 bytes) | data |``. HELLO (command 14) carries 24
bytes of transport capabilities (zeros: plain TCP); its answer is the major,
minor and patch version, one padding byte and the server's capabilities. A
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

HELLO = 14
CAPS_SIZE = 24
_HELLO_REQUEST = bytes([HELLO]) + struct.pack("<Q", CAPS_SIZE) + bytes(CAPS_SIZE)
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


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


async def hello(endpoint: str, timeout: float = 5.0) -> RpcVersion:
    """Handshake with the rpc-server at ``endpoint`` and hang up; its version."""
    host, port = parse_endpoint(endpoint)
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        why = "no answer" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))
        raise RpcError(f"rpc-server {endpoint} is unreachable: {why}") from exc
    async with stream:
        try:
            with trio.fail_after(timeout):
                await stream.send_all(_HELLO_REQUEST)
                size, = struct.unpack("<Q", await _receive_exactly(stream, 8))
                if size != _HELLO_ANSWER:
                    raise RpcError(f"{endpoint} answered the RPC handshake with {size} bytes, not "
                                   f"{_HELLO_ANSWER}: not an rpc-server of this protocol")
                body = await _receive_exactly(stream, _HELLO_ANSWER)
        except trio.TooSlowError as exc:
            raise RpcError(f"rpc-server {endpoint} accepted the connection but did not answer the "
                           f"handshake within {timeout:g}s: it serves one client at a time and is "
                           "probably busy with another") from exc
        except (EOFError, OSError, trio.BrokenResourceError) as exc:
            raise RpcError(f"{endpoint} closed the connection during the RPC handshake: not an "
                           "rpc-server, or one of an older protocol") from exc
    return RpcVersion(body[0], body[1], body[2])


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
        if client is not None and not version.serves(client):
            raise RpcError(f"rpc-server {ep} speaks RPC protocol {version}, this engine {client}: "
                           "build both from the same llama.cpp (run `tightwad setup` on that "
                           "machine)")
        found[ep] = version
    return found

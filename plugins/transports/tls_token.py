"""``tls-token``: rpc-server behind a tunnel that encrypts and asks for a token.

rpc-server has no authentication and has had remote-code-execution bugs, so
`tightwad rpc-worker` binds it to loopback and puts this tunnel in front.
A connection is, in order:

1. TLS (1.2 or later) with the worker's self-signed certificate; the client
   compares the certificate's SHA-256 with the fingerprint in its profile and
   hangs up on any other, before sending anything;
2. the client sends ``TWRPC``, a version byte (1), the token's length (2
   bytes, big-endian) and the token; the server compares it in constant time
   and answers one byte, 1 (accepted) or 0 (refused, then hangs up); after
   a 1 come 2 bytes of length and a JSON object about the worker (its
   engine's backend, e.g. ``{"backend": "cuda", "version": "0.1.0"}``);
3. only then does the server open its connection to rpc-server and relay.

A connection that never authenticates gets no byte through to rpc-server;
it has 10 s to do so, and at most 32 may be authenticating at once (more
are closed straight away), so idle or slow strangers cannot pile up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import ssl
import struct
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING

import trio

from tightwad_core.bench.link import LinkSpec, LinkStats, relay
from tightwad_core.config.profiles import secret
from tightwad_core.config.schema import ConfigError, RpcWorkerConfig
from tightwad_core.hookspecs import hookimpl
from tightwad_core.roles import TransportFactory
from tightwad_core.runtime.rpc import RpcError, receive_exactly
from tightwad_plugins.transports.certs import fingerprint, normalize_fingerprint
from tightwad_plugins.transports.tcp import open_tcp

if TYPE_CHECKING:
    import click

log = logging.getLogger("tightwad.tunnel")

MAGIC = b"TWRPC\x01"
MAX_TOKEN = 1024
AUTH_TIMEOUT = 10.0
MAX_PENDING = 32  # connections authenticating at once; more are closed at once


def client_context() -> ssl.SSLContext:
    """No CA and no host name: the certificate is pinned by fingerprint instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def open_tunnel(host: str, port: int, pinned: str, token: str, name: str,
                      timeout: float = 5.0) -> trio.SSLStream[trio.SocketStream]:
    """Open the tunnel to a worker: TLS, the fingerprint check, the token."""
    raw = await open_tcp(host, port, name, timeout)
    stream = trio.SSLStream(raw, client_context(), server_hostname=None)
    where = f"rpc worker {name!r} at {host}:{port}"
    try:
        with trio.fail_after(timeout):
            await stream.do_handshake()
            der = stream.getpeercert(binary_form=True)
            got = fingerprint(der or b"")
            if not hmac.compare_digest(got, pinned):
                raise RpcError(f"{where} presented certificate {got}, but the profile pins {pinned}: "
                               "if that worker's certificate was made anew, put the fingerprint "
                               "`tightwad rpc-worker` prints into the profile; otherwise something "
                               "else answers at that address")
            blob = token.encode()
            await stream.send_all(MAGIC + struct.pack(">H", len(blob)) + blob)
            answer = await stream.receive_some(1)
            info: dict[str, object] = {}
            if answer == b"\x01":
                n, = struct.unpack(">H", await receive_exactly(stream, 2))
                try:
                    got_info = json.loads(await receive_exactly(stream, n))
                except ValueError:
                    got_info = None
                info = got_info if isinstance(got_info, dict) else {}
    except trio.TooSlowError:
        await raw.aclose()
        raise RpcError(f"{where} did not complete the TLS tunnel handshake within {timeout:g}s") from None
    except (trio.BrokenResourceError, ssl.SSLError, OSError, EOFError) as exc:
        await raw.aclose()
        raise RpcError(f"{where} broke off the TLS tunnel handshake ({exc!r}): is it a "
                       "`tightwad rpc-worker` tunnel, not a bare rpc-server?") from exc
    except RpcError:
        await raw.aclose()
        raise
    if answer != b"\x01":
        await raw.aclose()
        raise RpcError(f"{where} refused the token: set the worker's token (its state folder's "
                       "`token` file, or the variable it was started with) in the profile's "
                       "`token_env`")
    stream.worker_info = info
    return stream


class TlsTokenTransport:
    name = "tls-token"

    def __init__(self, worker: RpcWorkerConfig) -> None:
        self.worker = worker
        self.link = LinkSpec(0.0)
        if not worker.fingerprint:
            raise ConfigError(f"cluster worker {worker.name!r}: transport tls-token needs "
                              "`fingerprint` (printed by `tightwad rpc-worker` on that machine)")
        try:
            self.pinned = normalize_fingerprint(worker.fingerprint)
        except ValueError as exc:
            raise ConfigError(f"cluster worker {worker.name!r}: {exc}") from None
        token = secret(worker.token, worker.token_env)
        if not token:
            where = f"the variable {worker.token_env}" if worker.token_env else "`token` or `token_env`"
            raise ConfigError(f"cluster worker {worker.name!r}: transport tls-token needs the "
                              f"worker's token, but {where} is not set")
        self.token = token

        self.info: dict[str, object] = {}  # what the worker said about itself last time

    def describe(self) -> str:
        return f"{self.name} to {self.worker.host}:{self.worker.port}"

    async def connect(self) -> trio.abc.Stream:
        stream = await open_tunnel(self.worker.host, self.worker.port, self.pinned, self.token,
                                   self.worker.name)
        self.info = getattr(stream, "worker_info", {}) or {}
        return stream


# --------------------------------------------------------------------------- the worker side


def _same(given: bytes, expected: bytes) -> bool:
    """Constant time whatever the lengths: compare digests."""
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(expected).digest())


async def _authenticate(stream: trio.SSLStream[trio.SocketStream], token: bytes) -> bool:
    with trio.fail_after(AUTH_TIMEOUT):
        await stream.do_handshake()
        head = await receive_exactly(stream, len(MAGIC) + 2)
        if head[:len(MAGIC)] != MAGIC:
            return False
        n, = struct.unpack(">H", head[len(MAGIC):])
        if n > MAX_TOKEN:
            return False
        return _same(await receive_exactly(stream, n), token)


async def _tunnel_connection(raw: trio.SocketStream, *, ctx: ssl.SSLContext, token: bytes,
                             target: tuple[str, int], stats: LinkStats, info: bytes,
                             limiter: trio.CapacityLimiter) -> None:
    peer = "?"
    try:
        peer = "%s:%s" % raw.socket.getpeername()[:2]
    except OSError:
        pass
    stats.connections += 1
    stream = trio.SSLStream(raw, ctx, server_side=True)
    try:
        try:
            limiter.acquire_on_behalf_of_nowait(stream)
        except trio.WouldBlock:
            log.warning("tunnel: %s refused: %d connections are authenticating already", peer,
                        MAX_PENDING)
            stats.failed += 1
            return
        try:
            ok = await _authenticate(stream, token)
        except (trio.TooSlowError, EOFError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            log.warning("tunnel: %s gave up before authenticating (%s)", peer, type(exc).__name__)
            stats.failed += 1
            return
        finally:
            limiter.release_on_behalf_of(stream)
        if not ok:
            log.warning("tunnel: %s sent a wrong token; refused", peer)
            stats.failed += 1
            try:
                await stream.send_all(b"\x00")
            except (trio.BrokenResourceError, OSError):
                pass
            return
        try:
            upstream = await trio.open_tcp_stream(*target)
        except OSError as exc:
            log.error("tunnel: rpc-server at %s:%d is not answering: %s", *target, exc)
            return
        async with upstream:
            await stream.send_all(b"\x01" + struct.pack(">H", len(info)) + info)
            stats.active += 1
            try:
                await relay(stream, upstream, LinkSpec(0.0), stats)
            finally:
                stats.active -= 1
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
        pass
    finally:
        await raw.aclose()


async def serve_tunnel(host: str, port: int, ctx: ssl.SSLContext, token: str,
                       target: tuple[str, int], *, info: Mapping[str, object] | None = None,
                       task_status: trio.TaskStatus[tuple[int, LinkStats]] = trio.TASK_STATUS_IGNORED,
                       ) -> None:
    """Accept tunnel connections on ``host:port`` and relay the authenticated
    ones to the rpc-server at ``target``; reports (port, stats) once listening.
    ``info`` (the worker's backend and version) goes to every client that
    authenticates."""
    if len(token) < 16:
        raise ValueError("the tunnel's token must be at least 16 characters")
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    stats = LinkStats()
    try:
        bound = listeners[0].socket.getsockname()[1]
        task_status.started((bound, stats))
        blob = json.dumps(info or {})[:4000].encode()
        handler = partial(_tunnel_connection, ctx=ctx, token=token.encode(), target=target,
                          stats=stats, info=blob, limiter=trio.CapacityLimiter(MAX_PENDING))
        await trio.serve_listeners(handler, listeners)
    finally:
        for listener in listeners:
            listener.socket.close()


@hookimpl
def register_transports(register: Callable[[str, TransportFactory], None]) -> None:
    register(TlsTokenTransport.name, TlsTokenTransport)


@hookimpl
def register_commands(register: Callable[[click.Command], None]) -> None:
    from tightwad_plugins.transports.rpc_worker import rpc_worker_command

    register(rpc_worker_command)

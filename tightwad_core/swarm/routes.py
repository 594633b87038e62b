"""The HTTP routes that serve a `SeedStore`'s pieces, and a minimal app
around them (for `tightwad swarm seed` and a pulling node's own serving;
the peer agent mounts the same blueprint).

    GET /v1/swarm/files                       the files served, with what is held
    GET /v1/swarm/files/<name>/manifest       the manifest
    GET /v1/swarm/files/<name>/bitfield       {"have": hex, "count": n}
    GET /v1/swarm/files/<name>/pieces/<i>     the piece's bytes (404 if not held,
                                              503 if its file cannot be read)

``name`` is a file name or whole-file SHA-256 looked up in the store, never
a path. A piece is streamed from its file in chunks, at most `MAX_READS`
chunk reads at a time per app, so no request holds a whole piece in memory."""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator

import trio
from quart import Blueprint, Response
from quart_trio import QuartTrio

from tightwad_core.config.profiles import is_loopback
from tightwad_core.errors import NotFound, TightwadError
from tightwad_core.http.serving import BrowserPolicy, guard, json_response, serve_app
from tightwad_core.swarm.manifest import SwarmError, encode_manifest
from tightwad_core.swarm.store import Seeded, SeedStore, read_exact

READ_CHUNK = 256 << 10  # bytes read from the file (and held) at a time per response
PACE_CHUNK = 64 << 10  # bytes sent at a time under a rate limit
MAX_READS = 8  # chunk reads at once per app


class Unreadable(TightwadError):
    """A piece this node holds but cannot read now (its file gone or cut short)."""

    status = 503
    type = "unavailable"


class RateLimit:
    """A token bucket shared by every response of one app: bytes leave no
    faster than ``rate`` per second on average, with bursts of ``burst`` s."""

    def __init__(self, rate: float, burst: float = 0.05) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise SwarmError(f"rate limit must be a positive number of bytes/s, not {rate}")
        self.rate = rate
        self.burst = burst
        self._next = 0.0

    async def take(self, n: int) -> None:
        now = trio.current_time()
        start = max(now - self.burst, self._next)
        self._next = start + n / self.rate
        await trio.sleep_until(self._next - self.burst)


def _entry(store: SeedStore, name: str) -> Seeded:
    entry = store.get(name)
    if entry is None:
        raise NotFound(f"no file named {name[:200]!r} is served here")
    return entry


def swarm_blueprint(store: SeedStore, *, rate_limit: float | None = None) -> Blueprint:
    bp = Blueprint("swarm", __name__)
    limit = RateLimit(rate_limit) if rate_limit else None
    reads = trio.CapacityLimiter(MAX_READS)

    @bp.get("/v1/swarm/files")
    async def files() -> Response:
        out = [{"name": e.manifest.name, "size": e.manifest.size, "sha256": e.manifest.sha256,
                "pieces": e.manifest.count, "have": e.have_hex()[1]} for e in store.entries()]
        return json_response({"files": out})

    @bp.get("/v1/swarm/files/<name>/manifest")
    async def manifest(name: str) -> Response:
        return Response(encode_manifest(_entry(store, name).manifest),
                        content_type="application/json")

    @bp.get("/v1/swarm/files/<name>/bitfield")
    async def bitfield(name: str) -> Response:
        have, count = _entry(store, name).have_hex()
        return json_response({"have": have, "count": count})

    async def _open(entry: Seeded, index: int) -> tuple[Seeded, int]:
        try:
            return await trio.to_thread.run_sync(store.open_piece, entry, index, limiter=reads)
        except OSError as exc:
            raise Unreadable(f"piece {index} of {entry.manifest.name} cannot be read here now: "
                             f"{exc.strerror or exc}") from None

    @bp.get("/v1/swarm/files/<name>/pieces/<int:index>")
    async def piece(name: str, index: int) -> Response:
        entry = _entry(store, name)
        if not entry.holds(index):
            raise NotFound(f"piece {index} of {entry.manifest.name} is not held here")
        entry, fd = await _open(entry, index)  # a missing file: an error, not a cut-off body
        os.close(fd)
        offset, length = entry.manifest.span(index)

        async def body() -> AsyncIterator[bytes]:
            _, fd = await _open(entry, index)  # opened in the body: closed however it ends
            try:
                for at in range(offset, offset + length, READ_CHUNK):
                    n = min(READ_CHUNK, offset + length - at)
                    data = await trio.to_thread.run_sync(read_exact, fd, n, at, limiter=reads)
                    if len(data) != n:
                        raise Unreadable(f"{entry.path} was cut short while it was read")
                    if limit is None:
                        yield data
                        continue
                    view = memoryview(data)
                    for part in range(0, n, PACE_CHUNK):
                        await limit.take(len(view[part:part + PACE_CHUNK]))
                        yield bytes(view[part:part + PACE_CHUNK])
            finally:
                os.close(fd)

        headers = {"Content-Length": str(length), "Cache-Control": "no-store"}
        return Response(body(), content_type="application/octet-stream", headers=headers)

    return bp


def piece_app(store: SeedStore, *, token: str | None, host: str,
              rate_limit: float | None = None) -> QuartTrio:
    """An app serving only ``store``'s pieces, behind the bearer check
    (``token`` None: open, which is allowed on loopback only)."""
    if not token and not is_loopback(host.strip("[]")):
        raise SwarmError(f"refusing to serve pieces on {host} without a token: beyond loopback "
                         "anyone could read them; set one (--token-env VAR)")
    app = QuartTrio("tightwad-swarm")
    app.register_blueprint(swarm_blueprint(store, rate_limit=rate_limit))
    guard(app, api_key=token, max_body_bytes=64 << 10,
          render=lambda exc: json_response(exc.body(), exc.status),
          browser=BrowserPolicy(bind_host=host))

    @app.get("/health")
    async def health() -> Response:
        return json_response({"ok": True, "files": len(store.names())})

    return app


async def serve_pieces(store: SeedStore, host: str, port: int, shutdown: trio.Event, *,
                       token: str | None = None, rate_limit: float | None = None,
                       task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``store`` on ``host:port`` (0: a free port) until ``shutdown``;
    ``task_status.started`` receives the base URL."""
    app = piece_app(store, token=token, host=host, rate_limit=rate_limit)

    async def _serve(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_app(app, host, port, shutdown, task_status=task_status)

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(_serve)
        task_status.started(urls[0].rstrip("/"))

"""Talking to one peer over HTTP: its manifest, its bitfield, one piece, each
read with a bound on its size, each failure turned into words."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import msgspec

from tightwad_core.swarm.manifest import MAX_MANIFEST_BYTES, Manifest, SwarmError, decode_manifest
from tightwad_core.swarm.store import Bitfield


@dataclass(frozen=True)
class PeerSource:
    url: str
    token: str | None = None


class PeerFailed(Exception):
    """The peer cannot be used (any more): ``str()`` says what it did."""


class PieceUnavailable(Exception):
    """The peer does not hold that piece (after all)."""


class TransientError(Exception):
    """A network error that may pass (the piece goes back to the queue)."""


def _errnos(exc: BaseException | None, depth: int = 0) -> set[int]:
    """The OS error numbers inside ``exc`` (its causes and exception groups)."""
    if exc is None or depth > 8:
        return set()
    found = {exc.errno} if isinstance(exc, OSError) and exc.errno else set()
    for inner in getattr(exc, "exceptions", ()):
        found |= _errnos(inner, depth + 1)
    return found | _errnos(exc.__cause__ or exc.__context__, depth + 1)


def explain(exc: BaseException) -> str:
    """What a network error means, in words."""
    if isinstance(exc, httpx.ConnectError):
        codes = _errnos(exc)
        if errno.ECONNREFUSED in codes or "refused" in str(exc).lower():
            return "connection refused (nothing listening there: not running, or another port)"
        if codes & {errno.EHOSTUNREACH, errno.ENETUNREACH}:
            return "host unreachable (check the address and the network)"
        return f"cannot connect ({exc or exc.__class__.__name__})"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return "connection lost mid-transfer"
    return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__


@dataclass
class PeerStats:
    bytes: int = 0
    pieces: int = 0
    dropped: str | None = None


class Peer:
    """One peer of a pull: where it is, what it holds, what came from it."""

    def __init__(self, source: PeerSource, client: httpx.AsyncClient) -> None:
        self.source = source
        self.url = source.url.rstrip("/")
        self.client = client
        self.headers = {"Authorization": f"Bearer {source.token}"} if source.token else {}
        self.have: Bitfield | None = None
        self.stats = PeerStats()
        self.failures = 0  # network errors in a row
        self.in_flight: set[int] = set()
        self.key = ""  # the file's name or sha256 on this peer

    @property
    def alive(self) -> bool:
        return self.stats.dropped is None

    def drop(self, reason: str) -> None:
        if self.stats.dropped is None:
            self.stats.dropped = reason

    def _path(self, what: str) -> str:
        return f"{self.url}/v1/swarm/files/{quote(self.key, safe='')}/{what}"

    async def _get(self, path: str, limit: int, what: str, count: bool = False) -> bytes:
        """GET ``path``, reading at most ``limit`` bytes; errors say what happened."""
        try:
            async with self.client.stream("GET", path, headers=self.headers) as resp:
                if resp.status_code == 401:
                    raise PeerFailed("refused our token (401): pass the seed's token with "
                                     "--token-env")
                if resp.status_code == 404:
                    raise PieceUnavailable(what)
                if resp.status_code != 200:
                    raise TransientError(f"answered HTTP {resp.status_code} for {what}")
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise PeerFailed(f"sent {what} of {declared} bytes, over the {limit} allowed")
                buf = bytearray()
                async for chunk in resp.aiter_raw():
                    buf += chunk
                    if count:
                        self.stats.bytes += len(chunk)
                    if len(buf) > limit:
                        raise PeerFailed(f"sent {what} of more than {limit} bytes")
                return bytes(buf)
        except httpx.HTTPError as exc:
            raise TransientError(explain(exc)) from exc

    async def fetch_manifest(self, key: str) -> Manifest:
        self.key = key
        try:
            data = await self._get(self._path("manifest"), MAX_MANIFEST_BYTES, "the manifest")
        except PieceUnavailable:
            raise PeerFailed(f"does not serve {key!r} (404)") from None
        except TransientError as exc:
            raise PeerFailed(str(exc)) from None
        try:
            return decode_manifest(data, "its manifest")
        except SwarmError as exc:
            raise PeerFailed(f"sent a bad manifest: {exc}") from None

    async def fetch_bitfield(self, n: int) -> Bitfield:
        try:
            data = await self._get(self._path("bitfield"), 4 * n + 4096, "the bitfield")
        except PieceUnavailable:
            raise PeerFailed("no longer serves the file (404)") from None
        try:
            raw = msgspec.json.decode(data)
            return Bitfield.from_hex(raw["have"], n)
        except (msgspec.DecodeError, SwarmError, KeyError, TypeError) as exc:
            raise PeerFailed(f"sent a bad bitfield: {exc}") from None

    async def fetch_piece(self, index: int, length: int) -> bytes:
        """Piece ``index``, at most ``length`` bytes read (more: the peer is dropped)."""
        return await self._get(self._path(f"pieces/{index}"), length, f"piece {index}",
                               count=True)

"""Pull one file from every peer that has it at once.

Every peer's manifest must name the same bytes (a peer offering another file
is dropped). Pieces are asked for rarest first (ties at random), several at a
time per peer; each one is checked against its SHA-256 before it is written
into the hidden partial file, and the pieces written are noted in a state file
so a killed pull resumes. Bitfields are asked for again every few seconds, so
peers that gain pieces (other pulls) are used. A peer that sends a corrupt
piece is dropped and the piece fetched elsewhere; a peer that goes away loses
its pieces in flight back to the queue. The finished file is checked whole and
moved into place atomically. With a `SeedStore`, the pieces held are served
while pulling, the finished file from its final path, and nothing after a
failure."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import trio

from tightwad_core.swarm.manifest import (
    Manifest,
    SwarmError,
    check_name,
    manifest_path,
    write_manifest,
)
from tightwad_core.swarm.partial import PartialFile, PullFailed
from tightwad_core.swarm.peers import (
    Peer,
    PeerFailed,
    PeerSource,
    PeerStats,
    PieceUnavailable,
    TransientError,
)
from tightwad_core.swarm.store import SeedStore

__all__ = ["PeerSource", "PullFailed", "PullProgress", "PullResult", "pull"]

MAX_FAILURES = 3  # network errors in a row before a peer is given up
PENDING_TRIES = 10  # refreshes a peer gets to start serving the file


class PeerResult(msgspec.Struct):
    bytes: int
    pieces: int
    dropped: str | None


class PullResult(msgspec.Struct):
    path: str
    name: str
    sha256: str
    size: int
    bytes_transferred: int  # on the wire, pieces that were of no use included
    bytes_wasted: int  # of those, the corrupt, cut-off and end-game duplicate ones
    bytes_reused: int
    bytes_resumed: int
    seconds: float
    transfer_seconds: float  # of `seconds`, the time pieces were being downloaded
    per_peer: dict[str, PeerResult]


@dataclass
class PullProgress:
    phase: str  # manifest, resume, reuse, download, verify, done
    total: int = 0
    held: int = 0
    transferred: int = 0
    reused: int = 0
    peers: dict[str, PeerStats] = field(default_factory=dict)


class _Pull:
    def __init__(self, m: Manifest, peers: list[Peer], part: PartialFile, store: SeedStore | None,
                 in_flight: int, refresh: float, stall: float,
                 progress: Callable[[PullProgress], None] | None) -> None:
        self.m, self.peers, self.part, self.store = m, peers, part, store
        self.in_flight, self.refresh, self.stall = in_flight, refresh, stall
        self.progress = progress
        self.remaining = m.count - part.have.count()
        self.requests: dict[int, list[trio.CancelScope]] = {}
        tiebreak = [random.random() for _ in range(m.count)]
        self.tiebreak = tiebreak
        self.order = sorted(part.have.missing(), key=tiebreak.__getitem__)
        self.wake = trio.Event()
        self.done = trio.Event()
        self.failure: str | None = None
        self.last_gain = trio.current_time()
        self.last_bytes = 0
        self.downloaded = 0  # bytes of the pieces written from the network
        self.unsaved = 0
        self.save_lock = trio.Lock()
        self.reused = 0
        self.held = part.held_bytes()

    # ------------------------------------------------------------ scheduling

    def notify(self) -> None:
        self.wake.set()
        self.wake = trio.Event()

    async def idle(self, seconds: float = 0.5) -> None:
        with trio.move_on_after(seconds):
            await self.wake.wait()

    def resort(self) -> None:
        """Rarest first: order the missing pieces by how many live peers hold them."""
        have = self.part.have
        self.order = [i for i in self.order if not have[i]]
        holders = [p.have for p in self.peers if p.alive and p.have is not None]
        counts = {i: sum(1 for h in holders if h[i]) for i in self.order}
        self.order.sort(key=lambda i: (counts[i], self.tiebreak[i]))

    def pick(self, peer: Peer) -> int | None:
        have, held = self.part.have, peer.have
        if held is None:
            return None
        spare = False
        for i in self.order:
            if have[i] or i in self.requests:
                continue
            spare = True
            if held[i]:
                return i
        if spare or peer.in_flight:
            return None  # a duplicate would slow this peer's own pieces down
        for i in self.order:  # the end game: an idle peer asks for a piece in flight elsewhere
            if not have[i] and len(self.requests.get(i, ())) == 1 and i not in peer.in_flight \
                    and held[i]:
                return i
        return None

    # ------------------------------------------------------------ tasks

    async def slot(self, peer: Peer) -> None:
        while peer.alive and not self.done.is_set():
            i = self.pick(peer)
            if i is None:
                await self.idle()
                continue
            await self.fetch(peer, i)

    def _failed(self, peer: Peer, reason: str, limit: int = MAX_FAILURES) -> None:
        peer.failures += 1
        if peer.failures >= limit:
            peer.drop(reason)

    async def fetch(self, peer: Peer, i: int) -> None:
        scope = trio.CancelScope()
        self.requests.setdefault(i, []).append(scope)
        peer.in_flight.add(i)
        try:
            with scope:
                try:
                    data = await peer.fetch_piece(i, self.m.span(i)[1])
                except PieceUnavailable:
                    if peer.have is not None:
                        peer.have.set(i, False)
                    return
                except TransientError as exc:
                    self._failed(peer, str(exc))
                    await trio.sleep(0.2 * peer.failures)
                    return
                except PeerFailed as exc:
                    peer.drop(str(exc))
                    return
                peer.failures = 0
                with trio.CancelScope(shield=True):
                    if self.part.have[i]:
                        return
                    ok = await trio.to_thread.run_sync(self.part.write_piece, i, data)
                    if not ok:
                        peer.drop(f"sent a corrupt piece ({i}: SHA-256 does not match the manifest)")
                        return
                    await self.complete(peer, i, scope)
        finally:
            scopes = self.requests.get(i, [])
            if scope in scopes:
                scopes.remove(scope)
            if not scopes:
                self.requests.pop(i, None)
            peer.in_flight.discard(i)
            self.notify()

    async def complete(self, peer: Peer, i: int, mine: trio.CancelScope) -> None:
        if self.part.have[i]:
            return
        self.part.have.set(i)
        self.held += self.m.span(i)[1]
        self.downloaded += self.m.span(i)[1]
        if self.store is not None:
            self.store.mark(self.m.sha256, i)
        peer.stats.pieces += 1
        self.remaining -= 1
        self.last_gain = trio.current_time()
        for other in self.requests.get(i, []):
            if other is not mine:
                other.cancel()  # end-game duplicates of this piece
        self.unsaved += 1
        if self.remaining == 0:
            self.done.set()
        if self.unsaved >= 8 or self.remaining == 0:
            await self.save()

    async def save(self) -> None:
        async with self.save_lock:
            self.unsaved = 0
            await trio.to_thread.run_sync(self.part.save_state)

    async def watch(self, peer: Peer, pending: bool) -> None:
        """Keep ``peer``'s bitfield fresh (after its manifest, if that failed first)."""
        while peer.alive and not self.done.is_set():
            try:
                if pending:
                    m = await peer.fetch_manifest(peer.key)
                    if not m.same_content(self.m):
                        peer.drop(f"offers another file (SHA-256 {m.sha256[:16]}..., not "
                                  f"{self.m.sha256[:16]}...)")
                        return
                    pending = False
                    peer.failures = 0
                peer.have = await peer.fetch_bitfield(self.m.count)
                peer.failures = 0
                self.resort()
                self.notify()
            except PeerFailed as exc:
                if not pending:
                    peer.drop(str(exc))
                    return
                self._failed(peer, str(exc), PENDING_TRIES)
            except TransientError as exc:
                self._failed(peer, str(exc), PENDING_TRIES if pending else MAX_FAILURES)
            await trio.sleep(self.refresh)

    def report(self, phase: str) -> None:
        if self.progress is not None:
            self.progress(PullProgress(phase, self.m.size, self.held,
                                       sum(p.stats.bytes for p in self.peers), self.reused,
                                       {p.url: p.stats for p in self.peers}))

    async def supervise(self) -> None:
        while not self.done.is_set():
            if not any(p.alive for p in self.peers):
                self.failure = "every peer failed"
                return
            moved = sum(p.stats.bytes for p in self.peers)
            if moved != self.last_bytes:  # bytes arriving are progress, a big piece under way too
                self.last_bytes, self.last_gain = moved, trio.current_time()
            if trio.current_time() - self.last_gain > self.stall:
                self.failure = (f"nothing arrived for {self.stall:.0f} s "
                                f"({self.remaining} of {self.m.count} still missing)")
                return
            self.report("download")
            with trio.move_on_after(0.25):
                await self.done.wait()

    async def run(self, pending: dict[str, str]) -> None:
        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                if not peer.alive:
                    continue
                nursery.start_soon(self.watch, peer, peer.url in pending)
                for _ in range(self.in_flight):
                    nursery.start_soon(self.slot, peer)
            await self.supervise()
            nursery.cancel_scope.cancel()


def _summary(peers: list[Peer]) -> str:
    return "; ".join(f"{p.url}: {p.stats.dropped or 'no answer'}" for p in peers)


async def _manifests(peers: list[Peer], key: str) -> tuple[Manifest, dict[str, str]]:
    """Ask every peer for the manifest; pick the file most of them offer (the
    one asked for, when ``key`` is a SHA-256) and drop the peers offering another."""
    got: dict[str, Manifest] = {}
    pending: dict[str, str] = {}  # url -> why it has no manifest yet

    async def ask(peer: Peer) -> None:
        try:
            got[peer.url] = await peer.fetch_manifest(key)
        except PeerFailed as exc:
            reason = str(exc)
            if "404" in reason or reason.startswith(("connection refused", "timed out", "cannot")):
                pending[peer.url] = reason  # may serve it soon (another pull that starts now)
                peer.stats.dropped = reason
            else:
                peer.drop(reason)

    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
    for peer in peers:
        if peer.alive and peer.url not in got and peer.url not in pending:
            pending[peer.url] = peer.stats.dropped = "no manifest within 30 s (timed out)"
    wanted = [m for m in got.values() if len(key) != 64 or m.sha256 == key]
    if not wanted:
        detail = _summary(peers) if not got else (
            "; ".join(f"{u}: offers SHA-256 {m.sha256}" for u, m in got.items()))
        raise PullFailed(f"no peer offers {key!r}: {detail}")
    votes = [sum(1 for o in wanted if o.same_content(m)) for m in wanted]
    chosen = wanted[votes.index(max(votes))]
    for peer in peers:
        m = got.get(peer.url)
        if m is not None and not m.same_content(chosen):
            peer.drop(f"offers another file (SHA-256 {m.sha256[:16]}..., the others "
                      f"{chosen.sha256[:16]}...)")
        if peer.url in pending:
            peer.stats.dropped = None
    return chosen, pending


async def pull(name_or_sha: str, peers: list[PeerSource], out: Path, *,
               reuse_dirs: list[Path] | tuple[Path, ...] = (), store: SeedStore | None = None,
               in_flight_per_peer: int = 4, progress: Callable[[PullProgress], None] | None = None,
               refresh: float = 2.0, stall_timeout: float = 60.0) -> PullResult:
    """Pull ``name_or_sha`` from ``peers`` into ``out`` (a folder: the file's
    own name in it). With ``store``, the pieces held so far are served from it."""
    if not peers:
        raise SwarmError("no peers to pull from: pass at least one --peer URL")
    if in_flight_per_peer < 1:
        raise SwarmError(f"requests in flight per peer must be 1 or more, not {in_flight_per_peer}")
    if len({p.url.rstrip("/") for p in peers}) != len(peers):
        raise SwarmError("the same peer is listed twice")
    t0 = trio.current_time()

    def tell(phase: str, done: int = 0, total: int = 0) -> None:
        if progress is not None:
            progress(PullProgress(phase, total, done))

    timeout = httpx.Timeout(30.0, connect=5.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        ps = [Peer(s, client) for s in peers]
        tell("manifest")
        m, pending = await _manifests(ps, name_or_sha)
        out = Path(out)
        if out.is_dir():
            out = out / m.name
        check_name(out.name)
        part = PartialFile(out, m)
        finished = False
        serving = False  # whether ``store`` serves the partial file (and must forget it)

        def progress_sync(phase: str, done: int, total: int) -> None:
            trio.from_thread.run_sync(tell, phase, done, total)

        try:
            resumed = await trio.to_thread.run_sync(part.open, progress_sync)
            reused = await trio.to_thread.run_sync(part.reuse, list(reuse_dirs), progress_sync)
            held = store.get(m.sha256) if store is not None else None
            if store is not None and (held is None or held.have_hex()[1] < m.count):
                store.add(part.path, m, have=part.have)
                serving = True
            job = _Pull(m, ps, part, store, in_flight_per_peer, refresh, stall_timeout, progress)
            job.reused = reused
            t_transfer = trio.current_time()
            if job.remaining:
                await job.run(pending)
            t_transfer = trio.current_time() - t_transfer
            if job.remaining:
                await job.save()
                raise PullFailed(f"{job.failure or 'stopped'}; {_summary(ps)}")

            def moved() -> None:  # in the same worker thread as the rename
                if store is not None:
                    store.add(out, m)

            await trio.to_thread.run_sync(part.finish, progress_sync, moved)
            finished = True
        finally:
            if not finished:
                if serving and store is not None:
                    store.remove(m.sha256, part.path)
                with trio.CancelScope(shield=True):  # Ctrl-C: the next pull resumes from here
                    if part.fd >= 0:
                        try:
                            await trio.to_thread.run_sync(part.save_state)
                        except OSError:
                            pass  # the next pull checks the pieces it finds from scratch
            part.close()
    try:
        await trio.to_thread.run_sync(write_manifest, msgspec.structs.replace(m, name=out.name),
                                      manifest_path(out))
    except OSError:
        pass  # the file is in place; only later delta pulls miss its manifest
    result = PullResult(
        path=str(out), name=m.name, sha256=m.sha256, size=m.size,
        bytes_transferred=sum(p.stats.bytes for p in ps),
        bytes_wasted=sum(p.stats.bytes for p in ps) - job.downloaded, bytes_reused=reused,
        bytes_resumed=resumed, seconds=round(trio.current_time() - t0, 3),
        transfer_seconds=round(t_transfer, 3),
        per_peer={p.url: PeerResult(p.stats.bytes, p.stats.pieces, p.stats.dropped or (
            f"never served the file: {pending[p.url]}" if p.url in pending and p.have is None
            else None)) for p in ps})
    tell("done", m.size, m.size)
    return result

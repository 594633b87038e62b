"""Slots and the sessions that hold them.

A *slot* is one llama.cpp context: one KV cache. A *session* holds one slot
from its first verify (or draft) until it is deleted, expires after
``ttl`` idle seconds, or is evicted because a new session needs a slot and
it is the least recently used idle one. A session is *active* while a
request runs on it; active sessions are never evicted or expired.

When a session ends its slot keeps its cache: a later session whose prompt
starts the same way reuses the shared prefix instead of evaluating it again.

All bookkeeping here is synchronous and runs on the trio thread, so it needs
no locks; the slot's ``trio.Lock`` only orders evaluations.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import numpy as np
import trio

from tightwad_plugins.worker.model import Context
from tightwad_plugins.worker.protocol import SessionNotFound, WorkerBusy

log = logging.getLogger("tightwad.worker")


@dataclass(eq=False)
class Slot:
    index: int
    ctx: Context
    lock: trio.Lock = field(default_factory=trio.Lock)
    session: Session | None = None

    @property
    def n_past(self) -> int:
        return len(self.ctx.tokens)


@dataclass(eq=False)
class Session:
    id: str
    slot: Slot
    rng: np.random.Generator
    ephemeral: bool  # opened for one plain request, never listed by id
    last_used: float = field(default_factory=trio.current_time)
    active: int = 0  # requests running on it now
    closed: bool = False


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SessionTable:
    def __init__(self, slots: list[Slot], ttl: float) -> None:
        self.slots = slots
        self.ttl = ttl
        self.by_id: dict[str, Session] = {}
        self.evicted = 0
        self.expired = 0

    # ---------------------------------------------------------------- lookup

    def open(self, prompt: list[int], seed: int | None, *, ephemeral: bool = False) -> Session:
        """A new active session on a free slot (the one sharing the longest
        prefix with ``prompt``), else on the least recently used idle
        session's slot; ``WorkerBusy`` when every slot is in use."""
        free = [s for s in self.slots if s.session is None]
        if free:
            slot = max(free, key=lambda s: _common(s.ctx.tokens, prompt))
        else:
            idle = [s for s in self.slots if s.session is not None and s.session.active == 0]
            if not idle:
                raise WorkerBusy(f"all {len(self.slots)} slots of this worker are in use; "
                                 "retry later or start it with more --slots")
            slot = min(idle, key=lambda s: s.session.last_used)  # type: ignore[union-attr]
            assert slot.session is not None
            log.info("evicting idle session %s from slot %d", slot.session.id, slot.index)
            self.evicted += 1
            self._free(slot.session)
        sid = secrets.token_hex(12)
        rng = np.random.default_rng(seed)
        sess = Session(id=sid, slot=slot, rng=rng, ephemeral=ephemeral, active=1)
        slot.session = sess
        if not ephemeral:
            self.by_id[sid] = sess
        return sess

    def acquire(self, sid: str) -> Session:
        sess = self.by_id.get(sid)
        if sess is None or sess.closed:
            raise SessionNotFound(f"session {sid!r} is unknown: it expired, was deleted or was "
                                  "evicted; open a new one with \"session\": null",
                                  param="session")
        sess.active += 1
        return sess

    def release(self, sess: Session) -> None:
        """A request on ``sess`` ended."""
        sess.active -= 1
        sess.last_used = trio.current_time()
        if sess.active == 0 and (sess.closed or sess.ephemeral):
            self._free(sess)

    def close(self, sess: Session) -> None:
        """End a session now, or as soon as its running requests finish."""
        sess.closed = True
        self.by_id.pop(sess.id, None)
        if sess.active == 0:
            self._free(sess)

    def delete(self, sid: str) -> None:
        sess = self.by_id.get(sid)
        if sess is None:
            raise SessionNotFound(f"session {sid!r} is unknown", param="session")
        self.close(sess)

    def _free(self, sess: Session) -> None:
        sess.closed = True
        self.by_id.pop(sess.id, None)
        if sess.slot.session is sess:
            sess.slot.session = None

    # ---------------------------------------------------------------- expiry

    def expire(self) -> int:
        now = trio.current_time()
        stale = [s for s in self.by_id.values()
                 if s.active == 0 and now - s.last_used > self.ttl]
        for s in stale:
            log.info("session %s expired after %.0fs idle", s.id, now - s.last_used)
            self._free(s)
        self.expired += len(stale)
        return len(stale)

    async def expire_forever(self) -> None:
        period = max(0.05, min(self.ttl / 4, 10.0))
        while True:
            await trio.sleep(period)
            self.expire()

    def in_use(self) -> int:
        return sum(1 for s in self.slots if s.session is not None)

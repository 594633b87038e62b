"""Sequences and the sessions that hold them.

The worker has one llama.cpp context with ``n`` sequences (one KV cache,
shared). A *session* holds one sequence from its first verify (or draft)
until it is deleted or has been idle for ``ttl`` seconds: between the rounds
of a request it is never taken away. When every sequence is held, a new
session waits in a first-come queue of at most ``queue_max`` requests for at
most ``queue_timeout`` seconds; beyond either it gets ``WorkerBusy`` (503
with ``Retry-After``), and no running session is disturbed.

When a session ends its sequence keeps its cache: a later session whose
prompt starts the same way reuses the shared prefix instead of evaluating it
again (and the context can copy a prefix from another sequence).

All bookkeeping here is synchronous and runs on the trio thread, so it needs
no locks; a sequence's ``trio.Lock`` only orders the requests of a session.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import trio

from tightwad_plugins.worker.model import Sequence, common_prefix
from tightwad_plugins.worker.protocol import SessionNotFound, WorkerBusy

log = logging.getLogger("tightwad.worker")


@dataclass(eq=False)
class Slot:
    """A sequence of the context and who holds it."""

    seq: Sequence
    lock: trio.Lock = field(default_factory=trio.Lock)
    session: Session | None = None

    @property
    def index(self) -> int:
        return self.seq.index

    @property
    def n_past(self) -> int:
        return len(self.seq.tokens)


@dataclass(eq=False)
class Session:
    id: str
    slot: Slot
    rng: np.random.Generator
    ephemeral: bool  # opened for one request (plain generation, a one-off draft)
    last_used: float = field(default_factory=trio.current_time)
    active: int = 0  # requests running on it now
    closed: bool = False


@dataclass(eq=False)
class _Waiter:
    prompt: list[int]
    event: trio.Event = field(default_factory=trio.Event)
    slot: Slot | None = None


class SessionTable:
    def __init__(self, slots: list[Slot], ttl: float, *, queue_max: int = 64,
                 queue_timeout: float = 120.0) -> None:
        self.slots = slots
        self.ttl = ttl
        self.queue_max = queue_max
        self.queue_timeout = queue_timeout
        self.by_id: dict[str, Session] = {}
        self.waiting: deque[_Waiter] = deque()
        self.expired = 0
        self.refused = 0
        self.queued = 0  # requests that had to wait for a sequence

    # ---------------------------------------------------------------- lookup

    async def open(self, prompt: list[int], seed: int | None, *,
                   ephemeral: bool = False) -> Session:
        """A new active session on a free sequence (the one sharing the longest
        prefix with ``prompt``), waiting for one when all are held."""
        free = [s for s in self.slots if s.session is None]
        if free and not self.waiting:
            slot = max(free, key=lambda s: common_prefix(s.seq.tokens, prompt))
        else:
            slot = await self._wait(prompt)
        sid = secrets.token_hex(12)
        sess = Session(id=sid, slot=slot, rng=np.random.default_rng(seed), ephemeral=ephemeral,
                       active=1)
        slot.session = sess
        if not ephemeral:
            self.by_id[sid] = sess
        return sess

    def _busy(self, why: str) -> WorkerBusy:
        self.refused += 1
        # a sequence frees when a request ends; suggest about one request's time
        return WorkerBusy(f"all {len(self.slots)} sequences of this worker are in use and {why}; "
                          "retry later or start it with more --slots",
                          retry_after=max(1, math.ceil(min(self.queue_timeout, 30.0) / 4)))

    async def _wait(self, prompt: list[int]) -> Slot:
        if len(self.waiting) >= self.queue_max:
            raise self._busy(f"{len(self.waiting)} requests are already waiting")
        w = _Waiter(prompt)
        self.waiting.append(w)
        self.queued += 1
        ok = False
        try:
            with trio.move_on_after(self.queue_timeout):
                await w.event.wait()
            ok = True
        finally:
            if w.slot is None:
                if w in self.waiting:
                    self.waiting.remove(w)
            elif not ok:  # handed a sequence, then cancelled before taking it
                w.slot.session = None
                self._hand_over(w.slot)
        if w.slot is None:
            raise self._busy(f"none freed within {self.queue_timeout:g}s")
        return w.slot

    def _hand_over(self, slot: Slot) -> None:
        """Give a freed sequence to the longest-waiting request, if any."""
        while self.waiting and slot.session is None:
            w = self.waiting.popleft()
            if w.event.is_set():
                continue
            w.slot = slot
            slot.session = _RESERVED
            w.event.set()

    def acquire(self, sid: str) -> Session:
        sess = self.by_id.get(sid)
        if sess is None or sess.closed:
            raise SessionNotFound(f"session {sid!r} is unknown: it expired, was deleted or the "
                                  "worker restarted; open a new one with \"session\": null",
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
            self._hand_over(sess.slot)

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

    # ---------------------------------------------------------------- borrowing

    def borrow(self, n: int) -> list[Slot]:
        """Up to ``n`` free sequences for one tree verify step (see tree.py);
        nobody waits for a sequence while one is free, so none is taken from
        a waiting request. Their caches are dropped by the step, so the ones
        keeping the least for reuse go first."""
        if self.waiting or n <= 0:
            return []
        free = sorted((s for s in self.slots if s.session is None), key=lambda s: s.n_past)[:n]
        for s in free:
            s.session = _BORROWED
        return free

    def give_back(self, slots: list[Slot]) -> None:
        for s in slots:
            if s.session is _BORROWED:
                s.session = None
                self._hand_over(s)

    def borrowed(self) -> int:
        return sum(1 for s in self.slots if s.session is _BORROWED)

    def in_use(self) -> int:
        return sum(1 for s in self.slots if s.session is not None)


#: Marks a sequence handed to a waiter that has not built its session yet.
_RESERVED: Session = Session.__new__(Session)
#: Marks a free sequence lent to a tree verify step.
_BORROWED: Session = Session.__new__(Session)

"""The worker's engine: verify and draft rounds on per-session KV caches.

Each request runs its whole evaluation (cache rollback, one batched decode,
acceptance) in one ``trio.to_thread.run_sync(..., abandon_on_cancel=False)``
call under the slot's lock: when the client goes away, trio waits for that
thread to finish, so a session's ``n_past`` and its cache always agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import trio

from tightwad_core.errors import BadRequest
from tightwad_plugins.worker import rejection
from tightwad_plugins.worker.model import Model
from tightwad_plugins.worker.protocol import (
    MAX_DRAFT,
    MAX_Q_SUPPORT,
    ContextFull,
    DraftRequest,
    DraftResponse,
    SessionConflict,
    VerifyRequest,
    VerifyResponse,
    check_sampling,
    check_tokens,
)
from tightwad_plugins.worker.sessions import Session, SessionTable, Slot

log = logging.getLogger("tightwad.worker")
T = TypeVar("T")


class Engine:
    """One model, ``slots`` contexts, and the sessions on them."""

    def __init__(self, model: Model, *, slots: int = 2, ctx: int = 4096,
                 session_ttl: float = 300.0, n_batch: int = 512) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.model = model
        self.vocab = model.vocab
        n_batch = min(n_batch, ctx)
        contexts = [model.new_context(ctx, n_batch) for _ in range(slots)]
        self.table = SessionTable([Slot(i, c) for i, c in enumerate(contexts)], session_ttl)
        self.n_ctx = contexts[0].n_ctx
        v = self.vocab  # the body of GET /v1/tightwad/vocab, built once (in the load thread)
        self.vocab_body = msgspec.json.encode({
            "n_vocab": v.n_vocab, "fingerprint": v.fingerprint, "eos": sorted(v.eos),
            "bos": v.bos, "pieces": [p.hex() for p in v.pieces],
            "specials": [p.hex() for p in v.specials]})
        self.started = time.time()
        self.rounds = 0
        self.chat_formatter: Any = None  # built on first use from the GGUF's chat template

    @classmethod
    async def load(cls, path: Path, *, slots: int = 2, ctx: int = 4096,
                   threads: int | None = None, session_ttl: float = 300.0,
                   verbose: bool = False) -> Engine:
        def build() -> Engine:
            model = Model(path, threads=threads, verbose=verbose)
            return cls(model, slots=slots, ctx=ctx, session_ttl=session_ttl)

        return await trio.to_thread.run_sync(build, abandon_on_cancel=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (session expiry); run it in the worker's nursery."""
        task_status.started()
        await self.table.expire_forever()

    async def close(self) -> None:
        """Free the contexts and the model once no evaluation is running."""
        with trio.CancelScope(shield=True):
            for slot in self.table.slots:
                async with slot.lock:
                    slot.ctx.close()
            self.model.close()

    # ------------------------------------------------------------- running

    async def in_slot(self, sess: Session, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread while holding the session's slot."""
        async with sess.slot.lock:
            return await trio.to_thread.run_sync(fn, abandon_on_cancel=False)

    def _session(self, sid: str | None, past: int, tokens: list[int],
                 seed: int | None) -> tuple[Session, bool]:
        if sid is None:
            if past != 0:
                raise SessionConflict("a new session starts from nothing: `past` must be 0",
                                      param="past")
            return self.table.open(tokens, seed), True
        return self.table.acquire(sid), False

    def _check_length(self, past: int, n_new: int) -> None:
        if past < 0:
            raise BadRequest("past must not be negative", param="past")
        if past + n_new > self.n_ctx:
            raise ContextFull(past + n_new, self.n_ctx)

    def _check_room(self, sess: Session, past: int) -> None:
        if past > sess.slot.n_past:
            raise SessionConflict(f"past={past} is beyond the {sess.slot.n_past} tokens this "
                                  "session holds", param="past")

    async def _round(self, sid: str | None, past: int, tokens: list[int], seed: int | None,
                     work: Callable[[Session], T]) -> tuple[Session, T]:
        sess, created = self._session(sid, past, tokens, seed)
        ok = False
        try:
            async with sess.slot.lock:
                self._check_room(sess, past)
                result = await trio.to_thread.run_sync(partial(work, sess),
                                                       abandon_on_cancel=False)
            ok = True
            return sess, result
        finally:
            if created and not ok:
                self.table.close(sess)  # the client never learned its id
            self.table.release(sess)

    # ------------------------------------------------------------- verify

    async def verify(self, req: VerifyRequest) -> VerifyResponse:
        tokens, draft = list(req.tokens), req.draft
        check_sampling(req.sampling)
        params = req.sampling.params()
        if not 0 <= draft <= MAX_DRAFT:
            raise BadRequest(f"draft must be between 0 and {MAX_DRAFT}", param="draft")
        if draft >= len(tokens):
            raise BadRequest("tokens must hold at least one token before the draft tokens "
                             "(the last accepted token)", param="tokens")
        self._check_length(req.past, len(tokens))
        check_tokens(tokens, self.vocab.n_vocab)
        q = req.q
        if not params.greedy:
            if q is None or len(q) != draft:
                raise BadRequest("sampling needs `q`: one distribution per draft token",
                                 param="q")
            for row in q:
                if len(row) > MAX_Q_SUPPORT:
                    raise BadRequest(f"a q entry may hold at most {MAX_Q_SUPPORT} tokens",
                                     param="q")
                if not all(0.0 <= v <= 1.0 + 1e-6 for v in row.values()):
                    raise BadRequest("q probabilities must lie in [0, 1]", param="q")
        if req.max_new is not None:
            if req.max_new < 1:
                raise BadRequest("max_new must be at least 1", param="max_new")
            if req.max_new < draft:  # drafts past the cap are never emitted
                cut = draft - req.max_new
                tokens, draft = tokens[:-cut], req.max_new
                q = q[:draft] if q is not None else None
        drafts = tokens[len(tokens) - draft:]
        past = req.past

        def work(sess: Session) -> tuple[int, int, list[float] | None, int, float]:
            t0 = time.perf_counter()
            rows = sess.slot.ctx.eval(past, tokens, need=draft + 1)
            assert rows is not None
            if params.greedy:
                accepted, token, gaps = rejection.accept_greedy(rows, drafts)
                out_gaps: list[float] | None = gaps
            else:
                accepted, token = rejection.accept_sampled(rows, drafts, q or [], params,
                                                           sess.rng)
                out_gaps = None
            return accepted, token, out_gaps, sess.slot.n_past, (time.perf_counter() - t0) * 1e3

        sess, (accepted, token, gaps, n_past, ms) = await self._round(
            req.session, past, tokens, params.seed, work)
        self.rounds += 1
        return VerifyResponse(session=sess.id, accepted=accepted, token=token, n_past=n_past,
                              gaps=gaps, engine_ms=ms)

    # ------------------------------------------------------------- draft

    async def draft(self, req: DraftRequest) -> DraftResponse:
        check_sampling(req.sampling)
        params = req.sampling.params()
        k = req.k
        if not 1 <= k <= MAX_DRAFT:
            raise BadRequest(f"k must be between 1 and {MAX_DRAFT}", param="k")
        if not req.tokens:
            raise BadRequest("tokens must hold at least one token", param="tokens")
        self._check_length(req.past, len(req.tokens) + k - 1)
        check_tokens(req.tokens, self.vocab.n_vocab)
        tokens, past = list(req.tokens), req.past

        def work(sess: Session) -> tuple[list[int], list[dict[int, float]] | None, int, float]:
            t0 = time.perf_counter()
            ctx = sess.slot.ctx
            rows = ctx.eval(past, tokens, need=1)
            assert rows is not None
            row = rows[-1]
            out: list[int] = []
            qs: list[dict[int, float]] = []
            for j in range(k):
                if params.greedy:
                    tok = int(np.argmax(row))
                else:
                    probs = rejection.draft_probs(row, params)
                    tok = rejection.sample(probs, sess.rng)
                    qs.append(rejection.sparse(probs))
                out.append(tok)
                if j < k - 1:
                    nxt = ctx.eval(len(ctx.tokens), [tok], need=1)
                    assert nxt is not None
                    row = nxt[-1]
            ms = (time.perf_counter() - t0) * 1e3
            return out, (None if params.greedy else qs), len(ctx.tokens), ms

        sess, (out, qs, n_past, ms) = await self._round(
            req.session, past, tokens, params.seed, work)
        return DraftResponse(session=sess.id, tokens=out, q=qs, n_past=n_past, engine_ms=ms)

    # ------------------------------------------------------------- misc

    def delete(self, sid: str) -> None:
        self.table.delete(sid)

    async def tokenize(self, text: str, add_special: bool) -> list[int]:
        return await trio.to_thread.run_sync(
            partial(self.model.tokenize, text, add_special=add_special), abandon_on_cancel=False)

    def info(self) -> dict[str, Any]:
        t = self.table
        return {
            "model": str(self.model.path),
            "chat_template": self.model.chat_template,
            "n_ctx": self.n_ctx,
            "n_vocab": self.vocab.n_vocab,
            "slots": len(t.slots),
            "sessions": len(t.by_id),
            "slots_in_use": t.in_use(),
            "session_ttl": t.ttl,
            "rounds": self.rounds,
            "evicted": t.evicted,
            "expired": t.expired,
            "capabilities": {"verify": True, "draft": True, "prompt_logprobs": True},
        }


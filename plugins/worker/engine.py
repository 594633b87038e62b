"""The worker's engine: verify and draft rounds on per-session sequences of
one batched context.

Each round is a ``Job`` for the scheduler (cache rollback, evaluation of the
new tokens, acceptance in the engine thread); rounds of concurrent sessions
share each ``llama_decode``. A session runs one round at a time (its
sequence's lock); when a client goes away its job is dropped at the next
step, so a session's ``n_past`` and its cache always agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import trio

from tightwad_core.errors import BadRequest
from tightwad_plugins.worker import rejection
from tightwad_plugins.worker.model import Context, Job, Model
from tightwad_plugins.worker.protocol import (
    MAX_BRANCHES,
    MAX_DRAFT,
    MAX_Q_SUPPORT,
    MAX_TREE_NODES,
    ContextFull,
    DraftRequest,
    DraftResponse,
    SessionConflict,
    VerifyRequest,
    VerifyResponse,
    check_sampling,
    check_tokens,
)
from tightwad_plugins.worker.scheduler import Scheduler
from tightwad_plugins.worker.sessions import Session, SessionTable, Slot
from tightwad_plugins.worker.tree import TreeJob, TreeResult, count_nodes

log = logging.getLogger("tightwad.worker")
T = TypeVar("T")


class Engine:
    """One model, one context with ``slots`` sequences, and the sessions on them."""

    def __init__(self, model: Model, *, slots: int = 2, ctx: int = 4096,
                 session_ttl: float = 60.0, n_batch: int = 512, queue_max: int = 64,
                 queue_timeout: float = 120.0, unified: bool = True,
                 record_routing: bool = False) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.model = model
        self.vocab = model.vocab
        self.context = Context(model, slots, ctx, min(n_batch, ctx), unified=unified,
                               record_routing=record_routing)
        self.scheduler = Scheduler(self.context)
        self.table = SessionTable([Slot(q) for q in self.context.seqs], session_ttl,
                                  queue_max=queue_max, queue_timeout=queue_timeout)
        self.n_ctx = self.context.n_ctx_seq
        v = self.vocab  # the body of GET /v1/tightwad/vocab, built once (in the load thread)
        self.vocab_body = msgspec.json.encode({
            "n_vocab": v.n_vocab, "fingerprint": v.fingerprint, "eos": sorted(v.eos),
            "bos": v.bos, "pieces": [p.hex() for p in v.pieces],
            "specials": [p.hex() for p in v.specials]})
        self.started = time.time()
        self.rounds = 0
        self.chat_formatter: Any = None  # built on first use from the GGUF's chat template

    @classmethod
    async def load(cls, path: Path, *, threads: int | None = None, verbose: bool = False,
                   n_gpu_layers: int | None = None, devices: list[str] | None = None,
                   rpc: list[str] | None = None, tensor_split: list[float] | None = None,
                   overrides: list[tuple[str, str]] | None = None, **kw: Any) -> Engine:
        def build() -> Engine:
            model = Model(path, threads=threads, verbose=verbose, n_gpu_layers=n_gpu_layers,
                          devices=devices, rpc=rpc, tensor_split=tensor_split,
                          overrides=overrides)
            try:
                return cls(model, **kw)
            except BaseException:
                model.close()
                raise

        return await trio.to_thread.run_sync(build, abandon_on_cancel=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The scheduler and session expiry; run it in the worker's nursery."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.scheduler.run)
            nursery.start_soon(self.table.expire_forever)
            task_status.started()

    async def close(self) -> None:
        """Free the context and the model (after ``run`` has ended)."""
        with trio.CancelScope(shield=True):
            def free() -> None:
                self.context.close()
                self.model.close()

            await trio.to_thread.run_sync(free, abandon_on_cancel=False)

    # ------------------------------------------------------------- running

    async def evaluate(self, sess: Session, past: int, new: list[int], need: int, *,
                       on_row: Callable[[int, Any], None] | None = None,
                       finish: Callable[[list[Any]], T] | None = None) -> T:
        """One job on ``sess``'s sequence (see ``Job``); its ``finish`` value."""
        job = Job(sess.slot.seq, past, new, need, on_row=on_row, finish=finish)
        result: T = await self.scheduler.submit(job)
        return result

    async def _session(self, sid: str | None, past: int, tokens: list[int],
                       seed: int | None, ephemeral: bool = False) -> tuple[Session, bool]:
        if sid is None:
            if past != 0:
                raise SessionConflict("a new session starts from nothing: `past` must be 0",
                                      param="past")
            return await self.table.open(tokens, seed, ephemeral=ephemeral), True
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
                     work: Callable[[Session], Awaitable[T]], *,
                     ephemeral: bool = False) -> tuple[Session, T]:
        sess, created = await self._session(sid, past, tokens, seed, ephemeral)
        ok = False
        try:
            async with sess.slot.lock:
                self._check_room(sess, past)
                result = await work(sess)
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
        if req.branches is not None:
            return await self._verify_tree(req)
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

        async def work(sess: Session) -> tuple[int, int, list[float] | None, int, float]:
            def accept(rows: list[np.ndarray]) -> tuple[int, int, list[float] | None]:
                if params.greedy:
                    return rejection.accept_greedy(np.stack(rows), drafts)
                accepted, token = rejection.accept_sampled(np.stack(rows), drafts, q or [],
                                                           params, sess.rng)
                return accepted, token, None

            t0 = time.perf_counter()
            accepted, token, gaps = await self.evaluate(sess, past, tokens, draft + 1,
                                                        finish=accept)
            return accepted, token, gaps, sess.slot.n_past, (time.perf_counter() - t0) * 1e3

        sess, (accepted, token, gaps, n_past, ms) = await self._round(
            req.session, past, tokens, params.seed, work)
        self.rounds += 1
        return VerifyResponse(session=sess.id, accepted=accepted, token=token, n_past=n_past,
                              gaps=gaps, engine_ms=ms)

    async def _verify_tree(self, req: VerifyRequest) -> VerifyResponse:
        """Greedy verification of several branches in one decode (tree.py)."""
        branches = [list(b) for b in req.branches or []]
        tokens = list(req.tokens)
        if not req.sampling.params().greedy:
            raise BadRequest("branches are verified greedily only: use temperature 0",
                             param="branches")
        if req.draft != 0:
            raise BadRequest("with branches, draft must be 0: the branches are the drafts",
                             param="draft")
        if not tokens:
            raise BadRequest("tokens must hold at least one token (the last accepted token)",
                             param="tokens")
        if not 1 <= len(branches) <= MAX_BRANCHES:
            raise BadRequest(f"branches must hold 1 to {MAX_BRANCHES} branches",
                             param="branches")
        for br in branches:
            if len(br) > MAX_DRAFT:
                raise BadRequest(f"a branch may hold at most {MAX_DRAFT} tokens",
                                 param="branches")
            check_tokens(br, self.vocab.n_vocab, param="branches")
        check_tokens(tokens, self.vocab.n_vocab)
        if req.max_new is not None:
            if req.max_new < 1:
                raise BadRequest("max_new must be at least 1", param="max_new")
            branches = [br[:req.max_new] for br in branches]
        nodes = count_nodes(branches)
        if nodes > MAX_TREE_NODES or nodes + 1 > self.context.n_batch:
            raise BadRequest(f"the branches hold {nodes} distinct positions; at most "
                             f"{min(MAX_TREE_NODES, self.context.n_batch - 1)} are allowed",
                             param="branches")
        self._check_length(req.past, len(tokens) + max(len(br) for br in branches))
        past = req.past

        async def work(sess: Session) -> tuple[TreeResult, int, float]:
            t0 = time.perf_counter()
            at, new = past, tokens
            if len(new) + nodes > self.context.n_batch:  # a long prompt: evaluated first
                await self.evaluate(sess, at, new[:-1], 1, finish=lambda rows: None)
                at, new = at + len(new) - 1, new[-1:]
            # the unified cache shares cells between sequences; split caches cannot
            lent = self.table.borrow(len(branches) - 1) if self.context.unified else []
            try:
                job = TreeJob(sess.slot.seq, at, new, branches[:1 + len(lent)],
                              [s.seq for s in lent])
                result: TreeResult = await self.scheduler.submit(job)
            finally:
                self.table.give_back(lent)
            return result, 1 + len(lent), (time.perf_counter() - t0) * 1e3

        sess, (res, verified, ms) = await self._round(req.session, past, tokens,
                                                            req.sampling.seed, work)
        self.rounds += 1
        return VerifyResponse(session=sess.id, accepted=res.accepted, token=res.token,
                              n_past=res.n_past, gaps=res.gaps, engine_ms=ms, branch=res.branch,
                              tree_nodes=res.tree_nodes, branches_verified=verified)

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

        async def work(sess: Session) -> tuple[list[int], list[dict[int, float]] | None, int,
                                                float]:
            t0 = time.perf_counter()
            out: list[int] = []
            qs: list[dict[int, float]] = []

            def choose(rows: list[np.ndarray]) -> int:
                row = rows[-1]
                if params.greedy:
                    return int(np.argmax(row))
                probs = rejection.draft_probs(row, params)
                qs.append(rejection.sparse(probs))
                return rejection.sample(probs, sess.rng)

            tok = await self.evaluate(sess, past, tokens, 1, finish=choose)
            out.append(tok)
            for _ in range(k - 1):
                tok = await self.evaluate(sess, sess.slot.n_past, [tok], 1, finish=choose)
                out.append(tok)
            ms = (time.perf_counter() - t0) * 1e3
            return out, (None if params.greedy else qs), sess.slot.n_past, ms

        sess, (out, qs, n_past, ms) = await self._round(
            req.session, past, tokens, params.seed, work, ephemeral=not req.keep)
        return DraftResponse(session=sess.id if req.keep else None, tokens=out, q=qs,
                             n_past=n_past, engine_ms=ms)

    # ------------------------------------------------------------- misc

    def delete(self, sid: str) -> None:
        self.table.delete(sid)

    async def tokenize(self, text: str, add_special: bool) -> list[int]:
        return await trio.to_thread.run_sync(
            partial(self.model.tokenize, text, add_special=add_special), abandon_on_cancel=False)

    def info(self) -> dict[str, Any]:
        t, m, c = self.table, self.model, self.context
        return {
            "model": str(m.path),
            "chat_template": m.chat_template,
            "n_ctx": self.n_ctx,
            "n_batch": c.n_batch,
            "n_vocab": self.vocab.n_vocab,
            "slots": len(t.slots),
            "sessions": len(t.by_id),
            "slots_in_use": t.in_use(),
            "waiting": len(t.waiting),
            "queue_max": t.queue_max,
            "queued": t.queued,
            "refused": t.refused,
            "session_ttl": t.ttl,
            "rounds": self.rounds,
            "expired": t.expired,
            "decodes": c.decodes,
            "evaluated_tokens": c.evaluated,
            "batched_decodes": c.batched,
            "tree_decodes": c.tree_decodes,
            "kv_unified": c.unified,
            "n_gpu_layers": m.n_gpu_layers,
            "devices": [d.name for d in m.devices] or ["CPU"],
            "placement": m.placement(),
            "capabilities": {"verify": True, "draft": True, "prompt_logprobs": True,
                             "tree": c.unified},
        }

"""The `worker` verifier: one request per round to a Tightwad worker, which
evaluates only the new tokens in one batch against the KV cache it keeps for
the session, rolls back rejected positions, and answers the verdict.

Protocol (see docs/worker.md): POST /v1/tightwad/verify with the session,
`past` (tokens accepted and already in its cache), the new `tokens` (the last
round's target token, then the K draft tokens), `draft` = K, the sampler and
the draft's q; the answer is `accepted`, `token`, `gaps` and `engine_ms`.

A greedy proposal with several branches is sent as a tree (`branches`, with
only the pending accepted tokens in `tokens`): the worker checks them all in
one decode and says which branch won. The branches sent are cut to fit the
worker's limits (at most 8 branches, and at most MAX_TREE_NODES distinct
positions, or its batch less one): trailing branches are dropped, the last
one kept may lose its tail. A worker whose /v1/tightwad/info says it cannot
check trees (``capabilities.tree`` false: a split KV cache) gets branch 0
alone, as an ordinary chain, and the verifier says ``tree = False`` from
then on. A proposal's ``trusted`` first tokens are sent as accepted tokens,
not drafts: the worker evaluates them without checking them, so they have
no top-2 gap (NaN in ``gaps``, which stays one entry per emitted position).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import trio

from tightwad_core.errors import BackendError, BackendUnavailable, BadRequest
from tightwad_core.hookspecs import hookimpl
from tightwad_core.http.wire import post_json
from tightwad_core.roles import VerifierFactory
from tightwad_core.spec.interfaces import Proposal, SamplingParams, Verdict
from tightwad_plugins.worker.protocol import MAX_BRANCHES, MAX_TREE_NODES

log = logging.getLogger("tightwad.worker")


#: How long a round waits for a worker that went away (restarting) before it fails.
REOPEN_WAIT = 30.0


def fit_nodes(branches: list[list[int]], limit: int) -> list[list[int]]:
    """The leading branches whose trie holds at most ``limit`` distinct
    positions, counted as the worker counts them; the first branch that does
    not fit keeps the longest head that does, and the rest are dropped (so
    each kept branch keeps its index, which the verdict names)."""
    # the worker's own count; its module pulls the engine's, so it is imported on first use
    from tightwad_plugins.worker.tree import count_nodes

    kept: list[list[int]] = []
    for br in branches:
        if count_nodes(kept + [br]) <= limit:
            kept.append(br)
            continue
        head = 0  # each token adds one position at most, so the count grows one by one
        while head < len(br) and count_nodes(kept + [br[:head + 1]]) <= limit:
            head += 1
        kept.append(br[:head])
        break
    return kept


class WorkerSession:
    """One request's session on the worker. When the worker loses it (it
    expired, or the worker restarted), the next round opens a new one by
    sending the whole accepted context again: the answer is unaffected."""

    def __init__(self, backend: Any, prompt: list[int], sampling: SamplingParams,
                 verifier: WorkerVerifier | None = None) -> None:
        self.backend = backend
        self.verifier = verifier
        self.sampling = msgspec.to_builtins(sampling)
        self.session: str | None = None
        self.accepted = list(prompt)  # the prompt and every token emitted so far
        self.past = 0  # how many of them the worker's session holds
        self.reopened = 0
        self.closed = False

    def _reopen(self, why: str) -> None:
        log.info("worker session %s lost (%s); re-opening it with the %d tokens of context",
                 self.session, why, len(self.accepted))
        self.session, self.past = None, 0
        self.reopened += 1
        if self.verifier is not None:
            self.verifier.learned = False  # a restarted worker may run with other settings

    def _body(self, proposal: Proposal, trusted: int,
              branches: list[list[int]] | None) -> dict[str, Any]:
        pending = self.accepted[self.past:] + proposal.tokens[:trusted]
        if branches is not None:
            return {"session": self.session, "past": self.past, "tokens": pending, "draft": 0,
                    "sampling": self.sampling, "branches": branches}
        q = None
        if self.sampling["temperature"] > 0:
            q = [{str(t): p for t, p in row.items()} for row in (proposal.q or [])[trusted:]]
        drafts = proposal.tokens[trusted:]
        return {"session": self.session, "past": self.past, "tokens": pending + drafts,
                "draft": len(drafts), "sampling": self.sampling, "q": q}

    async def _post(self, proposal: Proposal, trusted: int = 0,
                    branches: list[list[int]] | None = None) -> Any:
        waited, pause = 0.0, 0.25
        while True:
            body = self._body(proposal, trusted, branches)
            try:
                return await post_json(self.backend.client, "/v1/tightwad/verify", body,
                                       self.backend.where)
            except BadRequest as exc:
                if exc.upstream_code != "session_not_found" or self.session is None:
                    raise
                self._reopen("the worker no longer knows it")
            except BackendUnavailable as exc:
                if exc.retry_after is not None or waited >= REOPEN_WAIT:
                    raise  # busy (it said when to come back), or gone for good
                await trio.sleep(pause)
                waited += pause
                pause = min(pause * 2, 2.0)  # a restarted worker answers 404 for the session

    def _tree(self, proposal: Proposal, trusted: int) -> list[list[int]] | None:
        """The branches to send, each without the trusted tokens (a branch
        that does not start with them is sent empty: it checks nothing), cut
        to the worker's limits; None: send ``tokens`` as a chain."""
        if not proposal.branches or len(proposal.branches) < 2 or self.sampling["temperature"] > 0:
            return None
        if self.verifier is not None and not self.verifier.tree:
            return None  # the worker would check branch 0 alone: say so, send it as a chain
        head = proposal.tokens[:trusted]
        wanted = [list(br[trusted:]) if list(br[:trusted]) == head else []
                  for br in proposal.branches[:MAX_BRANCHES]]
        kept = fit_nodes(wanted, MAX_TREE_NODES if self.verifier is None
                         else self.verifier.max_nodes)
        return kept if len(kept) > 1 else None

    async def verify(self, proposal: Proposal) -> Verdict:
        t0 = time.perf_counter()
        trusted = max(0, min(proposal.trusted, len(proposal.tokens)))
        tree = self._tree(proposal, trusted)
        data = await self._post(proposal, trusted, tree)
        try:
            self.session = data["session"]
            accepted, token = int(data["accepted"]), int(data["token"])
            branch = int(data.get("branch") or 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"{self.backend.where} sent a malformed verdict") from exc
        if tree is None:
            branch, along = 0, proposal.tokens
        elif 0 <= branch < len(tree):
            along = proposal.tokens[:trusted] + tree[branch]
        else:
            raise BackendError(f"{self.backend.where} chose branch {branch} of {len(tree)}")
        if not 0 <= accepted <= len(along) - trusted:
            raise BackendError(f"{self.backend.where} accepted {accepted} of "
                               f"{len(along) - trusted}")
        accepted += trusted
        self.past = len(self.accepted) + accepted
        self.accepted += along[:accepted] + [token]
        engine = data.get("engine_ms")
        gaps = data.get("gaps")
        if gaps is not None and trusted:
            # the trusted tokens were never checked: no gap there, the verified ones after them
            gaps = [math.nan] * trusted + [float(g) for g in gaps]
        return Verdict(accepted=accepted, token=token, gaps=gaps, branch=branch,
                       seconds=time.perf_counter() - t0,
                       engine_seconds=None if engine is None else float(engine) / 1000)

    async def aclose(self) -> None:
        if self.closed or self.session is None:
            return
        self.closed = True
        try:
            with trio.move_on_after(2):
                await self.backend.client.delete(f"/v1/tightwad/sessions/{self.session}")
        except httpx.HTTPError as exc:
            log.debug("could not free worker session %s: %s", self.session, exc)


class WorkerVerifier:
    rung = "worker"
    rank = 1
    requires = "tightwad-verify"
    pinnable = False
    exact = True
    one_pass = True
    # greedy branches are checked in one decode; False once the worker's info
    # says it cannot (a split KV cache), which `learn` reads at the first request
    tree = True
    trusts = True  # trusted tokens are evaluated unchecked
    label = "worker: exact; K tokens verified in one forward pass, KV cache kept per session"

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.max_nodes = MAX_TREE_NODES  # most distinct positions of one tree
        self.learned = False

    async def learn(self) -> None:
        """Read what the worker can do from /v1/tightwad/info: whether it
        checks trees, and the batch a tree must fit (nodes + 1 positions).
        Unreadable: the defaults stay, and the next request asks again."""
        try:
            resp = await self.backend.client.get("/v1/tightwad/info")
            resp.raise_for_status()
            info = resp.json()
            caps = info.get("capabilities") or {}
            tree = bool(caps.get("tree", True))
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.debug("could not read %s's info: %s", self.backend.where, exc)
            return
        limit = MAX_TREE_NODES
        for key in ("n_batch", "n_ctx"):  # the worker's batch is at most its context
            value = info.get(key)
            if isinstance(value, int) and value > 1:
                limit = min(limit, value - 1)
        if self.tree and not tree:
            log.info("%s checks branch 0 only (its KV cache is split): branches are sent as "
                     "one chain", self.backend.where)
        self.tree, self.max_nodes, self.learned = tree, limit, True

    async def open(self, prompt: list[int], sampling: SamplingParams) -> WorkerSession:
        if self.backend.client is None:
            raise BackendUnavailable("the worker is not started")
        if not self.learned:
            await self.learn()
        return WorkerSession(self.backend, prompt, sampling, self)


@hookimpl
def register_verifiers(register: Callable[[str, VerifierFactory], None]) -> None:
    register("worker", WorkerVerifier)

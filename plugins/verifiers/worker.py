"""The `worker` verifier: one request per round to a Tightwad worker, which
evaluates only the new tokens in one batch against the KV cache it keeps for
the session, rolls back rejected positions, and answers the verdict.

Protocol (see docs/worker.md): POST /v1/tightwad/verify with the session,
`past` (tokens accepted and already in its cache), the new `tokens` (the last
round's target token, then the K draft tokens), `draft` = K, the sampler and
the draft's q; the answer is `accepted`, `token`, `gaps` and `engine_ms`.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger("tightwad.worker")


#: How long a round waits for a worker that went away (restarting) before it fails.
REOPEN_WAIT = 30.0


class WorkerSession:
    """One request's session on the worker. When the worker loses it (it
    expired, or the worker restarted), the next round opens a new one by
    sending the whole accepted context again: the answer is unaffected."""

    def __init__(self, backend: Any, prompt: list[int], sampling: SamplingParams) -> None:
        self.backend = backend
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

    async def _post(self, proposal: Proposal) -> Any:
        waited, pause = 0.0, 0.25
        while True:
            body = {"session": self.session, "past": self.past,
                    "tokens": self.accepted[self.past:] + proposal.tokens,
                    "draft": len(proposal.tokens), "sampling": self.sampling,
                    "q": [{str(t): p for t, p in row.items()} for row in (proposal.q or [])]
                    if self.sampling["temperature"] > 0 else None}
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

    async def verify(self, proposal: Proposal) -> Verdict:
        t0 = time.perf_counter()
        data = await self._post(proposal)
        try:
            self.session = data["session"]
            accepted, token = int(data["accepted"]), int(data["token"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"{self.backend.where} sent a malformed verdict") from exc
        if not 0 <= accepted <= len(proposal.tokens):
            raise BackendError(f"{self.backend.where} accepted {accepted} of {len(proposal.tokens)}")
        self.past = len(self.accepted) + accepted
        self.accepted += proposal.tokens[:accepted] + [token]
        engine = data.get("engine_ms")
        return Verdict(accepted=accepted, token=token, gaps=data.get("gaps"),
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
    label = "worker: exact; K tokens verified in one forward pass, KV cache kept per session"

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    async def open(self, prompt: list[int], sampling: SamplingParams) -> WorkerSession:
        if self.backend.client is None:
            raise BackendUnavailable("the worker is not started")
        return WorkerSession(self.backend, prompt, sampling)


@hookimpl
def register_verifiers(register: Callable[[str, VerifierFactory], None]) -> None:
    register("worker", WorkerVerifier)

"""The speculation loop: draft, verify once, emit the target's tokens.

It knows the roles in `interfaces` only: no HTTP, no engine. Each round:
ask the drafter for K tokens (K from `DraftLength`), let the verifier check
them in one target pass, feed the accepted tokens and the target's own next
token to the `Emitter`, and yield the text it releases. A drafter that fails
or is slow past its budget costs one round at K = 0 (`fallback`), never the
request.

With ``overlap``, the next round is drafted while the target verifies this
one, on the guess that every draft token is accepted: the draft continues
the proposal by K + 1 tokens, the first being its guess of the target's own
next token. When the round is fully accepted and that guess is the target's
token, the rest is the next proposal, and drafting cost no time; otherwise
it is thrown away (cancelled when the verdict shows the guess cannot hold).
The output is the same either way: the next proposal is what the draft
would have proposed from that context.

A proposal may carry ``branches`` (several continuations a tree verifier
checks in one pass; the verdict names the one ``accepted`` counts along) and
``trusted`` tokens (approximate consensus: taken without the target's
check, so they count as emitted but not as drafted or accepted). A drafter
with an ``observe(proposal, verdict, emitted)`` method hears each round's
outcome.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import trio

from tightwad_core.errors import BackendError
from tightwad_core.records import Delta, Usage
from tightwad_core.spec.draftlen import DraftLength
from tightwad_core.spec.emitter import Emitter
from tightwad_core.spec.interfaces import (
    Drafter,
    Proposal,
    SamplingParams,
    TargetText,
    Verdict,
    Verifier,
)

log = logging.getLogger("tightwad.spec")


@dataclass
class RequestStats:
    """What one request measured; merged into the proxy's totals at its end."""

    rounds: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, kept by the target
    emitted: int = 0  # tokens in the answer
    draft_s: float = 0.0
    verify_s: float = 0.0
    engine_s: float = 0.0  # engine time inside verify, when the verifier reports it
    wall_s: float = 0.0
    draft_failures: int = 0
    trusted: int = 0  # approximate consensus: tokens emitted without the target's check
    ahead_hits: int = 0  # rounds whose proposal was drafted during the previous verify
    ks: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # greedy: top-2 gap per emitted token
    tokens: list[int] = field(default_factory=list)  # the answer's token ids (end-of-generation left out)

    @property
    def network_s(self) -> float:
        return max(self.verify_s - self.engine_s, 0.0) if self.engine_s else 0.0


@dataclass
class DraftGuard:
    """Keeps a failing drafter out of the way for a while."""

    budget_s: float = 5.0  # a proposal slower than this is abandoned
    fallback: bool = True  # False: a drafter failure fails the request
    cooldown_s: float = 10.0
    down_until: float = 0.0
    last_error: str = ""

    def usable(self) -> bool:
        return time.monotonic() >= self.down_until


async def _propose(drafter: Drafter, guard: DraftGuard, ctx: list[int], k: int,
                   sampling: SamplingParams, stats: RequestStats) -> Proposal:
    t0 = time.perf_counter()
    try:
        with trio.fail_after(guard.budget_s):
            prop = await drafter.propose(ctx, k, sampling)
        branches = None if prop.branches is None else [b[:k] for b in prop.branches]
        return Proposal(tokens=prop.tokens[:k], q=None if prop.q is None else prop.q[:k],
                        branches=branches, trusted=min(prop.trusted, k),
                        seconds=time.perf_counter() - t0)
    except (Exception, trio.TooSlowError) as exc:  # noqa: BLE001 - any drafter fault
        stats.draft_failures += 1
        guard.last_error = f"{exc.__class__.__name__}: {exc}"
        if not guard.fallback:
            raise BackendError(f"draft failed: {guard.last_error}") from exc
        guard.down_until = time.monotonic() + guard.cooldown_s
        log.warning("draft failed (%s); continuing on the target alone for %.0fs",
                    guard.last_error, guard.cooldown_s)
        return Proposal(tokens=[], seconds=time.perf_counter() - t0)


async def _verify_drafting_ahead(
    session: Any, proposal: Proposal, drafter: Drafter, guard: DraftGuard, ctx: list[int],
    k: int, sampling: SamplingParams, stats: RequestStats,
) -> tuple[Verdict, Proposal | None]:
    """Verify ``proposal`` while drafting K + 1 tokens after it; the next
    round's proposal when the guess held."""
    ahead: list[Proposal] = []
    async with trio.open_nursery() as nursery:
        async def draft_ahead() -> None:
            ahead.append(await _propose(drafter, guard, ctx + proposal.tokens, k + 1, sampling,
                                        stats))

        nursery.start_soon(draft_ahead)
        verdict = await session.verify(proposal)
        if verdict.accepted < len(proposal.tokens) or verdict.extra:
            nursery.cancel_scope.cancel()  # the guess's context is gone
    guess = ahead[0] if ahead else None
    if guess is None or len(guess.tokens) < 2 or guess.tokens[0] != verdict.token:
        return verdict, None
    stats.ahead_hits += 1
    return verdict, Proposal(tokens=guess.tokens[1:], q=None if guess.q is None else guess.q[1:],
                             seconds=0.0)


async def speculate(
    prompt: list[int],
    *,
    verifier: Verifier,
    drafter: Drafter | None,
    text: TargetText,
    sampling: SamplingParams,
    max_tokens: int,
    stop: tuple[str, ...],
    draft_length: DraftLength,
    guard: DraftGuard,
    stats: RequestStats,
    overlap: bool = False,
) -> AsyncGenerator[Delta, None]:
    """Yield deltas of the target's answer; the last carries finish reason and usage."""
    t_start = time.perf_counter()
    emitter = Emitter(text.piece, text.eos, stop, max_tokens)
    session = await verifier.open(prompt, sampling)
    try:
        ctx = list(prompt)
        ahead: Proposal | None = None  # the next round's proposal, drafted during this one's verify
        # a drafter may want each round's outcome (multi-drafter consensus credits its members)
        observe = getattr(drafter, "observe", None)
        while emitter.finish is None:
            remaining = max_tokens - emitter.n
            k = min(draft_length.k(), remaining - 1) if drafter is not None and guard.usable() else 0
            from_ahead = ahead is not None and k > 0
            if ahead is not None and k > 0:
                proposal = Proposal(tokens=ahead.tokens[:k], q=None if ahead.q is None
                                    else ahead.q[:k], seconds=0.0)
            else:
                proposal = (await _propose(drafter, guard, ctx, k, sampling, stats)
                            if k > 0 and drafter is not None else Proposal(tokens=[]))
            ahead = None
            if overlap and proposal.tokens and drafter is not None and guard.usable():
                verdict, ahead = await _verify_drafting_ahead(
                    session, proposal, drafter, guard, ctx, draft_length.peek(), sampling, stats)
            else:
                verdict = await session.verify(proposal)
            proposed = proposal.tokens
            if proposal.branches and 0 < verdict.branch < len(proposal.branches):
                proposed = proposal.branches[verdict.branch]  # a tree verifier chose this branch
            trusted = min(proposal.trusted, verdict.accepted)
            new = proposed[: verdict.accepted] + [verdict.token] + verdict.extra
            ctx.extend(new)
            if observe is not None:
                observe(proposal, verdict, new)
            stats.rounds += 1
            # trusted tokens are no draft the target checked: kept out of acceptance
            stats.drafted += len(proposed) - trusted
            stats.accepted += verdict.accepted - trusted
            stats.trusted += trusted
            stats.draft_s += proposal.seconds
            stats.verify_s += verdict.seconds
            stats.engine_s += verdict.engine_seconds or 0.0
            stats.ks.append(len(proposed))
            if verdict.gaps:
                stats.gaps.extend(verdict.gaps)
            if len(proposed) > trusted:
                draft_length.observe_round(len(proposed) - trusted, verdict.accepted - trusted,
                                           None if from_ahead else proposal.seconds,
                                           verdict.seconds, prefill=stats.rounds == 1)
            released = emitter.feed(new)
            if released:
                yield Delta(text=released)
        stats.emitted = emitter.n
        stats.tokens = list(emitter.tokens)
        stats.wall_s = time.perf_counter() - t_start
        yield Delta(finish_reason=emitter.finish, usage=Usage(len(prompt), emitter.n))
    finally:
        with trio.CancelScope(shield=True):
            await session.aclose()

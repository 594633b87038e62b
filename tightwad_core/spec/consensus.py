"""Multi-drafter consensus: several drafters race each round and their
proposals make one (docs/speculation.md#multi-drafter-consensus).

Engine-free on purpose: the rules are pure functions over token chains, and
`ConsensusDrafter` speaks the `Drafter` protocol over any drafters, so the
speculation loop and its exactness argument stay unchanged. Each round every
usable drafter proposes K tokens concurrently; once the first non-empty
proposal arrives, the others get ``wait`` seconds more and are then
cancelled (counted as dropped for that round), so a slow or dead drafter
never stalls a round. A drafter that fails is recorded in its own
`DraftGuard` and skipped while its cooldown lasts. With sampling, the lead is
chosen before the round and waited for (up to its budget): choosing it among
the answers would let the choice depend on the samples.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from tightwad_core.errors import BackendError
from tightwad_core.spec.interfaces import Drafter, Proposal, SamplingParams, Verdict
from tightwad_core.spec.loop import DraftGuard

log = logging.getLogger("tightwad.spec")

RULES = ("strict", "majority", "any_disagree")
#: A round's outcome, for the rounds metric: the rule agreed on at least one
#: token of two answers or more / one answer only / sent as several branches /
#: two answers or more agreed on nothing / no usable answer (K = 0).
OUTCOMES = ("agreed", "single", "tree", "no_agreement", "nobody")


# ---- the rules (pure) -------------------------------------------------------

def strict_prefix(chains: Sequence[Sequence[int]]) -> int:
    """How many leading positions every chain proposes the same token at."""
    if not chains:
        return 0
    n = 0
    for column in zip(*chains):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def majority_path(chains: Sequence[Sequence[int]]) -> list[int]:
    """Follow the tokens most drafters propose: at position i, among the
    chains that match the path so far, the most proposed token (ties: the
    earliest chain's); the path goes on while more than half of all chains
    propose it."""
    path: list[int] = []
    n = len(chains)
    while True:
        i = len(path)
        followers = [c for c in chains if len(c) > i and list(c[:i]) == path]
        if not followers:
            return path
        counts = Counter(c[i] for c in followers)
        best = max(counts.values())
        token = next(c[i] for c in followers if counts[c[i]] == best)
        if 2 * best <= n:
            return path
        path.append(token)


def agreed(rule: str, chains: Sequence[Sequence[int]]) -> list[int]:
    """The tokens ``rule`` counts as agreed, from the start (any_disagree
    agrees on the strict prefix)."""
    if rule == "majority":
        return majority_path(chains)
    return list(chains[0][: strict_prefix(chains)]) if chains else []


def branches_of(chains: Sequence[Sequence[int]], lead: int) -> list[list[int]]:
    """The distinct continuations, the one holding the lead's chain first; a
    chain that is a prefix of another adds nothing to a tree and is left out."""
    out: list[list[int]] = []
    for c in sorted((list(c) for c in chains if c), key=len, reverse=True):
        if not any(b[: len(c)] == c for b in out):
            out.append(c)
    own = list(chains[lead])
    first = next((b for b in out if b[: len(own)] == own), None)
    if first is not None:
        out.remove(first)
        out.insert(0, first)
    return out


def common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def own_seed(sampling: SamplingParams, i: int) -> SamplingParams:
    """A seeded request gives each drafter its own stream of draws, so one
    drafter's samples never share random numbers with another's (the
    exactness argument needs the lead's draw at position j independent of
    the others' tokens before j)."""
    if sampling.seed is None or i == 0:
        return sampling
    return msgspec.structs.replace(sampling, seed=(sampling.seed + 7919 * i) % (2**31 - 1))


# ---- statistics -------------------------------------------------------------

@dataclass
class MemberStats:
    """One drafter's record; agreement = matched / judged."""

    answered: int = 0  # rounds it answered in time (an empty proposal included)
    dropped: int = 0  # rounds it was cancelled in (too slow, or the lead failed)
    failed: int = 0  # rounds it failed in, or was skipped in while its cooldown lasted
    proposed: int = 0  # tokens it proposed
    # per round min(len(its chain), len(emitted)): every drafter is judged on
    # the same emitted tokens, whatever the length of its own chain
    judged: int = 0
    matched: int = 0  # of those, the ones its chain shares with what the round emitted

    def add(self, o: MemberStats) -> None:
        for f in ("answered", "dropped", "failed", "proposed", "judged", "matched"):
            setattr(self, f, getattr(self, f) + getattr(o, f))

    def agreement(self) -> float | None:
        return self.matched / self.judged if self.judged else None


@dataclass
class ConsensusStats:
    rounds: int = 0  # rounds with at least one usable answer
    agreed: int = 0  # tokens the rule agreed on (rounds with two answers or more)
    trusted: int = 0  # of those, emitted without the target (approximate only)
    agreed_rounds: int = 0  # two answers or more, at least one token agreed
    single: int = 0  # one answer only: its chain, nothing to agree on
    fallback_no_agreement: int = 0  # nothing agreed: the lead's chain was verified instead
    fallback_no_answer: int = 0  # nobody (with sampling: not the lead) answered: K = 0
    tree_rounds: int = 0  # rounds sent as several branches
    branches: int = 0  # branches sent in those rounds
    members: list[MemberStats] = field(default_factory=list)

    def add(self, o: ConsensusStats) -> None:
        for f in ("rounds", "agreed", "trusted", "agreed_rounds", "single",
                  "fallback_no_agreement", "fallback_no_answer", "tree_rounds", "branches"):
            setattr(self, f, getattr(self, f) + getattr(o, f))
        while len(self.members) < len(o.members):
            self.members.append(MemberStats())
        for mine, theirs in zip(self.members, o.members):
            mine.add(theirs)


# ---- the drafter ------------------------------------------------------------

class ConsensusDrafter:
    """Shared by all requests: the fleet, its guards and the running
    agreement that picks the lead. `request()` gives each request its own
    view, which keeps that request's statistics and its last round.

    ``tree`` may be a callable, read each round: a verifier may learn only
    at its first request whether its target checks trees."""

    def __init__(self, drafters: Sequence[Drafter], *, rule: str = "strict", wait: float = 0.5,
                 budget_s: float = 5.0, fallback: bool = True,
                 tree: bool | Callable[[], bool] = False, approximate: bool = False,
                 cooldown_s: float = 10.0) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown consensus rule {rule!r}")
        self.drafters = list(drafters)
        self.rule = rule
        self.wait = wait
        self.fallback = fallback
        self._tree = tree
        self.approximate = approximate
        self.guards = [DraftGuard(budget_s=budget_s, fallback=True, cooldown_s=cooldown_s)
                       for _ in self.drafters]
        self.totals = ConsensusStats(members=[MemberStats() for _ in self.drafters])
        self.name = f"consensus ({rule}) of " + ", ".join(d.name for d in self.drafters)

    @property
    def tree(self) -> bool:
        return bool(self._tree() if callable(self._tree) else self._tree)

    def request(self) -> ConsensusRequest:
        return ConsensusRequest(self)

    async def propose(self, context: list[int], k: int, sampling: SamplingParams) -> Proposal:
        """One round outside a request (its figures go straight to the
        totals; no member is credited with matches): requests use `request()`."""
        view = self.request()
        try:
            return await view.propose(context, k, sampling)
        finally:
            view.finish()

    def lead(self, candidates: Sequence[int], extra: ConsensusStats | None = None) -> int:
        """The candidate with the best running agreement (ties: profile order):
        the totals of finished requests plus ``extra`` (the current request's
        rounds so far), so the lead follows each round."""
        def score(i: int) -> float:
            m = MemberStats()
            m.add(self.totals.members[i])
            if extra is not None:
                m.add(extra.members[i])
            a = m.agreement()
            return -1.0 if a is None else a
        return max(candidates, key=lambda i: (score(i), -i))

    async def gather(self, ctx: list[int], k: int, sampling: SamplingParams,
                     stats: ConsensusStats, lead: int | None = None) -> dict[int, Proposal]:
        """Every usable drafter's non-empty proposal. The others get ``wait``
        seconds after the first non-empty one (an empty answer starts no
        clock: it proposes nothing to agree on). ``lead`` (sampling) is
        waited for up to its own budget, whatever the wait; when it fails or
        proposes nothing, the round is given up at once (nothing returned)."""
        got: dict[int, Proposal] = {}
        failed: set[int] = set()
        empty: set[int] = set()
        usable = [i for i, g in enumerate(self.guards) if g.usable()]
        for i in set(range(len(self.drafters))) - set(usable):
            stats.members[i].failed += 1
        scopes = {i: trio.CancelScope() for i in usable}
        async with trio.open_nursery() as nursery:
            async def one(i: int) -> None:
                guard = self.guards[i]
                t0 = time.perf_counter()
                with scopes[i]:
                    try:
                        with trio.fail_after(guard.budget_s):
                            p = await self.drafters[i].propose(ctx, k, own_seed(sampling, i))
                    except (Exception, trio.TooSlowError) as exc:  # noqa: BLE001 - any drafter fault
                        failed.add(i)
                        guard.last_error = f"{exc.__class__.__name__}: {exc}"
                        guard.down_until = time.monotonic() + guard.cooldown_s
                        log.warning("drafter %s failed (%s); left out for %.0fs",
                                    self.drafters[i].name, guard.last_error, guard.cooldown_s)
                        if i == lead:
                            nursery.cancel_scope.cancel()
                        return
                if scopes[i].cancelled_caught:
                    return  # too slow: dropped
                if not p.tokens[:k]:
                    empty.add(i)
                    if i == lead:
                        nursery.cancel_scope.cancel()
                    return
                got[i] = Proposal(tokens=p.tokens[:k], q=None if p.q is None else p.q[:k],
                                  seconds=time.perf_counter() - t0)
                if len(got) == 1:  # the first usable answer starts the others' clock
                    deadline = trio.current_time() + self.wait
                    for j, scope in scopes.items():
                        if j != lead:
                            scope.deadline = min(scope.deadline, deadline)

            for i in usable:
                nursery.start_soon(one, i)
        for i in usable:
            m = stats.members[i]
            if i in got or i in empty:
                m.answered += 1
                m.proposed += len(got[i].tokens) if i in got else 0
            elif i in failed:
                m.failed += 1
            else:
                m.dropped += 1
        if lead is not None and lead not in got:
            return {}
        return got


class ConsensusRequest:
    """One request's consensus drafter: a `Drafter` with ``observe``."""

    def __init__(self, fleet: ConsensusDrafter) -> None:
        self.fleet = fleet
        self.name = fleet.name
        self.stats = ConsensusStats(members=[MemberStats() for _ in fleet.drafters])
        self._chains: dict[int, list[int]] = {}

    async def propose(self, context: list[int], k: int, sampling: SamplingParams) -> Proposal:
        t0 = time.perf_counter()
        fleet, st = self.fleet, self.stats
        lead: int | None = None
        if not sampling.greedy:
            # exactness: the lead is fixed before any sample is seen
            usable = [i for i, g in enumerate(fleet.guards) if g.usable()]
            lead = fleet.lead(usable, st) if usable else None
        got = await fleet.gather(context, k, sampling, st, lead)
        self._chains = {i: list(p.tokens) for i, p in got.items()}
        if not got:
            st.fallback_no_answer += 1
            if not fleet.fallback:
                raise BackendError("no drafter answered: "
                                   + "; ".join(g.last_error for g in fleet.guards if g.last_error))
            return Proposal(tokens=[], seconds=time.perf_counter() - t0)
        st.rounds += 1
        order = sorted(got)
        if lead is None:
            lead = fleet.lead(order, st)
        chains = [got[i].tokens for i in order]
        li = order.index(lead)
        prop = self._combine(chains, li, got[lead], sampling)
        return Proposal(tokens=prop.tokens, q=prop.q, branches=prop.branches, trusted=prop.trusted,
                        seconds=time.perf_counter() - t0)

    def _agreed(self, tokens: int) -> None:
        """A round of two answers or more: ``tokens`` agreed, or none."""
        st = self.stats
        st.agreed += tokens
        if tokens:
            st.agreed_rounds += 1
        else:
            st.fallback_no_agreement += 1

    def _combine(self, chains: list[list[int]], li: int, lead: Proposal,
                 sampling: SamplingParams) -> Proposal:
        fleet, st, rule = self.fleet, self.stats, self.fleet.rule
        own = chains[li]
        if len(chains) == 1:  # nothing to agree on: its chain, as a single drafter
            st.single += 1
            return Proposal(tokens=own, q=lead.q)
        if fleet.approximate:
            return self._approximate(chains, li, lead)
        if not sampling.greedy:
            # exact: the lead's own sample, cut one past the first position the
            # rule fails at (so including position j depends on positions < j only)
            ok = self._along(chains, li)
            self._agreed(ok)
            if rule == "any_disagree" or ok == 0:  # the lead's whole chain
                return lead
            cut = min(len(own), ok + 1)
            return Proposal(tokens=own[:cut], q=None if lead.q is None else lead.q[:cut])
        if rule == "any_disagree":
            shared = strict_prefix(chains)
            if fleet.tree:
                branches = branches_of(chains, li)
                if len(branches) > 1:
                    st.agreed += shared
                    st.tree_rounds += 1
                    st.branches += len(branches)
                    return Proposal(tokens=branches[0], branches=branches)
            self._agreed(shared)
            return Proposal(tokens=own)
        path = agreed(rule, chains)
        self._agreed(len(path))
        return Proposal(tokens=path or own)

    def _along(self, chains: list[list[int]], li: int) -> int:
        """How many leading positions of the lead's chain the rule agrees on."""
        own = chains[li]
        if self.fleet.rule == "majority":
            n, i = len(chains), 0
            while i < len(own) and 2 * sum(1 for c in chains if c[: i + 1] == own[: i + 1]) > n:
                i += 1
            return i
        return strict_prefix(chains)

    def _approximate(self, chains: list[list[int]], li: int, lead: Proposal) -> Proposal:
        """Agreed tokens (two answers at least) are trusted; the rest of the
        lead's chain is verified. any_disagree trusts a round only when every
        drafter proposed the same K tokens."""
        own = chains[li]
        if self.fleet.rule == "any_disagree":
            same = strict_prefix(chains)
            trusted = same if all(len(c) == same for c in chains) else 0
        else:
            trusted = self._along(chains, li)
        self._agreed(trusted)
        self.stats.trusted += trusted
        return Proposal(tokens=own, q=lead.q, trusted=trusted)

    def observe(self, proposal: Proposal, verdict: Verdict, emitted: list[int]) -> None:
        """Credit each answering drafter with the tokens of its chain the
        round emitted, out of min(len(chain), len(emitted)): the same
        emitted tokens judge every drafter."""
        for i, chain in self._chains.items():
            m = self.stats.members[i]
            m.judged += min(len(chain), len(emitted))
            m.matched += common(chain, emitted)
        self._chains = {}

    def finish(self) -> None:
        """Merge this request's figures into the fleet's totals."""
        self.fleet.totals.add(self.stats)


def outcomes(t: ConsensusStats) -> dict[str, int]:
    """Rounds by outcome (OUTCOMES); they add up to every round asked for."""
    return {"agreed": t.agreed_rounds, "single": t.single, "tree": t.tree_rounds,
            "no_agreement": t.fallback_no_agreement, "nobody": t.fallback_no_answer}


def snapshot(fleet: ConsensusDrafter) -> dict[str, Any]:
    """status()["consensus"]."""
    t = fleet.totals
    return {
        "rule": fleet.rule, "approximate": fleet.approximate, "tree": fleet.tree,
        "wait_s": fleet.wait, "rounds": t.rounds, "agreed": t.agreed, "trusted": t.trusted,
        "outcomes": outcomes(t),
        "fallbacks": {"no_agreement": t.fallback_no_agreement, "no_answer": t.fallback_no_answer},
        "tree_rounds": t.tree_rounds, "branches": t.branches,
        "drafters": [{"name": d.name, "usable": g.usable(), "last_error": g.last_error,
                      "answered": m.answered, "dropped": m.dropped, "failed": m.failed,
                      "proposed": m.proposed, "judged": m.judged, "matched": m.matched,
                      "agreement": None if m.agreement() is None else round(m.agreement() or 0.0, 4)}
                     for d, g, m in zip(fleet.drafters, fleet.guards, t.members)],
    }


def metrics(fleet: ConsensusDrafter) -> list[dict[str, Any]]:
    """status()["metrics"]: tightwad_consensus_* families."""
    t = fleet.totals
    names = [d.name for d in fleet.drafters]

    def fam(name: str, help_: str, kind: str, labels: list[str],
            samples: list[list[Any]]) -> dict[str, Any]:
        return {"name": name, "help": help_, "type": kind, "labels": labels, "samples": samples}

    return [
        fam("tightwad_consensus_rounds", "consensus rounds by outcome", "counter", ["outcome"],
            [[[o], v] for o, v in outcomes(t).items()]),
        fam("tightwad_consensus_tokens", "tokens the drafters agreed on, and of those the ones "
            "emitted without the target (APPROXIMATE)", "counter", ["outcome"],
            [[["agreed"], t.agreed], [["trusted"], t.trusted]]),
        fam("tightwad_consensus_tree_rounds", "rounds sent as several branches", "counter", [],
            [[[], t.tree_rounds]]),
        fam("tightwad_consensus_branches", "branches sent in tree rounds", "counter", [],
            [[[], t.branches]]),
        fam("tightwad_consensus_drafter_rounds", "rounds per drafter by outcome", "counter",
            ["drafter", "outcome"],
            [[[n, o], getattr(m, o)] for n, m in zip(names, t.members)
             for o in ("answered", "dropped", "failed")]),
        fam("tightwad_consensus_drafter_tokens", "tokens per drafter: proposed, judged (per round "
            "min(chain, emitted)) and matched by what was emitted", "counter",
            ["drafter", "outcome"],
            [[[n, o], getattr(m, o)] for n, m in zip(names, t.members)
             for o in ("proposed", "judged", "matched")]),
        fam("tightwad_consensus_drafter_agreement", "matched / judged per drafter", "gauge",
            ["drafter"], [[[n], m.agreement()] for n, m in zip(names, t.members)]),
    ]


__all__ = ["OUTCOMES", "ConsensusDrafter", "ConsensusRequest", "ConsensusStats", "MemberStats",
           "RULES", "agreed", "branches_of", "majority_path", "metrics", "outcomes", "snapshot",
           "strict_prefix"]

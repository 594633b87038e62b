"""Totals over all requests of a speculative mode (per-request figures live
in `RequestStats` until the request ends, so concurrent requests never mix)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tightwad_core.spec.loop import RequestStats

BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, float("inf"))


@dataclass
class SpecTotals:
    requests: int = 0  # speculated requests
    relayed: int = 0  # requests relayed to the target (K = 0)
    # of those, sampled requests the verifier could not accept a draft for (its
    # servers report too little of the target's distribution for this sampler)
    relayed_sampler: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    engine_s: float = 0.0
    draft_failures: int = 0
    trusted: int = 0  # approximate consensus: tokens emitted without the target's check
    ahead_hits: int = 0  # rounds whose proposal was drafted while the previous one verified
    round_buckets: list[int] = field(default_factory=lambda: [0] * 9)  # cumulative, per request
    round_sum: float = 0.0

    def add(self, s: RequestStats) -> None:
        self.requests += 1
        self.rounds += s.rounds
        self.drafted += s.drafted
        self.accepted += s.accepted
        self.emitted += s.emitted
        self.draft_s += s.draft_s
        self.verify_s += s.verify_s
        self.engine_s += s.engine_s
        self.draft_failures += s.draft_failures
        self.trusted += s.trusted
        self.ahead_hits += s.ahead_hits
        if s.rounds:
            tpr = s.emitted / s.rounds
            self.round_sum += tpr
            for i, bound in enumerate(BUCKETS):
                if tpr <= bound:
                    self.round_buckets[i] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "relayed": self.relayed,
            "relayed_sampler": self.relayed_sampler, "rounds": self.rounds,
            "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
            "acceptance": self.accepted / self.drafted if self.drafted else None,
            "tokens_per_round": self.emitted / self.rounds if self.rounds else None,
            "time_s": {"draft": round(self.draft_s, 4), "verify": round(self.verify_s, 4),
                       "engine": round(self.engine_s, 4),
                       "network": round(max(self.verify_s - self.engine_s, 0.0), 4) if self.engine_s else None},
            "draft_failures": self.draft_failures,
            "trusted": self.trusted,
            "ahead_hits": self.ahead_hits,
            "round_histogram": {"buckets": [["+Inf" if b == float("inf") else str(b), c]
                                             for b, c in zip(BUCKETS, self.round_buckets)],
                                 "sum": self.round_sum},
        }

"""Choosing K, the number of draft tokens per round.

A pinned K is used as is. ``"auto"`` picks the K that maximises expected
target tokens per second from what it measures:

* a, the chance that the target keeps a draft token given it kept the ones
  before (decayed count of kept tokens over tokens tried),
* d, seconds the drafter spends per proposed token,
* v(k), seconds one verify round costs with k draft tokens, fitted as
  v0 + v1 * k by least squares over recent rounds (network included),
* r, seconds per token when the target generates on its own (the relay).

With acceptance a, a round with k draft tokens yields on average
(1 - a^(k+1)) / (1 - a) tokens (Leviathan et al. 2023) and costs
k * d + v(k) seconds. K = 0 means: do not speculate, relay to the target,
whose rate 1 / r is the bar every K must beat. Auto re-probes speculation
every `probe_every` requests while relaying, so a change in load or network
is noticed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


def expected_tokens(a: float, k: int) -> float:
    """Mean tokens one round yields with k draft tokens and acceptance a."""
    a = min(max(a, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


@dataclass
class DraftLength:
    """K for the next round; one instance per proxy, shared by requests."""

    pinned: int | None = None  # a fixed K, or None for auto
    k_max: int = 12
    probe_every: int = 16  # while relaying, speculate on every Nth request to re-measure
    alpha: float = 0.1  # weight of the newest sample in moving averages
    acceptance: float = 0.6  # prior until measured
    draft_s_per_token: float | None = None
    relay_s_per_token: float | None = None
    _rounds: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=64))
    _requests: int = 0
    _acc: float = 0.0  # decayed sums behind `acceptance`
    _trials: float = 0.0
    current: int = 4

    # ---- per request ------------------------------------------------------

    def speculate_this_request(self) -> bool:
        """False: relay this request to the target (auto found K = 0 best)."""
        self._requests += 1
        if self.pinned is not None:
            return self.pinned > 0
        if self.relay_s_per_token is None or self.draft_s_per_token is None or len(self._rounds) < 4:
            # measure both ways first: alternate until each has data
            return self._requests % 2 == 1 or self.relay_s_per_token is not None
        if self.best_k() > 0:
            return True
        return self._requests % self.probe_every == 0

    def k(self) -> int:
        if self.pinned is not None:
            return self.pinned
        if self.draft_s_per_token is None or len(self._rounds) < 4:
            return self.current
        self.current = max(1, self.best_k())
        return self.current

    # ---- observations -----------------------------------------------------

    def observe_round(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        if k > 0:
            # a is per token, given the ones before it were kept: a round that
            # kept n of k tried n + 1 tokens (n if all k were kept)
            trials = accepted + (1 if accepted < k else 0)
            self._acc = self._acc * (1 - self.alpha) + accepted
            self._trials = self._trials * (1 - self.alpha) + trials
            self.acceptance = self._acc / self._trials if self._trials else self.acceptance
            per = draft_s / k
            self.draft_s_per_token = per if self.draft_s_per_token is None else (
                self.draft_s_per_token + self.alpha * (per - self.draft_s_per_token))
        self._rounds.append((k, verify_s))

    def observe_relay(self, tokens: int, seconds: float) -> None:
        if tokens <= 0:
            return
        per = seconds / tokens
        self.relay_s_per_token = per if self.relay_s_per_token is None else (
            self.relay_s_per_token + self.alpha * (per - self.relay_s_per_token))

    # ---- the model --------------------------------------------------------

    def verify_cost(self, k: int) -> float:
        pts = list(self._rounds)
        n = len(pts)
        mean_k = sum(p[0] for p in pts) / n
        mean_v = sum(p[1] for p in pts) / n
        var = sum((p[0] - mean_k) ** 2 for p in pts)
        slope = 0.0 if var == 0 else sum((p[0] - mean_k) * (p[1] - mean_v) for p in pts) / var
        slope = max(slope, 0.0)
        return max(mean_v + slope * (k - mean_k), 1e-6)

    def rate(self, k: int) -> float:
        """Expected tokens per second at K = k (k = 0: the relay's rate)."""
        if k == 0:
            return 0.0 if self.relay_s_per_token is None else 1.0 / self.relay_s_per_token
        cost = k * (self.draft_s_per_token or 0.0) + self.verify_cost(k)
        return expected_tokens(self.acceptance, k) / cost

    def best_k(self) -> int:
        return max(range(0, self.k_max + 1), key=self.rate)

    def snapshot(self) -> dict[str, object]:
        return {
            "mode": "pinned" if self.pinned is not None else "auto",
            "k": self.pinned if self.pinned is not None else self.current,
            "acceptance_estimate": round(self.acceptance, 4),
            "draft_ms_per_token": None if self.draft_s_per_token is None else round(1000 * self.draft_s_per_token, 3),
            "relay_ms_per_token": None if self.relay_s_per_token is None else round(1000 * self.relay_s_per_token, 3),
            "best_k": self.best_k() if self.pinned is None and len(self._rounds) >= 4 and self.draft_s_per_token else None,
        }

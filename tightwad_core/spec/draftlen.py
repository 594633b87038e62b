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
k * d + v(k) seconds (about max(k * d, v(k)) when the next round is
drafted during the verify, `overlap_draft`). K = 0 means: do not speculate, relay to the target,
whose rate 1 / r is the bar every K must beat; until the relay has been
timed (auto speculates first, and relays one request in `probe_every` to
time it), r is taken as v(0), one target step through the verifier. Auto re-probes speculation
every `probe_every` requests while relaying, so a change in load or network
is noticed.

Auto explores on purpose: its first rounds try a spread of K values, and
every `explore_every`-th round after that tries a K next to the current
best (one above or below, in turn), so the fit of v(k) always has rounds at
more than one K and a slope it measured rather than assumed. Prompt prefill
is kept out of the costs: a request's first round (whose verify and draft
include evaluating the prompt) counts for acceptance only, and the relay's
rate is timed from its first token on.
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
    overlap: bool = False  # the next round is drafted while this one verifies (overlap_draft)
    explore_every: int = 8  # every Nth round tries a K next to the best one
    seed_ks: tuple[int, ...] = (2, 5, 3, 7, 4)  # the spread the first rounds try
    _round_no: int = 0
    _explore_turn: int = 0

    # ---- per request ------------------------------------------------------

    def speculate_this_request(self) -> bool:
        """False: relay this request to the target (auto found K = 0 best)."""
        self._requests += 1
        if self.pinned is not None:
            return self.pinned > 0
        if self.draft_s_per_token is None or len(self._rounds) < 4:
            return True  # measure speculation first; until the relay is timed, v(0) stands for it
        if self.relay_s_per_token is None and self._requests % self.probe_every == 0:
            return False  # time the real relay once: streaming may beat one verify step
        if self.best_k() > 0:
            return True
        return self._requests % self.probe_every == 0

    def peek(self) -> int:
        """A guess at the next round's K without taking a turn (for drafting
        ahead): the current best, or the pinned K."""
        return self.pinned if self.pinned is not None else self.current

    def k(self) -> int:
        if self.pinned is not None:
            return self.pinned
        self._round_no += 1
        if len(self._rounds) < len(self.seed_ks) or self.draft_s_per_token is None:
            seeds = [k for k in self.seed_ks if k <= self.k_max] or [1]
            return seeds[(self._round_no - 1) % len(seeds)]
        self.current = max(1, self.best_k())
        if self._round_no % self.explore_every == 0:
            self._explore_turn += 1
            step = 1 if self._explore_turn % 2 else -1
            probe = self.current + step
            if not 1 <= probe <= self.k_max:
                probe = self.current - step
            return max(1, min(self.k_max, probe))
        return self.current

    # ---- observations -----------------------------------------------------

    def observe_round(self, k: int, accepted: int, draft_s: float | None, verify_s: float, *,
                      prefill: bool = False) -> None:
        """One round's outcome; ``prefill``: its costs include evaluating the
        prompt (a request's first round), so only its acceptance is used;
        ``draft_s`` None: the proposal was drafted during the previous verify
        (its cost is not known apart from that verify's)."""
        if k > 0:
            # a is per token, given the ones before it were kept: a round that
            # kept n of k tried n + 1 tokens (n if all k were kept)
            trials = accepted + (1 if accepted < k else 0)
            self._acc = self._acc * (1 - self.alpha) + accepted
            self._trials = self._trials * (1 - self.alpha) + trials
            self.acceptance = self._acc / self._trials if self._trials else self.acceptance
            if prefill:
                return
            if draft_s is not None:
                per = draft_s / k
                self.draft_s_per_token = per if self.draft_s_per_token is None else (
                    self.draft_s_per_token + self.alpha * (per - self.draft_s_per_token))
        self._rounds.append((k, verify_s))

    def observe_relay(self, tokens: int, seconds: float) -> None:
        """``tokens`` generated in ``seconds``, timed after the first token
        (so without the prompt's prefill)."""
        if tokens <= 0 or seconds <= 0:
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
            relay = self.relay_s_per_token
            if relay is None and self._rounds:
                relay = self.verify_cost(0)  # one target step through the verifier
            return 0.0 if relay is None else 1.0 / relay
        draft = k * (self.draft_s_per_token or 0.0)
        verify = self.verify_cost(k)
        # drafting the next round during the verify hides the shorter of the two
        cost = max(draft, verify) if self.overlap else draft + verify
        return expected_tokens(self.acceptance, k) / cost

    def best_k(self) -> int:
        """The K with the highest expected rate, among those measured and one
        beyond the largest measured (a fitted line is not trusted further out)."""
        top = min(self.k_max, max((k for k, _ in self._rounds), default=self.k_max) + 1)
        return max(range(0, top + 1), key=self.rate)

    def snapshot(self) -> dict[str, object]:
        return {
            "mode": "pinned" if self.pinned is not None else "auto",
            "k": self.pinned if self.pinned is not None else self.current,
            "acceptance_estimate": round(self.acceptance, 4),
            "draft_ms_per_token": None if self.draft_s_per_token is None else round(1000 * self.draft_s_per_token, 3),
            "relay_ms_per_token": None if self.relay_s_per_token is None else round(1000 * self.relay_s_per_token, 3),
            "best_k": self.best_k() if self.pinned is None and len(self._rounds) >= 4 and self.draft_s_per_token else None,
            "ks_measured": sorted({k for k, _ in self._rounds}),
        }

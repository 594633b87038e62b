"""The acceptance rules of speculative decoding, once, for every verifier:
the proxy-side rungs (sparse ``{token: probability}`` rows from a server)
and the worker (dense rows over the whole vocabulary).

Greedy (temperature 0): a draft token is *accepted* while it equals the
target's argmax at its position; the target's argmax after the accepted
prefix is the extra token (a *correction* after a rejection, a *bonus*
token when all K were accepted).

Sampling, after Leviathan et al. 2023 ("Fast Inference from Transformers via
Speculative Decoding") and Chen et al. 2023: draft token ``x`` drawn from
``q`` is accepted with probability ``min(1, p(x) / q(x))``; at the first
rejection a *recovered* token is drawn from ``normalise(max(0, p - q))``; if
all K are accepted a bonus token is drawn from ``p`` at the next position.
The emitted tokens are then distributed exactly as the target's own samples.
A draft that proposes deterministically (a text drafter) is the case
``q = one-hot(x)``, which the same rule covers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

#: A distribution: sparse ``{token id: probability}`` or dense over the vocabulary.
Row = Mapping[int, float] | np.ndarray


def prob(row: Row, token: int) -> float:
    """``row``'s probability of ``token`` (0 outside its support)."""
    if isinstance(row, np.ndarray):
        return float(row[token]) if 0 <= token < len(row) else 0.0
    return float(row.get(token, 0.0))


def residual(p: Row, q: Mapping[int, float]) -> Row:
    """``max(0, p - q)`` (unnormalised); ``p`` itself where the two agree numerically."""
    if isinstance(p, np.ndarray):
        out = p.copy()
        for t, qt in q.items():
            if 0 <= int(t) < len(out):
                out[int(t)] -= float(qt)
        np.maximum(out, 0.0, out=out)
        return out if out.sum() > 1e-12 else p
    rest = {t: pt - q.get(t, 0.0) for t, pt in p.items() if pt - q.get(t, 0.0) > 0}
    return rest if sum(rest.values()) > 1e-12 else p


def draw(row: Row, rng: np.random.Generator) -> int:
    """One sample from a nonnegative, possibly unnormalised distribution."""
    if isinstance(row, np.ndarray):
        ids = np.flatnonzero(row > 0)
        weights = row[ids]
    else:
        items = [(t, w) for t, w in row.items() if w > 0]
        ids = np.array([t for t, _ in items], dtype=np.int64)
        weights = np.array([w for _, w in items], dtype=np.float64)
    if len(ids) == 0:
        raise ValueError("cannot sample from an all-zero distribution")
    cdf = np.cumsum(weights, dtype=np.float64)
    u = rng.random() * cdf[-1]
    return int(ids[min(int(np.searchsorted(cdf, u, side="right")), len(ids) - 1)])


def accept_greedy(argmax: Sequence[int], draft: Sequence[int]) -> tuple[int, int]:
    """``(accepted, token)``: the longest prefix of ``draft`` equal to the
    target's argmax at each position; ``argmax`` has ``len(draft) + 1`` entries."""
    n = 0
    while n < len(draft) and int(draft[n]) == int(argmax[n]):
        n += 1
    return n, int(argmax[n])


def accept_sampled(p_rows: Sequence[Row] | Callable[[int], Row],
                   q_rows: Sequence[Mapping[int, float]] | None, draft: Sequence[int],
                   rng: np.random.Generator) -> tuple[int, int]:
    """``(accepted, token)`` for a sampling round (rejection sampling).

    ``p_rows`` gives the target's distribution before each draft token and
    after the last (``len(draft) + 1`` rows; a callable is asked only for the
    rows it needs). ``q_rows[i]`` is the draft's distribution at position
    ``i``, from which ``draft[i]`` was drawn; None means one-hot proposals.
    A draft token the draft gave no probability is rejected.
    """
    p_at = p_rows if callable(p_rows) else p_rows.__getitem__
    for i, x in enumerate(draft):
        p = p_at(i)
        q = q_rows[i] if q_rows is not None else {int(x): 1.0}
        qx = float(q.get(int(x), 0.0))
        if qx > 0.0 and rng.random() < min(1.0, prob(p, int(x)) / qx):
            continue
        return i, draw(residual(p, q), rng)
    return len(draft), draw(p_at(len(draft)), rng)

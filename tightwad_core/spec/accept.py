"""Exact acceptance on the proxy side, for verifiers that return the target's
probabilities as sparse {token: probability} rows (prefix-batch and
prompt-logprobs rungs).

Rejection sampling (Leviathan et al. 2023, Chen et al. 2023): draft token x
drawn from q is *accepted* with probability min(1, p(x) / q(x)); at the first
rejection a *recovered* token is drawn from normalise(max(0, p - q)); if all
K are accepted a *bonus* token is drawn from p at the next position. The
emitted tokens are then distributed exactly as the target's own samples.
A draft that proposes deterministically (a text drafter) is the case
q = one-hot(x), which the same rule covers.
"""

from __future__ import annotations

import numpy as np

Row = dict[int, float]


def _draw(row: Row, rng: np.random.Generator) -> int:
    ids = np.fromiter(row.keys(), dtype=np.int64)
    w = np.fromiter(row.values(), dtype=np.float64)
    total = w.sum()
    if total <= 0:
        raise ValueError("cannot sample from an all-zero distribution")
    return int(ids[rng.choice(len(ids), p=w / total)])


def accept_sampled(p_rows: list[Row], q_rows: list[Row] | None, draft: list[int],
                   rng: np.random.Generator) -> tuple[int, int]:
    """Returns (accepted, token). `p_rows` has len(draft) + 1 rows: the
    target's distribution before each draft token and after the last."""
    for i, x in enumerate(draft):
        p = p_rows[i]
        q = q_rows[i] if q_rows is not None else {x: 1.0}
        px, qx = p.get(x, 0.0), q.get(x, 0.0)
        if qx > 0 and rng.random() < min(1.0, px / qx):
            continue
        residual = {t: pt - q.get(t, 0.0) for t, pt in p.items() if pt - q.get(t, 0.0) > 0}
        return i, _draw(residual or p, rng)
    return len(draft), _draw(p_rows[len(draft)], rng)


def accept_greedy(argmax: list[int], draft: list[int]) -> tuple[int, int]:
    """Longest prefix of `draft` equal to the target's argmax at each position;
    `argmax` has len(draft) + 1 entries."""
    n = 0
    while n < len(draft) and draft[n] == argmax[n]:
        n += 1
    return n, argmax[n]

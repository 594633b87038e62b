"""The worker's sampler over raw logits, and the acceptance rules of
:mod:`tightwad_core.spec.accept` applied to logits rows.

``p`` is the target's distribution under the request's sampler: logits
divided by the temperature, softmax, then the ``top_k`` most likely tokens,
then the smallest set whose mass reaches ``top_p``, renormalised. A drafter
must truncate its own distribution the same way (see :func:`draft_probs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tightwad_core.spec import accept
from tightwad_core.spec.interfaces import SamplingParams

#: Largest support a drafter sends for one position (see :func:`draft_probs`).
Q_CAP = 64


def top_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of ``x``, largest first.

    Looks among the entries close to the maximum before falling back to a
    partition of the whole row, which is slow for a 150k vocabulary.
    """
    n = len(x)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.intp)
    m = float(x.max())
    idx: np.ndarray | None = None
    d = 8.0
    for _ in range(8):
        cand = np.flatnonzero(x >= m - d)
        if len(cand) >= k:
            idx = cand
            break
        d *= 4
    if idx is None:
        idx = np.arange(n)
    if len(idx) > k:
        idx = idx[np.argpartition(-x[idx], k - 1)[:k]]
    return idx[np.argsort(-x[idx], kind="stable")]


def target_probs(logits_row: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The sampler's distribution (float64) over the whole vocabulary for one
    position. Greedy settings give a one-hot vector on the argmax."""
    z = np.asarray(logits_row, dtype=np.float32)
    n = z.shape[-1]
    if params.greedy:
        out = np.zeros(n)
        out[int(np.argmax(z))] = 1.0
        return out
    z = z / np.float32(params.temperature)
    m = float(z.max())
    e = np.exp(z - np.float32(m))  # float32 exp: several times faster than float64
    total = float(e.sum(dtype=np.float64))
    keep: np.ndarray | None = None  # indices kept, most likely first
    if 0 < params.top_k < n:
        keep = top_indices(z, params.top_k)
    if params.top_p < 1.0:
        if keep is None:  # the nucleus lies among the tokens close to the maximum
            cand = None
            d = 8.0
            for _ in range(8):
                near = np.flatnonzero(z >= m - d)
                if float(e[near].sum(dtype=np.float64)) >= params.top_p * total:
                    cand = near
                    break
                d *= 4
            if cand is None:
                cand = np.arange(n)
            cand = cand[np.argsort(-z[cand], kind="stable")]
            base = total
        else:  # top_p applies to the renormalised top_k distribution
            cand = keep
            base = float(e[cand].sum(dtype=np.float64))
        mass = np.cumsum(e[cand], dtype=np.float64) / base
        cut = int(np.searchsorted(mass, params.top_p)) + 1  # first index reaching top_p
        keep = cand[: min(cut, len(cand))]
    out = np.zeros(n)
    if keep is None:
        out[:] = e
        return out / total
    out[keep] = e[keep]
    return out / out.sum()


def draft_probs(logits_row: np.ndarray, params: SamplingParams,
                cap: int = Q_CAP) -> np.ndarray:
    """A drafter's distribution: :func:`target_probs`, with its support cut to
    the ``cap`` most likely tokens and renormalised. The drafter samples from
    exactly this distribution, so the ``q`` it reports is exact."""
    probs = target_probs(logits_row, params)
    if np.count_nonzero(probs) > cap:
        top = top_indices(np.asarray(logits_row, dtype=np.float32), cap)
        capped = np.zeros_like(probs)
        capped[top] = probs[top]
        probs = capped / capped.sum()
    return probs


def sparse(probs: np.ndarray) -> dict[int, float]:
    """``{token id: probability}`` of the nonzero entries."""
    idx = np.flatnonzero(probs)
    return {int(i): float(probs[i]) for i in idx}


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a (possibly unnormalised, nonnegative) distribution."""
    return accept.draw(probs, rng)


def top2_gap(logits_row: np.ndarray) -> float:
    """Top-1 minus top-2 log-probability (equal to the logit gap)."""
    row = np.asarray(logits_row)
    if row.shape[-1] < 2:
        return float("inf")
    i = int(np.argmax(row))
    second = max(row[:i].max(initial=-np.inf), row[i + 1:].max(initial=-np.inf))
    return float(row[i]) - float(second)


def accept_greedy(logits_rows: np.ndarray,
                  draft: Sequence[int]) -> tuple[int, int, list[float]]:
    """``(accepted, token, gaps)`` for a greedy round.

    ``logits_rows`` has ``len(draft) + 1`` rows: row ``i`` is the target's
    prediction for the position of ``draft[i]``; the last row follows the
    last draft token. ``gaps`` holds one entry per emitted position
    (``accepted`` of them, then ``token``).
    """
    rows = np.asarray(logits_rows)
    if rows.shape[0] != len(draft) + 1:
        raise ValueError(f"need {len(draft) + 1} logits rows, got {rows.shape[0]}")
    accepted, token = accept.accept_greedy([int(np.argmax(r)) for r in rows], draft)
    return accepted, token, [top2_gap(rows[i]) for i in range(accepted + 1)]


def accept_sampled(logits_rows: np.ndarray, draft: Sequence[int],
                   q_rows: Sequence[Mapping[int, float]], params: SamplingParams,
                   rng: np.random.Generator) -> tuple[int, int]:
    """``(accepted, token)`` for a sampling round (rejection sampling).

    ``q_rows[i]`` is the draft's distribution at draft position ``i`` as
    ``{token id: probability}``; ``draft[i]`` was drawn from it. The target's
    distributions are computed from the logits only for the rows needed.
    """
    rows = np.asarray(logits_rows)
    if rows.shape[0] != len(draft) + 1 or len(q_rows) != len(draft):
        raise ValueError("need len(draft) + 1 logits rows and len(draft) q rows")
    return accept.accept_sampled(lambda i: target_probs(rows[i], params), q_rows, draft, rng)

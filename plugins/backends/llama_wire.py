"""llama-server's native wire format, shared by the llama-server backend, the
prefix-batch and generate-compare rungs and the llama-server drafter: exact
sampler fields, per-token probability rows and top-2 gaps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tightwad_core.spec.interfaces import SamplingParams

#: Largest distribution support that llama-server reports per position.
MAX_PROBS = 64


def sampler_fields(s: SamplingParams, n_probs: int) -> dict[str, Any]:
    """llama-server request fields for exactly our sampler (its extra samplers off)."""
    if s.greedy:
        return {"temperature": 0.0, "n_probs": n_probs}
    return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": 0.0,
            "typical_p": 1.0, "repeat_penalty": 1.0, "n_probs": n_probs, "post_sampling_probs": True,
            "samplers": ["top_k", "top_p", "temperature"]}


def probs_row(step: dict[str, Any]) -> tuple[dict[int, float], bool]:
    """A position's post-sampling distribution and whether it is complete."""
    row = {int(t["id"]): float(t["prob"]) for t in step.get("top_probs") or ()}
    return row, abs(sum(row.values()) - 1.0) < 2e-3


def gap_of(values: Sequence[float]) -> float | None:
    """Top-1 minus top-2 of some log-probabilities (None with fewer than two)."""
    if len(values) < 2:
        return None
    top = sorted(values, reverse=True)
    return float(top[0]) - float(top[1])


def gap(step: dict[str, Any]) -> float | None:
    """The top-2 log-probability gap of one ``completion_probabilities`` entry."""
    return gap_of([float(t["logprob"]) for t in step.get("top_logprobs") or ()])


def _incomplete_tail(buf: bytes) -> bool:
    """Whether ``buf`` ends inside a UTF-8 character, by llama-server's own test."""
    for i in range(1, min(4, len(buf)) + 1):
        c = buf[-i]
        if (c & 0xE0) == 0xC0 and i < 2 or (c & 0xF0) == 0xE0 and i < 3 or (c & 0xF8) == 0xF0 and i < 4:
            return True
    return False


def align_gaps(tokens: list[int], steps: list[dict[str, Any]],
               piece: Callable[[int], bytes]) -> list[float | None]:
    """The top-2 gap at each generated position.

    llama-server leaves out the probabilities of a token after which the text
    ends inside a UTF-8 character, so ``completion_probabilities`` can be
    shorter than ``tokens``; such positions get None. Every kept entry must
    name the token at its position, else no gap is trusted."""
    if len(steps) == len(tokens) and all(int(s.get("id", -1)) == t for s, t in zip(steps, tokens)):
        return [gap(s) for s in steps]
    out: list[float | None] = []
    buf = b""
    j = 0
    for tok in tokens:
        buf += piece(tok)
        if _incomplete_tail(buf[-4:]):
            out.append(None)
        elif j < len(steps) and int(steps[j].get("id", -1)) == tok:
            out.append(gap(steps[j]))
            j += 1
        else:
            return [None] * len(tokens)
    return out if j == len(steps) else [None] * len(tokens)

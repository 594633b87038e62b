"""How the `gate` mode's target reviews a draft.

``scores``: the target scores prompt + draft in one pass (a completion with
``echo`` and ``logprobs``, as the prompt-logprobs rung asks for) and the
draft is judged token by token against the target's own top choice. A draft
token is a *real disagreement* when the target's top token beats it by more
than ``threshold`` nats; small margins are near-ties the gate lets through,
which is what makes it cheaper than exact speculation.

``judge``: for targets that only chat, the target is asked in a fixed
prompt whether the draft answers the request; the reply must start with
APPROVE or REJECT, anything else is a failed review."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from tightwad_core.errors import BackendError
from tightwad_core.http.wire import post_json
from tightwad_core.records import GenRequest

#: Log-probabilities asked for per position: enough to see whether an
#: end-of-generation token is within the threshold after a finished draft.
TOP_N = 5

Verdict = Literal["approved", "corrected", "rejected"]


@dataclass(frozen=True)
class Review:
    """What the target said about one draft."""

    verdict: Verdict
    keep: int  # draft tokens kept (all of them when approved)
    seconds: float  # wall time of the review request
    margins: list[float]  # target top minus draft token, per draft position (scores only)


def _tid(key: str) -> int:
    if not key.startswith("token_id:"):
        raise BackendError(f"expected token ids in logprobs (token_id:N), got {key!r}")
    return int(key[9:])


def _lp(value: Any) -> float:
    """A log-probability; NaN (which would compare as no disagreement) is malformed."""
    f = float(value)
    if f != f:
        raise ValueError("a logprob is NaN")
    return f


def decide(margins: list[float], end_ok: bool, threshold: float, min_prefix: float) -> tuple[Verdict, int]:
    """The verdict from per-position margins: the first margin above
    ``threshold`` is the first real disagreement; a finished draft whose end
    the target does not accept disagrees right after its last token."""
    n = len(margins)
    first = next((i for i, m in enumerate(margins) if m > threshold), None)
    if first is None and end_ok:
        return "approved", n
    keep = n if first is None else first
    if keep == 0 or keep < min_prefix * n:
        return "rejected", 0
    return "corrected", keep


def parse_scores(lp: dict[str, Any], n_prompt: int, draft: list[int], finished: bool,
                 eos: frozenset[int], threshold: float, ended: bool = False) -> tuple[list[float], bool]:
    """Per-position margins of ``draft`` and whether its end is accepted, from
    an echo answer's ``logprobs`` (positions: prompt, draft, one generated).
    ``ended``: the server generated nothing because the target's own next
    token ends the generation (servers leave that token out). Logprobs of the
    wrong shape are a failed review (BackendError), never a crash: with
    ``fail_open`` the draft is then served marked, without it the request
    fails 502."""
    try:
        return _parse_scores(lp, n_prompt, draft, finished, eos, threshold, ended)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise BackendError(f"the target returned malformed logprobs for the review "
                           f"({type(exc).__name__}: {exc})") from exc


def _parse_scores(lp: dict[str, Any], n_prompt: int, draft: list[int], finished: bool,
                  eos: frozenset[int], threshold: float, ended: bool) -> tuple[list[float], bool]:
    tops = lp.get("top_logprobs") or []
    own = lp.get("token_logprobs") or []
    need = n_prompt + len(draft) + 1
    if ended and len(tops) == need - 1:
        tops = [*tops, None]
    if len(tops) < need or len(own) < n_prompt + len(draft):
        raise BackendError(f"the target returned logprobs for {len(tops)} of {need} positions "
                           "(does it support echo with logprobs?)")
    margins: list[float] = []
    for j, tok in enumerate(draft):
        row = tops[n_prompt + j]
        if not row:
            raise BackendError("the target returned no top logprobs for a draft position")
        values = {_tid(k): _lp(v) for k, v in row.items()}
        best_tok, best = max(values.items(), key=lambda kv: kv[1])
        mine = own[n_prompt + j]
        mine = values.get(tok, mine)
        if best_tok == tok or mine is None:
            margins.append(0.0 if best_tok == tok else float("inf"))
        else:
            margins.append(max(best - _lp(mine), 0.0))
    end_ok = True
    if finished and tops[n_prompt + len(draft)] is None:
        end_ok = True  # the target's own next token ends it too
    elif finished:  # the draft ended by itself: the target must be willing to end there too
        row = tops[n_prompt + len(draft)] or {}
        values = {_tid(k): _lp(v) for k, v in row.items()}
        if values:
            best = max(values.values())
            ends = [v for t, v in values.items() if t in eos]
            end_ok = bool(ends) and best - max(ends) <= threshold
        else:
            end_ok = False
    return margins, end_ok


async def score_draft(backend: Any, prompt: list[int], draft: list[int], finished: bool,
                      eos: frozenset[int], threshold: float, min_prefix: float) -> Review:
    """One target pass over prompt + draft; its verdict. The whole draft is
    scored in one request: it never exceeds the request's ``max_tokens`` and
    the target's context must hold prompt + answer anyway."""
    t0 = time.perf_counter()
    body: dict[str, Any] = {"prompt": prompt + draft, "max_tokens": 1, "echo": True, "logprobs": TOP_N,
                            "return_tokens_as_token_ids": True, "temperature": 0}
    if backend.config.model:
        body["model"] = backend.config.model
    data = await post_json(backend.client, "/v1/completions", body, backend.where)
    try:
        choice = data["choices"][0]
        lp = choice["logprobs"]
        if not isinstance(lp, dict):
            raise TypeError(type(lp).__name__)
        # nothing generated after the draft, finish "stop": the target's own next token ends it
        ended = (choice.get("finish_reason") == "stop"
                 and len(lp.get("top_logprobs") or ()) == len(prompt) + len(draft))
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BackendError(f"{backend.where} returned no logprobs for the review") from exc
    margins, end_ok = parse_scores(lp, len(prompt), draft, finished, eos, threshold, ended=ended)
    verdict, keep = decide(margins, end_ok, threshold, min_prefix)
    return Review(verdict=verdict, keep=keep, seconds=time.perf_counter() - t0, margins=margins)


JUDGE_SYSTEM = ("You review answers written by a smaller model. Decide whether the draft answer "
                "below answers the request correctly and completely. Reply with exactly one word: "
                "APPROVE or REJECT.")


def _request_text(req: GenRequest) -> str:
    if req.kind == "chat":
        lines = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in req.messages or ()]
        return "\n".join(lines)
    return req.prompt if isinstance(req.prompt, str) else "(a prompt of token ids)"


async def judge_draft(target: Any, req: GenRequest, draft_text: str) -> Review:
    """Ask the target whether to approve ``draft_text``; approved or rejected
    only. A reply that is neither is a failed review (BackendError)."""
    t0 = time.perf_counter()
    ask = GenRequest(kind="chat", max_tokens=4, temperature=0.0, messages=[
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": f"Request:\n{_request_text(req)}\n\nDraft answer:\n{draft_text}\n\n"
                                    "Reply APPROVE or REJECT."}])
    result = await target.generate(ask)
    word = result.text.strip().strip("*.:!\"'").upper()
    if word.startswith("APPROVE"):
        verdict: Verdict = "approved"
    elif word.startswith("REJECT"):
        verdict = "rejected"
    else:
        raise BackendError(f"the judge's reply is neither APPROVE nor REJECT: {result.text[:60]!r}")
    return Review(verdict=verdict, keep=0, seconds=time.perf_counter() - t0, margins=[])

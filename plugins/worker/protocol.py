"""The worker's wire format: request and response bodies, limits, errors.

Every speculative round is one ``POST /v1/tightwad/verify``: the client sends
only the tokens the worker has not seen yet (the previous round's extra token
and the new draft) and says how much of the session's KV cache it still
trusts (``past``). The worker keeps the KV cache per session, so nothing is
re-tokenized or re-evaluated between rounds.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tightwad_core.errors import (
    BackendUnavailable,
    BadRequest,
    ContextOverflow,
    NotFound,
    TightwadError,
)
from tightwad_core.spec.interfaces import SamplingParams

#: Most draft tokens one verify or draft request may carry.
MAX_DRAFT = 64
#: Most entries of one position's draft distribution ``q``.
MAX_Q_SUPPORT = 4096
#: Most top alternatives per position in ``logprobs`` / ``prompt_logprobs``.
MAX_TOP_LOGPROBS = 20
#: Most branches one tree verify may carry.
MAX_BRANCHES = 8
#: Most distinct positions (shared prefixes merged) of one tree verify.
MAX_TREE_NODES = MAX_DRAFT * 2


class Sampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Sampler settings; the same on the drafter and the target."""

    temperature: float = 0.0  # 0: greedy (argmax); otherwise in (0, 2]
    top_p: float = 1.0  # nucleus cut-off applied after top_k; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    seed: int | None = None  # seeds the session's random generator; null: OS entropy

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed)


class VerifyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/tightwad/verify``."""

    # Session id from an earlier answer; null opens a new session (then `past`
    # must be 0 and `tokens` starts with the whole prompt).
    session: str | None = None
    # Tokens of this session the client considers accepted and already in the
    # KV cache; entries beyond it (last round's rejected drafts) are dropped.
    # Must not exceed the session's n_past (409 otherwise).
    past: int = 0
    # Tokens to evaluate: accepted tokens the worker has not evaluated yet (the
    # prompt on the first call, then the previous round's extra token),
    # followed by the `draft` draft tokens.
    tokens: list[int]
    # How many of `tokens`, at the end, are draft tokens (K; may be 0).
    draft: int = 0
    # The sampler; temperature 0 means greedy verification.
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    # Sampling only: the draft's distribution at each draft position as
    # {"token id": probability}; each draft token was drawn from its entry.
    q: list[dict[int, float]] | None = None
    # The client emits at most this many more tokens; drafts beyond it are
    # neither evaluated nor checked.
    max_new: int | None = None
    # Greedy only: alternative draft continuations checked in the same pass
    # (a tree: shared prefixes are evaluated once). `tokens` then holds only
    # the accepted tokens not evaluated yet and `draft` must be 0.
    branches: list[list[int]] | None = None


class VerifyResponse(msgspec.Struct, kw_only=True):
    """Answer of ``POST /v1/tightwad/verify``."""

    session: str  # the session id to send next round
    accepted: int  # draft tokens kept, from the start of the draft
    token: int  # the target's own token after them: correction or bonus
    n_past: int  # tokens now in the session's KV cache (all evaluated tokens)
    # Greedy only: top-1 minus top-2 log-probability at each emitted position
    # (the accepted drafts, then `token`); small values are near-ties.
    gaps: list[float] | None = None
    engine_ms: float = 0.0  # evaluation plus acceptance, HTTP excluded
    # Tree verifies only (`branches` sent): the branch `accepted` counts along,
    # the positions evaluated for the tree, and how many of the branches were
    # checked (the first ones; fewer when too few sequences were free).
    branch: int = 0
    tree_nodes: int = 0
    branches_verified: int | None = None


class DraftRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/tightwad/draft``: the worker as a drafter."""

    session: str | None = None  # as in VerifyRequest
    past: int = 0  # as in VerifyRequest
    tokens: list[int]  # accepted tokens not evaluated yet (at least one)
    k: int  # how many tokens to propose
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    # false: a one-off draft whose session ends with the answer (its sequence
    # keeps the cache, so the next draft with the same prefix still reuses it)
    keep: bool = True


class DraftResponse(msgspec.Struct, kw_only=True):
    """Answer of ``POST /v1/tightwad/draft``."""

    session: str | None  # null when the request had keep = false
    tokens: list[int]  # the k proposed token ids
    # Sampling only: the distribution each proposed token was drawn from, as
    # {"token id": probability} over at most 64 tokens; null when greedy.
    q: list[dict[int, float]] | None = None
    # Tokens in the session's KV cache: the accepted context plus the
    # proposals except the last (which was never evaluated).
    n_past: int = 0
    engine_ms: float = 0.0


class TokenizeBody(msgspec.Struct, kw_only=True):
    content: str  # text to tokenize
    add_special: bool = False  # add BOS (if the model wants one); special tokens are parsed


class DetokenizeBody(msgspec.Struct, kw_only=True):
    tokens: list[int]


class TemplateBody(msgspec.Struct, kw_only=True):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


# --------------------------------------------------------------------------- errors


class SessionConflict(TightwadError):
    """The client's view of a session disagrees with the worker's."""

    status = 409
    type = "invalid_request_error"
    code = "session_conflict"


class SessionNotFound(NotFound):
    code = "session_not_found"


class WorkerBusy(BackendUnavailable):
    """Every sequence is held and the wait queue is full or timed out."""

    type = "worker_busy"
    code = "no_free_slot"


class ContextFull(ContextOverflow):
    """More tokens than a slot's context holds (its body carries the counts,
    as llama-server's does, so the proxy can say what to raise)."""

    def __init__(self, needed: int, allowed: int) -> None:
        super().__init__(needed, allowed, setting="the worker's --ctx-size")


def check_tokens(tokens: list[int], n_vocab: int, param: str = "tokens") -> None:
    for t in tokens:
        if not 0 <= t < n_vocab:
            raise BadRequest(f"token id {t} is outside the vocabulary (0..{n_vocab - 1})",
                             param=param)


def check_sampling(s: Sampling) -> None:
    if not 0.0 <= s.temperature <= 2.0:
        raise BadRequest("temperature must be between 0 and 2", param="sampling.temperature")
    if not 0.0 < s.top_p <= 1.0:
        raise BadRequest("top_p must be in (0, 1]", param="sampling.top_p")
    if s.top_k < 0:
        raise BadRequest("top_k must not be negative", param="sampling.top_k")

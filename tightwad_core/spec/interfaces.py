"""What drafters and verifiers exchange with the speculation loop.

One *round*: the drafter proposes K tokens after the context; the verifier
runs the target once over them and answers how many it accepts plus the
target's own next token. Every emitted token is therefore the target's:
accepted draft tokens are exactly what the target would have chosen
(greedy) or were kept by rejection sampling, and the extra token is the
target's own choice (a *correction* after a rejection, a *bonus* token when
all K were accepted). Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding"; Chen et al. 2023.
"""

from __future__ import annotations

from typing import Protocol

import msgspec


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """The sampler both models use; the same settings on both sides."""

    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus cut-off; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    seed: int | None = None  # seeds the acceptance draws and the target's own samples

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Proposal(msgspec.Struct, frozen=True, kw_only=True):
    """K draft tokens for one round."""

    tokens: list[int]  # proposed token ids, in the target's vocabulary
    # Sampling only: at each proposed position, the draft's probability of every
    # token in its (truncated) support, as {token id: probability}. The
    # proposed token was drawn from exactly this distribution.
    q: list[dict[int, float]] | None = None
    seconds: float = 0.0  # wall time spent drafting
    # Greedy only: alternative continuations (each a list of token ids) a
    # verifier with ``tree = True`` checks in the same pass; ``tokens`` is
    # branch 0 and listed first. Other verifiers check ``tokens`` alone.
    branches: list[list[int]] | None = None
    # Approximate consensus only: the first ``trusted`` tokens are taken as
    # they are, without the target's check (a verifier with ``trusts = True``).
    trusted: int = 0


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """The target's answer to one proposal."""

    accepted: int  # how many proposed tokens, from the start, are kept (trusted ones included)
    token: int  # the target's own token after them: correction or bonus
    # Further tokens the target generated itself after `token` (generate-compare
    # rungs only); emitted as they are, being the target's own.
    extra: list[int] = []
    # Greedy only: the target's top-2 log-probability gap at each emitted
    # position (accepted tokens, then `token`); small gaps are numeric near-ties.
    gaps: list[float] | None = None
    seconds: float = 0.0  # wall time of the verify request, network included
    # Which of the proposal's branches ``accepted`` counts along (0: ``tokens``).
    branch: int = 0
    engine_seconds: float | None = None  # time the engine itself spent, when known


class VerifySession(Protocol):
    """A target-side context for one request; it holds the KV cache if it can."""

    async def verify(self, proposal: Proposal) -> Verdict:
        """Check the proposal after the tokens accepted so far."""

    async def aclose(self) -> None:
        """Free the target's resources for this request (safe to call twice)."""


class Verifier(Protocol):
    """One rung of the verifier ladder."""

    rung: str  # "worker", "prompt-logprobs", "prefix-batch" or "generate-compare"
    exact: bool  # every emitted token is the target's own choice
    one_pass: bool  # K tokens are checked in one target forward pass (else: no speed-up)
    label: str  # one honest line for start-up logs, status and /v1/models

    async def open(self, prompt: list[int], sampling: SamplingParams) -> VerifySession:
        """Start a request whose context is `prompt` (token ids)."""

    # Optional: ``tree: bool`` (checks ``Proposal.branches`` in one pass) and
    # ``trusts: bool`` (takes ``Proposal.trusted`` tokens unchecked).
    # Optional: ``accepts(sampling) -> bool``, False when no draft token can be
    # accepted exactly under that sampler (the speculative mode then relays the
    # request instead of paying for drafts; status counts it as relayed_sampler).


class Drafter(Protocol):
    """Proposes tokens in the target's vocabulary."""

    name: str

    async def propose(self, context: list[int], k: int, sampling: SamplingParams) -> Proposal:
        """Up to `k` tokens that may follow `context` (fewer if the draft stops)."""


class TargetText(Protocol):
    """Tokenizer facts about the target the loop needs."""

    @property
    def eos(self) -> frozenset[int]:
        """Tokens that end generation."""

    async def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of a prompt (with BOS and special-token parsing when `special`)."""

    async def apply_template(self, messages: list[dict[str, object]]) -> str:
        """The target's own chat template applied, with the generation prompt added."""

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (may be part of a UTF-8 character)."""

"""Speculation against a stock llama-server: the `prefix-batch` and
`generate-compare` verifier rungs.

prefix-batch: the K+1 prefixes (context, context + d1, ..., context + d1..dK)
go in ONE `/completion` request with `n_predict: 1`; the server answers the
target's next token after each. Exact, one round trip, but K+1 sequences of
compute (cheap on a GPU, costly on a CPU). Prompt caching keeps the shared
prefix from being recomputed in every slot it lands in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tightwad_core.errors import BackendError
from tightwad_core.hookspecs import hookimpl
from tightwad_core.http.wire import post_json
from tightwad_core.roles import VerifierFactory
from tightwad_core.spec.accept import accept_greedy, accept_sampled
from tightwad_core.spec.interfaces import Proposal, SamplingParams, Verdict
from tightwad_plugins.backends.llama_wire import MAX_PROBS, gap, probs_row, sampler_fields


def _rng(s: SamplingParams) -> np.random.Generator:
    return np.random.default_rng(s.seed)


class _Session:
    def __init__(self, backend: Any, prompt: list[int], sampling: SamplingParams) -> None:
        self.backend = backend
        self.ctx = list(prompt)
        self.sampling = sampling
        self.rng = _rng(sampling)

    def advance(self, proposal: Proposal, verdict: Verdict) -> Verdict:
        self.ctx += proposal.tokens[: verdict.accepted] + [verdict.token] + verdict.extra
        return verdict

    def seed(self) -> int:
        return int(self.rng.integers(0, 2**31 - 1))

    async def aclose(self) -> None:
        return None


class PrefixBatchSession(_Session):
    async def verify(self, proposal: Proposal) -> Verdict:
        t0 = time.perf_counter()
        d = proposal.tokens
        prompts = [self.ctx + d[:i] for i in range(len(d) + 1)]
        s = self.sampling
        n_probs = 2 if s.greedy else (s.top_k if 0 < s.top_k <= MAX_PROBS else MAX_PROBS)
        body = {"prompt": prompts if len(prompts) > 1 else prompts[0], "n_predict": 1,
                "cache_prompt": True, "return_tokens": True, "seed": self.seed(),
                **sampler_fields(s, n_probs)}
        data = await post_json(self.backend.client, "/completion", body, self.backend.where)
        results = data if isinstance(data, list) else [data]
        results = sorted(results, key=lambda r: r.get("index", 0))
        if len(results) != len(prompts):
            raise BackendError(f"{self.backend.where} answered {len(results)} of {len(prompts)} prefixes")
        steps = [(r.get("completion_probabilities") or [{}])[0] for r in results]
        own = [int((r.get("tokens") or [-1])[0]) for r in results]
        if s.greedy:
            argmax = [int(st.get("id", t)) if st else t for st, t in zip(steps, own)]
            accepted, token = accept_greedy(argmax, d)
            gaps = [g for g in (gap(st) for st in steps[: accepted + 1]) if g is not None]
            return self.advance(proposal, Verdict(accepted=accepted, token=token, gaps=gaps or None,
                                                  seconds=time.perf_counter() - t0))
        rows = [probs_row(st) for st in steps]
        if all(complete for _, complete in rows):
            accepted, token = accept_sampled([r for r, _ in rows], proposal.q, d, self.rng)
        else:
            # A row is missing: the server leaves out the entry of a sampled token that
            # ends inside a UTF-8 character, or the support is wider than reported. The
            # answer is a fresh sample of the target at the first position. Not own[0]:
            # whether a row went missing depends on the server's own samples, and taking
            # one of them here would favour exactly the tokens that make rows go missing.
            accepted, token = 0, await self._fresh_sample()
        return self.advance(proposal, Verdict(accepted=accepted, token=token,
                                              seconds=time.perf_counter() - t0))


    async def _fresh_sample(self) -> int:
        body = {"prompt": self.ctx, "n_predict": 1, "cache_prompt": True, "return_tokens": True,
                "seed": self.seed(), **sampler_fields(self.sampling, 0)}
        data = await post_json(self.backend.client, "/completion", body, self.backend.where)
        try:
            return int(data["tokens"][0])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise BackendError(f"{self.backend.where} sent no token") from exc


class PrefixBatchVerifier:
    rung = "prefix-batch"
    rank = 3
    requires = "llama-completion"
    pinnable = False
    exact = True
    one_pass = True
    label = "prefix-batch: exact; K+1 prefixes checked in one request (K+1 sequences of compute)"

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @staticmethod
    def accepts(s: SamplingParams) -> bool:
        """Drafts can be accepted when greedy, or when sampling keeps at most the
        MAX_PROBS most likely tokens the server reports (a wider support is only
        partly known, so no draft could be accepted exactly)."""
        return s.greedy or 0 < s.top_k <= MAX_PROBS

    async def open(self, prompt: list[int], sampling: SamplingParams) -> PrefixBatchSession:
        return PrefixBatchSession(self.backend, prompt, sampling)


class GenerateCompareSession(_Session):
    """The target generates K+1 tokens itself; the draft is only compared."""

    async def verify(self, proposal: Proposal) -> Verdict:
        t0 = time.perf_counter()
        s = self.sampling
        body = {"prompt": self.ctx, "n_predict": len(proposal.tokens) + 1, "cache_prompt": True,
                "return_tokens": True, "seed": self.seed(), **sampler_fields(s, 0)}
        body.pop("n_probs", None)
        body.pop("post_sampling_probs", None)
        data = await post_json(self.backend.client, "/completion", body, self.backend.where)
        own = [int(t) for t in data.get("tokens") or ()]
        if data.get("stop_type") == "eos" and len(own) <= len(proposal.tokens):
            own.append(self.backend.eos_token)
        if not own:
            own = [self.backend.eos_token]
        accepted = 0
        while accepted < min(len(proposal.tokens), len(own) - 1) and proposal.tokens[accepted] == own[accepted]:
            accepted += 1
        v = Verdict(accepted=accepted, token=own[accepted], extra=own[accepted + 1:],
                    seconds=time.perf_counter() - t0)
        return self.advance(proposal, v)


class GenerateCompareVerifier(PrefixBatchVerifier):
    rung = "generate-compare"
    rank = 4
    one_pass = False
    label = ("generate-compare: correct output, NO speed-up: the target generates every token "
             "itself and the draft is only compared")

    async def open(self, prompt: list[int], sampling: SamplingParams) -> GenerateCompareSession:  # type: ignore[override]
        return GenerateCompareSession(self.backend, prompt, sampling)


@hookimpl
def register_verifiers(register: Callable[[str, VerifierFactory], None]) -> None:
    register("prefix-batch", PrefixBatchVerifier)
    register("generate-compare", GenerateCompareVerifier)

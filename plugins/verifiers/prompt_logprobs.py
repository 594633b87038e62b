"""The `prompt-logprobs` rung: any OpenAI-compatible server that returns
log-probabilities for prompt positions, such as vLLM with `echo` +
`logprobs`, or a Tightwad worker."""

from __future__ import annotations

import math
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

TOP_N = 20  # log-probabilities asked for per position (vLLM's usual maximum)


def _tid(key: str) -> int:
    if not key.startswith("token_id:"):
        raise BackendError(f"expected token ids in logprobs (token_id:N), got {key!r}; "
                           "the server must support return_tokens_as_token_ids")
    return int(key[9:])


def _row(top: dict[str, float] | None, s: SamplingParams) -> tuple[dict[int, float], bool]:
    """Target distribution at a position from its top log-probs; exact only
    when top_k keeps no more tokens than were reported."""
    if not top:
        return {}, False
    items = sorted(((_tid(k), v) for k, v in top.items()), key=lambda kv: -kv[1])
    if not 0 < s.top_k <= len(items):
        return {}, False
    items = items[: s.top_k]
    w = np.array([v / s.temperature for _, v in items])
    p = np.exp(w - w.max())
    p /= p.sum()
    if s.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), s.top_p) + 1)
        p = p[:keep] / p[:keep].sum()
        items = items[:keep]
    return {t: float(x) for (t, _), x in zip(items, p)}, True


class PromptLogprobsSession:
    def __init__(self, backend: Any, prompt: list[int], sampling: SamplingParams) -> None:
        self.backend = backend
        self.ctx = list(prompt)
        self.s = sampling
        self.rng = np.random.default_rng(sampling.seed)

    async def _complete(self, prompt: list[int], echo: bool) -> dict[str, Any]:
        s = self.s
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": 1, "echo": echo,
                                "logprobs": 2 if s.greedy else TOP_N, "return_tokens_as_token_ids": True,
                                "temperature": s.temperature, "seed": int(self.rng.integers(0, 2**31 - 1))}
        if not s.greedy:
            body.update(top_p=s.top_p, top_k=s.top_k or -1)
        if self.backend.config.model:
            body["model"] = self.backend.config.model
        data = await post_json(self.backend.client, "/v1/completions", body, self.backend.where)
        try:
            return data["choices"][0]["logprobs"]
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"{self.backend.where} returned no logprobs") from exc

    async def verify(self, proposal: Proposal) -> Verdict:
        t0 = time.perf_counter()
        d = proposal.tokens
        n = len(self.ctx)
        lp = await self._complete(self.ctx + d, echo=True)
        tokens, tops = lp.get("tokens") or [], lp.get("top_logprobs") or []
        if len(tokens) < n + len(d) + 1 or len(tops) < n + len(d) + 1:
            raise BackendError(f"{self.backend.where} returned logprobs for {len(tokens)} of "
                               f"{n + len(d) + 1} positions (does it support echo?)")
        positions = tops[n: n + len(d) + 1]
        gaps = None
        if self.s.greedy:
            argmax = [_tid(max(t, key=t.get)) for t in positions[:-1]] + [_tid(tokens[n + len(d)])]
            accepted, token = accept_greedy(argmax, d)
            gaps = []
            for t in positions[: accepted + 1]:
                vals = sorted(t.values(), reverse=True)
                if len(vals) >= 2 and math.isfinite(vals[1]):
                    gaps.append(vals[0] - vals[1])
        else:
            rows = [_row(t, self.s) for t in positions]
            if all(ok for _, ok in rows):
                accepted, token = accept_sampled([r for r, _ in rows], proposal.q, d, self.rng)
            else:  # the reported support may be too narrow: take the target's own sample
                own = await self._complete(self.ctx, echo=False)
                accepted, token = 0, _tid(own["tokens"][0])
        self.ctx += d[:accepted] + [token]
        return Verdict(accepted=accepted, token=token, gaps=gaps or None, seconds=time.perf_counter() - t0)

    async def aclose(self) -> None:
        return None


class PromptLogprobsVerifier:
    rung = "prompt-logprobs"
    rank = 2
    requires = "prompt-logprobs"
    pinnable = True  # servers cannot announce prompt logprobs: pin the rung for one that has them
    exact = True
    one_pass = True
    label = ("prompt-logprobs: exact; one request per round returns the target's choice at every "
             "draft position; a server that does not keep prompt log-probabilities evaluates the "
             "whole context again each round (a Tightwad worker keeps them)")

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @staticmethod
    def accepts(s: SamplingParams) -> bool:
        """Greedy, or sampling that keeps at most the TOP_N tokens a server reports
        per position; otherwise no draft can be accepted exactly."""
        return s.greedy or 0 < s.top_k <= TOP_N

    async def open(self, prompt: list[int], sampling: SamplingParams) -> PromptLogprobsSession:
        return PromptLogprobsSession(self.backend, prompt, sampling)


@hookimpl
def register_verifiers(register: Callable[[str, VerifierFactory], None]) -> None:
    register("prompt-logprobs", PromptLogprobsVerifier)

"""Drafters: where the speculative mode's proposals come from. Same-vocabulary
drafts (llama-server, a worker) propose token ids with their probabilities;
any other backend drafts text, which the target's tokenizer turns into ids."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import numpy as np

from tightwad_core.http.wire import post_json
from tightwad_core.records import GenRequest
from tightwad_core.roles import Backend
from tightwad_core.spec.interfaces import Proposal, SamplingParams
from tightwad_plugins.backends.llama_wire import MAX_PROBS, probs_row, sampler_fields
from tightwad_plugins.modes.target_text import TargetTokenizer


class LlamaServerDrafter:
    """Draft tokens from a llama-server with the target's vocabulary."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.name = f"llama-server at {backend.base_url}"
        self._rng = np.random.default_rng()

    async def propose(self, context: list[int], k: int, sampling: SamplingParams) -> Proposal:
        t0 = time.perf_counter()
        if sampling.greedy:
            fields = sampler_fields(sampling, 0)
            fields.pop("n_probs")
        else:
            # Any q is exact as long as it is what the draft sampled from: cap its
            # support so the server reports all of it.
            top_k = min(sampling.top_k or MAX_PROBS, MAX_PROBS)
            fields = sampler_fields(SamplingParams(temperature=sampling.temperature, top_k=top_k,
                                                   top_p=sampling.top_p), top_k)
        # a request's seed makes its drafts reproducible too (same context, same proposal)
        seed = (int(self._rng.integers(0, 2**31 - 1)) if sampling.seed is None
                else (sampling.seed * 1_000_003 + len(context)) % (2**31 - 1))
        body = {"prompt": context, "n_predict": k, "cache_prompt": True, "return_tokens": True,
                "seed": seed, **fields}
        data = await post_json(self.backend.client, "/completion", body, self.backend.where)
        tokens = [int(t) for t in data.get("tokens") or ()][:k]
        q = None
        if not sampling.greedy:
            # llama-server may leave out the entry of a token that ends inside a
            # UTF-8 character; a token whose q we do not have cannot be proposed
            # exactly, so the proposal stops at the first missing or misaligned one
            steps = data.get("completion_probabilities") or []
            q = []
            for t, st in zip(tokens, steps):
                row = probs_row(st)[0]
                if int(st.get("id", -1)) != t or row.get(t, 0.0) <= 0.0:
                    break
                q.append(row)
            tokens = tokens[: len(q)]
        return Proposal(tokens=tokens, q=q, seconds=time.perf_counter() - t0)


class WorkerDrafter:
    """Draft tokens from a worker.

    Each proposal is a one-off draft (``keep: false``): the worker runs it on
    the free sequence whose cache shares the longest prefix with the context
    and frees that sequence with the answer, keeping its cache. So a request's
    next round finds its own cache again (the previous round's rejected drafts
    are rolled back there), and no idle session of ours ever holds a sequence
    another request waits for."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.name = f"worker at {backend.base_url}"

    async def propose(self, context: list[int], k: int, sampling: SamplingParams) -> Proposal:
        t0 = time.perf_counter()
        if sampling.seed is not None:  # a request's seed makes each round's draws reproducible
            sampling = msgspec.structs.replace(
                sampling, seed=(sampling.seed * 1_000_003 + len(context)) % (2**31 - 1))
        body = {"session": None, "past": 0, "tokens": context, "k": k, "keep": False,
                "sampling": msgspec.to_builtins(sampling)}
        data = await post_json(self.backend.client, "/v1/tightwad/draft", body, self.backend.where)
        tokens = [int(t) for t in data.get("tokens") or ()][:k]
        q = data.get("q")
        if q is not None:
            q = [{int(t): float(p) for t, p in row.items()} for row in q][: len(tokens)]
        return Proposal(tokens=tokens, q=q, seconds=time.perf_counter() - t0)


class TextDrafter:
    """A draft that only speaks text: it continues the context's text and the
    target's tokenizer turns its answer into ids. Its proposals are
    deterministic, which rejection sampling handles as q = one-hot."""

    def __init__(self, backend: Backend, target: TargetTokenizer) -> None:
        self.backend = backend
        self.target = target
        self.name = f"{backend.kind} (text) at {getattr(backend, 'base_url', '?')}"

    async def propose(self, context: list[int], k: int, sampling: SamplingParams) -> Proposal:
        t0 = time.perf_counter()
        # control tokens spelled out, so the draft sees the chat template's structure
        text = b"".join(self.target.vocab.special(t) for t in context).decode("utf-8", "replace")
        req = GenRequest(kind="completion", prompt=text, max_tokens=k, temperature=0.0)
        result = await self.backend.generate(req)
        ids = (await self.target.tokenize(result.text, special=False))[:k] if result.text else []
        return Proposal(tokens=ids, q=[{t: 1.0} for t in ids] if not sampling.greedy else None,
                        seconds=time.perf_counter() - t0)

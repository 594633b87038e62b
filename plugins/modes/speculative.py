"""The ``speculative`` mode: a draft proposes, the target verifies, every
emitted token is the target's. Picks the verifier rung the target offers
(or the one the profile names) and a drafter that speaks token ids when the
vocabularies match, text otherwise."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import msgspec
import trio

from tightwad_core.errors import BadRequest, UnsupportedParam
from tightwad_core.hookspecs import hookimpl
from tightwad_core.config.profiles import ConfigError, Profile
from tightwad_core.records import Delta, GenRequest, Result
from tightwad_core.roles import Backend
from tightwad_core.spec.draftlen import DraftLength
from tightwad_core.spec.interfaces import SamplingParams
from tightwad_core.spec.loop import DraftGuard, RequestStats, speculate
from tightwad_core.spec.stats import SpecTotals
from tightwad_core.vocab import from_pieces, same_vocab

from tightwad_plugins.verifiers.llama_server import GenerateCompareVerifier, LlamaServerDrafter, PrefixBatchVerifier, sampler_fields
from tightwad_plugins.verifiers.prompt_logprobs import PromptLogprobsVerifier, TextDrafter
from tightwad_plugins.modes.target_text import TargetTokenizer, local_vocab
from tightwad_plugins.verifiers.worker import WorkerDrafter, WorkerVerifier

log = logging.getLogger("tightwad.spec")

VERIFIERS = {"worker": WorkerVerifier, "prefix-batch": PrefixBatchVerifier,
             "generate-compare": GenerateCompareVerifier, "prompt-logprobs": PromptLogprobsVerifier}
AUTO_RUNG = {"worker": "worker", "llama-server": "prefix-batch", "openai": "generate-compare",
             "ollama": "generate-compare"}
TOKEN_TARGETS = frozenset({"worker", "llama-server", "openai"})


class SpeculativeMode:
    name = "speculative"
    roles = ("target", "draft")

    def __init__(self, profile: Profile, backends: dict[str, Backend]) -> None:
        self.profile = profile
        self.target = backends["target"]
        self.draft_backend = backends["draft"]
        spec = profile.speculation
        pinned = spec.max_draft_tokens if isinstance(spec.max_draft_tokens, int) else None
        self.draft_length = DraftLength(pinned=pinned, k_max=spec.k_max)
        self.guard = DraftGuard(budget_s=spec.draft_timeout, fallback=spec.fallback_on_draft_failure)
        rung = spec.verifier if spec.verifier != "auto" else AUTO_RUNG.get(self.target.kind, "generate-compare")
        self.rung = rung
        self.relay_only = rung == "generate-compare" and self.target.kind not in ("llama-server",)
        self.verifier: Any = None
        self.drafter: Any = None
        self.text: TargetTokenizer | None = None
        self.totals = SpecTotals()

    async def start(self) -> None:
        """Check the pair and pick the verifier and drafter (after backends are up)."""
        if self.relay_only:
            log.warning("verifier generate-compare on a %s target: correct output, NO speed-up "
                        "(the target cannot check draft tokens)", self.target.kind)
            return
        if self.rung == "worker" and self.target.kind != "worker":
            raise ConfigError(f"verifier 'worker' needs a worker target, not {self.target.kind}")
        self.verifier = VERIFIERS[self.rung](self.target)
        self.text = TargetTokenizer(self.target)
        await self.text.load(fallback_files=[local_vocab(self.draft_backend)])
        draft_vocab = local_vocab(self.draft_backend)
        if self.draft_backend.kind == "llama-server" and draft_vocab is not None:
            if not same_vocab(draft_vocab, self.text.vocab):
                raise ConfigError(
                    f"the draft's vocabulary ({draft_vocab.n_vocab} tokens) differs from the target's "
                    f"({self.text.vocab.n_vocab} tokens): token ids cannot be mapped; use a draft of the "
                    "same family, or an openai/ollama draft (text, re-tokenized)")
            self.drafter = LlamaServerDrafter(self.draft_backend)
        elif self.draft_backend.kind == "llama-server":
            self.drafter = LlamaServerDrafter(self.draft_backend)
            log.warning("draft vocabulary not checked (no local model file); assuming it matches")
        elif self.draft_backend.kind == "worker":
            data = await self.draft_backend.get_json("/v1/tightwad/vocab")
            theirs = from_pieces([bytes.fromhex(p) for p in data["pieces"]], data["eos"], data.get("bos"),
                                 data["fingerprint"])
            if not same_vocab(theirs, self.text.vocab):
                raise ConfigError("the worker draft's vocabulary differs from the target's: token ids "
                                  "cannot be mapped; use a draft of the same family")
            self.drafter = WorkerDrafter(self.draft_backend)
        else:
            self.drafter = TextDrafter(self.draft_backend, self.text)
            log.warning("draft %s speaks text: proposals are re-tokenized with the target's tokenizer "
                        "(acceptance is lower than with a same-vocabulary draft)", self.draft_backend.kind)
        log.info("speculative mode: %s; draft %s; K %s", self.verifier.label, self.drafter.name,
                 self.profile.speculation.max_draft_tokens)

    # ---- requests ---------------------------------------------------------

    def check(self, req: GenRequest) -> None:
        for name in req.extra:
            raise UnsupportedParam(f"{name} is not supported in speculative mode", param=name)
        if req.kind == "completion" and isinstance(req.prompt, list) and self.relay_only:
            raise UnsupportedParam("token-id prompts need a token-level target", param="prompt")

    def _sampling(self, req: GenRequest) -> SamplingParams:
        return SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p,
                              top_k=req.top_k or 0, seed=req.seed)

    async def _prompt(self, req: GenRequest) -> list[int]:
        assert self.text is not None
        if req.kind == "chat":
            return await self.text.tokenize(await self.text.apply_template(req.messages or []), special=True)
        if isinstance(req.prompt, list):
            if any(t >= self.text.vocab.n_vocab for t in req.prompt):
                raise BadRequest("prompt has token ids outside the vocabulary", param="prompt")
            return list(req.prompt)
        return await self.text.tokenize(req.prompt or "", special=True)

    async def generate(self, req: GenRequest) -> Result:
        parts: list[str] = []
        async with aclosing(self.stream(req)) as it:
            async for d in it:
                parts.append(d.text)
                if d.finish_reason is not None:
                    return Result(text="".join(parts), finish_reason=d.finish_reason,
                                  usage=d.usage)  # type: ignore[arg-type]
        raise AssertionError("stream ended without a finish")

    async def stream(self, req: GenRequest) -> AsyncIterator[Delta]:
        if self.relay_only or not self.draft_length.speculate_this_request():
            async for d in self._relay(req):
                yield d
            return
        stats = RequestStats()
        try:
            prompt = await self._prompt(req)
            assert self.text is not None
            async with aclosing(speculate(
                    prompt, verifier=self.verifier, drafter=self.drafter, text=self.text,
                    sampling=self._sampling(req), max_tokens=req.max_tokens, stop=req.stop,
                    draft_length=self.draft_length, guard=self.guard, stats=stats)) as it:
                async for d in it:
                    yield d
        finally:
            self.totals.add(stats)

    async def _relay(self, req: GenRequest) -> AsyncIterator[Delta]:
        t0 = time.perf_counter()
        parts: list[str] = []
        self.totals.relayed += 1
        s = self._sampling(req)
        # the same defaults as the speculative path (OpenAI's temperature 1), not the server's
        req = msgspec.structs.replace(req, temperature=s.temperature, top_p=s.top_p)
        if self.target.kind == "llama-server" and not s.greedy:
            # the sampler the verifier uses, without llama-server's extra default samplers
            fields = sampler_fields(s, 0)
            fields.pop("n_probs")
            fields.pop("post_sampling_probs")
            req = msgspec.structs.replace(req, extra={**req.extra, **fields})
        async with aclosing(self.target.stream(req)) as it:
            async for d in it:
                parts.append(d.text)
                if d.finish_reason is not None:
                    # measured before the last delta goes out: a consumer may close
                    # this generator as soon as it has the finish
                    seconds = time.perf_counter() - t0
                    tokens = d.usage.completion_tokens if d.usage is not None else None
                    if tokens is None and self.text is not None:  # no usage in the target's stream
                        tokens = len(await self.text.tokenize("".join(parts), special=False))
                    self.draft_length.observe_relay(tokens or 0, seconds)
                yield d

    def status(self) -> dict[str, Any]:
        return {"mode": self.name, "verifier": {"rung": self.rung, "label": self.verifier.label if self.verifier
                                                else GenerateCompareVerifier.label,
                                                "exact": True, "speedup": not self.relay_only},
                "draft": getattr(self.drafter, "name", None), "draft_length": self.draft_length.snapshot(),
                "draft_health": {"usable": self.guard.usable(), "last_error": self.guard.last_error},
                **self.totals.snapshot()}


def make(profile: Profile, backends: dict[str, Backend]) -> SpeculativeMode:
    return SpeculativeMode(profile, backends)


make.roles = SpeculativeMode.roles  # type: ignore[attr-defined]


@hookimpl
def register_modes(register):  # type: ignore[no-untyped-def]
    register("speculative", make)


__all__ = ["SpeculativeMode", "trio"]

"""The ``speculative`` mode: a draft proposes, the target verifies, every
emitted token is the target's. Picks the verifier rung the target offers
(or the one the profile names) and a drafter that speaks token ids when the
vocabularies match, text otherwise."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from typing import Any, ClassVar

import msgspec

from tightwad_core.config.profiles import ConfigError, Profile
from tightwad_core.errors import UnsupportedParam
from tightwad_core.hookspecs import hookimpl
from tightwad_core.records import Delta, GenRequest, Result
from tightwad_core.roles import (
    FLEET,
    Backend,
    ModeContext,
    ModeFactory,
    TokenBackend,
    VerifierFactory,
    best_verifier,
    fleet,
)
from tightwad_core.spec.consensus import ConsensusDrafter, ConsensusRequest, metrics, snapshot
from tightwad_core.spec.draftlen import DraftLength
from tightwad_core.spec.interfaces import Drafter, Verifier
from tightwad_core.spec.loop import DraftGuard, RequestStats, speculate
from tightwad_core.spec.stats import SpecTotals
from tightwad_core.vocab import same_vocab
from tightwad_plugins.modes.drafters import LlamaServerDrafter, TextDrafter, WorkerDrafter
from tightwad_plugins.modes.target_text import TargetTokenizer, sampling_of, vocab_of

log = logging.getLogger("tightwad.spec")

#: The rung named when no rung fits the target: the target generates every
#: token itself (a plain relay), correct and with no speed-up.
RELAY_RUNG = "generate-compare"
RELAY_LABEL = ("generate-compare: correct output, NO speed-up: the target generates every token "
               "itself and the draft is only compared")
#: Same-vocabulary drafters by the capability they use, best first; a draft
#: with neither speaks text.
TOKEN_DRAFTERS: tuple[tuple[str, type[WorkerDrafter] | type[LlamaServerDrafter]], ...] = (
    ("tightwad-verify", WorkerDrafter), ("llama-completion", LlamaServerDrafter))


def pick_rung(name: str, target: Backend,
              verifiers: Mapping[str, VerifierFactory]) -> VerifierFactory | None:
    """The rung a profile's ``speculation.verifier`` names for ``target``; None
    means relay (no rung the target supports)."""
    if name == "auto":
        return best_verifier(verifiers, target.capabilities)
    if name not in verifiers:
        known = ", ".join(["auto", *sorted(verifiers)])
        raise ConfigError(f"field 'speculation.verifier': no verifier named {name!r} (known: {known})")
    rung = verifiers[name]
    if rung.requires in target.capabilities or rung.pinnable:
        return rung
    if name == RELAY_RUNG:
        return None
    raise ConfigError(f"verifier {name!r} needs a target that offers {rung.requires!r}; the "
                      f"{target.kind} target does not (use verifier = \"auto\")")


class SpeculativeMode:
    name = "speculative"
    roles: ClassVar[tuple[str, ...]] = ("target", "draft", FLEET)
    #: Approximate consensus: agreed tokens are emitted without the target's check.
    approximate: ClassVar[bool] = False

    def __init__(self, profile: Profile, backends: Mapping[str, Backend], context: ModeContext) -> None:
        self.profile = profile
        self.target = backends["target"]
        # the single draft, or the fleet (a [draft] table joins it as its first member)
        self.members = ([backends["draft"]] if "draft" in backends else []) + fleet(backends)
        if not self.members:
            raise ConfigError(f"mode {self.name!r} needs a [draft] table or [[drafters]] tables")
        self.draft_backend = self.members[0]
        self.consensus: ConsensusDrafter | None = None
        spec = profile.speculation
        pinned = spec.max_draft_tokens if isinstance(spec.max_draft_tokens, int) else None
        self.draft_length = DraftLength(pinned=pinned, k_max=spec.k_max, overlap=spec.overlap_draft)
        self.guard = DraftGuard(budget_s=spec.draft_timeout, fallback=spec.fallback_on_draft_failure)
        factory = pick_rung(spec.verifier, self.target, context.verifiers)
        self.relay_only = factory is None or not isinstance(self.target, TokenBackend)
        self.rung = RELAY_RUNG if factory is None else factory.rung
        self.factory = factory
        self._last_tokens: list[int] | None = None
        self.verifier: Verifier | None = None
        self.drafter: Drafter | None = None
        self.text: TargetTokenizer | None = None
        self.totals = SpecTotals()

    async def start(self) -> None:
        """Check the pair and build the verifier and drafter (after backends are up)."""
        target = self.target
        if self.relay_only or self.factory is None or not isinstance(target, TokenBackend):
            log.warning("verifier %s on a %s target: correct output, NO speed-up "
                        "(the target cannot check draft tokens)", self.rung, target.kind)
            return
        self.verifier = self.factory(target)
        self.text = TargetTokenizer(target)
        await self.text.load(fallback=await vocab_of(self.draft_backend))
        drafters = [await self._drafter_for(b, i) for i, b in enumerate(self.members)]
        spec = self.profile.speculation
        if len(drafters) > 1:
            self.consensus = ConsensusDrafter(
                drafters, rule=spec.consensus, wait=spec.consensus_wait, budget_s=spec.draft_timeout,
                fallback=spec.fallback_on_draft_failure, approximate=self.approximate,
                tree=lambda: bool(getattr(self.verifier, "tree", False)))
            self.drafter = self.consensus
            # each member has draft_timeout; the round as a whole may also wait for the others
            self.guard.budget_s = spec.draft_timeout + spec.consensus_wait + 1.0
            if spec.overlap_draft:
                log.info("overlap_draft is off with several drafters (each round's consensus "
                         "needs every answer)")
            log.info("consensus of %d drafters: %s%s", len(drafters), spec.consensus,
                     " (branches verified as one tree)" if self.consensus.tree else "")
        else:
            self.drafter = drafters[0]
        log.info("speculative mode: %s; draft %s; K %s", self.verifier.label, self.drafter.name,
                 spec.max_draft_tokens)

    async def _drafter_for(self, backend: Backend, i: int) -> Drafter:
        """The drafter for one draft backend: token ids when it shares the
        target's vocabulary, text otherwise."""
        assert self.text is not None
        which = "the draft" if len(self.members) == 1 else f"drafter {i} ({backend.kind})"
        draft_vocab = await vocab_of(backend)
        drafter = next((d for cap, d in TOKEN_DRAFTERS if cap in backend.capabilities), None)
        if drafter is None:
            log.warning("%s speaks text: proposals are re-tokenized with the target's tokenizer "
                        "(acceptance is lower than with a same-vocabulary draft)", which)
            return TextDrafter(backend, self.text)
        if draft_vocab is None:
            log.warning("%s: vocabulary not checked (no local model file); assuming it matches", which)
        elif not same_vocab(draft_vocab, self.text.vocab):
            raise ConfigError(
                f"{which}'s vocabulary ({draft_vocab.n_vocab} tokens) differs from the target's "
                f"({self.text.vocab.n_vocab} tokens): token ids cannot be mapped; use a draft of the "
                "same family, or an openai/ollama draft (text, re-tokenized)")
        return drafter(backend)

    # ---- requests ---------------------------------------------------------

    def check(self, req: GenRequest) -> None:
        for name in req.extra:
            raise UnsupportedParam(f"{name} is not supported in speculative mode", param=name)
        if req.tool_choice not in (None, "auto", "none"):
            raise UnsupportedParam("speculative mode cannot force a tool call: tool_choice must be "
                                   '"auto" or "none"', param="tool_choice")
        if req.kind == "completion" and isinstance(req.prompt, list) and self.relay_only:
            raise UnsupportedParam("token-id prompts need a token-level target", param="prompt")

    async def generate(self, req: GenRequest) -> Result:
        parts: list[str] = []
        async with aclosing(self.stream(req)) as it:
            async for d in it:
                parts.append(d.text)
                if d.finish_reason is not None:
                    assert d.usage is not None, "the last delta carries the usage"
                    return Result(text="".join(parts), finish_reason=d.finish_reason, usage=d.usage)
        raise AssertionError("stream ended without a finish")

    def _can_accept(self, req: GenRequest) -> bool:
        """Whether this rung can accept any draft token under the request's sampler."""
        accepts = getattr(self.verifier, "accepts", None)
        return accepts is None or bool(accepts(sampling_of(req)))

    async def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        if not self.relay_only and not self._can_accept(req):
            # every round would pay for K drafts and K+1 positions that can never be
            # accepted: the target alone answers, at its own speed
            self.totals.relayed_sampler += 1
            async for d in self._relay(req):
                yield d
            return
        if self.relay_only or not self.draft_length.speculate_this_request():
            async for d in self._relay(req):
                yield d
            return
        stats = RequestStats()
        # a fleet gives each request its own view (its figures, its last round)
        drafter: Drafter | None = self.drafter
        view: ConsensusRequest | None = None
        if self.consensus is not None:
            drafter = view = self.consensus.request()
        try:
            assert self.text is not None and self.verifier is not None and drafter is not None
            prompt = await self.text.prompt_ids(req)
            async with aclosing(speculate(
                    prompt, verifier=self.verifier, drafter=drafter, text=self.text,
                    sampling=sampling_of(req), max_tokens=req.max_tokens, stop=req.stop,
                    draft_length=self.draft_length, guard=self.guard, stats=stats,
                    overlap=self.profile.speculation.overlap_draft and view is None)) as it:
                async for d in it:
                    yield d
        finally:
            self.totals.add(stats)
            if view is not None:
                view.finish()
            if stats.tokens:
                self._last_tokens = stats.tokens

    def last_tokens(self) -> list[int] | None:
        """The token ids of the last speculated answer (what `tightwad bench`
        compares with the target's own, position by position); None before any."""
        return self._last_tokens

    async def _relay(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        t0 = time.perf_counter()
        parts: list[str] = []
        self.totals.relayed += 1
        s = sampling_of(req)
        # the same defaults as the speculative path (OpenAI's temperature 1), not the server's
        # and the sampler a verifier checks against, without a server's extra default samplers
        req = msgspec.structs.replace(req, temperature=s.temperature, top_p=s.top_p, exact_sampler=True)
        first: float | None = None  # when the first token came: the rate excludes the prefill
        async with aclosing(self.target.stream(req)) as it:
            async for d in it:
                parts.append(d.text)
                if first is None and d.text:
                    first = time.perf_counter()
                if d.finish_reason is not None:
                    # measured before the last delta goes out: a consumer may close
                    # this generator as soon as it has the finish
                    seconds = time.perf_counter() - (first if first is not None else t0)
                    tokens = d.usage.completion_tokens if d.usage is not None else None
                    if tokens is None and self.text is not None:  # no usage in the target's stream
                        tokens = len(await self.text.tokenize("".join(parts), special=False))
                    self.draft_length.observe_relay((tokens or 0) - (first is not None), seconds)
                yield d

    def status(self) -> dict[str, Any]:
        label = self.verifier.label if self.verifier is not None else RELAY_LABEL
        out = {"mode": self.name, "verifier": {"rung": self.rung, "label": label, "exact": True,
                                               "speedup": not self.relay_only},
               "draft": None if self.drafter is None else self.drafter.name, "draft_length": self.draft_length.snapshot(),
               "draft_health": {"usable": self.guard.usable(), "last_error": self.guard.last_error},
               **self.totals.snapshot()}
        if self.consensus is not None:
            out["consensus"] = snapshot(self.consensus)
            out["metrics"] = metrics(self.consensus)
        return out


@hookimpl
def register_modes(register: Callable[[str, ModeFactory], None]) -> None:
    register("speculative", SpeculativeMode)


__all__ = ["SpeculativeMode", "pick_rung"]

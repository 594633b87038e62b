"""The ``gate`` mode: a fleet of cheap drafters writes whole responses and
the target reviews each one before the client sees a character. The client
gets the approved draft, a corrected one (the agreed prefix, then the
target's own continuation) or a fresh target answer. A review that fails
fails the request unless ``gate.fail_open`` says to pass the draft on,
marked. A request with tools goes to the target as it is (``relayed``): a
tool call is not text the gate can review or cache. See docs/gate.md."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from tightwad_core.config.profiles import ConfigError, Profile
from tightwad_core.errors import (
    BackendError,
    BackendUnavailable,
    BadRequest,
    TightwadError,
    UnsupportedParam,
)
from tightwad_core.hookspecs import hookimpl
from tightwad_core.http.wire import stream_sse
from tightwad_core.records import Delta, GenRequest, Result, Usage
from tightwad_core.roles import FLEET, Backend, ModeContext, ModeFactory, TokenBackend, fleet
from tightwad_core.spec.emitter import Emitter
from tightwad_core.spec.interfaces import SamplingParams
from tightwad_core.vocab import same_vocab
from tightwad_plugins.modes.gate_fleet import Draft, Fleet, Member
from tightwad_plugins.modes.gate_review import Review, judge_draft, score_draft
from tightwad_plugins.modes.gate_stats import AnswerCache, GateTotals, cache_key, families
from tightwad_plugins.modes.target_text import TargetTokenizer, sampling_of, vocab_of

if TYPE_CHECKING:
    import click

log = logging.getLogger("tightwad.gate")


@dataclass
class _Served:
    """What one request ended up as (read when its last delta goes out)."""

    verdict: str = ""
    cacheable: bool = True


class _Emitter(Emitter):
    """The shared emitter, and an end without a token: a continuation the
    target's server cut (``finish_reason`` "length", e.g. its context) ends
    the answer "length" with no end-of-generation token counted."""

    def end(self, reason: str) -> str:
        if self.finish is not None:
            return ""
        self.finish = reason
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """A streamed delta's extra fields into a whole answer's (lists are joined)."""
    for k, v in extra.items():
        if isinstance(v, list) and isinstance(into.get(k), list):
            into[k] = [*into[k], *v]
        else:
            into[k] = v


class GateMode:
    name = "gate"
    roles: ClassVar[tuple[str, ...]] = ("target", FLEET)

    def __init__(self, profile: Profile, backends: Mapping[str, Backend], context: ModeContext) -> None:
        self.profile = profile
        self.cfg = profile.gate
        self.target = backends["target"]
        self.drafters = fleet(backends)
        self.fleet = Fleet([], self.cfg.pick, self.cfg.draft_timeout)
        self.text: TargetTokenizer | None = None
        self.cache = AnswerCache(self.cfg.cache_entries)
        self.totals = GateTotals()

    async def start(self) -> None:
        """Check that the target can review as configured and learn how each drafter writes."""
        target = self.target
        if self.cfg.review == "judge":
            self.fleet.members = [Member(i, be, "text") for i, be in enumerate(self.drafters)]
            log.info("gate mode: %d drafter(s), %s, judge review", len(self.drafters), self.cfg.pick)
            return
        if "prompt-logprobs" not in target.capabilities or not isinstance(target, TokenBackend):
            raise ConfigError(f'gate.review = "scores" needs a target that scores a draft with its own '
                              f"log-probabilities (a worker, or a server with prompt logprobs); the "
                              f'{target.kind} target does not: use review = "judge"')
        vocabs = [await vocab_of(be) for be in self.drafters]
        self.text = TargetTokenizer(target)
        await self.text.load(fallback=next((v for v in vocabs if v is not None), None))
        members = []
        for i, (be, v) in enumerate(zip(self.drafters, vocabs)):
            way = "text"
            if isinstance(be, TokenBackend) and (v is None or same_vocab(v, self.text.vocab)):
                way = "llama-completion" if "llama-completion" in be.capabilities else "token-completions"
                if v is None:
                    log.warning("drafters.%d: vocabulary not checked (no local model file); assuming "
                                "it matches the target's", i)
            elif isinstance(be, TokenBackend):
                log.warning("drafters.%d has another vocabulary: its drafts are re-tokenized with the "
                            "target's tokenizer", i)
            members.append(Member(i, be, way))
        self.fleet.members = members
        log.info("gate mode: %d drafter(s) (%s), scores review, threshold %g nats, min_prefix %g",
                 len(members), self.cfg.pick, self.cfg.threshold, self.cfg.min_prefix)

    # ---- requests ---------------------------------------------------------

    def check(self, req: GenRequest) -> None:
        for name in req.extra:
            raise UnsupportedParam(f"{name} is not supported in gate mode", param=name)
        if req.tool_choice not in (None, "auto", "none"):
            raise UnsupportedParam('gate mode cannot force a tool call: tool_choice must be "auto" or '
                                   '"none"', param="tool_choice")
        if self.cfg.review == "judge" or req.tools:
            self.target.check(req)

    def _relay(self, req: GenRequest) -> bool:
        """Tool requests go to the target as they are: a drafted tool call is
        neither text the review can score nor an answer the cache may keep."""
        if not req.tools:
            return False
        self.totals.relayed += 1
        return True

    async def generate(self, req: GenRequest) -> Result:
        if self._relay(req):
            return await self.target.generate(req)
        parts: list[str] = []
        extra: dict[str, Any] = {}
        served = _Served()
        async with aclosing(self._answer(req, served)) as it:
            async for d in it:
                parts.append(d.text)
                if d.extra:
                    _merge(extra, d.extra)
                if d.finish_reason is not None:
                    usage = d.usage or Usage(0, 0)
                    if served.verdict == "unreviewed":
                        extra["tightwad_review"] = "unreviewed"
                    return Result(text="".join(parts), finish_reason=d.finish_reason, usage=usage,
                                  extra=extra or None)
        raise AssertionError("stream ended without a finish")

    async def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        gen = self.target.stream(req) if self._relay(req) else self._answer(req, _Served())
        async with aclosing(gen) as it:
            async for d in it:
                yield d

    async def _answer(self, req: GenRequest, served: _Served) -> AsyncGenerator[Delta, None]:
        """The cache first; else a draft, its review and what the review decides."""
        key = cache_key(req) if self.cfg.cache_entries > 0 else None
        hit = self.cache.get(key)
        if hit is not None:
            self.totals.cached += 1
            served.verdict = "cached"
            if hit.text:
                yield Delta(text=hit.text)
            yield Delta(finish_reason=hit.finish_reason, usage=hit.usage)
            return
        parts: list[str] = []
        gen = self._scores(req, served) if self.cfg.review == "scores" else self._judge(req, served)
        async with aclosing(gen) as it:
            async for d in it:
                parts.append(d.text)
                if d.extra:  # fields beyond text (a target's tool call) are not kept in the cache
                    served.cacheable = False
                if d.finish_reason is not None and served.cacheable and d.usage is not None:
                    # stored before the last delta goes out: a consumer may stop reading at it
                    self.cache.put(key, Result(text="".join(parts), finish_reason=d.finish_reason,
                                               usage=d.usage))
                yield d

    async def _draft(self, req: GenRequest, prompt: list[int] | None, s: SamplingParams) -> Draft | None:
        """A whole draft from the first fleet member that manages one; None when none does."""
        for member in self.fleet.order():
            try:
                draft = await self.fleet.write(member, req, prompt, s, self.text)
            except BadRequest:  # too long for this drafter (or refused by it): the next may take it
                continue
            except (TightwadError, trio.TooSlowError):
                self.totals.drafter_failures += 1
                continue
            self.totals.draft_tokens_written += len(draft.tokens)
            return draft
        return None

    def _review_failed(self, exc: TightwadError, served: _Served, draft: Draft) -> None:
        """Fail closed (raise), or with ``fail_open`` log and count the unreviewed draft."""
        self.totals.review_failures += 1
        if not self.cfg.fail_open:
            cls = BackendUnavailable if isinstance(exc, BackendUnavailable) else BackendError
            raise cls(f"the target could not review the draft ({exc.message}); no unreviewed text is "
                      "served (gate.fail_open is off)") from None
        log.warning("review failed (%s): serving %s's draft UNREVIEWED (gate.fail_open)", exc.message,
                    draft.writer)
        self.totals.unreviewed += 1
        served.verdict = "unreviewed"
        served.cacheable = False

    async def _scores(self, req: GenRequest, served: _Served) -> AsyncGenerator[Delta, None]:
        assert self.text is not None
        text = self.text
        prompt = await text.prompt_ids(req)
        s = sampling_of(req)
        draft = await self._draft(req, prompt, s)
        if draft is not None and req.stop:
            draft = self._trim(draft, req)
        review: Review | None = None
        kept: list[int] = []
        whole = False  # the draft is served to its end
        if draft is None:
            self.totals.fresh_no_draft += 1
            served.verdict = "fresh_no_draft"
        else:
            try:
                review = await score_draft(self.target, prompt, draft.tokens, draft.finished, text.eos,
                                           self.cfg.threshold, self.cfg.min_prefix)
            except BadRequest:  # prompt + draft beyond the target's context: the client's 400
                raise
            except TightwadError as exc:
                self._review_failed(exc, served, draft)
                kept, whole = draft.tokens, True
            else:
                kept = draft.tokens[: review.keep]
                whole = review.verdict == "approved"
        emitter = _Emitter(text.piece, text.eos, req.stop, req.max_tokens)
        out = emitter.feed(kept)
        if emitter.finish is None and whole and draft is not None:
            if draft.finished:
                out += emitter.feed([min(text.eos)])  # the draft's own end, which the review accepted
            elif review is None:
                out += emitter.end("length")  # unreviewed: the target, which just failed, is not asked on
            # else: approved but cut short of max_tokens (e.g. the drafter's own context): the target
            # goes on from it, and the answer counts as corrected with every draft token kept
        if review is not None and draft is not None:
            verdict = review.verdict
            if verdict == "approved" and emitter.finish is None:  # the target writes the rest
                verdict = "corrected" if kept else "rejected"
            served.verdict = verdict
            setattr(self.totals, verdict, getattr(self.totals, verdict) + 1)
            self.totals.review_s += review.seconds
            self.totals.reviewed_kept += len(kept)
        self.totals.draft_tokens_kept += len(kept)
        if out:
            yield Delta(text=out)
        target_tokens = 0
        t_target = time.perf_counter()
        if emitter.finish is None:
            before = len(emitter.tokens)
            async with aclosing(self._continue(prompt + kept, req, s, emitter)) as it:
                async for piece in it:
                    if piece:
                        yield Delta(text=piece)
            target_tokens = len(emitter.tokens) - before  # the target's own tokens, no end marker
        self.totals.target_tokens_generated += target_tokens
        self.totals.last = {"verdict": served.verdict, "writer": draft.writer if draft else None,
                            "draft_tokens": len(draft.tokens) if draft else 0, "kept": len(kept),
                            "target_tokens": target_tokens,
                            "review_s": review.seconds if review else None,
                            "draft_s": draft.seconds if draft else None,
                            "target_s": time.perf_counter() - t_target if target_tokens else 0.0}
        yield Delta(finish_reason=emitter.finish or "stop", usage=Usage(len(prompt), emitter.n))

    def _trim(self, draft: Draft, req: GenRequest) -> Draft:
        """A draft cut after the token that completes a stop string: only that much
        is reviewed, and its end is the stop string's (no end-of-generation check)."""
        assert self.text is not None
        em = Emitter(self.text.piece, self.text.eos, req.stop, req.max_tokens)
        em.feed(draft.tokens)
        if em.finish != "stop":  # draft tokens hold no end-of-generation: a stop string ended it
            return draft
        return dataclasses.replace(draft, tokens=draft.tokens[: em.n], finished=False)

    async def _continue(self, ids: list[int], req: GenRequest, s: SamplingParams,
                        emitter: _Emitter) -> AsyncGenerator[str, None]:
        """The target's own continuation of ``ids``, streamed as token ids and
        released through ``emitter`` (stop strings across the draft boundary).
        The server's "stop" is an end-of-generation token (or its stop string)
        and is counted as one in usage, as the target alone counts it; its
        "length" means it was cut (its context) and ends the answer "length"."""
        assert self.text is not None
        be: Any = self.target
        body: dict[str, Any] = {"prompt": ids, "max_tokens": max(req.max_tokens - emitter.n, 1),
                                "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                                "logprobs": 0, "return_tokens_as_token_ids": True, "stream": True,
                                "stream_options": {"include_usage": True}}
        if s.seed is not None:
            body["seed"] = s.seed
        if req.stop:
            body["stop"] = list(req.stop)
        if be.config.model:
            body["model"] = be.config.model
        t0 = time.perf_counter()
        first: float | None = None
        n0 = len(emitter.tokens)
        async with aclosing(stream_sse(be.client, "/v1/completions", body, "completion", be.where)) as it:
            async for d in it:
                keys = ((d.extra or {}).get("logprobs") or {}).get("tokens") or ()
                if keys and first is None:
                    first = time.perf_counter()
                try:
                    toks = [int(str(k).rpartition(":")[2]) for k in keys]
                except ValueError as exc:
                    raise BackendError(f"{be.where} sent a malformed token id") from exc
                if toks:
                    yield emitter.feed(toks)
                if emitter.finish is not None:
                    break
                if d.finish_reason == "length":  # cut by the server, not by our max_tokens
                    yield emitter.end("length")
                    break
                if d.finish_reason is not None:
                    yield emitter.feed([min(self.text.eos)])  # ended by the server (eos or stop string)
                    break
        if emitter.finish is None:
            yield emitter.feed([min(self.text.eos)])
        made = len(emitter.tokens) - n0
        if first is not None and made > 1:
            self.totals.observe_target(made - 1, time.perf_counter() - first)
        else:
            self.totals.target_gen_s += time.perf_counter() - t0

    async def _judge(self, req: GenRequest, served: _Served) -> AsyncGenerator[Delta, None]:
        s = sampling_of(req)
        draft = await self._draft(req, None, s)
        verdict = "fresh_no_draft"
        review: Review | None = None
        if draft is not None and draft.extra:  # a drafted tool call: not text a judge reads
            self.totals.relayed += 1
            served.verdict, served.cacheable = "relayed", False
            async with aclosing(self.target.stream(req)) as it:
                async for d in it:
                    yield d
            return
        if draft is None:
            self.totals.fresh_no_draft += 1
        else:
            try:
                review = await judge_draft(self.target, req, draft.text)
            except BadRequest:  # the request and draft do not fit the target: the client's 400
                raise
            except TightwadError as exc:
                self._review_failed(exc, served, draft)
                verdict = "unreviewed"
            else:
                verdict = review.verdict
                setattr(self.totals, verdict, getattr(self.totals, verdict) + 1)
                self.totals.review_s += review.seconds
            if verdict in ("approved", "unreviewed"):
                served.verdict = verdict
                usage = draft.usage or Usage(0, 0)
                if review is not None:
                    self.totals.draft_tokens_kept += usage.completion_tokens
                    self.totals.reviewed_kept += usage.completion_tokens
                if draft.text:
                    yield Delta(text=draft.text)
                yield Delta(finish_reason="stop" if draft.finished else "length", usage=usage)
                return
        served.verdict = verdict
        t0 = time.perf_counter()
        first: float | None = None  # timed from the first text, as in _continue
        async with aclosing(self.target.stream(req)) as it:
            async for d in it:
                if d.text and first is None:
                    first = time.perf_counter()
                if d.finish_reason is not None and d.usage is not None:
                    made = d.usage.completion_tokens
                    self.totals.target_tokens_generated += made
                    if first is not None and made > 1:
                        self.totals.observe_target(made - 1, time.perf_counter() - first)
                    else:
                        self.totals.target_gen_s += time.perf_counter() - t0
                yield d

    # ---- status -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        members = [{"name": m.name, "backend": m.backend.kind, "writes": m.way, "responses": m.responses,
                    "failures": m.failures, "refused": m.refused, "busy": m.busy, "usable": m.usable(now),
                    "last_error": m.last_error} for m in self.fleet.members]
        snap = self.totals.snapshot()
        cfg = self.cfg
        gate = {**snap, "threshold": cfg.threshold, "min_prefix": cfg.min_prefix, "review": cfg.review,
                "pick": cfg.pick, "fail_open": cfg.fail_open,
                "cache": {"entries": cfg.cache_entries, "size": len(self.cache), "chars": self.cache.chars,
                          "evictions": self.cache.evictions},
                "drafters": members}
        return {"mode": self.name, "gate": gate, "metrics": families(snap, members)}


@hookimpl
def register_modes(register: Callable[[str, ModeFactory], None]) -> None:
    register("gate", GateMode)


@hookimpl
def register_commands(register: Callable[[click.Command], None]) -> None:
    from tightwad_plugins.modes.gate_cli import gate_group

    register(gate_group)


__all__ = ["GateMode"]

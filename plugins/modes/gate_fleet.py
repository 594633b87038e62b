"""The `gate` mode's writers: which drafter of the fleet writes a response
(round robin or least busy, skipping one that just failed), and how a whole
draft response is asked for in the target's token ids.

A drafter with the target's vocabulary writes from the target's own prompt
ids (llama-server's ``/completion``, or ``/v1/completions`` returning token
ids); any other drafter gets the templated prompt as text and its answer is
re-tokenized with the target's tokenizer.

A drafter that answers 400 (the request does not fit its context, or it
refuses a parameter) is not at fault and is not benched: the request goes to
the next drafter and, with none left, to the target, whose own answer (or
400 naming ``target.ctx_size``) is what the client gets."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import trio

from tightwad_core.errors import BackendError, BadRequest, TightwadError
from tightwad_core.http.wire import post_json
from tightwad_core.records import GenRequest, Usage
from tightwad_core.roles import Backend
from tightwad_core.spec.interfaces import SamplingParams
from tightwad_plugins.backends.llama_wire import sampler_fields
from tightwad_plugins.modes.target_text import TargetTokenizer

log = logging.getLogger("tightwad.gate")

#: Seconds a drafter whose last attempt failed is passed over.
COOLDOWN_S = 10.0


@dataclass(frozen=True)
class Draft:
    """A whole response one drafter wrote, in the target's token ids."""

    tokens: list[int]  # end-of-generation token left out
    finished: bool  # ended by itself (end of generation or a stop string), not by max_tokens
    text: str  # the drafter's own text (what a judge review reads)
    seconds: float
    writer: str
    usage: Usage | None = None  # the drafter's own count (judge review: the draft is served as it is)
    extra: dict[str, Any] | None = None  # fields beyond text (tool calls): such a draft is not served


@dataclass
class Member:
    """One drafter of the fleet and what it has done."""

    index: int
    backend: Backend
    way: str  # "llama-completion", "token-completions" or "text"
    responses: int = 0
    failures: int = 0
    refused: int = 0  # requests it answered 400 (too long for its context): no cooldown
    busy: int = 0
    down_until: float = 0.0
    last_error: str = ""

    @property
    def name(self) -> str:
        return f"drafters.{self.index}"

    def usable(self, now: float) -> bool:
        return now >= self.down_until


class Fleet:
    def __init__(self, members: list[Member], pick: str, timeout_s: float) -> None:
        self.members = members
        self.pick = pick
        self.timeout_s = timeout_s
        self._next = 0

    def order(self) -> list[Member]:
        """The members to try, best first; those cooling down after a failure are left out."""
        now = time.monotonic()
        usable = [m for m in self.members if m.usable(now)]
        if self.pick == "least-busy":
            return sorted(usable, key=lambda m: (m.busy, m.index))
        start = self._next % max(len(self.members), 1)
        self._next += 1
        ring = self.members[start:] + self.members[:start]
        return [m for m in ring if m in usable]

    async def write(self, member: Member, req: GenRequest, prompt: list[int] | None,
                    sampling: SamplingParams, text: TargetTokenizer | None) -> Draft:
        """One whole draft from ``member``, within the fleet's timeout; a failure
        marks the member down for a while and is raised (TightwadError or
        trio.TooSlowError); a BadRequest (the drafter refused this request) is
        raised without the cooldown. Without ``prompt`` (judge review) the
        drafter answers the request itself, as text."""
        member.busy += 1
        t0 = time.perf_counter()
        tokens: list[int] = []
        extra: dict[str, Any] | None = None
        try:
            with trio.fail_after(self.timeout_s):
                if prompt is None or text is None:
                    result = await member.backend.generate(req)
                    finished, said = result.finish_reason != "length", result.text
                    usage: Usage | None = result.usage
                    extra = result.extra
                else:
                    try:
                        tokens, finished, said = await _ask(member, req, prompt, sampling, text)
                    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                        raise BackendError(f"{member.name} sent a malformed draft "
                                           f"({type(exc).__name__}: {exc})") from exc
                    usage = None
        except BadRequest as exc:  # about this request, not the drafter's health
            member.refused += 1
            member.last_error = exc.message
            log.info("%s (%s) refused the request: %s", member.name, member.backend.kind, exc.message)
            raise
        except (TightwadError, trio.TooSlowError) as exc:
            member.failures += 1
            member.down_until = time.monotonic() + COOLDOWN_S
            member.last_error = str(exc) or f"no whole draft within {self.timeout_s:g} s"
            log.warning("%s (%s) failed to write a draft: %s", member.name, member.backend.kind,
                        member.last_error)
            raise
        finally:
            member.busy -= 1
        member.responses += 1
        member.down_until = 0.0
        return Draft(tokens=tokens, finished=finished, text=said, seconds=time.perf_counter() - t0,
                     writer=member.name, usage=usage, extra=extra or None)


async def _ask(member: Member, req: GenRequest, prompt: list[int], s: SamplingParams,
               text: TargetTokenizer) -> tuple[list[int], bool, str]:
    be: Any = member.backend
    eos = text.eos
    if member.way == "llama-completion":
        fields = sampler_fields(s, 0)
        fields.pop("n_probs", None)
        body: dict[str, Any] = {"prompt": prompt, "n_predict": req.max_tokens, "return_tokens": True,
                                "cache_prompt": True, "stop": list(req.stop), **fields}
        if s.seed is not None:
            body["seed"] = s.seed
        data = await post_json(be.client, "/completion", body, be.where, be.role)
        tokens = [int(t) for t in data.get("tokens") or ()]
        kept = [t for t in tokens if t not in eos][: req.max_tokens]
        finished = data.get("stop_type") in ("eos", "word") or len(kept) < len(tokens)
        return kept, finished, str(data.get("content") or "")
    if member.way == "token-completions":
        body = {"prompt": prompt, "max_tokens": req.max_tokens, "temperature": s.temperature,
                "top_p": s.top_p, "top_k": s.top_k, "logprobs": 0, "return_tokens_as_token_ids": True}
        if req.stop:
            body["stop"] = list(req.stop)
        if s.seed is not None:
            body["seed"] = s.seed
        data = await post_json(be.client, "/v1/completions", body, be.where, be.role)
        try:
            choice = data["choices"][0]
            keys = (choice.get("logprobs") or {}).get("tokens") or []
            tokens = [int(str(k).rpartition(":")[2]) for k in keys]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise BackendError(f"{be.where} sent a malformed draft") from exc
        kept = [t for t in tokens if t not in eos][: req.max_tokens]
        return kept, choice.get("finish_reason") != "length", str(choice.get("text") or "")
    # text: the templated prompt spelled out, the answer re-tokenized with the target's tokenizer.
    # No stop strings: a server that stops at one reports a natural end the target's review
    # would then look for; the gate cuts the draft at a stop string itself (GateMode._trim).
    spelled = b"".join(text.vocab.special(t) for t in prompt).decode("utf-8", "replace")
    ask = GenRequest(kind="completion", prompt=spelled, max_tokens=req.max_tokens,
                     temperature=s.temperature, top_p=s.top_p, seed=s.seed)
    result = await member.backend.generate(ask)
    ids = (await text.tokenize(result.text, special=False))[: req.max_tokens] if result.text else []
    return ids, result.finish_reason != "length", result.text

"""Plain generation for ``/v1/completions`` and ``/v1/chat/completions``.

Each step (one token evaluated, the next one chosen) is one scheduler job
on the sequence of an ephemeral session, so concurrent generations share
every decode, and a client that disconnects stops generation after the
current step and frees the sequence for the next request. Logits never
leave the engine thread: only the chosen token and, when asked, its
log-probability figures come back.

Log-probabilities are the model's own (log-softmax of the raw logits),
whatever the sampler settings.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import numpy as np

from tightwad_core.spec.emitter import stop_holdback
from tightwad_core.spec.interfaces import SamplingParams
from tightwad_plugins.worker import rejection
from tightwad_plugins.worker.engine import Engine
from tightwad_plugins.worker.model import common_prefix
from tightwad_plugins.worker.protocol import ContextFull
from tightwad_plugins.worker.sessions import Session


@dataclass(frozen=True)
class GenOptions:
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # legacy completions: top-N per token
    echo: bool = False  # return the prompt (and, with logprobs, its log-probabilities)
    prompt_logprobs: int | None = None  # vLLM-style per-prompt-token entries
    ids_as_tokens: bool = False  # token strings become "token_id:<id>"


@dataclass
class TokenLP:
    """Log-probability figures of one token at one position."""

    logprob: float
    rank: int  # 1 + how many tokens the model found more likely
    top: list[tuple[int, float]]  # the most likely tokens, best first


@dataclass
class Chunk:
    """Generation output since the previous chunk."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    lps: list[TokenLP | None] = field(default_factory=list)  # with `logprobs`, one per token
    offsets: list[int] = field(default_factory=list)  # text offset of each token
    prompt_lps: list[TokenLP | None] | None = None  # first chunk only, when asked
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def token_lp(row: np.ndarray, tok: int, n_top: int) -> TokenLP:
    x = np.asarray(row, dtype=np.float64)
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m).sum()))
    top: list[tuple[int, float]] = []
    if n_top > 0:
        n_top = min(n_top, len(x))
        idx = np.argpartition(-x, n_top - 1)[:n_top]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return TokenLP(logprob=float(x[tok] - lse), rank=int((x > x[tok]).sum()) + 1, top=top)


@dataclass(frozen=True)
class _EchoCache:
    tokens: tuple[int, ...]  # the prompt whose log-probabilities these are
    top: int  # alternatives kept per position
    lps: list[TokenLP | None]  # lps[i] scores tokens[i] after tokens[:i]


class _Picker:
    """Chooses each next token inside the engine thread."""

    def __init__(self, engine: Engine, sess: Session, opts: GenOptions) -> None:
        self.engine = engine
        self.sess = sess
        self.opts = opts
        self.n_top = max(opts.logprobs or 0, 0)

    def pick(self, row: np.ndarray) -> tuple[int, TokenLP | None]:
        p = self.opts.params
        tok = int(np.argmax(row)) if p.greedy else rejection.sample(
            rejection.target_probs(row, p), self.sess.rng)
        lp = token_lp(row, tok, self.n_top) if self.opts.logprobs is not None else None
        return tok, lp

    def _last(self, rows: list[np.ndarray]) -> tuple[int, TokenLP | None]:
        return self.pick(rows[-1])

    async def first(self, prompt: list[int], prompt_top: int | None
                    ) -> tuple[int, TokenLP | None, list[TokenLP | None] | None]:
        if prompt_top is None:
            tok, lp = await self.engine.evaluate(self.sess, 0, prompt, 1, finish=self._last)
            return tok, lp, None
        # a prompt echoed on this sequence before keeps its log-probabilities: entries
        # whose context is unchanged are reused, and only the rest is evaluated with
        # logits (the prompt-logprobs rung sends a longer prompt every round)
        seq = self.sess.slot.seq
        cache: _EchoCache | None = seq.prompt_lps
        lps: list[TokenLP | None] = [None]
        if cache is not None and cache.top >= prompt_top:
            same = common_prefix(list(cache.tokens), prompt)
            for lp in cache.lps[1:same]:
                if lp is None:
                    break
                lps.append(TokenLP(lp.logprob, lp.rank, lp.top[:prompt_top]))
        first = len(lps) - 1  # the row at this position scores prompt[len(lps)]
        out: list[tuple[int, TokenLP | None]] = []

        def on_row(pos: int, row: np.ndarray) -> None:
            if pos + 1 < len(prompt):
                lps.append(token_lp(row, prompt[pos + 1], prompt_top))
            else:
                out.append(self.pick(row))

        await self.engine.evaluate(self.sess, 0, prompt, len(prompt) - first, on_row=on_row)
        seq.prompt_lps = _EchoCache(tuple(prompt), prompt_top, list(lps))
        return (*out[0], lps)

    async def next(self, tok: int) -> tuple[int, TokenLP | None]:
        result: tuple[int, TokenLP | None] = await self.engine.evaluate(
            self.sess, self.sess.slot.n_past, [tok], 1, finish=self._last)
        return result


async def generate(engine: Engine, prompt: list[int], opts: GenOptions, *,
                   stream: bool) -> AsyncGenerator[Chunk, None]:
    """Chunks of output; the last one has ``finish_reason`` and the usage counts."""
    vocab = engine.vocab
    if len(prompt) >= engine.n_ctx:
        raise ContextFull(len(prompt), engine.n_ctx)
    budget = min(opts.max_tokens, engine.n_ctx - len(prompt))
    sess = await engine.table.open(prompt, opts.params.seed, ephemeral=True)
    try:
        picker = _Picker(engine, sess, opts)
        want_prompt = opts.prompt_logprobs is not None or (opts.echo and opts.logprobs is not None)
        prompt_top = max(opts.prompt_logprobs or 0, opts.logprobs or 0) if want_prompt else None
        tok, lp, prompt_lps = await picker.first(prompt, prompt_top)

        head = Chunk(prompt_lps=prompt_lps if opts.prompt_logprobs is not None else None)
        base = 0
        if opts.echo:
            dec = codecs.getincrementaldecoder("utf-8")("replace")
            for i, t in enumerate(prompt):
                head.tokens.append(t)
                head.offsets.append(len(head.text))
                head.text += dec.decode(vocab.pieces[t])
                if opts.logprobs is not None:
                    head.lps.append(prompt_lps[i] if prompt_lps else None)
            head.text += dec.decode(b"", final=True)
            base = len(head.text)
        if head.text or head.prompt_lps is not None or head.tokens:
            yield head

        dec = codecs.getincrementaldecoder("utf-8")("replace")
        text, sent, generated, finish, cut = "", 0, 0, None, False
        pending = Chunk()
        while True:
            generated += 1
            if tok in vocab.eos:
                finish = "stop"
                break
            pending.tokens.append(tok)
            pending.offsets.append(base + len(text))
            if opts.logprobs is not None:
                pending.lps.append(lp)
            before = len(text)
            text += dec.decode(vocab.pieces[tok])
            if opts.stop:
                start = max(0, before - max(len(s) for s in opts.stop) + 1)
                hits = [i for i in (text.find(s, start) for s in opts.stop) if i >= 0]
                if hits:
                    text, finish, cut = text[:min(hits)], "stop", True
                    break
            if generated >= budget:
                finish = "length"
                break
            if stream:
                safe = len(text) - stop_holdback(text, opts.stop)
                if safe > sent or pending.tokens:
                    pending.text = text[sent:max(safe, sent)]
                    sent = max(safe, sent)
                    yield pending
                    pending = Chunk()
            tok, lp = await picker.next(tok)
        if not cut:  # an incomplete UTF-8 sequence at the end becomes U+FFFD
            text += dec.decode(b"", final=True)
        pending.text = text[sent:]
        pending.finish_reason = finish
        pending.prompt_tokens = len(prompt)
        pending.completion_tokens = generated
        yield pending
    finally:
        engine.table.release(sess)

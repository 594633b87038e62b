"""Plain OpenAI routes, so the worker can serve as a target on its own:
``/v1/completions`` (with vLLM-style ``echo`` + ``logprobs`` and
``prompt_logprobs``), ``/v1/chat/completions`` (the GGUF's own chat
template) and ``/v1/models``."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import msgspec
from quart import Blueprint, Response, current_app, request

from tightwad_core.chat.tools import template_messages
from tightwad_core.errors import BadRequest, TightwadError, UnsupportedParam
from tightwad_core.http.common import check_messages, check_stop, check_tools, decode_body, new_id
from tightwad_core.spec.interfaces import SamplingParams
from tightwad_plugins.worker.engine import Engine
from tightwad_plugins.worker.generate import Chunk, GenOptions, TokenLP, generate
from tightwad_plugins.worker.protocol import MAX_TOP_LOGPROBS, ContextFull, check_tokens

bp = Blueprint("worker_plain", __name__)
_enc = msgspec.json.Encoder()


class _Common(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1


class CompletionBody(_Common, kw_only=True):
    prompt: str | list[str | int]  # text, [text] or token ids
    echo: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool = False


class ChatBody(_Common, kw_only=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None  # rendered by the template; calls come back as text
    tool_choice: Any = None


def _engine() -> Engine:
    eng: Engine = current_app.config["WORKER_ENGINE"]
    return eng


def _model_name(eng: Engine) -> str:
    return eng.model.path.stem


def apply_template(eng: Engine, messages: list[dict[str, Any]],
                   tools: list[dict[str, Any]] | None = None) -> str:
    """The GGUF's ``tokenizer.chat_template``, rendered by llama-cpp-python's
    Jinja formatter with the generation prompt added (and the template's
    tools section, when ``tools`` are given)."""
    check_messages(messages)
    check_tools(tools)
    fmt = eng.chat_formatter
    if fmt is None:
        if not eng.model.chat_template:
            raise BadRequest("this model has no chat template (tokenizer.chat_template); use "
                             "/v1/completions", param="messages")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        v = eng.vocab
        eos = v.special(min(v.eos)).decode("utf-8", "replace") if v.eos else ""
        bos = v.special(v.bos).decode("utf-8", "replace") if v.bos is not None else ""
        fmt = Jinja2ChatFormatter(template=eng.model.chat_template, eos_token=eos, bos_token=bos)
        eng.chat_formatter = fmt
    try:
        text = str(fmt(messages=template_messages(messages), tools=tools or None).prompt)
    except Exception as exc:  # template errors are the request's fault (raise_exception)
        raise BadRequest(f"the chat template failed on these messages: {exc}",
                         param="messages") from exc
    # as llama-server does: a template that writes BOS leaves it to the tokenizer when the
    # model adds one, so tokenizing the text with add_special gives one BOS, not two
    v = eng.vocab
    bos = v.special(v.bos).decode("utf-8", "replace") if v.bos is not None else ""
    if v.add_bos and bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def _options(body: _Common, max_tokens: int | None, **kw: Any) -> GenOptions:
    limit = current_app.config["WORKER_MAX_TOKENS"]
    if max_tokens is None:
        max_tokens = limit
    if not 1 <= max_tokens <= limit:
        raise BadRequest(f"max_tokens must be between 1 and this worker's limit of {limit}",
                         param="max_tokens")
    if body.n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    if not 0.0 <= body.temperature <= 2.0:
        raise BadRequest("temperature must be between 0 and 2", param="temperature")
    if not 0.0 < body.top_p <= 1.0:
        raise BadRequest("top_p must be in (0, 1]", param="top_p")
    if body.top_k < 0:
        raise BadRequest("top_k must not be negative", param="top_k")
    params = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                            seed=body.seed)
    return GenOptions(max_tokens=max_tokens, params=params, stop=check_stop(body.stop), **kw)


def _tok_str(eng: Engine, tok: int, ids: bool) -> str:
    return f"token_id:{tok}" if ids else eng.vocab.special(tok).decode("utf-8", "replace")


def _legacy_logprobs(eng: Engine, c: Chunk, n_top: int, ids: bool) -> dict[str, Any]:
    tops: list[dict[str, float] | None] = []
    for t, lp in zip(c.tokens, c.lps):
        if lp is None:
            tops.append(None)
            continue
        top = {_tok_str(eng, i, ids): v for i, v in lp.top[:n_top]}
        top.setdefault(_tok_str(eng, t, ids), lp.logprob)
        tops.append(top)
    return {"tokens": [_tok_str(eng, t, ids) for t in c.tokens],
            "token_logprobs": [None if lp is None else lp.logprob for lp in c.lps],
            "top_logprobs": tops, "text_offset": list(c.offsets)}


def _prompt_logprobs(eng: Engine, prompt: list[int], lps: list[TokenLP | None], n_top: int,
                     ids: bool) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for tok, lp in zip(prompt, lps):
        if lp is None:
            out.append(None)
            continue
        entry = {str(i): {"logprob": v, "rank": r + 1, "decoded_token": _tok_str(eng, i, ids)}
                 for r, (i, v) in enumerate(lp.top[:n_top])}
        entry[str(tok)] = {"logprob": lp.logprob, "rank": lp.rank,
                           "decoded_token": _tok_str(eng, tok, ids)}
        out.append(entry)
    return out


def _merge(chunks: list[Chunk]) -> Chunk:
    out = Chunk()
    for c in chunks:
        out.text += c.text
        out.tokens += c.tokens
        out.lps += c.lps
        out.offsets += c.offsets
        out.prompt_lps = c.prompt_lps if c.prompt_lps is not None else out.prompt_lps
        out.finish_reason = c.finish_reason or out.finish_reason
        out.prompt_tokens = max(out.prompt_tokens, c.prompt_tokens)
        out.completion_tokens = max(out.completion_tokens, c.completion_tokens)
    return out


def _usage(c: Chunk) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _choice(eng: Engine, chat: bool, c: Chunk, opts: GenOptions, prompt: list[int],
            stream: bool) -> dict[str, Any]:
    if chat:
        key = "delta" if stream else "message"
        msg: dict[str, Any] = {"content": c.text} if (c.text or not stream) else {}
        if not stream:
            msg["role"] = "assistant"
        return {"index": 0, key: msg, "logprobs": None, "finish_reason": c.finish_reason}
    choice: dict[str, Any] = {"index": 0, "text": c.text, "finish_reason": c.finish_reason,
                              "logprobs": None}
    if opts.logprobs is not None and c.tokens:
        choice["logprobs"] = _legacy_logprobs(eng, c, opts.logprobs, opts.ids_as_tokens)
    if c.prompt_lps is not None:
        choice["prompt_logprobs"] = _prompt_logprobs(eng, prompt, c.prompt_lps,
                                                     opts.prompt_logprobs or 0, opts.ids_as_tokens)
    return choice


async def _respond(eng: Engine, chat: bool, prompt: list[int], opts: GenOptions,
                   body: _Common) -> Response:
    rid = new_id("chatcmpl" if chat else "cmpl")
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": _model_name(eng)}
    gen = generate(eng, prompt, opts, stream=body.stream)
    if not body.stream:
        async with aclosing(gen):
            c = _merge([chunk async for chunk in gen])
        choice = _choice(eng, chat, c, opts, prompt, False)
        return Response(_enc.encode({**head, "choices": [choice], "usage": _usage(c)}),
                        content_type="application/json")
    if chat:
        head["object"] = "chat.completion.chunk"
    usage = bool((body.stream_options or {}).get("include_usage"))
    first = await gen.__anext__()  # errors before any output stay HTTP errors

    async def events() -> AsyncGenerator[bytes, None]:
        async with aclosing(gen):
            try:
                if chat:
                    role = {"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}
                    yield b"data: " + _enc.encode({**head, "choices": [role]}) + b"\n\n"
                c: Chunk | None = first
                while c is not None:
                    if c.text or c.finish_reason or c.prompt_lps is not None or (
                            opts.logprobs is not None and c.tokens):
                        choice = _choice(eng, chat, c, opts, prompt, True)
                        yield b"data: " + _enc.encode({**head, "choices": [choice]}) + b"\n\n"
                    if c.finish_reason is not None:
                        if usage:
                            yield b"data: " + _enc.encode({**head, "choices": [],
                                                           "usage": _usage(c)}) + b"\n\n"
                        break
                    c = await anext(gen, None)
            except TightwadError as exc:
                yield b"data: " + _enc.encode(exc.body()) + b"\n\n"
            yield b"data: [DONE]\n\n"

    resp = Response(events(), content_type="text/event-stream")
    resp.timeout = None
    resp.headers["cache-control"] = "no-cache"
    return resp


def _top(value: int | None, name: str) -> int | None:
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}", param=name)
    return value


@bp.post("/v1/completions")
async def completions() -> Response:
    eng = _engine()
    body = decode_body(await request.get_data(cache=False), CompletionBody)
    prompt_in = body.prompt
    if isinstance(prompt_in, list) and any(isinstance(p, str) for p in prompt_in):
        if len(prompt_in) != 1:
            raise BadRequest("only one prompt per request is supported", param="prompt")
        prompt_in = prompt_in[0]
    if isinstance(prompt_in, str):
        prompt = await eng.tokenize(prompt_in, True)
    else:
        prompt = [int(t) for t in prompt_in]
        check_tokens(prompt, eng.vocab.n_vocab, "prompt")
    if len(prompt) > eng.n_ctx:
        raise ContextFull(len(prompt), eng.n_ctx)
    if not prompt:
        raise BadRequest("prompt must not be empty", param="prompt")
    opts = _options(body, body.max_tokens, logprobs=_top(body.logprobs, "logprobs"),
                    echo=body.echo, prompt_logprobs=_top(body.prompt_logprobs, "prompt_logprobs"),
                    ids_as_tokens=body.return_tokens_as_token_ids)
    return await _respond(eng, False, prompt, opts, body)


@bp.post("/v1/chat/completions")
async def chat_completions() -> Response:
    eng = _engine()
    body = decode_body(await request.get_data(cache=False), ChatBody)
    if body.logprobs:
        raise UnsupportedParam("chat logprobs are not supported by the worker; use "
                               "/v1/completions with logprobs", param="logprobs")
    text = apply_template(eng, body.messages, body.tools)
    prompt = await eng.tokenize(text, True)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    return await _respond(eng, True, prompt, _options(body, max_tokens), body)


@bp.get("/v1/models")
async def models() -> Response:
    eng = _engine()
    data = {"object": "list", "data": [{
        "id": _model_name(eng), "object": "model", "created": int(eng.started),
        "owned_by": "tightwad-worker",
        "meta": {"n_ctx": eng.n_ctx, "n_vocab": eng.vocab.n_vocab, "slots": len(eng.table.slots)},
    }]}
    return Response(_enc.encode(data), content_type="application/json")

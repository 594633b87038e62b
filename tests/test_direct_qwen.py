"""Direct mode on the real Qwen2.5-Coder 1.5B target: what comes through the
proxy is what the target says, to the official `openai` and `ollama` clients."""

from __future__ import annotations

import ollama
import openai
import pytest
import trio
from conftest import relay_profile, start_proxy

PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the capital of France? Answer in one sentence.",
    "List three prime numbers greater than 50.",
    "Explain recursion to a ten-year-old in two sentences.",
    "Write a haiku about autumn.",
    "Convert 100 degrees Fahrenheit to Celsius and show the steps.",
    "Give a SQL query that counts rows in a table named users.",
    "Translate 'good morning' into Spanish and German.",
    "What does HTTP status 404 mean?",
    "Write a bash one-liner that counts lines in all .py files.",
]


def _chat(base_url: str, prompt: str, **kw: object) -> tuple[str, int, int, str]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=kw.pop("model", "ignored-by-llama-server"),  # type: ignore[arg-type]
                                       messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=48, seed=1, **kw)  # type: ignore[arg-type]
    return (r.choices[0].message.content or "", r.usage.prompt_tokens, r.usage.completion_tokens,
            r.choices[0].finish_reason)


async def test_direct_mode_is_identical_to_target(nursery, tmp_path, qwen_server):
    running = await start_proxy(nursery, relay_profile(qwen_server.url), tmp_path)
    served = await running.state.served_model()
    mismatches = []
    for prompt in PROMPTS:
        direct = await trio.to_thread.run_sync(_chat, qwen_server.url + "/v1", prompt)
        proxied = await trio.to_thread.run_sync(lambda p=prompt: _chat(running.url + "/v1", p, model=served))
        if direct != proxied:
            mismatches.append((prompt, direct, proxied))
    assert not mismatches, mismatches
    running.shutdown.set()


def _openai_all(base: str, model: str) -> dict[str, object]:
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    out: dict[str, object] = {}
    out["models"] = [m.id for m in client.models.list().data]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=16, temperature=0)
    out["chat"] = (chat.choices[0].message.content, chat.usage.completion_tokens)
    pieces, usage, finish = [], None, None
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16,
            temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage.completion_tokens
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    out["chat_stream"] = ("".join(pieces), usage, finish)
    comp = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=12, temperature=0)
    out["completion"] = (comp.choices[0].text, comp.usage.completion_tokens)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="def add(a, b):", max_tokens=12, temperature=0, stream=True) if c.choices)
    out["completion_stream"] = text
    return out


async def test_openai_client_chat_and_completions(nursery, tmp_path, qwen_server):
    running = await start_proxy(nursery, relay_profile(qwen_server.url), tmp_path)
    model = await running.state.served_model()
    got = await trio.to_thread.run_sync(_openai_all, running.url + "/v1", model)
    assert got["models"] == [model]
    text, n = got["chat"]
    assert text and 0 < n <= 16
    stream_text, usage, finish = got["chat_stream"]
    assert stream_text == text and usage == n and finish in ("stop", "length")
    ctext, cn = got["completion"]
    assert ctext and cn == 12
    assert got["completion_stream"] == ctext
    running.shutdown.set()


def _ollama_all(host: str, model: str) -> dict[str, object]:
    client = ollama.Client(host=host)
    out: dict[str, object] = {}
    out["version"] = client.ps() and None
    out["tags"] = [m.model for m in client.list().models]
    r = client.chat(model=model, messages=[{"role": "user", "content": "Say hello."}],
                    options={"temperature": 0, "num_predict": 16})
    out["chat"] = (r.message.content, r.eval_count, r.done_reason)
    out["chat_stream"] = "".join(p.message.content or "" for p in client.chat(
        model=model, messages=[{"role": "user", "content": "Say hello."}], stream=True,
        options={"temperature": 0, "num_predict": 16}))
    g = client.generate(model=model, prompt="Say hello.", options={"temperature": 0, "num_predict": 16})
    out["generate"] = g.response
    out["generate_stream"] = "".join(p.response for p in client.generate(
        model=model, prompt="Say hello.", stream=True, options={"temperature": 0, "num_predict": 16}))
    show = client.show(model)
    out["show"] = (show.details.family if show.details else None, bool(show.template))
    return out


async def test_ollama_client_chat_and_generate(nursery, tmp_path, qwen_server):
    running = await start_proxy(nursery, relay_profile(qwen_server.url), tmp_path)
    model = await running.state.served_model()
    got = await trio.to_thread.run_sync(_ollama_all, running.url, model)
    assert got["tags"] == [model]
    text, count, reason = got["chat"]
    assert text and 0 < count <= 16 and reason in ("stop", "length")
    assert got["chat_stream"] == text
    # /api/generate applies the chat template, like Ollama does without raw
    assert got["generate"] == text
    assert got["generate_stream"] == text
    assert got["show"] == ("qwen2", True)
    running.shutdown.set()


@pytest.mark.parametrize("stream", [False, True])
async def test_ollama_backend_through_ollama_wire(nursery, tmp_path, qwen_server, stream):
    """The `ollama` backend against a server speaking the Ollama wire format:
    a second proxy whose Ollama routes front the real target."""
    inner = await start_proxy(nursery, relay_profile(qwen_server.url), tmp_path, name="inner")
    model = await inner.state.served_model()
    outer = await start_proxy(nursery, relay_profile(inner.url, backend="ollama",
                                                    target_kw={"model": model}), tmp_path, name="outer")

    def both() -> tuple[object, object]:
        a = _chat(qwen_server.url + "/v1", "Name two colours.", stream=False)
        if not stream:
            b = _chat(outer.url + "/v1", "Name two colours.", model=model)
            return a, b
        client = openai.OpenAI(base_url=outer.url + "/v1", api_key="x", max_retries=0)
        parts, usage = [], None
        for c in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name two colours."}],
                                                temperature=0, max_tokens=48, seed=1, stream=True,
                                                stream_options={"include_usage": True}):
            parts.extend(ch.delta.content or "" for ch in c.choices)
            usage = c.usage or usage
        return a[0], "".join(parts)

    a, b = await trio.to_thread.run_sync(both)
    if stream:
        assert a == b
    else:
        assert a == b  # text, prompt tokens, completion tokens and finish reason all match
    inner.shutdown.set()
    outer.shutdown.set()

"""Tool calls on the real Qwen2.5-Coder 1.5B, through both modes: the model's
own template renders the tools, its `<tool_call>` markup comes back as OpenAI
`tool_calls` (and Ollama `message.tool_calls`), and a tool result sent back
gets an answer. Direct mode relays to llama-server (which parses the calls
itself); speculative mode parses the worker target's raw text. Both give the
same calls for the same greedy answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
import trio
from conftest import qwen, relay_profile, start_proxy

from tightwad_core.config.profiles import BackendConfig, Profile, SpeculationConfig
from tightwad_core.runtime import catalog

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now? Use the tool."}]


def speculative_profile() -> Profile:
    return Profile(
        mode="speculative", listen="127.0.0.1:0",
        target=BackendConfig(backend="worker", model_path=str(qwen(catalog.DEFAULT_TARGET)), ctx_size=4096,
                             parallel=1, threads=1),
        draft=BackendConfig(backend="llama-server", model_path=str(qwen(catalog.DEFAULT_DRAFT)), ctx_size=4096,
                            parallel=1, threads=1),
        speculation=SpeculationConfig(max_draft_tokens=4, verifier="worker"))


def _calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


def _round_trip(base: str, model: str) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], temperature=0,
                                           max_tokens=64)
    choice = first.choices[0]
    streamed: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], temperature=0,
                                                max_tokens=64, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or ():
                slot = streamed.setdefault(tc.index, {"name": "", "arguments": ""})
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
    call = choice.message.tool_calls[0] if choice.message.tool_calls else None
    answer = None
    if call is not None:
        back = ASK + [{"role": "assistant", "content": choice.message.content,
                       "tool_calls": [{"id": call.id, "type": "function",
                                       "function": {"name": call.function.name,
                                                    "arguments": call.function.arguments}}]},
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'}]
        answer = client.chat.completions.create(model=model, messages=back, tools=[WEATHER], temperature=0,
                                                max_tokens=48).choices[0]
    return {"finish": choice.finish_reason, "calls": _calls(choice.message),
            "content": choice.message.content,
            "streamed": [(s["name"], json.loads(s["arguments"])) for _, s in sorted(streamed.items())],
            "stream_finish": finish, "answer": None if answer is None else answer.message.content,
            "answer_finish": None if answer is None else answer.finish_reason}


def _ollama(host: str, model: str) -> list[tuple[str, dict[str, Any]]]:
    client = ollama.Client(host=host)
    r = client.chat(model=model, messages=ASK, tools=[WEATHER], options={"temperature": 0, "num_predict": 64})
    streamed = []
    for part in client.chat(model=model, messages=ASK, tools=[WEATHER], stream=True,
                            options={"temperature": 0, "num_predict": 64}):
        streamed += [(c.function.name, dict(c.function.arguments)) for c in part.message.tool_calls or ()]
    whole = [(c.function.name, dict(c.function.arguments)) for c in r.message.tool_calls or ()]
    assert whole == streamed, (whole, streamed)
    return whole


async def _exercise(running: Any) -> dict[str, Any]:
    served = await running.state.served_model()
    out = await trio.to_thread.run_sync(_round_trip, running.url + "/v1", served)
    out["ollama"] = await trio.to_thread.run_sync(_ollama, running.url, served)
    return out


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return {}


@pytest.mark.parametrize("mode", ["direct", "speculative"])
async def test_tool_round_trip(nursery: trio.Nursery, tmp_path: Path, qwen_server: Any, mode: str,
                               results: dict[str, Any]) -> None:
    profile = relay_profile(qwen_server.url) if mode == "direct" else speculative_profile()
    running = await start_proxy(nursery, profile, tmp_path)
    got = await _exercise(running)
    running.shutdown.set()
    print(f"\n{mode}: {got}")
    assert got["finish"] == "tool_calls" and got["stream_finish"] == "tool_calls", got
    assert len(got["calls"]) == 1 and got["calls"][0][0] == "get_weather", got
    assert "paris" in got["calls"][0][1]["city"].lower(), got
    assert got["streamed"] == got["calls"] and got["ollama"] == got["calls"], got
    assert not (got["content"] or "").count("<tool_call>"), got  # the markup is not content
    assert got["answer_finish"] == "stop" and "21" in (got["answer"] or ""), got
    results[mode] = got
    if len(results) == 2:  # the same structure from both modes for the same greedy answer
        assert results["direct"]["calls"] == results["speculative"]["calls"], results


async def test_ollama_surface_says_tools(nursery: trio.Nursery, tmp_path: Path, qwen_server: Any) -> None:
    """/api/show lists `tools` for a template with a tools section; /api/ps has a
    parseable, future `expires_at`."""
    from datetime import datetime, timezone

    import httpx

    running = await start_proxy(nursery, relay_profile(qwen_server.url), tmp_path)
    served = await running.state.served_model()
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
        show = (await client.post("/api/show", json={"model": served})).json()
        assert show["capabilities"] == ["completion", "tools"], show["capabilities"]
        assert "<tool_call>" in show["template"]
        ps = (await client.get("/api/ps")).json()["models"][0]
        assert ps["name"] == served and ps["model"] == served
        expires = datetime.fromisoformat(ps["expires_at"].replace("Z", "+00:00"))
        assert expires > datetime.now(timezone.utc)
        r = await client.post("/api/chat", json={"model": served, "stream": False, "keep_alive": "5m",
                                                  "messages": [{"role": "user", "content": "Hi"}],
                                                  "options": {"num_predict": 4}})
        assert r.status_code == 200 and r.json()["done"] is True, r.text
    running.shutdown.set()

"""Faults in speculative mode (tiny pair on real llama-server): a draft that
dies, stalls or fails; a target that dies mid-stream; the openai client
streaming from a speculative profile."""

from __future__ import annotations

import json
import os
import signal

import httpx
import msgspec
import openai
import pytest
import trio
from conftest import start_proxy
from test_spec_llama import _reference, pair, spec_profile  # noqa: F401  (fixture)

from tightwad_core.config.profiles import SpeculationConfig
from tightwad_core.spec.interfaces import Proposal


async def _stream_text(client: httpx.AsyncClient, body: dict, on_event=None) -> tuple[str, list[dict]]:  # type: ignore[no-untyped-def]
    events = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        assert s.status_code == 200
        async for line in s.aiter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                events.append(ev)
                if on_event is not None:
                    on_event(len(events))
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    return text, events


async def test_draft_dies_mid_request_falls_back(nursery, tmp_path, pair):  # noqa: F811
    running = await start_proxy(nursery, spec_profile(pair, "prefix-batch", 4), tmp_path)
    draft = running.state.backends["draft"]
    target = running.state.backends["target"]
    ref = await _reference(target.base_url, "once upon a time there", 200)
    mode = running.state.mode
    ref_text = b"".join(mode.text.piece(t) for t in ref).decode("utf-8", "replace")

    def kill(n: int) -> None:
        if n == 3:
            os.kill(draft.process.pid, signal.SIGKILL)

    async with httpx.AsyncClient(base_url=running.url, timeout=120) as client:
        text, events = await _stream_text(client, {"prompt": "once upon a time there", "max_tokens": 200,
                                                   "temperature": 0}, kill)
    assert not any("error" in e for e in events)
    assert text == ref_text  # nothing lost, nothing repeated
    assert mode.status()["draft_failures"] >= 1
    running.shutdown.set()


class _StallingDrafter:
    """Fault injection: a drafter that answers only after a long stall."""

    name = "stalls"

    async def propose(self, context, k, sampling):  # type: ignore[no-untyped-def]
        await trio.sleep(30)
        return Proposal(tokens=[])


class _BrokenDrafter:
    name = "broken"

    async def propose(self, context, k, sampling):  # type: ignore[no-untyped-def]
        raise RuntimeError("draft exploded")


async def test_slow_draft_is_abandoned(nursery, tmp_path, pair):  # noqa: F811
    prof = spec_profile(pair, "prefix-batch", 4)
    prof = msgspec.structs.replace(prof, speculation=SpeculationConfig(max_draft_tokens=4, verifier="prefix-batch",
                                                                        draft_timeout=0.2))
    running = await start_proxy(nursery, prof, tmp_path)
    running.state.mode.drafter = _StallingDrafter()
    target = running.state.backends["target"]
    ref = await _reference(target.base_url, "hello world", 16)
    async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
        with trio.fail_after(20):
            r = await client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 16,
                                                           "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == len(ref)
    assert running.state.mode.status()["draft_failures"] == 1  # then it stays out of the way
    running.shutdown.set()


async def test_draft_failure_without_fallback_is_an_error(nursery, tmp_path, pair):  # noqa: F811
    prof = spec_profile(pair, "prefix-batch", 4)
    prof = msgspec.structs.replace(prof, speculation=SpeculationConfig(
        max_draft_tokens=4, verifier="prefix-batch", fallback_on_draft_failure=False))
    running = await start_proxy(nursery, prof, tmp_path)
    running.state.mode.drafter = _BrokenDrafter()
    async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
        r = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 502
        assert "draft exploded" in r.json()["error"]["message"]
    running.shutdown.set()


async def test_target_dies_mid_stream(nursery, tmp_path, pair):  # noqa: F811
    running = await start_proxy(nursery, spec_profile(pair, "prefix-batch", 4), tmp_path)
    target = running.state.backends["target"]

    def kill(n: int) -> None:
        if n == 3:
            os.kill(target.process.pid, signal.SIGKILL)

    async with httpx.AsyncClient(base_url=running.url, timeout=120) as client:
        text, events = await _stream_text(client, {"prompt": "the cat sat on", "max_tokens": 250,
                                                   "temperature": 0}, kill)
        assert "error" in events[-1] and events[-1]["error"]["type"] in ("backend_unavailable", "backend_error")
        # the supervisor brings the target back and the proxy serves again
        with trio.fail_after(60):
            while (await client.get("/health")).status_code != 200:
                await trio.sleep(0.2)
        r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
    running.shutdown.set()


def _openai_stream(base: str) -> tuple[list[str], str | None, object]:
    client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
            model="target", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=40,
            temperature=0, stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return pieces, finish, usage


async def test_openai_client_streams_from_speculative_profile(nursery, tmp_path, pair):  # noqa: F811
    running = await start_proxy(nursery, spec_profile(pair, "prefix-batch", 4), tmp_path)
    pieces, finish, usage = await trio.to_thread.run_sync(_openai_stream, running.url + "/v1")
    assert finish in ("stop", "length") and usage is not None
    assert usage.completion_tokens <= 40 and usage.prompt_tokens > 3
    async with httpx.AsyncClient(base_url=running.url) as client:
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 40, "temperature": 0})
        assert r.json()["choices"][0]["message"]["content"] == "".join(pieces)
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["meta"]["verifier"]["rung"] == "prefix-batch"
        metrics = (await client.get("/metrics")).text
        assert "tightwad_spec_rounds_total" in metrics and "tightwad_spec_tokens_per_round_bucket" in metrics
        st = (await client.get("/v1/tightwad/status")).json()
        assert st["mode_status"]["rounds"] > 0
    running.shutdown.set()


@pytest.mark.parametrize("bad", [{"logprobs": True}, {"response_format": {"type": "json_object"}}])
async def test_unsupported_params_are_refused(nursery, tmp_path, pair, bad):  # noqa: F811
    running = await start_proxy(nursery, spec_profile(pair, "prefix-batch", 4), tmp_path)
    async with httpx.AsyncClient(base_url=running.url) as client:
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **bad})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    running.shutdown.set()

"""The `openai` backend against a real OpenAI-compatible server: llama-server's
/v1 routes (tiny model), chat and completions, streamed and not."""

from __future__ import annotations

import httpx
import pytest
from conftest import relay_profile, start_proxy


@pytest.mark.parametrize("suffix", ["", "/v1"])  # with or without the /v1 users paste from SDK configs
async def test_openai_backend_relays(nursery, tmp_path, tiny_server, suffix):
    running = await start_proxy(nursery, relay_profile(tiny_server.url + suffix, backend="openai",
                                                       target_kw={"model": "tiny-llama"},
                                                       passthrough=["cache_prompt"]), tmp_path)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0,
            "cache_prompt": False}
    async with httpx.AsyncClient(timeout=60) as c:
        direct = (await c.post(tiny_server.url + "/v1/chat/completions", json=body)).json()
        proxied = (await c.post(running.url + "/v1/chat/completions", json=body)).json()
        assert proxied["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
        assert proxied["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"] == 8
        assert proxied["model"] == "tiny-llama"
        parts = []
        async with c.stream("POST", running.url + "/v1/completions", json={
                "prompt": "the cat", "max_tokens": 8, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "cache_prompt": False}) as s:
            async for line in s.aiter_lines():
                if line.startswith("data: {"):
                    parts.append(line)
        whole = (await c.post(running.url + "/v1/completions", json={
            "prompt": "the cat", "max_tokens": 8, "temperature": 0, "cache_prompt": False})).json()
        assert whole["usage"]["completion_tokens"] == 8
        assert '"usage"' in parts[-1]  # include_usage: a final usage chunk
        # top_k is not an OpenAI parameter: refused, not silently dropped
        r = await c.post(running.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "top_k": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    running.shutdown.set()

"""Bad input gets a clear OpenAI- or Ollama-shaped error, never a traceback,
and the proxy keeps serving. Runs against a real llama-server (tiny model)."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import relay_profile, start_proxy

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]

CASES = [
    # (name, path, raw body, status, type/param fragment)
    ("malformed json", CHAT, b'{"messages": [', 400, "not valid JSON"),
    ("empty body", CHAT, b"", 400, "empty"),
    ("not an object", CHAT, b"[1, 2]", 400, "invalid request"),
    ("missing messages", CHAT, b'{"model": "x"}', 400, "messages"),
    ("messages wrong type", CHAT, b'{"messages": "hello"}', 400, "messages"),
    ("empty messages", CHAT, b'{"messages": []}', 400, "messages must not be empty"),
    ("role missing", CHAT, b'{"messages": [{"content": "x"}]}', 400, "role"),
    ("max_tokens zero", CHAT, json.dumps({"messages": MSG, "max_tokens": 0}).encode(), 400, "max_tokens"),
    ("max_tokens negative", CHAT, json.dumps({"messages": MSG, "max_tokens": -5}).encode(), 400, "max_tokens"),
    ("max_tokens over limit", CHAT, json.dumps({"messages": MSG, "max_tokens": 100000}).encode(), 400,
     "above this proxy's limit"),
    ("max_tokens string", CHAT, json.dumps({"messages": MSG, "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    ("temperature too high", CHAT, json.dumps({"messages": MSG, "temperature": 7}).encode(), 400, "temperature"),
    ("n above one", CHAT, json.dumps({"messages": MSG, "n": 3}).encode(), 400, "n=1"),
    ("denied passthrough", CHAT, json.dumps({"messages": MSG, "n_predict": 99999}).encode(), 400, "n_predict"),
    ("unknown model", CHAT, json.dumps({"messages": MSG, "model": "gpt-9"}).encode(), 404, "gpt-9"),
    ("empty prompt", "/v1/completions", b'{"prompt": ""}', 400, "prompt"),
    ("two prompts", "/v1/completions", b'{"prompt": ["a", "b"]}', 400, "one prompt"),
    ("unknown route", "/v1/nope", b"{}", 404, ""),
]


@pytest.mark.parametrize("name,path,body,status,fragment", CASES, ids=[c[0] for c in CASES])
async def test_bad_openai_input(nursery, tmp_path, tiny_server, name, path, body, status, fragment):
    running = await start_proxy(nursery, relay_profile(tiny_server.url, max_tokens_limit=256), tmp_path)
    async with httpx.AsyncClient(base_url=running.url) as client:
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "code", "param"}
        assert fragment in err["message"]
        # and the proxy still serves a good request afterwards
        ok = await client.post(CHAT, json={"messages": MSG, "max_tokens": 4})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] <= 4
    running.shutdown.set()


async def test_body_over_limit(nursery, tmp_path, tiny_server):
    running = await start_proxy(nursery, relay_profile(tiny_server.url, max_body_bytes=4096), tmp_path)
    big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
    async with httpx.AsyncClient(base_url=running.url) as client:
        r = await client.post(CHAT, json=big)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
        r = await client.post("/api/chat", json={"model": "x", **big})
        assert r.status_code == 413 and "limit" in r.json()["error"]
    running.shutdown.set()


OLLAMA_CASES = [
    ("chat no model", "/api/chat", b'{"messages": []}', 400, "model"),
    ("chat bad options", "/api/chat", json.dumps({"model": "tiny-llama", "messages": MSG,
                                                    "options": {"temperature": "hot"}}).encode(), 400,
     "temperature"),
    ("unknown option", "/api/chat", json.dumps({"model": "tiny-llama", "messages": MSG,
                                                 "options": {"flux_capacitor": 1}}).encode(), 400,
     "flux_capacitor"),
    ("images", "/api/generate", json.dumps({"model": "tiny-llama", "prompt": "x",
                                             "images": ["aGk="]}).encode(), 400, "images"),
    ("unknown model", "/api/generate", json.dumps({"model": "llama3", "prompt": "x"}).encode(), 404,
     "llama3"),
]


@pytest.mark.parametrize("name,path,body,status,fragment", OLLAMA_CASES, ids=[c[0] for c in OLLAMA_CASES])
async def test_bad_ollama_input(nursery, tmp_path, tiny_server, name, path, body, status, fragment):
    running = await start_proxy(nursery, relay_profile(tiny_server.url), tmp_path)
    async with httpx.AsyncClient(base_url=running.url) as client:
        r = await client.post(path, content=body)
        assert r.status_code == status, r.text
        assert fragment in r.json()["error"]
    running.shutdown.set()


async def test_bearer_token_required(nursery, tmp_path, tiny_server):
    running = await start_proxy(nursery, relay_profile(tiny_server.url, api_key="s3cret"), tmp_path)
    async with httpx.AsyncClient(base_url=running.url) as client:
        assert (await client.get("/health")).status_code == 200  # health stays open
        r = await client.post(CHAT, json={"messages": MSG, "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = await client.get("/v1/models", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await client.post(CHAT, json={"messages": MSG, "max_tokens": 2},
                              headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200
    running.shutdown.set()


async def test_a_web_page_cannot_use_the_proxy(nursery, tmp_path, tiny_server):
    """DNS rebinding (a foreign Host), a cross-site page (a foreign Origin) and a
    JSON body disguised as text/plain are refused on an open loopback proxy;
    an allowed origin gets its preflight and CORS headers."""
    running = await start_proxy(nursery, relay_profile(
        tiny_server.url, allowed_origins=["http://localhost:3000"]), tmp_path)
    body = {"messages": MSG, "max_tokens": 2}
    async with httpx.AsyncClient(base_url=running.url) as client:
        r = await client.post(CHAT, json=body, headers={"host": "attacker.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        r = await client.post(CHAT, json=body, headers={"origin": "http://attacker.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        r = await client.options(CHAT, headers={"origin": "http://attacker.example",
                                                "access-control-request-method": "POST"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        r = await client.post(CHAT, content=json.dumps(body), headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
        r = await client.post(CHAT, content=json.dumps(body), headers={
            "content-type": "application/x-www-form-urlencoded", "sec-fetch-site": "cross-site"})
        assert r.status_code == 415
        # the Ollama routes answer the same refusal in Ollama's shape
        r = await client.post("/api/chat", json={"model": "x", "messages": MSG},
                              headers={"host": "rebind.attacker.example:8088"})
        assert r.status_code == 403 and "Host" in r.json()["error"]

        # what real clients send still works: loopback names, curl's -d default, JSON
        for host in ("localhost", "127.0.0.1", "[::1]:8088", running.url.split("//")[1]):
            r = await client.post(CHAT, json=body, headers={"host": host})
            assert r.status_code == 200, (host, r.text)
        r = await client.post(CHAT, content=json.dumps(body),
                              headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200, r.text
        # an allowed page: preflight answered, then the request, with CORS headers
        page = "http://localhost:3000"
        r = await client.options(CHAT, headers={"origin": page, "access-control-request-method": "POST",
                                                "access-control-request-headers": "content-type"})
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == page
        assert "POST" in r.headers["access-control-allow-methods"]
        r = await client.post(CHAT, json=body, headers={"origin": page})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
    running.shutdown.set()


async def test_parameters_beyond_openai_need_the_profiles_leave(nursery, tmp_path, tiny_server):
    """`grammar` (and any other llama.cpp extension) is refused naming it, unless
    the profile passes it on; then llama-server obeys it."""
    body = {"messages": MSG, "max_tokens": 4, "temperature": 0, "grammar": 'root ::= "yes"'}
    running = await start_proxy(nursery, relay_profile(tiny_server.url), tmp_path)
    async with httpx.AsyncClient(base_url=running.url) as client:
        r = await client.post(CHAT, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"
        assert "passthrough" in r.json()["error"]["message"]
        r = await client.post(CHAT, json={**body, "n_probs": 3, "lora": []})
        assert r.status_code == 400 and all(n in r.json()["error"]["message"]
                                            for n in ("grammar", "n_probs", "lora"))
        ok = await client.post(CHAT, json={"messages": MSG, "max_tokens": 2, "presence_penalty": 0.5})
        assert ok.status_code == 200, ok.text  # OpenAI's own parameters go through
    running.shutdown.set()
    opened = await start_proxy(nursery, relay_profile(tiny_server.url, passthrough=["grammar"]),
                               tmp_path)
    async with httpx.AsyncClient(base_url=opened.url) as client:
        r = await client.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "yes"
    opened.shutdown.set()

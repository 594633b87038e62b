"""Speculation with the worker target (tiny generated pair): greedy output is
the target's own, the sampled distribution is the target's (chi-square), a
fixed seed reproduces, and the prompt-logprobs rung works on the worker's
echo route."""

from __future__ import annotations

import math
from collections import Counter

import httpx
import msgspec
import pytest
import trio
from conftest import start_proxy

from tightwad_core.config.profiles import BackendConfig, Profile, SpeculationConfig
from tightwad_core.testing.tinymodels import tiny_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):  # type: ignore[no-untyped-def]
    return tiny_pair(tmp_path_factory.mktemp("wpair"), seed=2)


def worker_profile(pair, rung: str = "worker", k: int | str = 4,  # type: ignore[no-untyped-def]
                   draft_backend: str = "llama-server") -> Profile:
    draft, target = pair
    return Profile(mode="speculative", listen="127.0.0.1:0", max_tokens_limit=256,
                   target=BackendConfig(backend="worker", model_path=str(target), ctx_size=512, parallel=2,
                                        threads=1),
                   draft=BackendConfig(backend=draft_backend, model_path=str(draft), ctx_size=512,
                                       parallel=1, threads=1),
                   speculation=SpeculationConfig(max_draft_tokens=k, verifier=rung))


@pytest.mark.parametrize("rung,drafter", [("worker", "llama-server"), ("prompt-logprobs", "llama-server"),
                                           ("worker", "worker")])
async def test_greedy_is_the_workers_own(nursery, tmp_path, pair, rung, drafter):
    running = await start_proxy(nursery, worker_profile(pair, rung, draft_backend=drafter), tmp_path)
    target = running.state.backends["target"]
    async with httpx.AsyncClient(timeout=120) as c:
        for prompt in ("the cat sat on", "once upon a time", "hello world"):
            ref = (await c.post(target.base_url + "/v1/completions", json={
                "prompt": prompt, "max_tokens": 40, "temperature": 0})).json()["choices"][0]["text"]
            got = (await c.post(running.url + "/v1/completions", json={
                "prompt": prompt, "max_tokens": 40, "temperature": 0})).json()
            assert got["choices"][0]["text"] == ref, prompt
            assert got["usage"]["completion_tokens"] == 40
    st = running.state.mode.status()
    assert st["verifier"]["rung"] == rung and st["acceptance"] > 0.2
    running.shutdown.set()


def chi2_999(dof: int) -> float:
    """0.999 quantile of chi-square (Wilson-Hilferty; within 1% for dof >= 3)."""
    z = 3.0902
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


async def _top(c: httpx.AsyncClient, url: str, ids: list[int], k: int) -> dict[int, float]:
    """The target's next-token distribution under temperature 1, top_k k."""
    r = await c.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 1, "temperature": 0,
                                                   "logprobs": k, "return_tokens_as_token_ids": True})
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    w = {int(key.split(":")[1]): math.exp(v) for key, v in top.items()}
    total = sum(w.values())
    return {t: x / total for t, x in w.items()}


async def first_two_fit(c: httpx.AsyncClient, proxy_url: str, exact_url: str, piece, ids: list[int],  # type: ignore[no-untyped-def]
                        top_k: int, n: int, seed: int) -> None:
    """Sample the first two tokens ``n`` times through the proxy and check them
    against the target's exact joint distribution (read from a worker at
    ``exact_url``): chi-square goodness of fit at alpha 0.001."""
    p1 = await _top(c, exact_url, ids, top_k)
    joint: Counter[str] = Counter()
    for t1, a in p1.items():
        for t2, b in (await _top(c, exact_url, ids + [t1], top_k)).items():
            joint[(piece(t1) + piece(t2)).decode("utf-8", "replace")] += a * b
    seen: Counter[str] = Counter()
    for i in range(n):
        r = await c.post(proxy_url + "/v1/completions", json={
            "prompt": ids, "max_tokens": 2, "temperature": 1.0, "top_k": top_k, "seed": seed + i})
        assert r.status_code == 200, r.text
        seen[r.json()["choices"][0]["text"]] += 1
    assert set(seen) <= set(joint), f"texts the target cannot produce: {set(seen) - set(joint)}"
    cats = [t for t, q in joint.items() if q * n >= 5]
    obs = [seen[t] for t in cats] + [n - sum(seen[t] for t in cats)]
    exp = [joint[t] * n for t in cats] + [n * (1 - sum(joint[t] for t in cats))]
    pairs = [(o, e) for o, e in zip(obs, exp) if e > 0]
    chi2 = sum((o - e) ** 2 / e for o, e in pairs)
    dof = len(pairs) - 1
    assert dof >= 3, "the test prompt must spread its probability"
    assert chi2 < chi2_999(dof), (chi2, dof, list(zip(cats, obs, exp)))


async def test_sampled_tokens_follow_the_target(nursery, tmp_path, pair):
    """The first two tokens sampled through the proxy (the first drafted and
    accepted or corrected, the second the target's own) follow the target's
    exact joint distribution: chi-square goodness of fit at alpha 0.001."""
    running = await start_proxy(nursery, worker_profile(pair, "worker", 4), tmp_path)
    url = running.state.backends["target"].base_url
    async with httpx.AsyncClient(timeout=60) as c:
        ids = (await c.post(url + "/tokenize", json={"content": "the", "add_special": True})).json()["tokens"]
        await first_two_fit(c, running.url, url, running.state.mode.text.piece, ids, 6, 600, 10_000)
    st = running.state.mode.status()
    assert st["drafted"] > 0 and 0 < st["accepted"] < st["drafted"]  # both branches exercised
    running.shutdown.set()


@pytest.mark.parametrize("drafter", ["llama-server", "worker"])
async def test_fixed_seed_reproduces(nursery, tmp_path, pair, drafter):
    running = await start_proxy(nursery, worker_profile(pair, "worker", 4, draft_backend=drafter),
                                tmp_path)
    body = {"prompt": "once upon a time", "max_tokens": 30, "temperature": 0.9, "seed": 1234}
    async with httpx.AsyncClient(base_url=running.url, timeout=60) as c:
        a = (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"]
        # another request in between, with its own seed, must not shift this one's draws
        await c.post("/v1/completions", json={**body, "seed": 7, "prompt": "the cat"})
        b = (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"]
        other = (await c.post("/v1/completions", json={**body, "seed": 99})).json()["choices"][0]["text"]
    assert a == b
    assert a != other  # 30 sampled tokens: a different seed all but surely differs
    running.shutdown.set()


async def test_client_disconnect_frees_worker_session(nursery, tmp_path, pair):
    running = await start_proxy(nursery, worker_profile(pair, "worker", 4), tmp_path)
    target = running.state.backends["target"]
    async with httpx.AsyncClient(timeout=60) as c:
        async with c.stream("POST", running.url + "/v1/completions", json={
                "prompt": "the cat", "max_tokens": 250, "temperature": 0, "stream": True}) as s:
            n = 0
            async for line in s.aiter_lines():
                n += line.startswith("data: {")
                if n >= 3:
                    break
        with trio.fail_after(10):
            while (await c.get(target.base_url + "/v1/tightwad/info")).json().get("sessions", 1):
                await trio.sleep(0.05)
    running.shutdown.set()


async def test_drafting_ahead_keeps_the_output(nursery, tmp_path, pair):
    """overlap_draft: the next round drafted during this one's verify; greedy
    output is still the worker's own, rounds use the drafted-ahead proposal,
    and a fixed seed still reproduces a sampled answer."""
    prof = worker_profile(pair, "worker", 4)
    prof = msgspec.structs.replace(prof, speculation=msgspec.structs.replace(
        prof.speculation, overlap_draft=True))
    running = await start_proxy(nursery, prof, tmp_path)
    target = running.state.backends["target"]
    async with httpx.AsyncClient(timeout=120) as c:
        for prompt in ("the cat sat on", "once upon a time", "hello world"):
            body = {"prompt": prompt, "max_tokens": 40, "temperature": 0}
            ref = (await c.post(target.base_url + "/v1/completions", json=body)).json()
            got = (await c.post(running.url + "/v1/completions", json=body)).json()
            assert got["choices"][0]["text"] == ref["choices"][0]["text"], prompt
            assert got["usage"] == ref["usage"]
        sampled = {"prompt": "once upon a time", "max_tokens": 30, "temperature": 0.9, "seed": 77}
        a = (await c.post(running.url + "/v1/completions", json=sampled)).json()["choices"][0]["text"]
        b = (await c.post(running.url + "/v1/completions", json=sampled)).json()["choices"][0]["text"]
    assert a == b
    st = running.state.mode.status()
    assert st["ahead_hits"] > 0 and st["acceptance"] > 0.2
    running.shutdown.set()

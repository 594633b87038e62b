"""Speculation against stock llama-server (tiny generated pair): the
prefix-batch and generate-compare rungs give the target's own greedy output."""

from __future__ import annotations

from functools import partial

import httpx
import msgspec
import pytest
import trio
from conftest import start_proxy

from tightwad_core.config.profiles import BackendConfig, Profile, SpeculationConfig
from tightwad_core.testing.tinymodels import tiny_pair

PROMPTS = ["the cat sat on", "hello world", "once upon a time there", "a b c d e f", "question answer"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):  # type: ignore[no-untyped-def]
    return tiny_pair(tmp_path_factory.mktemp("pair"), seed=0)


def spec_profile(pair, rung: str, k: int | str = 4) -> Profile:  # type: ignore[no-untyped-def]
    draft, target = pair
    be = dict(backend="llama-server", ctx_size=512, parallel=max(k + 1, 2) if isinstance(k, int) else 5, threads=1)
    return Profile(mode="speculative", listen="127.0.0.1:0", max_tokens_limit=256,
                   target=BackendConfig(model_path=str(target), **be),
                   draft=BackendConfig(model_path=str(draft), **{**be, "parallel": 1}),
                   speculation=SpeculationConfig(max_draft_tokens=k, verifier=rung))


async def _reference(url: str, prompt: str, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        r = await c.post("/completion", json={"prompt": prompt, "n_predict": n, "temperature": 0,
                                              "return_tokens": True, "cache_prompt": False})
        return r.json()["tokens"]


@pytest.mark.parametrize("rung", ["prefix-batch", "generate-compare"])
async def test_greedy_output_is_the_targets(nursery, tmp_path, pair, rung):
    running = await start_proxy(nursery, spec_profile(pair, rung), tmp_path)
    target = running.state.backends["target"]
    text = running.state.mode.text
    async with httpx.AsyncClient(base_url=running.url, timeout=120) as client:
        for prompt in PROMPTS:
            ref = await _reference(target.base_url, prompt, 48)
            ref_text = b"".join(text.piece(t) for t in ref).decode("utf-8", "replace")
            r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 48, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["text"] == ref_text, prompt
            assert body["usage"]["completion_tokens"] == len(ref)
            # streamed: same text in pieces
            pieces = []
            async with client.stream("POST", "/v1/completions", json={
                    "prompt": prompt, "max_tokens": 48, "temperature": 0, "stream": True}) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: {"):
                        import json
                        pieces.append(json.loads(line[6:])["choices"][0]["text"])
            assert "".join(pieces) == ref_text
        status = running.state.mode.status()
    assert status["verifier"]["rung"] == rung
    assert status["rounds"] > 0 and status["drafted"] > 0
    if rung == "prefix-batch":
        assert status["acceptance"] > 0.2  # the tiny pair agrees about 3 times in 4
    running.shutdown.set()


async def test_k_zero_relays_to_the_target(nursery, tmp_path, pair):
    """K = 0 (what auto picks when speculation does not pay) relays whole requests."""
    running = await start_proxy(nursery, spec_profile(pair, "prefix-batch", 0), tmp_path)
    target = running.state.backends["target"]
    text = running.state.mode.text
    ref = await _reference(target.base_url, "the cat sat on", 32)
    async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
        r = await client.post("/v1/completions", json={"prompt": "the cat sat on", "max_tokens": 32, "temperature": 0})
        assert r.json()["choices"][0]["text"] == b"".join(text.piece(t) for t in ref).decode("utf-8", "replace")
        s = await client.post("/v1/completions", json={"prompt": "the cat sat on", "max_tokens": 8,
                                                        "temperature": 0.7, "seed": 5})
        assert s.status_code == 200 and s.json()["usage"]["completion_tokens"] == 8
    st = running.state.mode.status()
    assert st["relayed"] == 2 and st["rounds"] == 0
    assert st["draft_length"]["relay_ms_per_token"] is not None  # the relay's speed is measured
    running.shutdown.set()


async def test_text_drafter_over_openai_backend(nursery, tmp_path, pair):
    """A draft that only speaks text (an OpenAI-compatible server): its answer
    is re-tokenized with the target's tokenizer; output stays the target's."""
    from conftest import ServerProc

    draft_file, _ = pair
    srv = await trio.to_thread.run_sync(lambda: ServerProc(draft_file, tmp_path / "draft.log", parallel=1))
    try:
        prof = spec_profile(pair, "prefix-batch", 4)
        prof = msgspec.structs.replace(prof, draft=BackendConfig(backend="openai", url=srv.url + "/v1",
                                                                 model="draft"))
        running = await start_proxy(nursery, prof, tmp_path)
        assert running.state.mode.drafter.__class__.__name__ == "TextDrafter"
        target = running.state.backends["target"]
        text = running.state.mode.text
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            for prompt in ("the cat sat on", "hello world"):
                ref = await _reference(target.base_url, prompt, 24)
                r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0})
                assert r.json()["choices"][0]["text"] == b"".join(text.piece(t) for t in ref).decode("utf-8", "replace")
        st = running.state.mode.status()
        assert st["drafted"] > 0 and st["accepted"] > 0
        running.shutdown.set()
    finally:
        srv.stop()


async def test_sampled_prefix_batch_follows_the_target(nursery, tmp_path, pair):
    """Sampled prefix-batch against stock llama-server: drafts are accepted
    (top_k within what the server reports) and the first two tokens follow the
    target's exact joint distribution (chi-square at alpha 0.001; the exact
    distribution read from a worker on the same GGUF). A sampler whose support
    the server cannot report is relayed, not paid for in drafts."""
    from test_spec_worker import first_two_fit

    from tightwad_plugins.worker.cli import serve_worker

    draft, target = pair
    running = await start_proxy(nursery, spec_profile(pair, "prefix-batch", 4), tmp_path)
    worker = await nursery.start(partial(serve_worker, target, "127.0.0.1", 0, ctx=512, threads=1))
    async with httpx.AsyncClient(timeout=60) as c:
        ids = (await c.post(worker.url + "/tokenize", json={"content": "the", "add_special": True})
               ).json()["tokens"]
        await first_two_fit(c, running.url, worker.url, running.state.mode.text.piece, ids, 6, 600,
                            20_000)
        st = running.state.mode.status()
        assert st["drafted"] > 0 and 0 < st["accepted"] < st["drafted"]  # the rounds pay
        before = (st["drafted"], st["relayed_sampler"])
        r = await c.post(running.url + "/v1/completions", json={
            "prompt": ids, "max_tokens": 8, "temperature": 1.0, "seed": 5})  # no top_k
        assert r.status_code == 200, r.text
        st = running.state.mode.status()
        assert (st["drafted"], st["relayed_sampler"]) == (before[0], before[1] + 1)
    running.shutdown.set()

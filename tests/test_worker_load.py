"""The worker under a household's load: more clients than sequences all get
their answers (they queue, nobody is evicted), concurrent rounds share
decodes, and a worker that dies mid-answer is re-opened by the proxy."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import trio
from conftest import qwen, start_proxy

from tightwad_core.bench.report import divergence_index
from tightwad_core.cli.main import builtin_config
from tightwad_core.config.profiles import BackendConfig, Profile, SpeculationConfig, load_profile
from tightwad_core.runtime import catalog
from tightwad_core.testing.tinymodels import tiny_pair

PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the capital of France? Answer in one sentence.",
    "List three prime numbers.",
    "Explain what a hash map is in two sentences.",
    "Write a haiku about the sea.",
    "How do I read a file line by line in Python?",
    "What does HTTP stand for?",
    "Give me a SQL query that counts rows in a table named users.",
]


async def _stream(client: openai.AsyncOpenAI, prompt: str, n: int) -> tuple[str, str | None]:
    text, finish = "", None
    model = (await client.models.list()).data[0].id
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n,
        temperature=0, stream=True)
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


async def test_eight_streamed_clients_share_two_sequences(nursery: trio.Nursery,
                                                          tmp_path: Path) -> None:
    qwen(catalog.DEFAULT_TARGET)
    qwen(catalog.DEFAULT_DRAFT)
    n = 24
    _, base = load_profile(builtin_config(), "speculative")
    assert base.target is not None and base.draft is not None
    profile = Profile(
        mode="speculative", listen="127.0.0.1:0", max_tokens_limit=256,
        target=BackendConfig(backend="worker", model_path=base.target.model_path, ctx_size=1024,
                             parallel=2),
        draft=BackendConfig(backend="llama-server", model_path=base.draft.model_path,
                            ctx_size=4096, parallel=2, extra_args=["--poll", "0"]),
        speculation=SpeculationConfig(max_draft_tokens=4, verifier="worker"))
    running = await start_proxy(nursery, profile, tmp_path)
    target = running.state.backends["target"]
    pieces = (await target.vocab()).pieces
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0,
                                timeout=600)

    # the target alone: tokens and top-2 gaps (to tell a near-tie from a bug)
    refs = []
    for p in PROMPTS:
        ids = await target.tokenize(
            await target.apply_template([{"role": "user", "content": p}]), add_special=False)
        refs.append(await target.complete_ids(ids, n, gaps=True))

    def check(i: int, text: str, finish: str | None, when: str) -> None:
        assert finish in ("stop", "length"), (when, PROMPTS[i], finish)
        ref = refs[i]
        if text == ref.text:
            return
        at = divergence_index(ref.tokens, text, lambda t: pieces[t])
        gap = ref.gaps[at] if at < len(ref.gaps) else None
        assert gap is not None and gap < 1.0, (when, PROMPTS[i], at, gap, text, ref.text)

    for i, p in enumerate(PROMPTS):  # each alone
        check(i, *await _stream(client, p, n), "alone")

    results: dict[int, tuple[str, str | None]] = {}

    async def one(i: int) -> None:
        results[i] = await _stream(client, PROMPTS[i], n)

    async with httpx.AsyncClient() as c:
        before = (await c.get(target.base_url + "/v1/tightwad/info")).json()
    async with trio.open_nursery() as inner:
        for i in range(len(PROMPTS)):
            inner.start_soon(one, i)
    assert sorted(results) == list(range(len(PROMPTS)))
    for i, (text, finish) in results.items():
        check(i, text, finish, "concurrent")
    async with httpx.AsyncClient() as c:
        info = (await c.get(target.base_url + "/v1/tightwad/info")).json()
    print(f"worker: queued {info['queued'] - before['queued']}, refused {info['refused']}, "
          f"decodes {info['decodes'] - before['decodes']} of which batched "
          f"{info['batched_decodes'] - before['batched_decodes']}")
    # some of the eight had to wait for a sequence; none was refused or evicted
    assert info["queued"] > before["queued"] and info["refused"] == 0
    assert info["sessions"] == 0  # every request's session was closed at its end

    # an answer that ends at end-of-generation: the same text, finish and counts as the
    # target alone gives (completion_tokens counts the end token, as the target does)
    ask = {"messages": [{"role": "user", "content": "What does HTTP stand for? One line."}],
           "max_tokens": 64, "temperature": 0}
    async with httpx.AsyncClient(timeout=300) as c:
        alone = (await c.post(target.base_url + "/v1/chat/completions", json=ask)).json()
        via = (await c.post(running.url + "/v1/chat/completions", json=ask)).json()
    assert alone["choices"][0]["finish_reason"] == "stop"
    assert via["choices"][0]["finish_reason"] == "stop"
    assert via["usage"] == alone["usage"], (via["usage"], alone["usage"])
    assert via["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    running.shutdown.set()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_pair(tmp_path_factory.mktemp("lpair"), seed=2)


async def test_worker_killed_mid_answer_is_reopened(nursery: trio.Nursery, tmp_path: Path,
                                                    pair: tuple[Path, Path]) -> None:
    draft, target_file = pair
    profile = Profile(
        mode="speculative", listen="127.0.0.1:0", max_tokens_limit=512,
        target=BackendConfig(backend="worker", model_path=str(target_file), ctx_size=1024,
                             parallel=2, threads=1),
        draft=BackendConfig(backend="llama-server", model_path=str(draft), ctx_size=1024,
                            parallel=1, threads=1),
        speculation=SpeculationConfig(max_draft_tokens=4, verifier="worker"))
    running = await start_proxy(nursery, profile, tmp_path)
    target = running.state.backends["target"]
    body: dict[str, Any] = {"prompt": "once upon a time", "max_tokens": 300, "temperature": 0}
    async with httpx.AsyncClient(timeout=120) as c:
        ref = (await c.post(target.base_url + "/v1/completions", json=body)).json()
        ref_text = ref["choices"][0]["text"]
        first_pid = target.process.pid
        text, events, errors, finish = "", 0, [], None
        async with c.stream("POST", running.url + "/v1/completions",
                            json={**body, "stream": True}) as resp:
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = httpx.Response(200, content=line[6:]).json()
                if "error" in data:
                    errors.append(data["error"])
                    continue
                events += 1
                text += data["choices"][0]["text"]
                finish = data["choices"][0].get("finish_reason") or finish
                if events == 2:  # the worker dies mid-answer; its supervisor restarts it
                    os.kill(first_pid, signal.SIGKILL)
    assert target.process.pid != first_pid and target.process.restarts >= 1
    # the proxy re-opened its session on the restarted worker: the answer is unaffected
    assert errors == [] and finish == "length", (errors, finish)
    assert text == ref_text
    running.shutdown.set()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tightwad_core.testing.tinymodels import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=1)


def test_jobs_of_three_sequences_share_one_decode(tiny: Path) -> None:
    """Verify rounds of three sessions (different prompts, one with a cached
    prefix) evaluated in ONE llama_decode give the rows each gets alone."""
    from tightwad_plugins.worker.model import Context, Job, Model

    model = Model(tiny, threads=1)
    try:
        alone = Context(model, 1, 256, 64)
        batched = Context(model, 3, 256, 64)
        inputs = [[5, 9, 30, 31, 2], [7, 7, 100, 3], [5, 9, 30, 44, 45, 46]]
        want = []
        for ids in inputs:
            job = Job(alone.seqs[0], 0, ids, 3, finish=np.stack)
            alone.step([job])
            assert job.finished and job.error is None
            want.append(job.result)
        batched.step([Job(batched.seqs[0], 0, inputs[0][:3], 1)])  # a cached prefix in seq 0
        jobs = [Job(q, 0, ids, 3, finish=np.stack) for q, ids in zip(batched.seqs, inputs)]
        before = batched.decodes
        batched.step(jobs)
        assert batched.decodes == before + 1 and batched.batched >= 1
        for job, ref in zip(jobs, want):
            assert job.finished and job.error is None
            assert np.allclose(job.result, ref, atol=1e-3)
            assert int(np.argmax(job.result[-1])) == int(np.argmax(ref[-1]))
        assert [q.tokens for q in batched.seqs] == inputs
        # rollback is per sequence: seq 1 drops its last two, the others keep theirs
        redo = Job(batched.seqs[1], 2, [100, 3], 2, finish=np.stack)
        batched.step([redo])
        assert np.allclose(redo.result, want[1][-2:], atol=1e-3)
        assert [q.tokens for q in batched.seqs] == inputs
        alone.close()
        batched.close()
    finally:
        model.close()


"""`tightwad worker`: the acceptance math, a real worker on a tiny random-weight
model, and an optional check on the real Qwen 1.5B model."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from click.testing import CliRunner

import tightwad_plugins.worker as plugin
from tightwad_core.plugins import load_registry
from tightwad_core.runtime import catalog
from tightwad_core.spec.interfaces import SamplingParams
from tightwad_core.testing.tinymodels import reference_greedy, write_tiny_model
from tightwad_plugins.worker.cli import (
    RunningWorker,
    WorkerConfigError,
    serve_worker,
    worker_command,
)
from tightwad_plugins.worker.rejection import (
    accept_greedy,
    accept_sampled,
    draft_probs,
    sample,
    sparse,
    target_probs,
)

N_VOCAB = 8


def rows_with_argmax(argmaxes: list[int], n: int = N_VOCAB, margin: float = 2.0) -> np.ndarray:
    rows = np.zeros((len(argmaxes), n), dtype=np.float32)
    for i, a in enumerate(argmaxes):
        rows[i, a] = margin
    return rows


# --------------------------------------------------------------------- greedy table

GREEDY_CASES = [  # (target argmax at each row, draft, accepted, token)
    pytest.param([3, 4, 5, 6], [3, 4, 5], 3, 6, id="perfect-match-bonus"),
    pytest.param([3, 4, 5, 6], [3, 1, 5], 1, 4, id="early-mismatch"),
    pytest.param([3, 4, 5, 6], [0, 4, 5], 0, 3, id="first-mismatch"),
    pytest.param([7], [], 0, 7, id="empty-draft"),
    pytest.param([2, 2], [2], 1, 2, id="single-draft-bonus"),
]


@pytest.mark.parametrize(("argmaxes", "draft", "accepted", "token"), GREEDY_CASES)
def test_accept_greedy_table(argmaxes: list[int], draft: list[int], accepted: int,
                             token: int) -> None:
    got_acc, got_tok, gaps = accept_greedy(rows_with_argmax(argmaxes), draft)
    assert (got_acc, got_tok) == (accepted, token)
    assert len(gaps) == accepted + 1
    assert all(g == pytest.approx(2.0) for g in gaps)
    with pytest.raises(ValueError):  # one row more than the draft, always
        accept_greedy(rows_with_argmax(argmaxes), [*draft, 0])


# --------------------------------------------------------------------- sampling

LOGITS = np.log(np.array([0.30, 0.22, 0.16, 0.12, 0.10, 0.06, 0.03, 0.01], dtype=np.float64))
Q = np.array([0.05, 0.40, 0.05, 0.30, 0.05, 0.05, 0.05, 0.05])
# the 0.999 quantile of the chi-square distribution, by degrees of freedom
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def test_target_probs_truncation() -> None:
    p = target_probs(LOGITS, SamplingParams(temperature=1.0))
    assert p == pytest.approx([0.30, 0.22, 0.16, 0.12, 0.10, 0.06, 0.03, 0.01])
    p = target_probs(LOGITS, SamplingParams(temperature=1.0, top_k=3))
    assert p == pytest.approx(np.array([0.30, 0.22, 0.16, 0, 0, 0, 0, 0]) / 0.68)
    p = target_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.6))  # .30+.22+.16 >= .6
    assert np.count_nonzero(p) == 3
    p = target_probs(LOGITS, SamplingParams(temperature=1.0, top_k=5, top_p=0.5))
    assert np.count_nonzero(p) == 2  # (.30 + .22) / .90 >= .5
    assert target_probs(LOGITS, SamplingParams()).tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    q = draft_probs(np.arange(100, dtype=np.float32), SamplingParams(temperature=1.0), cap=10)
    assert np.count_nonzero(q) == 10 and q.sum() == pytest.approx(1.0)


def _chi2(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    mask = p > 0
    assert counts[~mask].sum() == 0, "a token outside the target's support was emitted"
    expected = p[mask] * counts.sum()
    return float(((counts[mask] - expected) ** 2 / expected).sum()), int(mask.sum()) - 1


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_k=6),
                                    SamplingParams(temperature=1.3, top_p=0.8)],
                         ids=["plain", "top-k", "top-p"])
def test_rejection_sampling_emits_target_distribution(params: SamplingParams) -> None:
    """One draft position: draw x ~ q, accept or correct; the emitted token
    must follow the target's p (chi-square at significance 0.001)."""
    rng = np.random.default_rng(1234)
    p = target_probs(LOGITS, params)
    rows = np.stack([LOGITS, LOGITS])
    q_row = {i: float(v) for i, v in enumerate(Q)}
    counts = np.zeros(N_VOCAB)
    accepted_total = 0
    draws = 20_000
    for _ in range(draws):
        x = sample(Q, rng)
        acc, tok = accept_sampled(rows, [x], [q_row], params, rng)
        counts[x if acc == 1 else tok] += 1
        accepted_total += acc
    stat, dof = _chi2(counts, p)
    assert stat < CHI2_999[dof], (stat, counts / draws, p)
    expected_accept = float(np.minimum(p, Q).sum())  # theory: sum_x min(p, q)
    assert accepted_total / draws == pytest.approx(expected_accept, abs=0.02)


def test_rejection_sampling_is_seeded_and_edge_cases() -> None:
    params = SamplingParams(temperature=1.0)
    rows = np.stack([LOGITS] * 4)
    q_rows = [{i: float(v) for i, v in enumerate(Q)}] * 3

    def run(seed: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng(seed)
        return [accept_sampled(rows, [1, 3, 0], q_rows, params, rng) for _ in range(50)]

    assert run(7) == run(7) and run(7) != run(8)

    rng = np.random.default_rng(0)
    rows = rows[:2]
    # a draft token the draft gave no mass is always rejected
    assert accept_sampled(rows, [2], [{0: 1.0}], params, rng)[0] == 0
    # q == p: everything is accepted, the bonus token comes from p
    exact = sparse(target_probs(LOGITS, params))
    assert all(accept_sampled(rows, [0], [exact], params, rng)[0] == 1 for _ in range(100))
    # empty draft: one sample from p
    assert 0 <= accept_sampled(LOGITS[None, :], [], [], params, rng)[1] < N_VOCAB


# ===================================================================== live worker

# Every live test below needs llama-cpp-python; the command-line test does not.
needs_engine = pytest.mark.usefixtures("llama_cpp_installed")


async def start(nursery: trio.Nursery, model: Path, **kw: Any) -> RunningWorker:
    kw.setdefault("ctx", 512)
    kw.setdefault("threads", 1)
    kw.setdefault("slots", 4)  # tests that do not close their sessions leave them to the TTL
    return await nursery.start(partial(serve_worker, model, "127.0.0.1", 0, **kw))


def next_past(past: int, sent: list[int], draft: int, accepted: int) -> int:
    return past + (len(sent) - draft) + accepted


async def vpost(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/tightwad/verify", json=body)


async def verify(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await vpost(client, **body)
    assert r.status_code == 200, r.text
    return r.json()


async def greedy_continuation(client: httpx.AsyncClient, prompt: list[int], n: int) -> list[int]:
    """The worker's own greedy continuation, one token per round (K = 0)."""
    out = await verify(client, session=None, past=0, tokens=prompt, draft=0)
    sid, past, cont = out["session"], out["n_past"], [out["token"]]
    while len(cont) < n:
        out = await verify(client, session=sid, past=past, tokens=[cont[-1]], draft=0)
        past = out["n_past"]
        cont.append(out["token"])
    assert (await client.delete(f"/v1/tightwad/sessions/{sid}")).status_code == 204
    return cont


async def tokenize(client: httpx.AsyncClient, text: str) -> list[int]:
    r = await client.post("/tokenize", json={"content": text, "add_special": True})
    return r.json()["tokens"]  # type: ignore[no-any-return]


@needs_engine
async def test_greedy_verify_matches_one_token_at_a_time(nursery: trio.Nursery,
                                                         tiny_model: Path) -> None:
    w = await start(nursery, tiny_model)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        prompt = await tokenize(client, "The quick brown fox jumps over")
        cont = await greedy_continuation(client, prompt, 24)
        # the engine agrees with an independent NumPy forward pass of the same file
        assert cont == reference_greedy(tiny_model, prompt, 24)

        # (a) the exact continuation in chunks of 4: all accepted, bonus = next true token
        out = await verify(client, session=None, past=0, tokens=prompt, draft=0)
        sid, past, j = out["session"], out["n_past"], 1
        assert out["token"] == cont[0] and past == len(prompt)
        while j + 4 < len(cont):
            sent = [cont[j - 1], *cont[j:j + 4]]
            out = await verify(client, session=sid, past=past, tokens=sent, draft=4)
            assert (out["accepted"], out["token"]) == (4, cont[j + 4]), out
            assert out["n_past"] == past + len(sent) and len(out["gaps"]) == 5
            past = next_past(past, sent, 4, out["accepted"])
            j += 5

        # (b) one corrupted draft token per round: accepted stops there and the
        # correction is the true token; `past` rolls the rejected drafts back
        out = await verify(client, session=None, past=0, tokens=prompt, draft=0)
        sid, past, j = out["session"], out["n_past"], 1
        for bad in (2, 0, 3, 1):
            draft = list(cont[j:j + 4])
            draft[bad] = (draft[bad] + 1) % 256
            sent = [cont[j - 1], *draft]
            out = await verify(client, session=sid, past=past, tokens=sent, draft=4)
            assert (out["accepted"], out["token"]) == (bad, cont[j + bad]), out
            assert len(out["gaps"]) == bad + 1
            past = next_past(past, sent, 4, bad)
            j += bad + 1
        # after all the rollbacks the session continues exactly
        out = await verify(client, session=sid, past=past, tokens=[cont[j - 1]], draft=0)
        assert out["token"] == cont[j]

        # max_new trims the draft: only 2 of 4 are checked and evaluated
        out = await verify(client, session=None, past=0, tokens=prompt + cont[:4], draft=4,
                           max_new=2)
        assert out["accepted"] == 2 and out["n_past"] == len(prompt) + 2


@needs_engine
async def test_sessions_queue_expire_delete_busy_and_conflict(nursery: trio.Nursery,
                                                              tiny_model: Path) -> None:
    w = await start(nursery, tiny_model, slots=2, session_ttl=1.0)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        prompt = await tokenize(client, "hello there")
        a = await verify(client, tokens=prompt)
        # a past beyond what the session holds is a conflict, as is a new session with past
        r = await vpost(client, session=a["session"], past=a["n_past"] + 1, tokens=[a["token"]])
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_conflict"
        assert (await vpost(client, past=3, tokens=[1])).status_code == 409

        # DELETE frees the slot; a second DELETE is a 404, as is using it
        assert (await client.delete(f"/v1/tightwad/sessions/{a['session']}")).status_code == 204
        assert (await client.delete(f"/v1/tightwad/sessions/{a['session']}")).status_code == 404
        r = await vpost(client, session=a["session"], past=a["n_past"], tokens=[a["token"]])
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        assert (await client.get("/v1/tightwad/info")).json()["slots_in_use"] == 0

        # with both sequences held by idle sessions, a third waits in the queue: nobody
        # is evicted between rounds, and it starts as soon as one of them is deleted
        s1 = (await verify(client, tokens=prompt))["session"]
        s2 = (await verify(client, tokens=prompt))["session"]
        third: dict[str, Any] = {}

        async def wait_for_one() -> None:
            third.update(await verify(client, tokens=prompt))

        async with trio.open_nursery() as inner:
            inner.start_soon(wait_for_one)
            with trio.fail_after(10):
                while w.engine.table.queued == 0:
                    await trio.sleep(0.01)
            info = (await client.get("/v1/tightwad/info")).json()
            assert info["waiting"] == 1 and not third
            # both held sessions still answer while the third waits
            await verify(client, session=s1, past=len(prompt), tokens=[5])
            await verify(client, session=s2, past=len(prompt), tokens=[5])
            await client.delete(f"/v1/tightwad/sessions/{s2}")
        s3 = third["session"]
        await verify(client, session=s1, past=len(prompt) + 1, tokens=[6])

        # a full queue, or a wait past --queue-timeout, is a 503 worker_busy with
        # Retry-After; the sessions that hold the sequences are not disturbed
        w.engine.table.queue_timeout = 0.3
        r = await vpost(client, tokens=prompt)
        assert r.status_code == 503 and r.json()["error"]["type"] == "worker_busy"
        assert int(r.headers["retry-after"]) >= 1
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "retry-after" in r.headers
        w.engine.table.queue_max = 0
        r = await vpost(client, tokens=prompt)
        assert r.status_code == 503 and "already waiting" in r.json()["error"]["message"]
        await verify(client, session=s3, past=len(prompt), tokens=[7])
        assert (await client.get("/v1/tightwad/info")).json()["refused"] == 3

        # idle sessions expire after session_ttl seconds
        await trio.sleep(1.8)
        info = (await client.get("/v1/tightwad/info")).json()
        assert info["sessions"] == 0 and info["slots_in_use"] == 0 and info["expired"] >= 2
        assert (await vpost(client, session=s1, past=1, tokens=[6])).status_code == 404


@needs_engine
async def test_bad_requests_are_openai_shaped(nursery: trio.Nursery, tiny_model: Path) -> None:
    w = await start(nursery, tiny_model, max_body_bytes=4096)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        cases = [
            {"tokens": [1, 2], "draft": 2},  # no token before the drafts
            {"tokens": [10**6]},  # outside the vocabulary
            {"tokens": [1, 2], "draft": 1, "sampling": {"temperature": 0.8}},  # no q
            {"tokens": [1] * 600},  # over the context
            {"tokens": [1], "bogus": 1},
        ]
        for body in cases:
            r = await vpost(client, **body)
            assert r.status_code == 400, (body, r.text)
            assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
        r = await client.post("/v1/tightwad/verify", content=b"x" * 5000)
        assert r.status_code == 413
        assert (await client.get("/v1/tightwad/info")).json()["slots_in_use"] == 0


@needs_engine
async def test_sampled_verify_and_draft(nursery: trio.Nursery, tiny_model: Path) -> None:
    w = await start(nursery, tiny_model)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        prompt = await tokenize(client, "Once upon a time")
        sampling = {"temperature": 0.9, "top_k": 20, "seed": 42}
        r = await client.post("/v1/tightwad/draft", json={"tokens": prompt, "k": 4,
                                                           "sampling": sampling})
        assert r.status_code == 200, r.text
        d = r.json()
        assert len(d["tokens"]) == 4 and len(d["q"]) == 4
        assert d["n_past"] == len(prompt) + 3
        for tok, q in zip(d["tokens"], d["q"]):
            assert str(tok) in q and len(q) <= 20 and sum(q.values()) == pytest.approx(1.0)
        # the worker verifying its own (sampled) draft with the draft's q: p == q, so all pass
        body = {"tokens": prompt + d["tokens"], "draft": 4, "sampling": sampling, "q": d["q"]}
        first = await verify(client, **body)
        assert first["accepted"] == 4 and first["gaps"] is None
        assert (await verify(client, **body)) | {"session": "", "engine_ms": 0} == \
            first | {"session": "", "engine_ms": 0}  # same seed, same answer
        # greedy drafting continues the greedy continuation
        cont = await greedy_continuation(client, prompt, 5)
        r = await client.post("/v1/tightwad/draft", json={"tokens": prompt, "k": 5})
        assert r.json()["tokens"] == cont and r.json()["q"] is None


@needs_engine
async def test_prompt_logprobs_match_greedy_verify(nursery: trio.Nursery,
                                                   tiny_model: Path) -> None:
    w = await start(nursery, tiny_model)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        prompt = await tokenize(client, "It is the end of the world as we know")
        argmax = []  # the greedy verify's argmax after each prefix
        for j in range(1, len(prompt) + 1):
            out = await verify(client, tokens=prompt[:j])
            argmax.append(out["token"])
            await client.delete(f"/v1/tightwad/sessions/{out['session']}")
        r = await client.post("/v1/completions", json={
            "prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2,
            "prompt_logprobs": 3, "return_tokens_as_token_ids": True})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        n = len(prompt)
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n + 3
        assert lp["tokens"][:n] == [f"token_id:{t}" for t in prompt]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["text_offset"] == sorted(lp["text_offset"])
        for i in range(1, n + 3):
            top = lp["top_logprobs"][i]
            assert len(top) in (2, 3) and lp["token_logprobs"][i] <= 0.0
            if i <= n:  # top-1 at each prompt position and the first generated one
                assert max(top, key=top.get) == f"token_id:{argmax[i - 1]}", i
        # greedy generation: every generated token is its position's top-1
        assert lp["tokens"][n] == f"token_id:{argmax[-1]}"
        for i in range(n, n + 3):
            top = lp["top_logprobs"][i]
            assert max(top, key=top.get) == lp["tokens"][i]

        pl = choice["prompt_logprobs"]
        assert len(pl) == n and pl[0] is None
        for i in range(1, n):  # the actual token is there, and the rank-1 is the argmax
            assert str(prompt[i]) in pl[i] and len(pl[i]) in (3, 4)  # top-3 + the actual one
            assert [int(t) for t, e in pl[i].items() if e["rank"] == 1] == [argmax[i - 1]], i
            assert all(math.isfinite(e["logprob"]) for e in pl[i].values())
        assert r.json()["usage"] == {"prompt_tokens": n, "completion_tokens": 3,
                                     "total_tokens": n + 3}


@needs_engine
async def test_plain_routes(nursery: trio.Nursery, tiny_model: Path) -> None:
    w = await start(nursery, tiny_model)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        text = "Hello world, the quick brown fox!"
        toks = (await client.post("/tokenize", json={"content": text})).json()["tokens"]
        assert (await client.post("/detokenize", json={"tokens": toks})).json()["content"] == text
        v1 = (await client.get("/v1/tightwad/vocab")).json()
        v2 = (await client.get("/v1/tightwad/vocab")).json()
        assert v1["fingerprint"] == v2["fingerprint"] and len(v1["fingerprint"]) == 64
        assert len(v1["pieces"]) == v1["n_vocab"] and v1["eos"]
        assert text.encode().startswith(bytes.fromhex(v1["pieces"][toks[0]]))

        r = await client.post("/apply-template", json={"messages": [
            {"role": "user", "content": "hi"}]})
        assert r.json()["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert r.json()["choices"][0]["message"]["role"] == "assistant"

        # stop strings: the text ends before the first occurrence
        full = (await client.post("/v1/completions", json={
            "prompt": "the", "max_tokens": 20, "temperature": 0})).json()["choices"][0]
        assert full["finish_reason"] == "length"
        stop = full["text"][5:8]
        cut = (await client.post("/v1/completions", json={
            "prompt": "the", "max_tokens": 20, "temperature": 0, "stop": stop})).json()
        assert (cut["choices"][0]["text"], cut["choices"][0]["finish_reason"]) == \
            (full["text"][:full["text"].find(stop)], "stop")
        # streaming gives the same text
        pieces = []
        async with client.stream("POST", "/v1/completions", json={
                "prompt": "the", "max_tokens": 20, "temperature": 0, "stream": True}) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
        assert "".join(pieces) == full["text"]
        r = await client.post("/v1/completions", json={"prompt": "the", "max_tokens": 10**6})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert (await client.get("/v1/models")).json()["data"][0]["id"] == tiny_model.stem


@needs_engine
async def test_client_disconnect_mid_stream_frees_the_slot(nursery: trio.Nursery,
                                                           tmp_path: Path) -> None:
    # wider than the shared tiny model: ~3 ms a token, so 2000 tokens take seconds
    model = write_tiny_model(tmp_path / "wide.gguf", seed=2, n_embd=256, n_layer=4, n_ff=1024,
                             n_ctx=2048)
    w = await start(nursery, model, slots=1, ctx=2048)
    slot = w.engine.table.slots[0]
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        async with client.stream("POST", "/v1/completions", json={
                "prompt": "a", "max_tokens": 2000, "temperature": 0.8, "stream": True}) as resp:
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data: {")
                if seen >= 3:
                    break  # hang up mid-stream
        with trio.fail_after(10):
            while slot.session is not None:
                await trio.sleep(0.02)
        # generation stopped soon after the hang-up, and the cache matches its tokens
        assert len(slot.seq.tokens) < 1000
        await verify(client, tokens=[1, 2, 3])
        assert slot.seq.tokens == [1, 2, 3]
        info = (await client.get("/v1/tightwad/info")).json()
        assert info["sessions"] == 1 and info["slots_in_use"] == 1


@needs_engine
async def test_bearer_token(nursery: trio.Nursery, tiny_model: Path) -> None:
    w = await start(nursery, tiny_model, api_key="sekrit")
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        assert (await client.get("/health")).status_code == 200
        r = await client.get("/v1/tightwad/info")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert (await client.get("/v1/tightwad/info",
                                 headers={"authorization": "Bearer sekrit"})).status_code == 200
    with pytest.raises(WorkerConfigError):
        await serve_worker(tiny_model, "0.0.0.0", 0)


def test_worker_command_help_and_missing_model(tmp_path: Path) -> None:
    r = (runner := CliRunner()).invoke(worker_command, ["--help"])
    assert r.exit_code == 0 and "--model" in r.output and "--session-ttl" in r.output
    r = runner.invoke(worker_command, ["--model", str(tmp_path / "nope.gguf")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "file not found" in r.output
    (tmp_path / "x.gguf").write_bytes(b"")
    r = runner.invoke(worker_command, ["--model", str(tmp_path / "x.gguf"), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "bearer token" in r.output


def test_plugin_registers_the_worker_command() -> None:
    reg = load_registry(extra={"worker-under-test": plugin}, entry_points=False)
    assert reg.entries["commands"]["worker"] is worker_command


# ===================================================================== real model

QWEN = catalog.model_path("qwen2.5-coder-1.5b")


@pytest.mark.slow
@needs_engine
@pytest.mark.usefixtures("qwen_target_file")
async def test_qwen_verify_eight_in_one_pass(nursery: trio.Nursery) -> None:
    threads = 2
    w = await start(nursery, QWEN, slots=1, ctx=1024, threads=threads)
    async with httpx.AsyncClient(base_url=w.url, timeout=120) as client:
        prompt = await tokenize(client, "def fibonacci(n):\n    \"\"\"Return the n-th")
        cont = await greedy_continuation(client, prompt, 10)
        out = await verify(client, tokens=prompt, draft=0)
        sid, past = out["session"], out["n_past"]
        times = []
        for _ in range(3):  # the same round thrice: the cache rolls back each time
            out = await verify(client, session=sid, past=past, tokens=cont[:9], draft=8)
            assert out["accepted"] == 8 or min(out["gaps"]) < 0.1, out
            if out["accepted"] == 8:
                assert out["token"] == cont[9]
            assert out["n_past"] == past + 9
            times.append(out["engine_ms"])

        # the same 9 tokens one at a time, on the same engine in the same run
        singles = []
        for _ in range(3):
            step_ms = 0.0
            p = past
            for i in range(9):
                one = await verify(client, session=sid, past=p, tokens=[cont[i]], draft=0)
                step_ms += one["engine_ms"]
                p += 1
            singles.append(step_ms)
    print(f"\nqwen 1.5B, {threads} threads: verify of 8 drafts engine_ms {min(times):.1f} "
          f"(runs {', '.join(f'{t:.1f}' for t in times)}); the same 9 tokens one at a time "
          f"{min(singles):.1f} ms")
    # the claim: checking 8 drafts in one pass costs well under evaluating them one by one
    # (about a third here; 0.8 leaves room for a loaded machine, both sides measured alike)
    assert min(times) < 0.8 * min(singles), (times, singles)


@needs_engine
async def test_echo_reuses_the_log_probabilities_it_computed(nursery: trio.Nursery,
                                                             tiny_model: Path) -> None:
    """The prompt-logprobs rung sends a longer prompt every round: the worker
    evaluates only the new positions, and the figures match a full evaluation."""
    w = await start(nursery, tiny_model, slots=1)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        prompt = await tokenize(client, "It is the end of the world as we know it")
        ext = [5, 9, 30]

        async def echo(ids: list[int], top: int) -> tuple[list[Any], int]:
            before = (await client.get("/v1/tightwad/info")).json()["evaluated_tokens"]
            r = await client.post("/v1/completions", json={
                "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 0,
                "prompt_logprobs": top})
            assert r.status_code == 200, r.text
            after = (await client.get("/v1/tightwad/info")).json()["evaluated_tokens"]
            return r.json()["choices"][0]["prompt_logprobs"], after - before

        full, n_full = await echo(prompt + ext, 5)  # nothing cached: every position
        assert n_full == len(prompt) + len(ext)
        again, n_again = await echo(prompt + ext, 3)  # all cached but the last row
        extended, n_ext = await echo(prompt + ext + [7, 8], 3)
        assert n_again == 1 and n_ext == 3
        for got in (again, extended):
            for i in range(1, len(prompt) + len(ext)):
                want = full[i][str((prompt + ext)[i])]["logprob"]
                assert abs(got[i][str((prompt + ext)[i])]["logprob"] - want) < 1e-3, i
                assert len(got[i]) in (3, 4)  # the top 3, plus the actual token
        # more alternatives than were kept: a full evaluation again
        _, n_wider = await echo(prompt + ext, 8)
        assert n_wider == len(prompt) + len(ext)

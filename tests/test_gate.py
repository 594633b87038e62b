"""The `gate` mode on the tiny generated models: a worker target reviews
whole drafts from llama-server drafters. An identical drafter is approved, a
different one rejected, a near one corrected (its agreed prefix, then the
target's own continuation); reviews fail closed unless `fail_open`; the
cache answers identical requests without a model call; the proxy's bearer
token applies; a drafter dying mid-response costs nothing but a retry."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from click.testing import CliRunner
from conftest import start_proxy

import tightwad_plugins.modes.gate as gate_mod
import tightwad_plugins.modes.gate_fleet as gate_fleet
from tightwad_core.config.profiles import BackendConfig, ConfigError, Profile
from tightwad_core.config.schema import GateConfig
from tightwad_core.errors import BackendError
from tightwad_core.roles import BackendContext, ModeContext
from tightwad_core.testing.tinymodels import tiny_pair, write_tiny_model
from tightwad_plugins.backends.llama_server import LlamaServerBackend
from tightwad_plugins.modes.gate import GateMode
from tightwad_plugins.modes.gate_review import decide
from tightwad_plugins.modes.gate_stats import AnswerCache, cache_key

PROMPT = "the cat sat on"
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gate")
    draft, target = tiny_pair(d, seed=2)
    other = write_tiny_model(d / "other.gguf", seed=7)  # same vocabulary, unrelated weights
    return {"target": target, "near": draft, "other": other}


def _server(path: Path | None = None, url: str | None = None) -> BackendConfig:
    if url is not None:
        return BackendConfig(backend="llama-server", url=url)
    return BackendConfig(backend="llama-server", model_path=str(path), ctx_size=512, parallel=1, threads=1)


def gate_profile(models: dict[str, Path], drafters: list[BackendConfig], **gate: Any) -> Profile:
    api_key = gate.pop("api_key", None)
    gate.setdefault("cache_entries", 0)
    return Profile(mode="gate", listen="127.0.0.1:0", max_tokens_limit=256, api_key=api_key,
                   target=BackendConfig(backend="worker", model_path=str(models["target"]), ctx_size=512,
                                        parallel=2, threads=1),
                   drafters=drafters, gate=GateConfig(**gate))


async def _alone(running: Any, body: dict[str, Any], chat: bool = False) -> str:
    """The target's own greedy answer, asked of the worker directly."""
    target = running.state.backends["target"]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with httpx.AsyncClient(timeout=60) as c:
        data = (await c.post(target.base_url + path, json=body)).json()
    choice = data["choices"][0]
    return str(choice["message"]["content"] if chat else choice["text"])


def _gate(running: Any) -> dict[str, Any]:
    return running.state.mode.status()["gate"]


def _client(running: Any, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=running.url + "/v1", api_key=key, max_retries=0, timeout=60)


# ---- the verdict, from margins ----------------------------------------------


def test_decide() -> None:
    assert decide([0.0, 0.5, 1.0], True, 2.0, 0.25) == ("approved", 3)
    assert decide([0.0, 0.5, 1.0], False, 2.0, 0.25) == ("corrected", 3)  # the end disagrees
    assert decide([0.0, 0.0, 0.0, 3.0], True, 2.0, 0.25) == ("corrected", 3)
    assert decide([0.0, 3.0, 0.0, 0.0, 0.0], True, 2.0, 0.25) == ("rejected", 0)  # 1 < 0.25 * 5
    assert decide([5.0, 0.0], True, 2.0, 0.0) == ("rejected", 0)  # nothing agreed: nothing kept
    assert decide([], False, 2.0, 0.25) == ("rejected", 0)


def test_parse_scores_margins_and_end() -> None:
    from tightwad_plugins.modes.gate_review import parse_scores

    def row(**lps: float) -> dict[str, float]:
        return {f"token_id:{k[1:]}": v for k, v in lps.items()}

    # prompt of 2 (first position has none), draft [5, 6], then the generated position
    lp = {"top_logprobs": [None, row(t5=-0.1), row(t5=-0.2, t7=-0.5), row(t7=-0.1, t6=-3.0), row(t0=-0.3, t9=-1.0)],
          "token_logprobs": [None, -1.0, -0.2, -3.0, -0.3]}
    margins, end_ok = parse_scores(lp, 2, [5, 6], True, frozenset({0}), 2.0)
    assert margins == [0.0, pytest.approx(2.9)] and end_ok
    _, end_ok = parse_scores(lp, 2, [5, 6], True, frozenset({1}), 2.0)  # no end token near the top
    assert not end_ok
    short = {k: v[:4] for k, v in lp.items()}  # the target generated nothing: its own token ends it
    assert parse_scores(short, 2, [5, 6], True, frozenset({1}), 2.0, ended=True)[1]
    with pytest.raises(BackendError, match="3 of 4 positions"):  # fewer positions than asked: a failed review
        parse_scores({k: v[:3] for k, v in lp.items()}, 2, [5], True, frozenset({0}), 2.0)


def test_cache_is_bounded() -> None:
    from tightwad_core.records import GenRequest, Result, Usage

    cache = AnswerCache(2)
    reqs = [GenRequest(kind="completion", prompt=f"p{i}", max_tokens=8, temperature=0.0) for i in range(3)]
    for r in reqs:
        cache.put(cache_key(r), Result(text="x", finish_reason="stop", usage=Usage(1, 1)))
    assert len(cache) == 2 and cache.evictions == 1
    assert cache.get(cache_key(reqs[0])) is None and cache.get(cache_key(reqs[2])) is not None
    sampled = GenRequest(kind="completion", prompt="p", max_tokens=8, temperature=0.7)
    assert cache_key(sampled) is None  # sampling without a seed is never served from the cache
    assert cache_key(GenRequest(kind="completion", prompt="p", max_tokens=8, temperature=0.7, seed=3))


def test_pick_order_skips_failed_and_balances() -> None:
    import time as _time

    from tightwad_plugins.modes.gate_fleet import Fleet, Member

    ms = [Member(i, None, "text") for i in range(3)]  # type: ignore[arg-type]
    rr = Fleet(ms, "round-robin", 5.0)
    assert [[m.index for m in rr.order()] for _ in range(3)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    ms[1].down_until = _time.monotonic() + 60  # failed just now: passed over
    assert [m.index for m in rr.order()] == [0, 2]
    ms[1].down_until = 0.0
    ms[0].busy, ms[1].busy, ms[2].busy = 2, 0, 1
    assert [m.index for m in Fleet(ms, "least-busy", 5.0).order()] == [1, 2, 0]


@pytest.mark.parametrize("reply,verdict", [("APPROVE", "approved"), (" **Approve.**", "approved"),
                                           ("REJECT: wrong", "rejected"), ("maybe", None), ("", None)])
async def test_judge_reply_parsing(reply: str, verdict: str | None) -> None:
    from tightwad_core.records import GenRequest, Result, Usage
    from tightwad_plugins.modes.gate_review import judge_draft

    class Replies:  # fault injection: a target whose judge reply is fixed
        asked: list[GenRequest] = []

        async def generate(self, req: GenRequest) -> Result:
            self.asked.append(req)
            return Result(text=reply, finish_reason="stop", usage=Usage(1, 1))

    t = Replies()
    req = GenRequest(kind="chat", messages=CHAT, max_tokens=8)
    if verdict is None:
        with pytest.raises(BackendError, match="neither APPROVE nor REJECT"):
            await judge_draft(t, req, "hi")
    else:
        assert (await judge_draft(t, req, "hi")).verdict == verdict
    assert "hello there" in t.asked[-1].messages[-1]["content"]  # type: ignore[index]


async def test_scores_review_needs_prompt_logprobs(tmp_path: Path) -> None:
    cfg = BackendConfig(backend="llama-server", url="http://127.0.0.1:9")
    target = LlamaServerBackend(cfg, BackendContext(role="target", config_dir=tmp_path, run_dir=tmp_path))
    prof = Profile(mode="gate", target=cfg, drafters=[cfg])
    mode = GateMode(prof, {"target": target, "drafters.0": target}, ModeContext(verifiers={}))
    with pytest.raises(ConfigError, match='review = "judge"'):
        await mode.start()


# ---- approve, reject, correct -------------------------------------------------


async def test_identical_approved_other_rejected(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    prof = gate_profile(models, [_server(models["target"]), _server(models["other"])], threshold=2.0)
    running = await start_proxy(nursery, prof, tmp_path)
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    ref = await _alone(running, body)
    async with _client(running) as client:
        first = await client.completions.create(model="target", **body)  # drafters.0: the target's twin
        assert _gate(running)["last"]["verdict"] == "approved"
        second = await client.completions.create(model="target", **body)  # drafters.1: unrelated
        assert _gate(running)["last"]["verdict"] == "rejected"
        streamed = ""
        async for ev in await client.completions.create(model="target", stream=True, **body):  # drafters.0
            streamed += ev.choices[0].text if ev.choices else ""
    assert first.choices[0].text == ref and first.choices[0].finish_reason == "length"
    assert first.usage is not None and first.usage.completion_tokens == 30
    assert second.choices[0].text == ref  # a fresh answer of the target's own
    assert streamed == ref
    g = _gate(running)
    assert (g["approved"], g["rejected"], g["corrected"]) == (2, 1, 0)
    assert g["rates"]["approved"] == pytest.approx(2 / 3)
    assert g["draft_tokens_kept"] == 60 and g["target_tokens_generated"] == 30
    assert [m["responses"] for m in g["drafters"]] == [2, 1]
    async with httpx.AsyncClient(timeout=30) as c:
        metrics = (await c.get(running.url + "/metrics")).text
    assert 'tightwad_gate_answers_total{verdict="approved"} 2.0' in metrics
    assert 'tightwad_gate_answers_total{verdict="rejected"} 1.0' in metrics
    assert 'tightwad_gate_drafter_responses_total{drafter="drafters.1"} 1.0' in metrics
    running.shutdown.set()


async def test_near_draft_corrected(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    # threshold 0: every kept draft token is the target's own top choice, so the
    # answer must be exactly the target's greedy one: draft prefix + target continuation
    prof = gate_profile(models, [_server(models["near"])], threshold=0.0, min_prefix=0.0)
    running = await start_proxy(nursery, prof, tmp_path)
    mode = running.state.mode
    drafter = running.state.backends["drafters.0"]
    seen = 0
    async with _client(running) as client, httpx.AsyncClient(timeout=60) as raw:
        for prompt in (PROMPT, "once upon a time", "hello world", "a b c"):
            body = {"prompt": prompt, "max_tokens": 40, "temperature": 0}
            ref = await _alone(running, body)
            got = await client.completions.create(model="target", **body)
            last = _gate(running)["last"]
            assert got.choices[0].text == ref, prompt
            if last["verdict"] != "corrected":
                continue
            seen += 1
            ids = await mode.text.prompt_ids(_req(prompt))
            own = (await raw.post(drafter.base_url + "/completion", json={
                "prompt": ids, "n_predict": 40, "temperature": 0, "return_tokens": True})).json()["tokens"]
            prefix = b"".join(mode.text.piece(t) for t in own[: last["kept"]]).decode("utf-8", "replace")
            assert 0 < last["kept"] < last["draft_tokens"]
            assert last["target_tokens"] == 40 - last["kept"]
            assert ref.startswith(prefix.rstrip("\ufffd"))
            streamed = ""
            async for ev in await client.completions.create(model="target", stream=True, **body):
                streamed += ev.choices[0].text if ev.choices else ""
            assert streamed == ref
    g = _gate(running)
    assert seen >= 1 and g["corrected"] >= seen
    assert g["draft_tokens_kept"] > 0
    running.shutdown.set()


def _req(prompt: str) -> Any:
    from tightwad_core.records import GenRequest

    return GenRequest(kind="completion", prompt=prompt, max_tokens=40, temperature=0.0)


async def test_stop_string_inside_an_approved_draft(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    prof = gate_profile(models, [_server(models["target"])])
    running = await start_proxy(nursery, prof, tmp_path)
    plain = await _alone(running, {"prompt": PROMPT, "max_tokens": 30, "temperature": 0})
    assert " yo" in plain  # the tiny target's greedy text (seed 2) holds the stop string
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": [" yo"]}
    async with _client(running) as client:
        got = await client.completions.create(model="target", **body)
    assert got.choices[0].text == plain[: plain.index(" yo")]
    assert got.choices[0].finish_reason == "stop"
    last = _gate(running)["last"]
    assert last["verdict"] == "approved" and last["target_tokens"] == 0
    assert got.usage is not None and got.usage.completion_tokens == last["kept"] < 30
    running.shutdown.set()


async def test_chat_approved_and_streamed(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    prof = gate_profile(models, [_server(models["target"])])
    running = await start_proxy(nursery, prof, tmp_path)
    body = {"messages": CHAT, "max_tokens": 24, "temperature": 0}
    ref = await _alone(running, body, chat=True)
    async with _client(running) as client:
        whole = await client.chat.completions.create(model="target", **body)  # type: ignore[call-overload]
        parts = [ev.choices[0].delta.content or "" async for ev in
                 await client.chat.completions.create(model="target", stream=True, **body)  # type: ignore[call-overload]
                 if ev.choices]
    assert whole.choices[0].message.content == ref == "".join(parts)
    assert _gate(running)["approved"] == 2
    running.shutdown.set()


# ---- failing reviews ------------------------------------------------------------


async def _broken_review(*args: Any, **kw: Any) -> Any:
    raise BackendError("target (worker) sent a malformed review")


@pytest.mark.parametrize("stream", [False, True])
async def test_failed_review_fails_closed(nursery, tmp_path, models, monkeypatch, stream):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gate_mod, "score_draft", _broken_review)
    running = await start_proxy(nursery, gate_profile(models, [_server(models["near"])]), tmp_path)
    drafter = running.state.backends["drafters.0"]
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as raw:
        draft = (await raw.post(drafter.base_url + "/v1/completions", json=body)).json()["choices"][0]["text"]
    async with _client(running) as client:
        with pytest.raises(openai.APIStatusError) as err:
            if stream:
                async for _ in await client.completions.create(model="target", stream=True, **body):
                    pass
            else:
                await client.completions.create(model="target", **body)
    assert err.value.status_code == 502
    assert draft[:8] not in str(err.value.body) and "fail_open" in str(err.value)
    g = _gate(running)
    assert g["review_failures"] == 1 and g["unreviewed"] == 0 and g["drafters"][0]["responses"] == 1
    running.shutdown.set()


async def test_failed_review_fail_open_serves_marked_draft(nursery, tmp_path, models, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gate_mod, "score_draft", _broken_review)
    prof = gate_profile(models, [_server(models["near"])], fail_open=True, cache_entries=8)
    running = await start_proxy(nursery, prof, tmp_path)
    drafter = running.state.backends["drafters.0"]
    body = {"messages": CHAT, "max_tokens": 20, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as c:
        mode = running.state.mode
        ids = await mode.text.tokenize(await mode.text.apply_template(CHAT), special=True)
        toks = (await c.post(drafter.base_url + "/completion", json={
            "prompt": ids, "n_predict": 20, "temperature": 0, "return_tokens": True})).json()["tokens"]
        own = b"".join(mode.text.piece(t) for t in toks).decode("utf-8", "replace")
        got = (await c.post(running.url + "/v1/chat/completions", json=body)).json()
        again = (await c.post(running.url + "/v1/chat/completions", json=body)).json()
    msg = got["choices"][0]["message"]
    assert msg["content"] == own and msg["tightwad_review"] == "unreviewed"
    assert again["choices"][0]["message"]["tightwad_review"] == "unreviewed"  # never cached
    g = _gate(running)
    assert g["unreviewed"] == 2 and g["cached"] == 0 and g["approved"] == 0
    running.shutdown.set()


async def test_judge_reply_that_is_no_verdict_fails_closed(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    # the tiny target's reply to the judge prompt is noise: neither APPROVE nor REJECT
    running = await start_proxy(nursery, gate_profile(models, [_server(models["near"])], review="judge"),
                                tmp_path)
    async with _client(running) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model="target", messages=CHAT, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    assert err.value.status_code == 502 and "APPROVE" in str(err.value)
    assert _gate(running)["review_failures"] == 1
    running.shutdown.set()


# ---- cache, auth ----------------------------------------------------------------------


async def test_cache_hit_costs_no_model_call(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    prof = gate_profile(models, [_server(models["near"])], cache_entries=2)
    running = await start_proxy(nursery, prof, tmp_path)
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    async with _client(running) as client:
        first = await client.completions.create(model="target", **body)
        g = _gate(running)
        before = (g["drafters"][0]["responses"], g["review_s"], g["target_tokens_generated"])
        second = await client.completions.create(model="target", **body)
        streamed = "".join([ev.choices[0].text async for ev in
                            await client.completions.create(model="target", stream=True, **body) if ev.choices])
        g = _gate(running)
        assert g["cached"] == 2 and second.choices[0].text == first.choices[0].text == streamed
        assert (g["drafters"][0]["responses"], g["review_s"], g["target_tokens_generated"]) == before
        assert second.usage == first.usage
        for p in ("b", "c"):  # two more answers evict the first (2 entries)
            await client.completions.create(model="target", **{**body, "prompt": p})
        await client.completions.create(model="target", **body)
        g = _gate(running)
        assert g["cached"] == 2 and g["cache"]["evictions"] >= 1 and g["cache"]["size"] == 2
        await client.completions.create(model="target", **{**body, "temperature": 0.8})  # sampled: not cached
        await client.completions.create(model="target", **{**body, "temperature": 0.8})
        assert _gate(running)["cached"] == 2
    assert _gate(running)["drafters"][0]["responses"] == 6
    running.shutdown.set()


async def test_bearer_token_applies(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    prof = gate_profile(models, [_server(models["target"])], api_key="gate-secret")
    running = await start_proxy(nursery, prof, tmp_path)
    async with _client(running, "wrong") as bad:
        with pytest.raises(openai.AuthenticationError) as err:
            await bad.completions.create(model="target", prompt=PROMPT, max_tokens=8, temperature=0)
    assert err.value.status_code == 401
    async with _client(running, "gate-secret") as good:
        ok = await good.completions.create(model="target", prompt=PROMPT, max_tokens=8, temperature=0)
    assert ok.choices[0].text and _gate(running)["approved"] == 1
    assert [m["responses"] for m in _gate(running)["drafters"]] == [1]  # the 401 cost no draft
    from tightwad_core.cli import main

    def status(*extra: str) -> Any:
        return CliRunner().invoke(main, ["gate", "status", "--url", running.url, *extra])

    shown = await trio.to_thread.run_sync(status, "--api-key", "gate-secret", "--json")
    assert shown.exit_code == 0 and json.loads(shown.output)["approved"] == 1
    table = await trio.to_thread.run_sync(status, "--api-key", "gate-secret")
    assert table.exit_code == 0 and "approved" in table.output and "drafters.0" in table.output
    refused = await trio.to_thread.run_sync(status)
    assert refused.exit_code == 1 and "401" in refused.output
    running.shutdown.set()


# ---- drafters dying -------------------------------------------------------------------


#: What a faulty drafter sends after its head: half a body, then the connection drops; or
#: whole JSON of the wrong shape; or (for a status query) JSON that is no object.
FAULTS = {"half": b"content-length: 4000\r\n\r\n" + json.dumps({"content": "half an"}).encode()[:12],
          "malformed": b"content-length: 34\r\n\r\n{\"tokens\": [{\"id\": 1}], \"x\": null}",
          "list": b"content-length: 6\r\n\r\n[1, 2]"}


async def _half_answering_server(nursery: trio.Nursery, fault: str = "half") -> str:
    """A drafter that is healthy, then fails every answer (``fault``)."""

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        if data.startswith(b"GET") and fault != "list":
            body = b'{"status":"ok"}'
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                  b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + FAULTS[fault])
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.mark.parametrize("fault", ["half", "malformed"])
async def test_drafter_dying_mid_response_next_one_writes(nursery, tmp_path, models, monkeypatch, fault):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gate_fleet, "COOLDOWN_S", 3600.0)  # still cooling down at the second request
    url = await _half_answering_server(nursery, fault)
    prof = gate_profile(models, [_server(url=url), _server(models["target"])])
    running = await start_proxy(nursery, prof, tmp_path)
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    ref = await _alone(running, body)
    async with _client(running) as client:
        got = await client.completions.create(model="target", **body)
        streamed = "".join([ev.choices[0].text async for ev in
                            await client.completions.create(model="target", stream=True, **body) if ev.choices])
    assert got.choices[0].text == ref == streamed
    g = _gate(running)
    assert g["drafter_failures"] == 1 and g["approved"] == 2 and g["fresh_no_draft"] == 0
    dead, alive = g["drafters"]
    assert dead["failures"] == 1 and not dead["usable"] and dead["last_error"]
    assert alive["responses"] == 2  # the second request skipped the one cooling down
    running.shutdown.set()


async def test_no_drafter_left_the_target_answers(nursery, tmp_path, models, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gate_fleet, "COOLDOWN_S", 3600.0)
    url = await _half_answering_server(nursery)
    running = await start_proxy(nursery, gate_profile(models, [_server(url=url)]), tmp_path)
    body = {"messages": CHAT, "max_tokens": 20, "temperature": 0}
    ref = await _alone(running, body, chat=True)
    async with _client(running) as client:
        got = await client.chat.completions.create(model="target", **body)  # type: ignore[call-overload]
        again = await client.chat.completions.create(model="target", **body)  # type: ignore[call-overload]
    assert got.choices[0].message.content == ref == again.choices[0].message.content
    g = _gate(running)
    assert g["fresh_no_draft"] == 2 and g["drafter_failures"] == 1  # then cooling down: not asked
    assert g["approved"] + g["corrected"] + g["rejected"] == 0
    running.shutdown.set()


# ---- the command line ------------------------------------------------------------------


def test_gate_start_refuses_other_modes(tmp_path: Path) -> None:
    from tightwad_core.cli import main

    cfg = tmp_path / "t.toml"
    cfg.write_text('[profiles.plain]\nmode = "direct"\n[profiles.plain.target]\nbackend = "openai"\n'
                   'url = "http://127.0.0.1:9"\n')
    res = CliRunner().invoke(main, ["gate", "start", "--config", str(cfg), "--profile", "plain"])
    assert res.exit_code == 2
    assert 'not "gate"' in res.output and len(res.output.strip().splitlines()) == 1


async def test_gate_status_on_json_that_is_no_object(nursery) -> None:  # type: ignore[no-untyped-def]
    from tightwad_core.cli import main

    url = await _half_answering_server(nursery, "list")
    res = await trio.to_thread.run_sync(lambda: CliRunner().invoke(main, ["gate", "status", "--url", url]))
    assert res.exit_code == 1 and "not a status object" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


# ---- requests the gate does not review as drafts -------------------------------------------


def test_malformed_logprobs_are_a_failed_review() -> None:
    from tightwad_plugins.modes.gate_review import parse_scores

    good = {"token_id:5": -0.1}
    for bad_row in ({"token_id:x": -0.1}, {"token_id:5": None}, [["token_id:5", -0.1]], {5: -0.1},
                    {"token_id:5": "nan"}):
        lp = {"top_logprobs": [None, bad_row, good], "token_logprobs": [None, -0.1, -0.1]}
        with pytest.raises(BackendError, match="malformed logprobs"):
            parse_scores(lp, 1, [5], False, frozenset({0}), 2.0)
    with pytest.raises(BackendError, match="malformed logprobs"):
        parse_scores({"top_logprobs": ["x", "y", "z"], "token_logprobs": [None] * 3}, 1, [5], False,
                     frozenset({0}), 2.0)


def test_cache_holds_a_bounded_amount_of_text() -> None:
    from tightwad_core.records import GenRequest, Result, Usage

    cache = AnswerCache(100, max_chars=25)
    keys = [cache_key(GenRequest(kind="completion", prompt=f"p{i}", max_tokens=8, temperature=0.0))
            for i in range(4)]
    for k in keys[:3]:
        cache.put(k, Result(text="x" * 10, finish_reason="stop", usage=Usage(1, 10)))
    assert len(cache) == 2 and cache.chars == 20 and cache.evictions == 1  # 30 > 25: the oldest goes
    cache.put(keys[3], Result(text="y" * 26, finish_reason="stop", usage=Usage(1, 26)))  # over the budget alone
    assert cache.get(keys[3]) is None and cache.chars == 20
    cache.put(keys[2], Result(text="z", finish_reason="stop", usage=Usage(1, 1)))  # replacing: counted once
    assert cache.chars == 11 and len(cache) == 2


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


async def test_tool_requests_are_relayed_not_drafted(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    prof = gate_profile(models, [_server(models["near"])], cache_entries=8)
    running = await start_proxy(nursery, prof, tmp_path)
    body = {"messages": CHAT, "max_tokens": 16, "temperature": 0, "tools": TOOLS}
    ref = await _alone(running, body, chat=True)
    async with _client(running) as client:
        got = await client.chat.completions.create(model="target", **body)  # type: ignore[call-overload]
        parts = [ev.choices[0].delta.content or "" async for ev in
                 await client.chat.completions.create(model="target", stream=True, **body)  # type: ignore[call-overload]
                 if ev.choices]
        again = await client.chat.completions.create(model="target", **body)  # type: ignore[call-overload]
    assert got.choices[0].message.content == ref == "".join(parts) == again.choices[0].message.content
    g = _gate(running)
    assert g["relayed"] == 3 and g["cached"] == 0 and g["cache"]["size"] == 0
    assert g["drafters"][0]["responses"] == 0 and g["approved"] + g["corrected"] + g["rejected"] == 0
    running.shutdown.set()


# ---- contexts: the drafter's, the target's --------------------------------------------------


async def test_drafter_context_too_small(nursery, tmp_path, models, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gate_fleet, "COOLDOWN_S", 3600.0)
    twin = BackendConfig(backend="llama-server", model_path=str(models["target"]), ctx_size=256, parallel=1,
                         threads=1)  # 256 tokens of context; the target has 1024
    prof = gate_profile(models, [twin])
    prof = Profile(**{**{f: getattr(prof, f) for f in prof.__struct_fields__},  # type: ignore[attr-defined]
                      "target": BackendConfig(backend="worker", model_path=str(models["target"]),
                                              ctx_size=1024, parallel=1, threads=1)})
    running = await start_proxy(nursery, prof, tmp_path)
    # an answer longer than the drafter's context: its draft stops early, unfinished; the review
    # approves every token of it and the target writes the rest (counted corrected, all kept)
    body = {"prompt": PROMPT, "max_tokens": 250, "temperature": 0}
    ref = await _alone(running, body)
    async with _client(running) as client:
        got = await client.completions.create(model="target", **body)
        last = _gate(running)["last"]
        assert got.choices[0].text == ref and got.choices[0].finish_reason == "length"
        assert got.usage is not None and got.usage.completion_tokens == 250
        assert last["verdict"] == "corrected" and last["kept"] == last["draft_tokens"] < 250
        assert last["target_tokens"] == 250 - last["kept"]
        # a prompt longer than the drafter's context: it refuses (400), is not benched for it, and
        # the target answers
        long = {"prompt": "the cat sat on the mat " * 60, "max_tokens": 8, "temperature": 0}
        ref_long = await _alone(running, long)
        for _ in range(2):
            assert (await client.completions.create(model="target", **long)).choices[0].text == ref_long
    g = _gate(running)
    (d,) = g["drafters"]
    assert d["refused"] == 2 and d["failures"] == 0 and d["usable"] and "ctx_size" in d["last_error"]
    assert g["fresh_no_draft"] == 2 and g["drafter_failures"] == 0 and g["corrected"] == 1
    running.shutdown.set()


def _small_target(models: dict[str, Path], drafters: list[BackendConfig], **gate: Any) -> Profile:
    prof = gate_profile(models, drafters, **gate)
    fields = {f: getattr(prof, f) for f in prof.__struct_fields__}  # type: ignore[attr-defined]
    fields["target"] = BackendConfig(backend="worker", model_path=str(models["target"]), ctx_size=256,
                                     parallel=1, threads=1)
    return Profile(**fields)


@pytest.mark.parametrize("fail_open", [False, True])
async def test_review_beyond_the_target_context_is_400(nursery, tmp_path, models, fail_open):  # type: ignore[no-untyped-def]
    # the drafter (512 tokens of context) writes 250 tokens; prompt + draft do not fit the
    # target's 256: the client's request is too long, whatever fail_open says
    running = await start_proxy(nursery, _small_target(models, [_server(models["target"])],
                                                       fail_open=fail_open), tmp_path)
    async with _client(running) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.completions.create(model="target", prompt=PROMPT, max_tokens=250, temperature=0)
    assert err.value.status_code == 400 and "target.ctx_size" in str(err.value)
    g = _gate(running)
    assert g["unreviewed"] == 0 and g["review_failures"] == 0 and g["drafters"][0]["responses"] == 1
    running.shutdown.set()


async def test_continuation_cut_by_the_target_context_is_length(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    url = await _half_answering_server(nursery)  # no draft: the target answers alone, cut by its context
    running = await start_proxy(nursery, _small_target(models, [_server(url=url)]), tmp_path)
    body = {"prompt": PROMPT, "max_tokens": 250, "temperature": 0}
    target = running.state.backends["target"]
    async with httpx.AsyncClient(timeout=60) as c:
        alone = (await c.post(target.base_url + "/v1/completions", json=body)).json()
    assert alone["choices"][0]["finish_reason"] == "length" and alone["usage"]["completion_tokens"] < 250
    async with _client(running) as client:
        got = await client.completions.create(model="target", **body)
    assert got.choices[0].text == alone["choices"][0]["text"] and got.choices[0].finish_reason == "length"
    assert got.usage is not None and got.usage.completion_tokens == alone["usage"]["completion_tokens"]
    g = _gate(running)
    assert g["fresh_no_draft"] == 1 and g["target_tokens_generated"] == got.usage.completion_tokens
    running.shutdown.set()


async def test_text_drafter_gets_no_stop_strings(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    from conftest import ServerProc

    twin = await trio.to_thread.run_sync(lambda: ServerProc(models["target"], tmp_path / "twin.log",
                                                            parallel=1, ctx=512))
    try:
        text_drafter = BackendConfig(backend="openai", url=twin.url)  # not a token backend: writes text
        running = await start_proxy(nursery, gate_profile(models, [text_drafter]), tmp_path)
        assert _gate(running)["drafters"][0]["writes"] == "text"
        drafter = running.state.backends["drafters.0"]
        asked: list[Any] = []
        own_generate = drafter.generate

        async def recording(req: Any) -> Any:  # what the drafter is asked, then its real answer
            asked.append(req)
            return await own_generate(req)

        drafter.generate = recording
        plain = await _alone(running, {"prompt": PROMPT, "max_tokens": 30, "temperature": 0})
        body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": [" yo"]}
        async with _client(running) as client:
            got = await client.completions.create(model="target", **body)
        # a server that stops at a stop string reports a natural end, which the review
        # would hold against the draft: the gate cuts text drafts at stop strings itself
        assert len(asked) == 1 and asked[0].stop == () and asked[0].max_tokens == 30
        assert got.choices[0].text == plain[: plain.index(" yo")] and got.choices[0].finish_reason == "stop"
        assert _gate(running)["drafters"][0]["responses"] == 1
        running.shutdown.set()
    finally:
        await trio.to_thread.run_sync(twin.stop)


async def test_fresh_answer_with_a_stop_string(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    # rejected: the target answers afresh and stops at the stop string; usage and the target's
    # own token count are what the target alone reports (no end marker of the gate's counted)
    running = await start_proxy(nursery, gate_profile(models, [_server(models["other"])]), tmp_path)
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": [" yo"]}
    target = running.state.backends["target"]
    async with httpx.AsyncClient(timeout=60) as c:
        alone = (await c.post(target.base_url + "/v1/completions", json=body)).json()
    async with _client(running) as client:
        got = await client.completions.create(model="target", **body)
    assert got.choices[0].text == alone["choices"][0]["text"] and got.choices[0].finish_reason == "stop"
    assert got.usage is not None and got.usage.completion_tokens == alone["usage"]["completion_tokens"]
    g = _gate(running)
    assert g["last"]["verdict"] == "rejected"
    assert g["last"]["target_tokens"] == g["target_tokens_generated"] == alone["usage"]["completion_tokens"]
    running.shutdown.set()

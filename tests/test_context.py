"""A chat longer than the target's context: a clear 400 that says what was
needed, what is allowed and what to raise, in every mode; or, where the
profile opts in, Ollama-style truncation of the oldest turns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import start_proxy

from tightwad_core.chat.truncate import drop_oldest
from tightwad_core.config.profiles import BackendConfig, Profile, SpeculationConfig
from tightwad_core.testing.tinymodels import tiny_pair

LONG = "alpha beta gamma delta " * 120  # several hundred tokens of the tiny vocabulary
CTX = 256


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_pair(tmp_path_factory.mktemp("ctx"))


def _profile(pair: tuple[Path, Path], mode: str, **kw: Any) -> Profile:
    draft, target = pair
    if mode == "direct":
        return Profile(mode="direct", listen="127.0.0.1:0", target=BackendConfig(
            backend="llama-server", model_path=str(target), ctx_size=CTX, parallel=1, threads=1), **kw)
    return Profile(mode="speculative", listen="127.0.0.1:0",
                   target=BackendConfig(backend="worker", model_path=str(target), ctx_size=CTX,
                                        parallel=1, threads=1),
                   draft=BackendConfig(backend="llama-server", model_path=str(draft), ctx_size=1024,
                                       parallel=1, threads=1),
                   speculation=SpeculationConfig(max_draft_tokens=2, verifier="worker"), **kw)


@pytest.mark.parametrize("mode", ["direct", "speculative"])
async def test_over_long_chat_gets_a_clear_400(nursery, tmp_path: Path, pair, mode: str) -> None:
    running = await start_proxy(nursery, _profile(pair, mode), tmp_path)
    async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
        for stream in (False, True):
            r = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": LONG}], "max_tokens": 8, "stream": stream})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "context_length_exceeded" and err["n_ctx"] == CTX, err
            assert err["n_prompt_tokens"] > CTX, err
            msg = err["message"]
            assert f"needs {err['n_prompt_tokens']} tokens" in msg and f"the {CTX} allowed" in msg, msg
            assert "`target.ctx_size`" in msg and "http" not in msg, msg  # no backend URL
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        r = await client.post("/api/chat", json={"model": model, "stream": False,
                                                  "messages": [{"role": "user", "content": LONG}]})
        assert r.status_code == 400 and "tokens of context" in r.json()["error"], r.text
    running.shutdown.set()


@pytest.mark.parametrize("mode", ["direct", "speculative"])
async def test_truncate_oldest_on_ollama_routes(nursery, tmp_path: Path, pair, mode: str) -> None:
    running = await start_proxy(nursery, _profile(pair, mode, truncate="oldest"), tmp_path)
    served = await running.state.served_model()
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "alpha beta"}]
    async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
        for stream in (False, True):
            r = await client.post("/api/chat", json={"model": served, "messages": chat, "stream": stream,
                                                      "options": {"num_predict": 4, "temperature": 0}})
            assert r.status_code == 200, r.text
            last = [line for line in r.text.splitlines() if line.strip()][-1]
            final = httpx.Response(200, content=last).json()
            assert final["done"] is True and 0 < final["prompt_eval_count"] < CTX, final
            for name in ("load_duration", "prompt_eval_duration", "eval_duration", "total_duration"):
                assert final[name] > 0, (name, final)
            assert final["total_duration"] >= final["load_duration"] + final["prompt_eval_duration"]
        # the OpenAI routes never truncate: a client there gets the error
        r = await client.post("/v1/chat/completions", json={"messages": chat, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    running.shutdown.set()


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "system"}, {"role": "user", "n": 1}, {"role": "assistant"}, {"role": "user", "n": 2}],
     [{"role": "system"}, {"role": "assistant"}, {"role": "user", "n": 2}]),
    ([{"role": "user", "n": 1}, {"role": "assistant", "tool_calls": [1]}, {"role": "tool"}, {"role": "tool"},
      {"role": "user", "n": 2}],
     [{"role": "assistant", "tool_calls": [1]}, {"role": "tool"}, {"role": "tool"}, {"role": "user", "n": 2}]),
    ([{"role": "assistant", "tool_calls": [1]}, {"role": "tool"}, {"role": "user", "n": 2}],
     [{"role": "user", "n": 2}]),  # a call goes with its results
    ([{"role": "system"}, {"role": "user"}], None),  # nothing left to drop
    ([], None),
])
def test_drop_oldest(messages: list[dict[str, Any]], expected: list[dict[str, Any]] | None) -> None:
    assert drop_oldest(messages) == expected

"""`tightwad moe bench` against a real llama-server on a generated MoE model,
against the real proxy speculating over the tiny pair, against a port with
nothing on it, and against a small fault-injecting server that cuts one
stream mid-answer."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import ServerProc, start_proxy

from tightwad_core.config.profiles import BackendConfig, Profile, SpeculationConfig
from tightwad_core.moe.bench import percentile
from tightwad_core.runtime.procs import free_port
from tightwad_core.testing.tinymodels import tiny_pair
from tightwad_core.testing.tinymoe import write_tiny_moe

EXE = str(Path(sys.executable).parent / "tightwad")


def bench_argv(url: str, *extra: str) -> list[str]:
    return [EXE, "moe", "bench", "--url", url, *extra]


def check_consistent(doc: dict[str, Any]) -> None:
    """The summary is what the per-request figures give."""
    done = [r for r in doc["results"] if r["state"] == "done"]
    s = doc["summary"]
    assert s["done"] == len(done)
    assert s["ttft_median_s"] == pytest.approx(statistics.median(r["ttft_s"] for r in done), abs=2e-4)
    assert s["ttft_p90_s"] == pytest.approx(percentile([r["ttft_s"] for r in done], 90), abs=2e-4)
    rates = [r["tok_s"] for r in done if r["tok_s"] is not None]
    assert s["tok_s_median"] == pytest.approx(statistics.median(rates), rel=1e-3)
    assert s["tokens"] == sum(r["tokens"] for r in doc["results"])
    assert s["tok_s_aggregate"] == pytest.approx(s["tokens"] / s["wall_s"], rel=2e-3)
    assert max(r["seconds"] for r in done) <= s["wall_s"] + 1e-3


# --------------------------------------------------------------------------- pure logic


@pytest.mark.parametrize(("values", "q", "want"), [
    ([], 90, None), ([3.0], 90, 3.0), ([1.0, 2.0], 50, 1.0), ([4.0, 1.0, 3.0, 2.0], 90, 4.0),
    ([float(i) for i in range(1, 11)], 90, 9.0), ([float(i) for i in range(1, 11)], 100, 10.0),
])
def test_percentile_is_nearest_rank(values: list[float], q: float, want: float | None) -> None:
    assert percentile(values, q) == want


# --------------------------------------------------------------------------- llama-server


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    d = tmp_path_factory.mktemp("moe-bench")
    srv = ServerProc(write_tiny_moe(d / "tiny-moe.gguf", seed=3), d / "srv.log", parallel=2, ctx=256)
    yield srv
    srv.stop()


def test_bench_llama_server_json(moe_server: ServerProc) -> None:
    out = subprocess.run(bench_argv(moe_server.url + "/v1/", "--requests", "5", "--concurrency", "2",
                                    "--max-tokens", "12", "--json"),
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["target"] == {"url": moe_server.url, "model": "tiny-moe", "tightwad": False}
    assert doc["token_count"] == "usage" and doc["complete"] is True and doc["acceptance"] is None
    assert [r["index"] for r in doc["results"]] == list(range(5))
    for r in doc["results"]:
        assert r["state"] == "done" and r["error"] is None, r
        assert r["ttft_s"] > 0 and 0 < r["tokens"] <= 12 and r["seconds"] >= r["ttft_s"]
        assert "accepted" not in r
    check_consistent(doc)
    # the shipped prompts, in turn
    assert doc["results"][0]["prompt"].startswith("Write a Python function")


def test_bench_llama_server_table(moe_server: ServerProc, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\nthe cat sat on\n")
    out = subprocess.run(bench_argv(moe_server.url, "--requests", "3", "--max-tokens", "8",
                                    "--prompts", str(prompts)),
                         check=False, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0, out.stderr
    assert "tiny-moe at " + moe_server.url in out.stdout
    assert "3 done" in out.stdout and "TTFT median" in out.stdout and "accepted" not in out.stdout
    assert out.stdout.count("hello there") == 2 and out.stdout.count("the cat sat on") == 1


# --------------------------------------------------------------------------- the proxy


def spec_profile(pair: tuple[Path, Path]) -> Profile:
    draft, target = pair
    be: dict[str, Any] = {"backend": "llama-server", "ctx_size": 512, "threads": 1}
    return Profile(mode="speculative", listen="127.0.0.1:0",
                   target=BackendConfig(model_path=str(target), parallel=5, **be),
                   draft=BackendConfig(model_path=str(draft), parallel=1, **be),
                   speculation=SpeculationConfig(max_draft_tokens=4, verifier="prefix-batch"))


async def test_bench_speculative_proxy_shows_acceptance(nursery: trio.Nursery, tmp_path: Path) -> None:
    running = await start_proxy(nursery, spec_profile(tiny_pair(tmp_path / "pair", seed=0)), tmp_path)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["the cat sat on", "once upon a time there", "a b c d e f"]))
    out = await trio.run_process(bench_argv(running.url, "--requests", "3", "--max-tokens", "24",
                                            "--prompts", str(prompts), "--json"),
                                 capture_stdout=True, capture_stderr=True, check=False)
    assert out.returncode == 0, out.stderr.decode()
    doc = json.loads(out.stdout)
    assert doc["target"]["tightwad"] is True and doc["target"]["mode"] == "speculative"
    assert doc["target"]["verifier"]["rung"] == "prefix-batch"
    status = running.state.mode.status()
    acc = doc["acceptance"]
    # a fresh proxy: the run's counters are the proxy's totals
    assert acc["drafted"] == status["drafted"] > 0 and acc["accepted"] == status["accepted"]
    assert 0 < acc["accepted"] <= acc["drafted"]  # the tiny pair agrees about 3 times in 4
    assert acc["rate"] == pytest.approx(acc["accepted"] / acc["drafted"], abs=1e-4)
    # one request at a time: per request too, adding up to the run's
    assert sum(r["drafted"] for r in doc["results"]) == acc["drafted"]
    assert sum(r["accepted"] for r in doc["results"]) == acc["accepted"]
    assert all(r["state"] == "done" and r["ttft_s"] > 0 and r["tokens"] > 0 for r in doc["results"])
    assert doc["token_count"] == "usage"
    check_consistent(doc)

    # concurrent requests: the run's acceptance only
    out = await trio.run_process(bench_argv(running.url, "--requests", "4", "--concurrency", "2",
                                            "--max-tokens", "16", "--prompts", str(prompts), "--json"),
                                 capture_stdout=True, capture_stderr=True, check=False)
    assert out.returncode == 0, out.stderr.decode()
    doc2 = json.loads(out.stdout)
    after = running.state.mode.status()
    assert doc2["acceptance"]["drafted"] == after["drafted"] - status["drafted"] > 0
    assert doc2["acceptance"]["accepted"] == after["accepted"] - status["accepted"]
    assert all(r["drafted"] is None for r in doc2["results"])

    # the table: an accepted column and the run's acceptance under it
    out = await trio.run_process(bench_argv(running.url, "--requests", "2", "--max-tokens", "16",
                                            "--prompts", str(prompts)),
                                 capture_stdout=True, capture_stderr=True, check=False,
                                 env={**os.environ, "COLUMNS": "160"})
    assert out.returncode == 0, out.stderr.decode()
    text = " ".join(out.stdout.decode().split())
    final = running.state.mode.status()
    assert "accepted" in text and "2 done" in text
    assert (f"accepted {final['accepted'] - after['accepted']} of "
            f"{final['drafted'] - after['drafted']} drafted") in text, text
    running.shutdown.set()


# --------------------------------------------------------------------------- faults


def test_target_down_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run(bench_argv(url, "--json"), check=False, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"error: cannot reach {url}") and out.stderr.count("\n") == 1, out.stderr
    out = subprocess.run(bench_argv(url, "--token-env", "TIGHTWAD_TEST_NO_SUCH_VAR"),
                         check=False, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.strip() == \
        "error: --token-env TIGHTWAD_TEST_NO_SUCH_VAR: the variable is not set"


TOKEN = "s3cret-bench"
STREAMING = trio.Event()  # set once a slow stream has sent a chunk (re-made per test)


def _event(obj: dict[str, Any]) -> bytes:
    data = f"data: {json.dumps(obj)}\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _fault_handler(stream: trio.SocketStream) -> None:
    """One request per connection. Chat answers stream three words without usage;
    a prompt holding "cut" gets two and then the connection closes mid-body, one
    holding "slow" never ends, one holding "endless line" sends one line that never
    ends, one holding "endless error" an error status whose body never ends.
    Anything without the bearer token gets 401."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some()
        if not data:
            return
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += await stream.receive_some()
    path = lines[0].split()[1]

    async def answer(status: str, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        await stream.send_all(f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                              f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode() + data)

    if headers.get("authorization") != f"Bearer {TOKEN}":
        await answer("401 Unauthorized", {"error": {"message": "no token"}})
    elif path == "/v1/models":
        await answer("200 OK", {"object": "list", "data": [{"id": "fault-model"}]})
    elif path == "/v1/chat/completions":
        prompt = json.loads(body)["messages"][0]["content"]
        status = "500 Internal Server Error" if "endless error" in prompt else "200 OK"
        await stream.send_all(f"HTTP/1.1 {status}\r\ncontent-type: text/event-stream\r\n"
                              "transfer-encoding: chunked\r\nconnection: close\r\n\r\n".encode())
        if "endless" in prompt:  # until the client hangs up
            head = b"[/INST] broke: " if "error" in prompt else b'data: {"choices": [{"delta": {"content": "'
            filler = b"x" * 65536
            try:
                part = head
                while True:
                    await stream.send_all(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    part = filler
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        if "slow" in prompt:  # streams until the client goes away
            try:
                while True:
                    await stream.send_all(_event({"choices": [{"index": 0, "delta": {"content": " w"},
                                                               "finish_reason": None}]}))
                    STREAMING.set()
                    await trio.sleep(0.05)
            except trio.BrokenResourceError:
                return
        for i, word in enumerate(("one", " two", " three")):
            if "cut" in prompt and i == 2:
                await stream.aclose()  # mid-answer: no last chunk, no [DONE]
                return
            await stream.send_all(_event({"choices": [{"index": 0, "delta": {"content": word},
                                                       "finish_reason": None}]}))
            await trio.sleep(0.01)
        await stream.send_all(_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        await stream.send_all(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    else:
        await answer("404 Not Found", {"error": {"message": "not found"}})
    await stream.aclose()


async def test_a_stream_cut_mid_answer_fails_that_request_only(nursery: trio.Nursery,
                                                               tmp_path: Path) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, _fault_handler, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["fine one", "cut this one", "fine two"]))
    out = await trio.run_process(
        bench_argv(url, "--requests", "3", "--concurrency", "3", "--prompts", str(prompts),
                   "--token-env", "TIGHTWAD_TEST_BENCH_TOKEN", "--json"),
        capture_stdout=True, capture_stderr=True, check=False,
        env={**os.environ, "TIGHTWAD_TEST_BENCH_TOKEN": TOKEN})
    assert out.returncode == 0, out.stderr.decode()
    doc = json.loads(out.stdout)
    assert doc["target"]["model"] == "fault-model" and doc["target"]["tightwad"] is False
    assert doc["token_count"] == "chunks"  # no usage in these streams
    ok, cut, ok2 = doc["results"]
    for r in (ok, ok2):
        assert r["state"] == "done" and r["tokens"] == 3 and r["ttft_s"] > 0 and r["error"] is None
    assert cut["state"] == "failed" and cut["tokens"] == 2
    assert "RemoteProtocolError" in cut["error"], cut["error"]
    assert doc["summary"]["done"] == 2 and doc["summary"]["failed"] == 1
    check_consistent(doc)

    # the table says the same
    out = await trio.run_process(
        bench_argv(url, "--requests", "3", "--prompts", str(prompts), "--token-env", "TOK"),
        capture_stdout=True, capture_stderr=True, check=False,
        env={**os.environ, "TOK": TOKEN, "COLUMNS": "160"})
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert "failed" in text and "RemoteProtocolError" in text and "2 done" in text and "1 failed" in text


async def test_ctrl_c_prints_what_was_measured(nursery: trio.Nursery, tmp_path: Path) -> None:
    global STREAMING
    STREAMING = trio.Event()
    listeners = await nursery.start(partial(trio.serve_tcp, _fault_handler, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["fine one", "slow one", "fine two"]))
    proc = await trio.lowlevel.open_process(
        bench_argv(url, "--requests", "3", "--prompts", str(prompts), "--token-env", "TOK", "--json"),
        stdout=subprocess.PIPE, env={**os.environ, "TOK": TOKEN})
    assert proc.stdout is not None
    out = b""

    async def read() -> None:
        nonlocal out
        async for data in proc.stdout:  # type: ignore[union-attr]
            out += data

    async with trio.open_nursery() as inner:
        inner.start_soon(read)
        with trio.fail_after(30):
            await STREAMING.wait()
            await trio.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 130
    doc = json.loads(out)
    assert doc["complete"] is False
    first, slow, last = doc["results"]
    assert first["state"] == "done" and first["tokens"] == 3
    assert slow["state"] == "cancelled" and slow["tokens"] > 0 and slow["ttft_s"] > 0
    assert last["state"] == "waiting"
    assert doc["summary"]["done"] == 1 and doc["summary"]["cancelled"] == 1
    assert doc["summary"]["not_sent"] == 1


async def test_endless_answers_fail_their_request_and_text_is_not_markup(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """A stream line or an error body that never ends fails that request once
    the bench's cap is reached (1 MiB a line, 64 KiB of an error); prompts and
    error text holding rich markup show as they are."""
    listeners = await nursery.start(partial(trio.serve_tcp, _fault_handler, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["What is [/INST]?", "endless line", "endless error"]))
    argv = bench_argv(url, "--requests", "3", "--concurrency", "3", "--prompts", str(prompts),
                      "--token-env", "TOK")
    env = {**os.environ, "TOK": TOKEN, "COLUMNS": "200"}
    with trio.fail_after(30):
        out = await trio.run_process([*argv, "--json"], capture_stdout=True, capture_stderr=True,
                                     check=False, env=env)
    assert out.returncode == 0, out.stderr.decode()
    fine, line, error = json.loads(out.stdout)["results"]
    assert fine["state"] == "done" and fine["prompt"] == "What is [/INST]?"
    assert line["state"] == "failed" and line["error"] == "a stream line is longer than 1 MiB"
    assert error["state"] == "failed" and error["error"].startswith("HTTP 500: [/INST] broke: xxx")
    with trio.fail_after(30):
        out = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                     env=env)
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert "What is [/INST]?" in text and "HTTP 500: [/INST] broke" in text, text
    assert "1 done" in text and "2 failed" in text

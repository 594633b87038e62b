"""Routing profiles: the worker's `--record-routing` counts on real llama.cpp
runs of generated MoE GGUFs (a router forced onto chosen experts, and a
random one under batched decodes), `tightwad moe profile` and `tightwad moe
summary` end to end, and what they refuse."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tightwad_core.moe.profile import (
    LayerCounts,
    ProfileError,
    layer_skew,
    load_profile,
    parse_profile,
)
from tightwad_core.testing.tinymodels import write_tiny_model
from tightwad_core.testing.tinymoe import write_tiny_moe
from tightwad_plugins.worker.cli import RunningWorker, serve_worker
from tightwad_plugins.worker.routing import shard_paths

EXE = str(Path(sys.executable).parent / "tightwad")
FORCED = {0: [1, 4], 1: [0, 3], 2: [2, 5]}  # layer -> the two experts its router always picks
N_EXPERT, K = 6, 2
PROMPTS = ["Tell me about the sea and the ships on it.", "Two plus two?",
           "Write three words about rain in the city at night, please."]

pytestmark = pytest.mark.usefixtures("llama_cpp_installed")


@pytest.fixture(scope="module")
def forced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_moe(tmp_path_factory.mktemp("moe") / "forced.gguf", seed=5, n_layer=3,
                          n_expert=N_EXPERT, n_expert_used=K, router_bias=FORCED)


@pytest.fixture(scope="module")
def spread(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_moe(tmp_path_factory.mktemp("moe") / "spread.gguf", seed=2, n_layer=2,
                          n_expert=8, n_expert_used=2)


async def start(nursery: trio.Nursery, model: Path, **kw: Any) -> RunningWorker:
    kw.setdefault("ctx", 256)
    kw.setdefault("threads", 1)
    kw.setdefault("slots", 3)
    return await nursery.start(partial(serve_worker, model, "127.0.0.1", 0, **kw))


async def chat(client: httpx.AsyncClient, prompt: str, n: int = 12) -> None:
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text


async def greedy_ids(client: httpx.AsyncClient, prompt: str, n: int = 16) -> list[int]:
    r = await client.post("/v1/completions", json={
        "prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 1,
        "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    return [int(t.rpartition(":")[2]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


async def at_once(client: httpx.AsyncClient, fn: Any, prompts: list[str]) -> list[Any]:
    out: list[Any] = [None] * len(prompts)

    async def one(i: int) -> None:
        out[i] = await fn(client, prompts[i])

    async with trio.open_nursery() as n:
        for i in range(len(prompts)):
            n.start_soon(one, i)
    return out


async def routing(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/v1/tightwad/routing")
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


# --------------------------------------------------------------------- the worker


async def test_forced_router_counts_every_evaluated_token(nursery: trio.Nursery,
                                                         forced: Path) -> None:
    w = await start(nursery, forced, record_routing=True)
    async with httpx.AsyncClient(base_url=w.url, timeout=60) as client:
        info = (await client.get("/v1/tightwad/info")).json()
        assert info["record_routing"] is True and info["routing"]["moe_layers"] == 3
        await at_once(client, chat, PROMPTS)  # three sequences share each decode
        prof = await routing(client)
        info = (await client.get("/v1/tightwad/info")).json()
        assert info["batched_decodes"] > 0
        assert prof["tokens"] == info["evaluated_tokens"] > 3 * 12
        assert prof["batches"] == info["decodes"]  # one ubatch per decode here
        assert (prof["format"], prof["version"], prof["model"]) == (
            "tightwad-moe-routing", 1, "forced.gguf")
        assert (prof["expert_count"], prof["expert_used_count"]) == (N_EXPERT, K)
        n = prof["tokens"]
        for layer in prof["layers"]:
            hot = FORCED[layer["layer"]]
            assert layer["counts"] == [n if e in hot else 0 for e in range(N_EXPERT)], layer
        assert [x["layer"] for x in prof["layers"]] == [0, 1, 2]
        parse_profile(prof, "the worker's profile")  # the reader's checks agree

        # reset hands back the counts it clears; counting goes on from zero
        r = await client.post("/v1/tightwad/routing/reset")
        assert r.status_code == 200 and r.json() == prof
        empty = await routing(client)
        assert empty["tokens"] == empty["batches"] == 0
        assert all(c == 0 for x in empty["layers"] for c in x["counts"])
        before = info["evaluated_tokens"]
        await chat(client, "One more question about the sea.", 4)
        after = (await client.get("/v1/tightwad/info")).json()["evaluated_tokens"]
        assert (await routing(client))["tokens"] == after - before > 0


async def test_counts_under_batching_and_the_output_does_not_change(
        nursery: trio.Nursery, spread: Path) -> None:
    """Three requests at once give the counts of the same three alone (each on a
    fresh worker, so that no cached prefix is skipped), and recording leaves the
    greedy tokens as they are without it."""
    batched = await start(nursery, spread, record_routing=True)
    plain = await start(nursery, spread, slots=1)
    async with httpx.AsyncClient(base_url=batched.url, timeout=60) as c:
        ids_batched = await at_once(c, greedy_ids, PROMPTS)
        assert (await c.get("/v1/tightwad/info")).json()["batched_decodes"] > 0
        together = await routing(c)
    ids_alone, parts = [], []
    for p in PROMPTS:
        alone = await start(nursery, spread, record_routing=True, slots=1)
        async with httpx.AsyncClient(base_url=alone.url, timeout=60) as c:
            ids_alone.append(await greedy_ids(c, p))
            parts.append(await routing(c))
        alone.shutdown.set()
    async with httpx.AsyncClient(base_url=plain.url, timeout=60) as c:
        ids_plain = [await greedy_ids(c, p) for p in PROMPTS]
        info = (await c.get("/v1/tightwad/info")).json()
        assert info["record_routing"] is False and info["routing"] is None
        r = await c.get("/v1/tightwad/routing")
        assert r.status_code == 404 and "--record-routing" in r.json()["error"]["message"]
    assert ids_alone == ids_plain  # recording changes nothing the client sees
    assert ids_batched == ids_alone
    assert together["tokens"] == sum(p["tokens"] for p in parts)
    for i, layer in enumerate(together["layers"]):
        summed = [sum(p["layers"][i]["counts"][e] for p in parts) for e in range(8)]
        assert layer["counts"] == summed
        assert sum(c > 0 for c in summed) > K  # a real spread, not a forced router
        assert sum(summed) == together["tokens"] * K


async def test_dense_worker_says_it_has_no_experts(nursery: trio.Nursery,
                                                  tmp_path: Path) -> None:
    dense = write_tiny_model(tmp_path / "dense.gguf", seed=1)
    w = await start(nursery, dense, record_routing=True, slots=1)
    async with httpx.AsyncClient(base_url=w.url, timeout=60) as c:
        info = (await c.get("/v1/tightwad/info")).json()
        assert info["record_routing"] is True and info["routing"] is None
        r = await c.get("/v1/tightwad/routing")
        assert r.status_code == 409 and "has no experts" in r.json()["error"]["message"]


# --------------------------------------------------------------------- the commands


async def tightwad(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    res = await trio.run_process([EXE, *map(str, args)], capture_stdout=True,
                                 capture_stderr=True, check=False,
                                 env={**os.environ, **(env or {})})
    return res.returncode, res.stdout.decode(), res.stderr.decode()


async def test_profile_and_summary_end_to_end(forced: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS[:2]))
    out = tmp_path / "profile.json"
    rc, stdout, stderr = await tightwad("moe", "profile", forced, "--out", out, "--prompts",
                                        prompts, "--max-tokens", "6", "--threads", "1", "--json")
    assert rc == 0, stderr
    facts = json.loads(stdout)
    prof = load_profile(out)
    assert facts["tokens"] == prof.tokens > 2 * 6 and facts["prompts"] == 2
    assert facts["completion_tokens"] == 12 and facts["moe_layers"] == 3
    assert out.stat().st_mode & 0o777 == 0o644  # written by tightwad_core.runtime.atomic
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    for x in prof.layers:
        assert x.counts == tuple(prof.tokens if e in FORCED[x.layer] else 0
                                 for e in range(N_EXPERT))

    rc, stdout, stderr = await tightwad("moe", "summary", out, "--top", "2")
    assert rc == 0, stderr
    assert "hot ratio" in stdout and "entropy" in stdout and "█" in stdout
    assert "1:50.0% 4:50.0%" in stdout and "0:50.0% 3:50.0%" in stdout

    svg = tmp_path / "heat.svg"
    rc, stdout, stderr = await tightwad("moe", "summary", out, "--json", "--svg", svg)
    assert rc == 0, stderr
    summary = json.loads(stdout)
    for layer in summary["layers"]:
        hot = sorted(h["expert"] for h in layer["hottest"] if h["share"] > 0)
        assert hot == FORCED[layer["layer"]]
        assert layer["hot_ratio"] == N_EXPERT / K
        assert layer["entropy"] == pytest.approx(math.log(K) / math.log(N_EXPERT), abs=1e-4)
    assert svg.stat().st_mode & 0o777 == 0o644
    root = ET.parse(svg).getroot()
    cells = [e for e in root.iter("{http://www.w3.org/2000/svg}rect") if e.get("class") == "cell"]
    assert len(cells) == 3 * N_EXPERT
    texts = [e.text for e in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "expert" in texts and "layer" in texts and "uniform" in texts


async def test_profile_reads_a_running_worker(nursery: trio.Nursery, forced: Path,
                                              tmp_path: Path) -> None:
    w = await start(nursery, forced, record_routing=True, api_key="s3cret")
    async with httpx.AsyncClient(base_url=w.url, timeout=60,
                                 headers={"authorization": "Bearer s3cret"}) as c:
        await chat(c, PROMPTS[0], 5)
        want = await routing(c)
    out = tmp_path / "live.json"
    # a token goes only where --token-env says: never TIGHTWAD_API_KEY unasked
    rc, _, stderr = await tightwad("moe", "profile", "--worker", w.url, "--out", out,
                                   env={"TIGHTWAD_API_KEY": "s3cret"})
    assert rc == 1 and "bearer token" in stderr and not out.exists()
    rc, stdout, stderr = await tightwad("moe", "profile", "--worker", w.url + "/v1", "--out", out,
                                        "--token-env", "MY_TOKEN", env={"MY_TOKEN": "s3cret"})
    assert rc == 0, stderr
    assert json.loads(out.read_text()) == want and "wrote" in stdout


async def test_refusals(nursery: trio.Nursery, tmp_path: Path, spread: Path) -> None:
    dense = write_tiny_model(tmp_path / "dense.gguf", seed=1)
    rc, _, stderr = await tightwad("moe", "profile", dense, "--out", tmp_path / "x.json")
    assert rc == 2 and "dense model" in stderr and len(stderr.strip().splitlines()) == 1
    rc, _, stderr = await tightwad("moe", "profile", "--out", tmp_path / "x.json")
    assert rc == 2 and "MODEL" in stderr
    for flag in (["--max-tokens", "64"], ["--threads", "2"], ["--prompts", str(dense)]):
        rc, _, stderr = await tightwad("moe", "profile", "--worker", "http://127.0.0.1:9",
                                       "--out", tmp_path / "x.json", *flag)
        assert rc == 2 and stderr.strip() == (f"error: {flag[0]} is for a worker started on "
                                              "MODEL; --worker reads a running one"), stderr

    w = await start(nursery, spread, slots=1)  # no --record-routing
    rc, _, stderr = await tightwad("moe", "profile", "--worker", w.url, "--out",
                                   tmp_path / "x.json")
    assert rc == 1 and "start it with --record-routing" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "x.json").exists()

    good = {"format": "tightwad-moe-routing", "version": 1, "model": "m.gguf",
            "architecture": "llama", "expert_count": 4, "expert_used_count": 2, "tokens": 3,
            "batches": 1, "layers": [{"layer": 0, "counts": [3, 3, 0, 0]}]}
    bad = {"format": {**good, "format": "something-else"},
           "version": {**good, "version": 2},
           "sum": {**good, "layers": [{"layer": 0, "counts": [3, 2, 0, 0]}]},
           "over": {**good, "layers": [{"layer": 0, "counts": [4, 1, 1, 0]}]},
           "width": {**good, "layers": [{"layer": 0, "counts": [3, 3, 0]}]}}
    for name, body in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(body))
        rc, _, stderr = await tightwad("moe", "summary", path)
        assert rc == 2 and stderr.startswith("error: ") and "Traceback" not in stderr, name
        assert len(stderr.strip().splitlines()) == 1, stderr
    (tmp_path / "junk.json").write_text("{not json")
    rc, _, stderr = await tightwad("moe", "summary", tmp_path / "junk.json")
    assert rc == 2 and "not JSON" in stderr


# --------------------------------------------------------------------- pure logic


@pytest.mark.parametrize(("counts", "hot", "entropy", "cv"), [
    pytest.param((5, 5, 5, 5), 1.0, 1.0, 0.0, id="uniform"),
    pytest.param((10, 10, 0, 0), 2.0, 0.5, 1.0, id="always-the-same-two"),
    pytest.param((6, 2, 2, 0), 2.4, 0.6855, 0.8718, id="skewed"),
])
def test_skew_measures(counts: tuple[int, ...], hot: float, entropy: float, cv: float) -> None:
    s = layer_skew(LayerCounts(0, counts), top=1)
    assert (s.hot_ratio, s.entropy, s.cv) == pytest.approx((hot, entropy, cv), abs=1e-4)
    assert s.hottest[0] == (0, counts[0] / sum(counts))


@pytest.mark.parametrize(("change", "message"), [
    ({"tokens": 0}, "recorded no tokens"),
    ({"batches": 9}, "9 batches for 3 tokens"),
    ({"expert_used_count": 5}, "5 experts used per token of 4"),
    ({"version": True}, "version True"),
    ({"layers": [{"layer": 1, "counts": [3, 3, 0, 0]}, {"layer": 0, "counts": [3, 3, 0, 0]}]},
     "layer 0 comes after layer 1"),
])
def test_parse_profile_names_what_is_wrong(change: dict[str, Any], message: str) -> None:
    good = {"format": "tightwad-moe-routing", "version": 1, "model": "m.gguf",
            "architecture": "llama", "expert_count": 4, "expert_used_count": 2, "tokens": 3,
            "batches": 1, "layers": [{"layer": 0, "counts": [3, 3, 0, 0]}]}
    assert parse_profile(good, "p").tokens == 3
    with pytest.raises(ProfileError, match=message):
        parse_profile({**good, **change}, "p")


def test_a_split_gguf_is_read_in_all_its_files() -> None:
    first = Path("/m/big-00001-of-00003.gguf")
    assert [p.name for p in shard_paths(first, {"split.count": "3"})] == [
        "big-00001-of-00003.gguf", "big-00002-of-00003.gguf", "big-00003-of-00003.gguf"]
    assert shard_paths(Path("/m/one.gguf"), {}) == [Path("/m/one.gguf")]


# --------------------------------------------------------------------- odd answers and input


async def _odd_worker(stream: trio.SocketStream) -> None:
    """Answers GET /KIND/v1/tightwad/routing by KIND: an object that never
    ends, a JSON list, or text."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some()
        if not data:
            return
        buf += data
    kind = buf.split(b" ", 2)[1].decode().split("/")[1]
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
    try:
        if kind == "endless":
            await stream.send_all(head + b"transfer-encoding: chunked\r\n\r\n")
            part, filler = b'{"format": "', b"x" * (1 << 20)
            while True:
                await stream.send_all(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                part = filler
        body = b"[1, 2]" if kind == "list" else b"not json <html>"
        await stream.send_all(head + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def test_odd_worker_answers_are_one_line(nursery: trio.Nursery, tmp_path: Path) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, _odd_worker, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    out = tmp_path / "x.json"
    for kind, message in [("endless", "answered more than 64 MiB at /v1/tightwad/routing"),
                          ("list", "did not answer a JSON object"), ("text", "did not answer JSON")]:
        with trio.fail_after(60):
            rc, _, stderr = await tightwad("moe", "profile", "--worker",
                                           f"http://127.0.0.1:{port}/{kind}", "--out", out)
        assert rc == 1 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not out.exists()


def test_summary_prints_names_as_they_are(tmp_path: Path) -> None:
    good = {"format": "tightwad-moe-routing", "version": 1, "model": "odd [red]name[/].gguf",
            "architecture": "[bold]llama", "expert_count": 4, "expert_used_count": 2,
            "tokens": 3, "batches": 1, "layers": [{"layer": 0, "counts": [3, 3, 0, 0]}]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(good))
    res = subprocess.run([EXE, "moe", "summary", str(path)], capture_output=True, text=True,
                         check=False, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    assert "odd [red]name[/].gguf ([bold]llama): 3 tokens" in res.stdout, res.stdout


async def test_ctrl_c_while_profiling_names_the_logs(forced: Path, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = await trio.lowlevel.open_process(
        [EXE, "moe", "profile", str(forced), "--out", str(tmp_path / "x.json"), "--threads", "1"],
        stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.stderr is not None
    with trio.fail_after(60):
        while not list(tmp.glob("tightwad-profile-*/*")):  # the worker is being started
            await trio.sleep(0.05)
        await trio.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        err = b""
        async for data in proc.stderr:
            err += data
        assert await proc.wait() == 130
    line = err.decode().strip().splitlines()[-1]
    (run_dir,) = tmp.glob("tightwad-profile-*")
    assert line == f"error: interrupted (logs in {run_dir})", err.decode()
    assert not (tmp_path / "x.json").exists()

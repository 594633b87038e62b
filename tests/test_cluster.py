"""Cluster mode: a profile's target placed on real rpc-servers through the
transport plugins; placement, the pool's health, a worker down or of another
protocol at start, a worker killed mid-stream, and the TLS-token tunnel's
refusals."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from conftest import start_proxy

from tightwad_core.bench.link import LinkStats
from tightwad_core.config.profiles import ConfigError, Profile, validate
from tightwad_core.config.schema import ClusterConfig, RpcWorkerConfig
from tightwad_core.runtime import rpc
from tightwad_core.runtime.procs import StartupError, free_port
from tightwad_core.testing.tinymodels import write_tiny_model
from tightwad_plugins.placement.memory import MemoryProportional
from tightwad_plugins.transports.certs import load_or_create
from tightwad_plugins.transports.tls_token import TlsTokenTransport, open_tunnel, serve_tunnel

BODY = {"prompt": "once upon a time", "max_tokens": 24, "temperature": 0}


def _profile(model: Path, workers: list[dict[str, Any]] | None, **kw: Any) -> Profile:
    raw: dict[str, Any] = {"mode": "direct", "listen": "127.0.0.1:0",
                           "target": {"backend": "llama-server", "model_path": str(model),
                                      "ctx_size": 256, "parallel": 1, "threads": 1,
                                      "startup_timeout": 60}}
    if workers is not None:
        raw["cluster"] = {"workers": workers, **kw}
    return msgspec.convert(raw, Profile)


def _launched(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "port": free_port(), "launch": True, "threads": 1, **kw}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("cluster") / "c.gguf", seed=3, n_layer=4)


# --------------------------------------------------------------------------- placement


def test_memory_proportional_split() -> None:
    place = MemoryProportional()
    layers = {f"blk.{i}": 100 for i in range(8)}
    plan = place.assign(layers, {"big": 3000, "small": 1000})
    assert [plan[f"blk.{i}"] for i in range(8)] == ["big"] * 6 + ["small"] * 2
    # a device never gets more than it offers, even where rounding to whole layers would
    plan = place.assign(layers, {"a": 190, "b": 720})  # a's share: 167 B, 1.67 layers
    assert list(plan.values()).count("a") == 1
    with pytest.raises(ValueError, match="need 800 B but the pool offers 700 B"):
        place.assign(layers, {"a": 400, "b": 300})
    with pytest.raises(ValueError, match="does not fit"):  # enough in total, not per layer
        place.assign({"blk.0": 500, "blk.1": 500}, {"a": 600, "b": 450, "c": 100})


def test_cluster_config_errors_name_the_field(tmp_path: Path, model: Path) -> None:
    def bad(workers: list[dict[str, Any]], match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            validate(tmp_path / "t.toml", "p", _profile(model, workers), check_files=False)

    bad([], "at least one")
    bad([{"name": "a"}, {"name": "a", "port": 1}], "two workers are named 'a'")
    bad([{"name": "a", "host": "10.0.0.5", "launch": True}], "tightwad rpc-worker")
    bad([{"name": "a", "delay": "fast"}], "bad delay")
    bad([{"name": "a", "memory": "lots"}], "bad memory size")
    bad([{"name": "a b"}], "workers\\[0\\].name")


# --------------------------------------------------------------------------- the pool serving


async def test_profile_on_a_pool_gives_the_local_tokens(nursery, tmp_path, model):
    alone = await start_proxy(nursery, _profile(model, None), tmp_path / "alone", "alone")
    pooled = await start_proxy(nursery, _profile(model, [
        _launched("near"), _launched("far", transport="emulated", delay="2ms")]),
        tmp_path / "pool", "pool")
    async with httpx.AsyncClient(timeout=60) as c:
        want = (await c.post(alone.url + "/v1/completions", json=BODY)).json()["choices"][0]["text"]
        got = (await c.post(pooled.url + "/v1/completions", json=BODY)).json()["choices"][0]["text"]
        status = (await c.get(pooled.url + "/v1/tightwad/status")).json()
    assert got == want and got
    cluster = status["cluster"]
    assert cluster["placement"] == "memory-proportional" and cluster["output_local"] is True
    workers = {w["name"]: w for w in cluster["workers"]}
    assert [w["layers"] for w in workers.values()] == [2, 2]  # 4 layers, equal memory
    for w in workers.values():
        assert w["state"] == "up" and w["protocol"] == str(rpc.engine_version())
        assert w["devices"] and w["devices"][0]["total"] > 0
        assert w["bytes_up"] > 0 and w["bytes_down"] > 0 and w["round_trips"] > 0
    assert "emulated link (2 ms each way" in workers["far"]["transport"]
    # the launched target really runs on the pool: its command line names the relays
    args = pooled.state.backends["target"].process.argv  # type: ignore[attr-defined]
    assert args[args.index("--device") + 1] == "RPC0,RPC1"
    # all 4 + 1 layers offloaded (llama.cpp offloads the last N), the output layer's
    # tensors pulled back here; its slot in the split goes to the last device
    assert args[args.index("--n-gpu-layers") + 1] == "5"
    assert args[args.index("--tensor-split") + 1] == "2,3"
    assert args[args.index("--override-tensor") + 1].endswith("=CPU")


async def test_output_layer_kept_local_sends_hidden_states_not_logits(nursery, tmp_path, model):
    """With the output layer on the pool, the last worker sends back a row
    of logits per position; kept here, a hidden state: fewer bytes."""
    got = {}
    for local in (True, False):
        running = await start_proxy(nursery, _profile(model, [_launched("a"), _launched("b")],
                                                      output_local=local),
                                    tmp_path / str(local), f"p{local}")
        pool = running.state.pool
        assert pool is not None
        async with httpx.AsyncClient(timeout=60) as c:
            await c.post(running.url + "/v1/completions", json=BODY)  # warm
            before = pool.members[1].stats.bytes_down
            r = await c.post(running.url + "/v1/completions", json={**BODY, "prompt": "zz top"})
            got[local] = ((pool.members[1].stats.bytes_down - before) /
                          r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["text"])
        running.shutdown.set()
    assert got[True][1] == got[False][1]
    assert got[True][0] < got[False][0]


async def test_a_worker_down_at_start_is_named(tmp_path, model):
    dead = {"name": "gone", "port": free_port()}
    with pytest.RaisesGroup(pytest.RaisesExc(StartupError, match="rpc worker 'gone' at "
                                             "127.0.0.1:\\d+ is unreachable"), flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await start_proxy(nursery, _profile(model, [_launched("ok"), dead]), tmp_path)


async def test_a_workers_agent_of_another_version_is_reported_at_start(nursery, tmp_path, model,
                                                                      caplog):
    from test_discovery import agent_like, serve_http

    other = await serve_http(nursery, agent_like(version="9.9.9", token=None))
    gone = f"http://127.0.0.1:{free_port()}"
    profile = _profile(model, [_launched("a", agent=other), _launched("b", agent=gone)])
    with caplog.at_level("WARNING", logger="tightwad.cluster"):
        running = await start_proxy(nursery, profile, tmp_path)
    text = caplog.text
    assert "rpc worker a: version mismatch: the agent runs tightwad 9.9.9" in text
    assert "rpc worker b: peer agent: agent unreachable" in text
    async with httpx.AsyncClient(timeout=60) as c:  # the pool serves all the same
        assert (await c.post(running.url + "/v1/completions", json=BODY)).status_code == 200


async def test_a_worker_of_another_protocol_is_refused(tmp_path, model):
    ours = rpc.engine_version()
    assert ours is not None

    async def newer(stream: trio.SocketStream) -> None:  # a fake: only the handshake
        await stream.receive_some(1 + 8 + rpc.CAPS_SIZE)
        await stream.send_all(struct.pack("<Q", 28) + bytes([ours.major + 1, 0, 0, 0]) + bytes(24))

    async with trio.open_nursery() as nursery:
        port = (await nursery.start(trio.serve_tcp, newer, 0))[0].socket.getsockname()[1]
        with pytest.RaisesGroup(pytest.RaisesExc(
                StartupError, match=f"speaks RPC protocol {ours.major + 1}.0.0, this engine {ours}"),
                flatten_subgroups=True):
            async with trio.open_nursery() as inner:
                await start_proxy(inner, _profile(model, [{"name": "odd", "port": port}]), tmp_path)
        nursery.cancel_scope.cancel()


async def test_worker_killed_mid_stream_ends_the_stream_naming_it_then_serves(nursery, tmp_path, model):
    profile = _profile(model, [_launched("a"), _launched("b")])
    profile.passthrough = ["ignore_eos"]
    running = await start_proxy(nursery, profile, tmp_path)
    pool = running.state.pool
    assert pool is not None
    victim = pool.members[1].process
    assert victim is not None and victim.pid
    long = {"prompt": "tell me everything", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    events: list[str] = []
    async with httpx.AsyncClient(timeout=120) as c:
        async with c.stream("POST", running.url + "/v1/completions", json=long) as resp:
            assert resp.status_code == 200, await resp.aread()
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 5:
                        os.kill(victim.pid, signal.SIGKILL)
        errors = [json.loads(e)["error"] for e in events if e.startswith("{") and '"error"' in e]
        assert len(errors) == 1 and events[-1] == "[DONE]"
        assert "rpc worker 'b' dropped out of the pool" in errors[0]["message"]
        assert "127.0.0.1" not in errors[0]["message"]  # clients see names, not addresses
        # the pool restarts the worker, the supervisor the target: answers come back
        with trio.fail_after(90):
            while True:
                r = await c.post(running.url + "/v1/completions", json=BODY)
                if r.status_code == 200:
                    break
                await trio.sleep(0.5)
        status = (await c.get(running.url + "/v1/tightwad/status")).json()["cluster"]
    b = status["workers"][1]
    assert b["drops"] >= 1 and b["state"] == "up" and b["restarts"] >= 1


# --------------------------------------------------------------------------- the tunnel


@pytest.fixture
def tunnel_identity(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_or_create(tmp_path / "state")


async def _counting_server(nursery: trio.Nursery) -> tuple[int, list[bytes]]:
    """Stands in for rpc-server: records every byte that reaches it."""
    got: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(4096):
            got.append(data)

    port = (await nursery.start(trio.serve_tcp, handler, 0))[0].socket.getsockname()[1]
    return port, got


async def test_tunnel_refuses_without_the_token_and_passes_nothing(nursery, tunnel_identity):
    token = "t" * 32
    inner, got = await _counting_server(nursery)
    port, stats = await nursery.start(partial(serve_tunnel, "127.0.0.1", 0,
                                              tunnel_identity.server_context(), token,
                                              ("127.0.0.1", inner)))
    assert isinstance(stats, LinkStats)
    hello = bytes([rpc.HELLO]) + struct.pack("<Q", rpc.CAPS_SIZE) + bytes(rpc.CAPS_SIZE)
    # 1. plain TCP speaking RPC straight away: TLS fails, nothing reaches the server
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    await raw.send_all(hello)
    with trio.fail_after(5):
        while await raw.receive_some(100):
            pass
    await raw.aclose()
    # 2. TLS and the right certificate, but a wrong token: refused
    with pytest.raises(rpc.RpcError, match="refused the token"):
        await open_tunnel("127.0.0.1", port, tunnel_identity.fingerprint, "x" * 32, "w")
    # 3. a pinned fingerprint that is not the worker's: the client hangs up first
    with pytest.raises(rpc.RpcError, match="but the profile pins sha256:0000"):
        await open_tunnel("127.0.0.1", port, "sha256:" + "0" * 64, token, "w")
    await trio.sleep(0.2)
    assert got == [] and stats.failed >= 2
    # 4. the right token: bytes flow both ways
    stream = await open_tunnel("127.0.0.1", port, tunnel_identity.fingerprint, token, "w")
    await stream.send_all(b"ping")
    with trio.fail_after(5):
        while not got:
            await trio.sleep(0.01)
    assert b"".join(got) == b"ping"
    await stream.aclose()


async def test_pool_through_rpc_worker(nursery, tmp_path, model, monkeypatch):
    """`tightwad rpc-worker` (a real subprocess: rpc-server behind the tunnel)
    serves a profile's target; the coordinator learns the worker's backend."""
    from tightwad_core.runtime.engine import installed_backend

    token = "s3cret-token-for-the-tunnel"
    port = free_port()
    env = {**os.environ, "TIGHTWAD_RPC_TOKEN": token}
    state = tmp_path / "state"
    proc = await trio.lowlevel.open_process(
        [str(Path(sys.executable).parent / "tightwad"), "rpc-worker", "--listen",
         f"127.0.0.1:{port}", "--state-dir", str(state), "-t", "1"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(60):
            while not (state / "cert.pem").is_file():
                await trio.sleep(0.1)
            fp = load_or_create(state).fingerprint
            while True:
                try:  # (closed at once: rpc-server serves one client at a time)
                    await (await open_tunnel("127.0.0.1", port, fp, token, "w")).aclose()
                    break
                except rpc.RpcError:
                    await trio.sleep(0.2)
        monkeypatch.setenv("TW_TEST_TOKEN", token)
        worker = {"name": "safe", "port": port, "transport": "tls-token",
                  "fingerprint": fp.upper().replace("SHA256:", "sha256:"),
                  "token_env": "TW_TEST_TOKEN"}
        running = await start_proxy(nursery, _profile(model, [worker]), tmp_path)
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(running.url + "/v1/completions", json=BODY)
            status = (await c.get(running.url + "/v1/tightwad/status")).json()["cluster"]
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        w = status["workers"][0]
        assert w["state"] == "up" and w["transport"].startswith("tls-token") and w["layers"] == 4
        assert w["backend"] == installed_backend()
        running.shutdown.set()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0  # a clean stop on SIGTERM
    # a profile without the token, or with a malformed fingerprint, does not start
    with pytest.raises(ConfigError, match="TW_TEST_UNSET is not set"):
        TlsTokenTransport(msgspec.convert({**worker, "token_env": "TW_TEST_UNSET"}, RpcWorkerConfig))
    with pytest.raises(ConfigError, match="bad certificate fingerprint"):
        TlsTokenTransport(msgspec.convert({**worker, "fingerprint": "abc"}, RpcWorkerConfig))


def test_installed_backend_reads_the_build_flags(tmp_path: Path) -> None:
    from tightwad_core.runtime import engine

    stamp = tmp_path / "build-flags.json"
    assert engine.installed_backend(stamp) is None
    for gpu in ("cpu", "cuda", "rocm", "metal"):
        stamp.write_text(json.dumps(engine.cmake_flags(gpu=gpu)))
        assert engine.installed_backend(stamp) == gpu


def test_rpc_worker_show_prints_a_profile_snippet(tmp_path: Path) -> None:
    env = {**os.environ, "TIGHTWAD_RPC_TOKEN": ""}
    out = subprocess.run([str(Path(sys.executable).parent / "tightwad"), "rpc-worker", "--show",
                          "--state-dir", str(tmp_path / "s"), "--listen", "10.1.2.3:50100"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    fp = load_or_create(tmp_path / "s").fingerprint
    assert f'fingerprint = "{fp}"' in out.stdout and 'host = "10.1.2.3"' in out.stdout
    token = (tmp_path / "s" / "token").read_text().strip()
    assert len(token) >= 32 and token not in out.stdout  # the token stays in its file
    assert oct((tmp_path / "s" / "token").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "s" / "key.pem").stat().st_mode & 0o777) == "0o600"


def test_cluster_config_round_trips_through_msgspec() -> None:
    cfg = msgspec.convert({"workers": [{"name": "a", "memory": "8GiB"}]}, ClusterConfig)
    assert cfg.workers[0].transport == "tcp" and cfg.placement == "memory-proportional"


def test_start_status_stop(tmp_path: Path, model: Path) -> None:
    """`tightwad start` in the background, `status --json` with the pool, `stop`."""
    cfg = tmp_path / "tightwad.toml"
    port, a, b = free_port(), free_port(), free_port()
    cfg.write_text(f'''
[profiles.pool]
listen = "127.0.0.1:{port}"
[profiles.pool.target]
backend = "llama-server"
model_path = "{model}"
ctx_size = 256
parallel = 1
threads = 1
[[profiles.pool.cluster.workers]]
name = "one"
port = {a}
launch = true
threads = 1
[[profiles.pool.cluster.workers]]
name = "two"
port = {b}
launch = true
threads = 1
memory = "3GiB"
''')
    exe = str(Path(sys.executable).parent / "tightwad")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "COLUMNS": "220"}

    def tw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=180)

    started = tw("start", "--config", str(cfg), "-p", "pool", "--timeout", "120")
    try:
        assert started.returncode == 0, started.stderr
        assert f"serving on http://127.0.0.1:{port}" in started.stdout
        again = tw("start", "--config", str(cfg), "-p", "pool")
        assert again.returncode == 1 and "already running" in again.stderr
        st = tw("status", "--json")
        assert st.returncode == 0, st.stdout + st.stderr
        (entry,) = json.loads(st.stdout)
        assert entry["profile"] == "pool" and entry["running"] is True
        workers = entry["status"]["cluster"]["workers"]
        assert [w["name"] for w in workers] == ["one", "two"]
        assert all(w["state"] == "up" for w in workers) and workers[1]["memory_offered"] == 3 << 30
        table = tw("status", "-p", "pool")
        assert table.returncode == 0 and "one" in table.stdout and "round trips" in table.stdout
    finally:
        stopped = tw("stop", "-p", "pool")
    assert stopped.returncode == 0 and "stopped 'pool'" in stopped.stdout, stopped.stderr
    gone = tw("status")
    assert gone.returncode == 1 and "nothing was started" in gone.stdout
    with httpx.Client() as c, pytest.raises(httpx.ConnectError):
        c.get(f"http://127.0.0.1:{port}/health")


async def test_bench_of_a_cluster_profile_times_the_pool_alone(tmp_path: Path) -> None:
    """`tightwad bench` on a combined test bed: the pool alone (a stock
    llama-server over its own rpc-servers and links) is the baseline, and
    round trips and bytes per token are counted for every side."""
    from tightwad_core.bench.link import LinkSpec
    from tightwad_core.bench.run import run_bench
    from tightwad_core.testing.tinymodels import tiny_pair

    draft, target = tiny_pair(tmp_path / "pair", seed=0)
    prof = msgspec.convert({
        "mode": "speculative", "listen": "127.0.0.1:0",
        "target": {"backend": "worker", "model_path": str(target), "ctx_size": 512,
                   "parallel": 1, "threads": 1},
        "draft": {"backend": "llama-server", "model_path": str(draft), "ctx_size": 512,
                  "parallel": 1, "threads": 1},
        "speculation": {"max_draft_tokens": 3, "verifier": "worker"},
        "cluster": {"workers": [_launched("a", port=0, transport="emulated", delay="50ms"),
                                _launched("b", port=0, transport="emulated", delay="50ms")]},
    }, Profile)
    report = await run_bench("bed", prof, config_dir=tmp_path, prompts=["the cat sat on"],
                             max_tokens=12, link=LinkSpec(0.002), run_dir=tmp_path / "run")
    cfg, totals = report["config"], report["totals"]
    assert "own pool of 2 rpc-servers" in cfg["baseline"]
    assert [w["name"] for w in cfg["pool"]] == ["a", "b"]
    assert all("2 ms each way" in w["transport"] for w in cfg["pool"])  # --link-delay went to the pool
    assert totals["baseline_tok_s"] and totals["speedup_vs_baseline"]
    net = report["network"]
    assert set(net) == {"target", "proxy", "baseline"}
    for side in net.values():
        assert side["tokens"] > 0 and side["round_trips_per_token"] > 0 and side["bytes_per_token"] > 0
    # one token per step: at least one round trip per worker per token alone; fewer speculating
    assert net["target"]["round_trips_per_token"] >= 2
    assert net["proxy"]["round_trips_per_token"] < net["target"]["round_trips_per_token"]
    model = report["model"]
    assert model["k"] == 3 and model["predicted_speedup"] >= model["predicted_speedup_without_overlap"] > 0
    assert model["measured_speedup"] == totals["speedup_vs_baseline_tok_s"]


def test_leviathan_model_from_a_report() -> None:
    from tightwad_core.bench.report import leviathan

    # a = 0.8 at K = 3: 2.952 tokens a round; verify 0.9 s, draft 20 ms a token, pool 0.8 s a token
    report = {"config": {"draft_tokens": 3}, "totals": {
        "rounds": 10, "tokens_per_round": 2.952, "ahead_hits": 0, "draft_s": 0.6,
        "verify_s": 9.0, "baseline_tok_s": 1.25, "speedup_vs_baseline_tok_s": 2.0}}
    m = leviathan(report)
    assert m is not None and m["acceptance_per_token"] == pytest.approx(0.8, abs=1e-3)
    assert m["predicted_speedup"] == pytest.approx(2.952 * 0.8 / 0.9, rel=1e-3)
    assert m["predicted_speedup_without_overlap"] == pytest.approx(2.952 * 0.8 / 0.96, rel=1e-3)
    assert leviathan({"config": {"draft_tokens": "auto"}, "totals": report["totals"]}) is None


def test_benchmark_command_times_the_pool(tmp_path: Path, model: Path) -> None:
    cfg = tmp_path / "tightwad.toml"
    cfg.write_text(f'''
[profiles.pool]
[profiles.pool.target]
backend = "llama-server"
model_path = "{model}"
ctx_size = 256
parallel = 1
threads = 1
[[profiles.pool.cluster.workers]]
name = "one"
port = 0
launch = true
threads = 1
transport = "emulated"
[[profiles.pool.cluster.workers]]
name = "two"
port = 0
launch = true
threads = 1
''')
    exe = str(Path(sys.executable).parent / "tightwad")
    out = subprocess.run([exe, "benchmark", "--config", str(cfg), "-p", "pool", "--limit", "2",
                          "--max-tokens", "8", "--link-delay", "1ms", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    t = report["totals"]
    assert t["prompts"] == 2 and t["gen_tok_s"] > 0 and t["prompt_tok_s_median"] > 0
    assert t["round_trips_per_token"] >= 2  # each token crosses both workers at least once
    assert [w["layers"] for w in report["workers"]] == [2, 2]
    assert sum(w["bytes_share"] for w in report["workers"]) == pytest.approx(1.0, abs=0.01)
    assert "1 ms each way" in report["workers"][0]["transport"]
    plain = subprocess.run([exe, "benchmark", "--config", str(cfg), "-p", "nope"],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 2 and "nope" in plain.stderr


def test_config_show_prints_a_cluster_profile_as_toml(tmp_path: Path) -> None:
    import tomllib

    from click.testing import CliRunner

    from tightwad_core.cli import main

    res = CliRunner().invoke(main, ["config", "show", "-p", "combined-demo"],
                             env={"TIGHTWAD_CONFIG": None}, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    shown = tomllib.loads(res.output[res.output.index("mode ="):] if "mode =" in res.output
                          else res.output)
    assert [w["name"] for w in shown["cluster"]["workers"]] == ["rpc-a", "rpc-b"]
    assert shown["cluster"]["workers"][0]["delay"] == "100ms"

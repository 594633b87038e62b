"""The peer agent: real agents on loopback ports (in this process, and as
`tightwad peer start` processes), a real rpc-worker started through the API,
and the refusals its security rests on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from tightwad_core.config.profiles import ConfigError, Profile, load_file, validate
from tightwad_core.config.schema import PeerConfig
from tightwad_core.peer.agent import AgentState, run_agent
from tightwad_core.peer.client import agent_report, annotate_workers
from tightwad_core.peer.config import parse_ports, resolve
from tightwad_core.runtime.procs import free_port

TOKEN = "peer-test-token-0123456789"
EXE = str(Path(sys.executable).parent / "tightwad")
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _cfg(**kw: Any) -> PeerConfig:
    return PeerConfig(**{"listen": "127.0.0.1:0", "discovery": False, **kw})


@asynccontextmanager
async def agent(tmp_path: Path, **kw: Any) -> AsyncIterator[AgentState]:
    async with trio.open_nursery() as nursery:
        state: AgentState = await nursery.start(partial(
            run_agent, _cfg(**kw), run_path=tmp_path / "run", signals=False))
        try:
            yield state
        finally:
            state.shutdown.set()


# --------------------------------------------------------------------------- config


def test_settings_are_checked() -> None:
    def bad(match: str, **kw: Any) -> None:
        with pytest.raises(ConfigError, match=match):
            resolve(PeerConfig(**kw))

    bad("beyond loopback\\) needs a token", listen="0.0.0.0:9191")
    bad("token_env: \\$TW_UNSET_PEER_TOKEN is unset", listen="0.0.0.0:9191",
        token_env="TW_UNSET_PEER_TOKEN")
    # named but unset never means "no token", even on loopback
    bad("token_env: \\$TW_UNSET_PEER_TOKEN is unset", token_env="TW_UNSET_PEER_TOKEN")
    bad("shorter than 16", token="short")
    bad("allow", allow=["10.0.0.0/33"])
    bad("rpc_ports", rpc_ports="50060-50052")
    bad("rpc_ports", rpc_ports="fifty")
    bad("max_body_bytes", max_body_bytes=10)
    bad("not a multicast address", discovery_group="10.1.2.3")
    assert resolve(PeerConfig()).loopback_only and resolve(PeerConfig()).token is None
    assert resolve(PeerConfig(listen="0.0.0.0:9191", token=TOKEN)).url() == "http://127.0.0.1:9191"
    assert parse_ports("50052-50054,50060") == {50052, 50053, 50054, 50060}


def test_peer_table_of_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "tightwad.toml"
    path.write_text('[peer]\nlisten = "0.0.0.0:9300"\ntoken_env = "TW_PEER"\n'
                    'model_dirs = ["/srv/models"]\nallow = ["192.168.1.0/24"]\n')
    cfg = load_file(path).peer
    assert cfg is not None and cfg.listen == "0.0.0.0:9300" and cfg.model_dirs == ["/srv/models"]
    assert cfg.rpc_ports == "50052-50059" and cfg.discovery is True
    path.write_text('[peer]\nbinary = "/bin/sh"\n')
    with pytest.raises(ConfigError, match="peer.*binary"):
        load_file(path)


def test_worker_agent_url_is_checked(tmp_path: Path) -> None:
    raw = {"target": {"backend": "llama-server", "model_path": "m.gguf"},
           "cluster": {"workers": [{"name": "a", "agent": "ftp://10.0.0.5"}]}}
    with pytest.raises(ConfigError, match=r"workers\[0\].agent"):
        validate(tmp_path / "t.toml", "p", msgspec.convert(raw, Profile), check_files=False)


# --------------------------------------------------------------------------- security


async def test_every_route_but_health_needs_the_token(tmp_path: Path) -> None:
    routes = [("GET", "/v1/peer/info"), ("GET", "/v1/peer/models"), ("GET", "/v1/peer/models/a.gguf"),
              ("GET", "/v1/peer/rpc-worker"), ("GET", "/v1/peer/logs?service=agent"),
              ("POST", "/v1/peer/rpc-worker/start"), ("POST", "/v1/peer/rpc-worker/stop"),
              ("GET", "/v1/swarm/files"), ("GET", "/v1/swarm/files/a.gguf/manifest"),
              ("GET", "/v1/no/such/route")]
    async with agent(tmp_path, token=TOKEN) as st, httpx.AsyncClient(base_url=st.url) as c:
        health = await c.get("/v1/peer/health")
        assert health.status_code == 200 and health.json()["ok"] is True
        for method, path in routes:
            for headers in ({}, {"authorization": "Bearer wrong-token-but-long-enough"},
                            {"authorization": TOKEN}):  # no "Bearer "
                r = await c.request(method, path, headers=headers, json={"port": 50052})
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
        for path in ("/v1/peer/info", "/v1/peer/models", "/v1/peer/rpc-worker", "/v1/swarm/files"):
            assert (await c.get(path, headers=AUTH)).status_code == 200, path
        info = (await c.get("/v1/peer/info", headers=AUTH)).json()
        assert info["version"] == health.json()["version"] and info["cpu"]["count"] >= 1
        assert info["memory"]["total"] > 0 and isinstance(info["gpus"], list)


async def test_without_a_token_only_loopback_is_served(tmp_path: Path) -> None:
    async with agent(tmp_path) as st, httpx.AsyncClient(base_url=st.url) as c:
        assert (await c.get("/v1/peer/info")).status_code == 200
        # a DNS-rebinding page names its own host: refused without a token
        r = await c.get("/v1/peer/info", headers={"host": "evil.example:9191"})
        assert r.status_code == 403


def test_refuses_to_listen_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TIGHTWAD_CONFIG"}
    env.update(XDG_STATE_HOME=str(tmp_path / "state"), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    for extra in (["--foreground"], []):
        done = subprocess.run([EXE, "peer", "start", "--listen", f"0.0.0.0:{free_port()}",
                               "--no-discovery", *extra], capture_output=True, text=True,
                              env=env, timeout=60, cwd=tmp_path, check=False)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "needs a token" in lines[0], done.stderr
    assert not (tmp_path / "state" / "tightwad" / "peer" / "agent.json").exists()


async def test_allowlist_refuses_other_addresses(tmp_path: Path) -> None:
    from tightwad_core.peer.discovery import interfaces

    lan = next((a for _, a in interfaces() if not a.startswith("127.")), None)
    assert lan is not None, "the test needs an interface with a non-loopback IPv4 address"
    port = free_port("0.0.0.0")
    async with agent(tmp_path, listen=f"0.0.0.0:{port}", token=TOKEN, allow=["198.51.100.0/24"]):
        async with httpx.AsyncClient(base_url=f"http://{lan}:{port}") as c:
            for path in ("/v1/peer/health", "/v1/peer/info"):  # checked before anything
                r = await c.get(path, headers=AUTH)
                assert r.status_code == 403 and "allow" in r.json()["error"]["message"], path
        # this machine's own tools (peer start/status) pass the allowlist; the token still counts
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            assert (await c.get("/v1/peer/info", headers=AUTH)).status_code == 200
            assert (await c.get("/v1/peer/info")).status_code == 401
    async with agent(tmp_path, listen=f"0.0.0.0:{port}", token=TOKEN, allow=[f"{lan}/32"]):
        async with httpx.AsyncClient(base_url=f"http://{lan}:{port}") as c:
            assert (await c.get("/v1/peer/info", headers=AUTH)).status_code == 200
            assert (await c.get("/v1/peer/info")).status_code == 401


async def test_oversized_and_odd_bodies_are_refused(tmp_path: Path) -> None:
    lo = free_port()
    async with agent(tmp_path, token=TOKEN, rpc_ports=f"{lo}") as st, \
            httpx.AsyncClient(base_url=st.url, headers=AUTH) as c:
        start = "/v1/peer/rpc-worker/start"
        big = b'{"port": 1, "pad": "' + b"x" * 70_000 + b'"}'
        r = await c.post(start, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds anyway
            for _ in range(20):
                yield b"x" * 8192

        r = await c.post(start, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = await c.post(start, content=b"port=1", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = await c.post(start, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = await c.get("/v1/peer/logs?lines=100000")
        assert r.status_code == 400


async def test_rpc_worker_start_takes_no_binary_and_no_foreign_port(tmp_path: Path) -> None:
    lo = free_port()
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.sh"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
    evil.chmod(0o755)
    async with agent(tmp_path, token=TOKEN, rpc_ports=f"{lo}-{lo}") as st, \
            httpx.AsyncClient(base_url=st.url, headers=AUTH) as c:
        start = "/v1/peer/rpc-worker/start"
        for port in (lo + 1, 22, 0, 70000):
            r = await c.post(start, json={"port": port})
            assert r.status_code == 400 and "outside this agent's rpc_ports" in r.text, port
        for body in ({"port": lo, "binary": str(evil)}, {"port": lo, "argv": [str(evil)]},
                     {"port": lo, "rpc_worker_binary": str(evil)}):
            r = await c.post(start, json=body)
            assert r.status_code == 400 and "unknown field" in r.text, body
        r = await c.post(start, json={"port": lo, "threads": 0})
        assert r.status_code == 400
        state = (await c.get("/v1/peer/rpc-worker")).json()
        assert state["state"] == "stopped" and state["pid"] is None
        assert (await c.get("/v1/peer/logs?service=rpc-worker")).json()["lines"] == []
    assert not marker.exists()


async def test_models_are_listed_and_nothing_outside_is_reachable(tmp_path: Path) -> None:
    from tightwad_core.swarm.manifest import make_manifest, manifest_path, write_manifest

    models, outside = tmp_path / "models", tmp_path / "outside"
    (models / "sub").mkdir(parents=True)
    outside.mkdir()
    (models / "a.gguf").write_bytes(b"a" * 1000)
    digest = "ab" * 32
    (models / "a.gguf.sha256").write_text(f"{digest}  a.gguf\n")
    b = models / "sub" / "b.gguf"
    b.write_bytes(os.urandom(50_000))
    write_manifest(make_manifest(b, piece_size=16384), manifest_path(b))
    (outside / "secret.gguf").write_bytes(b"TOP-SECRET-CONTENT")
    (models / "link.gguf").symlink_to(outside / "secret.gguf")
    (models / "escape").symlink_to(outside, target_is_directory=True)
    async with agent(tmp_path, token=TOKEN, model_dirs=[str(models)]) as st, \
            httpx.AsyncClient(base_url=st.url, headers=AUTH) as c:
        listed = {m["name"]: m for m in (await c.get("/v1/peer/models")).json()["models"]}
        assert set(listed) == {"a.gguf", "sub/b.gguf"}
        assert listed["a.gguf"]["size"] == 1000 and listed["a.gguf"]["sha256"] == digest
        assert listed["sub/b.gguf"]["sha256"] == make_manifest(b).sha256
        assert (await c.get("/v1/peer/models/sub/b.gguf")).status_code == 200
        for name in ("link.gguf", "escape/secret.gguf", "../outside/secret.gguf",
                     "..%2Foutside%2Fsecret.gguf", "%2E%2E/outside/secret.gguf",
                     str(outside / "secret.gguf")):
            r = await c.get(f"/v1/peer/models/{name}", follow_redirects=True)  # "//": a 308 first
            assert r.status_code == 404 and "TOP-SECRET" not in r.text, (name, r.status_code)
        for service in ("../../etc/passwd", "agent/../rpc-worker", "/etc/passwd"):
            r = await c.get("/v1/peer/logs", params={"service": service})
            assert r.status_code == 400, service
        seeded = (await c.get("/v1/swarm/files")).json()["files"]
        assert [f["name"] for f in seeded] == ["b.gguf"]  # the file with a manifest


async def test_rpc_worker_starts_and_stops_through_the_api(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the rpc-worker's identity
    monkeypatch.delenv("TIGHTWAD_RPC_TOKEN", raising=False)
    port = free_port()
    async with agent(tmp_path, token=TOKEN, rpc_ports=f"{port}") as st, \
            httpx.AsyncClient(base_url=st.url, headers=AUTH, timeout=120) as c:
        r = await c.post("/v1/peer/rpc-worker/start", json={"port": port, "threads": 1})
        assert r.status_code == 200, r.text
        state = (await c.get("/v1/peer/rpc-worker")).json()
        assert state["state"] == "running" and state["port"] == port and state["pid"] > 0
        assert state["fingerprint"].startswith("sha256:") and len(state["fingerprint"]) == 71
        assert state["token_file"] == str(tmp_path / "config" / "tightwad" / "rpc-worker" / "token")
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        again = await c.post("/v1/peer/rpc-worker/start", json={"port": port})
        assert again.status_code == 409
        lines = [x["line"] for x in (await c.get("/v1/peer/logs?service=rpc-worker")).json()["lines"]]
        assert any("certificate fingerprint" in x for x in lines), lines
        assert any("rpc-worker started" in x["line"] for x in
                   (await c.get("/v1/peer/logs?service=agent")).json()["lines"])
        os.kill(state["pid"], signal.SIGTERM)  # it ends (cleanly): the agent starts it again
        with trio.fail_after(60):
            while True:
                state = (await c.get("/v1/peer/rpc-worker")).json()
                if state["restarts"] == 1 and state["state"] == "running":
                    break
                await trio.sleep(0.2)
        pid = state["pid"]
        stopped = (await c.post("/v1/peer/rpc-worker/stop")).json()
        assert stopped["state"] == "stopped" and stopped["pid"] is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


# --------------------------------------------------------------------------- coordinator


async def test_coordinator_sees_agent_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TW_AGENT_TOKEN", TOKEN)
    async with agent(tmp_path, token=TOKEN) as st:
        workers: list[dict[str, Any]] = [
            {"name": "a", "agent": st.url, "agent_token_env": "TW_AGENT_TOKEN"},
            {"name": "b", "agent": f"http://127.0.0.1:{free_port()}"},
            {"name": "c", "agent": st.url},  # no token
            {"name": "d", "agent": None}]
        await trio.to_thread.run_sync(annotate_workers, workers)
        old = await trio.to_thread.run_sync(partial(agent_report, st.url, TOKEN, ours="0.0.1"))
    reports = [w.get("agent_report") for w in workers]
    assert reports[0]["state"] == "ok" and reports[0]["info"]["hostname"] == socket.gethostname()
    assert reports[1]["state"] == "unreachable" and "agent unreachable" in reports[1]["detail"]
    assert reports[2]["state"] == "refused" and "agent_token_env" in reports[2]["detail"]
    assert reports[3] is None
    assert old["state"] == "mismatch" and "version mismatch" in old["detail"]

    from tightwad_core.cli.daemon import _print

    monkeypatch.setenv("COLUMNS", "260")
    w = {"transport": "tcp", "state": "up", "detail": "", "protocol": "3.0.0", "devices": [],
         "layers": 2, "bytes_up": 0, "bytes_down": 0, "round_trips": 0, "drops": 0}
    _print({"running": True, "profile": "p", "url": "http://x", "status": {
        "backends": {}, "cluster": {"placement": "memory-proportional", "engine_protocol": "3.0.0",
                                    "output_local": True, "workers": [
                                        {**w, **workers[0]}, {**w, **workers[1]}]}}})
    out = capsys.readouterr().out
    assert "agent" in out and "tightwad " in out and "agent unreachable" in out


def test_cli_start_status_stop(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "tightwad.toml"
    cfg.write_text(f'[peer]\nlisten = "127.0.0.1:{port}"\ntoken_env = "TW_PEER_TOKEN"\n'
                   f'discovery = false\nmodel_dirs = ["{tmp_path}"]\n')
    env = {k: v for k, v in os.environ.items() if k != "TIGHTWAD_CONFIG"}
    env.update(XDG_STATE_HOME=str(tmp_path / "state"), TW_PEER_TOKEN=TOKEN)

    def tw(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EXE, "peer", *args], capture_output=True, text=True,
                              env={**env, **extra}, timeout=90, cwd=tmp_path, check=False)

    started = tw("start", "--config", str(cfg))
    try:
        assert started.returncode == 0, started.stderr
        assert f"peer agent on http://127.0.0.1:{port}" in started.stdout
        again = tw("start", "--config", str(cfg))
        assert again.returncode == 1 and "already running" in again.stderr
        st = tw("status", "--json")
        assert st.returncode == 0, st.stdout + st.stderr
        data = json.loads(st.stdout)
        assert data["state"] == "ok" and data["info"]["model_dirs"] == [str(tmp_path)]
        text = tw("status")
        assert text.returncode == 0 and "rpc-worker: stopped" in text.stdout, text.stdout
        refused = tw("status", TW_PEER_TOKEN="")
        assert refused.returncode == 1 and "refuses" in refused.stdout
    finally:
        stopped = tw("stop")
    assert stopped.returncode == 0 and "stopped the peer agent" in stopped.stdout, stopped.stderr
    gone = tw("status", "--config", str(cfg))
    assert gone.returncode == 1 and "agent unreachable" in gone.stdout
    assert tw("stop").returncode == 1


async def test_agents_with_discovery_hear_each_other(tmp_path: Path) -> None:
    """Two agents announcing on loopback: each keeps the other (same token)
    among its discovered peers; a listener hears both with the token's tag."""
    from tightwad_core.peer.discovery import listen, tag_for

    where = {"discovery": True, "discovery_interface": "127.0.0.1", "announce_interval": 0.2,
             "discovery_port": free_port(), "token": TOKEN}
    async with agent(tmp_path / "a", **where) as a, agent(tmp_path / "b", **where) as b:
        heard = await listen(1.0, group="239.255.91.91", port=where["discovery_port"],
                             interface="127.0.0.1")
        assert {h.url for h in heard if h.tag == tag_for(TOKEN)} >= {a.url, b.url}
        async with httpx.AsyncClient(headers=AUTH) as c:
            with trio.fail_after(10):
                while True:
                    info = (await c.get(a.url + "/v1/peer/info")).json()
                    if info["discovered"]:
                        break
                    await trio.sleep(0.2)
        assert info["discovered"] == [b.url] and a.book is not None and a.url not in a.book.urls()

"""Faults: a target that is down at start-up, one that dies mid-stream, a
client that disconnects mid-stream, and Ctrl-C on `tightwad run`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
from conftest import ServerProc, relay_profile, start_proxy

from tightwad_core.config.profiles import BackendConfig, Profile
from tightwad_core.runtime.procs import free_port

CHAT = "/v1/chat/completions"
LONG = {"messages": [{"role": "user", "content": "count forever"}], "max_tokens": 4000,
        "temperature": 0, "ignore_eos": True}


def _pids_with(fragment: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if fragment in cmd and "llama-server" in cmd:
                out.append(int(entry.name))
    return out


async def test_target_down_at_startup_then_up(nursery, tmp_path, tiny_model):
    port = free_port()
    running = await start_proxy(nursery, relay_profile(f"http://127.0.0.1:{port}"), tmp_path)
    async with httpx.AsyncClient(base_url=running.url) as client:
        h = await client.get("/health")
        assert h.status_code == 503 and h.json()["backends"]["target"]["ok"] is False
        assert str(port) not in h.text  # the open health route names roles, not addresses
        for stream in (False, True):
            r = await client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}],
                                              "max_tokens": 4, "stream": stream})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "backend_unavailable"
            # what went wrong, by role; never the backend's address
            assert str(port) not in r.text and "127.0.0.1" not in r.text
            assert "target" in r.json()["error"]["message"]
        r = await client.post("/api/chat", json={"model": "x", "messages": [{"role": "user", "content": "x"}]})
        # the target is down, so its model name is unknown: the name asked for is not served
        assert r.status_code == 404 and "error" in r.json()
        # the target comes up later on that port: the proxy serves without a restart
        srv = await trio.to_thread.run_sync(lambda: ServerProc(tiny_model, tmp_path / "late.log", port=port))
        try:
            r = await client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert (await client.get("/health")).status_code == 200
        finally:
            srv.stop()
    running.shutdown.set()


def _launch_profile(model: Path) -> Profile:
    return Profile(mode="direct", listen="127.0.0.1:0", passthrough=["ignore_eos"],
                   target=BackendConfig(backend="llama-server", model_path=str(model), ctx_size=4096,
                                        parallel=1, threads=1))


async def _events(resp: httpx.Response) -> list[dict]:
    out = []
    async for line in resp.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(msgspec.json.decode(line[6:]))
        if line == "data: [DONE]":
            out.append({"done": True})
    return out


async def test_target_dies_mid_stream(nursery, tmp_path, tiny_model):
    running = await start_proxy(nursery, _launch_profile(tiny_model), tmp_path)
    backend = running.state.backends["target"]
    pid = backend.process.pid
    got: list[dict] = []
    async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
        async with client.stream("POST", CHAT, json={**LONG, "stream": True}) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    got.append(msgspec.json.decode(line[6:]))
                    if len(got) == 5:
                        os.kill(pid, signal.SIGKILL)
                elif line == "data: [DONE]":
                    got.append({"done": True})
        assert got[-1] == {"done": True}
        assert "error" in got[-2], got[-3:]
        assert got[-2]["error"]["type"] in ("backend_unavailable", "backend_error")
        assert all("error" not in e for e in got[:-2])
        # supervised: the target is restarted and the proxy keeps serving
        with trio.fail_after(60):
            while (await client.get("/health")).status_code != 200:
                await trio.sleep(0.2)
        r = await client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200
        assert backend.process.restarts >= 1 and backend.process.pid != pid
    running.shutdown.set()


async def test_client_disconnect_cancels_upstream(nursery, tmp_path, qwen_server):
    running = await start_proxy(nursery, relay_profile(qwen_server.url, passthrough=["ignore_eos"]),
                                tmp_path)
    async with httpx.AsyncClient(timeout=60) as client:
        async def busy() -> int:
            slots = (await client.get(qwen_server.url + "/slots")).json()
            return sum(1 for s in slots if s.get("is_processing"))

        assert await busy() == 0
        async with client.stream("POST", running.url + CHAT, json={**LONG, "stream": True}) as resp:
            n = 0
            async for line in resp.aiter_lines():
                n += line.startswith("data: ")
                if n >= 3:
                    break
            assert await busy() == 1
        # the client is gone: the proxy must drop its upstream request, freeing the slot
        t0 = trio.current_time()
        with trio.fail_after(5):
            while await busy():
                await trio.sleep(0.05)
        print(f"slot freed {1000 * (trio.current_time() - t0):.0f} ms after the client left")
    running.shutdown.set()


def test_ctrl_c_stops_cleanly(tmp_path, tiny_model):
    model = tmp_path / "ctrl-c-model.gguf"  # a name no other test's server uses
    model.write_bytes(tiny_model.read_bytes())
    tiny_model = model
    port = free_port()
    cfg = tmp_path / "tightwad.toml"
    cfg.write_text(
        f'[profiles.t]\nlisten = "127.0.0.1:{port}"\n[profiles.t.target]\nbackend = "llama-server"\n'
        f'model_path = "{tiny_model}"\nparallel = 1\nctx_size = 512\n')
    exe = Path(sys.executable).parent / "tightwad"
    proc = subprocess.Popen([str(exe), "run", "--config", str(cfg), "--profile", "t"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        assert _pids_with(str(tiny_model)), "llama-server was not launched"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
    assert not _pids_with(str(tiny_model)), "the launched llama-server outlived the proxy"


def test_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "tightwad.toml"
    cfg.write_text('[profiles.t]\n[profiles.t.target]\nbackend = "llama-server"\nurl = "not a url"\n')
    exe = Path(sys.executable).parent / "tightwad"
    r = subprocess.run([str(exe), "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "profile 't'" in r.stderr and "target.url" in r.stderr


def test_missing_model_at_startup(tmp_path):
    cfg = tmp_path / "tightwad.toml"
    cfg.write_text('[profiles.t]\n[profiles.t.target]\nbackend = "llama-server"\nmodel_path = "nope.gguf"\n')
    exe = Path(sys.executable).parent / "tightwad"
    r = subprocess.run([str(exe), "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "target.model_path" in r.stderr and "does not exist" in r.stderr


@pytest.mark.parametrize("garbage", [b"\x00\x01not a model", b"GGUF" + b"\x00" * 64])
def test_broken_model_fails_to_start(tmp_path, garbage):
    model = tmp_path / "broken.gguf"
    model.write_bytes(garbage)
    cfg = tmp_path / "tightwad.toml"
    cfg.write_text(f'[profiles.t]\nlisten = "127.0.0.1:0"\n[profiles.t.target]\nbackend = "llama-server"\n'
                   f'model_path = "{model}"\nrestart = false\n')
    exe = Path(sys.executable).parent / "tightwad"
    r = subprocess.run([str(exe), "run", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "llama-server (target) exited" in r.stderr

"""Hot swap: another GGUF on a running target, beside the old one on one
machine, one after the other on a pool; refusals for models outside the
profile's folders, non-GGUF files and a vocabulary the draft cannot use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from conftest import start_proxy

from tightwad_core.config.profiles import Profile
from tightwad_core.runtime.procs import free_port
from tightwad_core.testing.tinymodels import write_tiny_model

BODY = {"prompt": "once upon a time", "max_tokens": 16, "temperature": 0}


def _profile(model: Path, cluster: bool = False, **kw: Any) -> Profile:
    raw: dict[str, Any] = {"mode": "direct", "listen": "127.0.0.1:0", "target": {
        "backend": "llama-server", "model_path": str(model), "ctx_size": 256, "parallel": 1,
        "threads": 1, "startup_timeout": 60}, **kw}
    if cluster:
        raw["cluster"] = {"workers": [{"name": n, "port": 0, "launch": True, "threads": 1}
                                      for n in ("a", "b")]}
    return msgspec.convert(raw, Profile)


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    return (write_tiny_model(tmp_path / "one.gguf", seed=1),
            write_tiny_model(tmp_path / "two.gguf", seed=2))


async def _text(c: httpx.AsyncClient, url: str) -> str:
    r = await c.post(url + "/v1/completions", json=BODY)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


@pytest.mark.parametrize("cluster", [False, True], ids=["local", "pool"])
async def test_swap_serves_the_new_model_and_finishes_what_is_in_flight(nursery, tmp_path, models,
                                                                       cluster):
    one, two = models
    alone = await start_proxy(nursery, _profile(two), tmp_path / "ref", "ref")
    running = await start_proxy(nursery, _profile(one, cluster), tmp_path / "run", "run")
    target = running.state.backends["target"]
    async with httpx.AsyncClient(timeout=120) as c:
        want = await _text(c, alone.url)
        before = await _text(c, running.url)
        old_pid = target.process.pid  # type: ignore[attr-defined]
        events: list[str] = []

        async def long_stream() -> None:  # in flight while the swap happens
            body = {**BODY, "max_tokens": 120, "stream": True}
            async with c.stream("POST", running.url + "/v1/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        events.append(line)

        async with trio.open_nursery() as inner:
            inner.start_soon(long_stream)
            await trio.sleep(0.2)
            r = await c.post(running.url + "/v1/tightwad/swap", json={"model": str(two)})
        assert r.status_code == 200, r.text
        steps = r.json()["steps"]
        assert r.json()["model"] == "two" and steps[-1] == "now serving two.gguf"
        assert any(("beside" if not cluster else "one coordinator at a time") in s for s in steps)
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
        assert await _text(c, running.url) == want != before
        models_list = (await c.get(running.url + "/v1/models")).json()["data"]
        assert models_list[0]["id"] == "two"
        assert target.process.pid != old_pid  # type: ignore[attr-defined]
        assert not Path(f"/proc/{old_pid}").exists() or "Z" in Path(f"/proc/{old_pid}/stat").read_text().split()[2]
        if cluster:
            pool = (await c.get(running.url + "/v1/tightwad/status")).json()["cluster"]
            assert all(w["state"] == "up" for w in pool["workers"])  # the workers kept running


async def test_swap_refusals(nursery, tmp_path, models):
    one, _two = models
    running = await start_proxy(nursery, _profile(one), tmp_path / "run", "run")
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    outside.mkdir()
    stray = write_tiny_model(outside / "stray.gguf", seed=3)
    (tmp_path / "notes.txt").write_text("x")
    link = tmp_path / "sneaky.gguf"
    link.symlink_to(stray)
    async with httpx.AsyncClient(timeout=60) as c:
        async def swap(model: str) -> httpx.Response:
            return await c.post(running.url + "/v1/tightwad/swap", json={"model": model})

        assert (await swap(str(stray))).status_code == 403
        assert (await swap(str(link))).status_code == 403  # a symlink out of the folder
        assert (await swap(str(tmp_path / ".." / outside.name / "stray.gguf"))).status_code == 403
        assert (await swap(str(tmp_path / "notes.txt"))).status_code == 400
        assert (await swap(str(tmp_path / "missing.gguf"))).status_code == 404
        r = await c.post(running.url + "/v1/tightwad/swap", json={"path": "x"})
        assert r.status_code == 400
        same = await swap(str(one))
        assert same.status_code == 200 and same.json()["steps"] == ["already serving one.gguf"]


async def test_swap_in_a_speculative_profile_keeps_the_draft_vocabulary(nursery, tmp_path):
    from tightwad_core.testing.tinymodels import tiny_pair

    draft, target = tiny_pair(tmp_path / "pair", seed=0)
    other = write_tiny_model(tmp_path / "pair" / "other.gguf", seed=5, n_layer=4)
    be = {"backend": "llama-server", "ctx_size": 256, "threads": 1}
    prof = msgspec.convert({"mode": "speculative", "listen": "127.0.0.1:0",
                            "target": {**be, "model_path": str(target), "parallel": 5},
                            "draft": {**be, "model_path": str(draft), "parallel": 1},
                            "speculation": {"max_draft_tokens": 3, "verifier": "prefix-batch"}},
                           Profile)
    running = await start_proxy(nursery, prof, tmp_path / "run", "spec")
    async with httpx.AsyncClient(timeout=120) as c:
        r = await c.post(running.url + "/v1/tightwad/swap", json={"model": "@qwen2.5-coder-0.5b"})
        assert r.status_code == 409 and "vocabulary" in r.json()["error"]["message"]
        r = await c.post(running.url + "/v1/tightwad/swap", json={"model": str(other)})
        assert r.status_code == 200, r.text
        assert (await c.post(running.url + "/v1/completions", json=BODY)).status_code == 200


def test_swap_command(tmp_path: Path, models: tuple[Path, Path]) -> None:
    one, two = models
    port = free_port()
    cfg = tmp_path / "tightwad.toml"
    cfg.write_text(f'[profiles.s]\nlisten = "127.0.0.1:{port}"\n[profiles.s.target]\n'
                   f'backend = "llama-server"\nmodel_path = "{one}"\nctx_size = 256\n'
                   'parallel = 1\nthreads = 1\n')
    exe = str(Path(sys.executable).parent / "tightwad")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}

    def tw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=180)

    assert tw("start", "--config", str(cfg), "-p", "s", "--timeout", "60").returncode == 0
    try:
        out = tw("swap", str(two))
        assert out.returncode == 0, out.stderr
        assert "now serves two" in out.stdout and "- loading two.gguf beside one.gguf" in out.stdout
        bad = tw("swap", "/etc/passwd")
        assert bad.returncode == 1 and "not a .gguf file" in bad.stderr
    finally:
        tw("stop", "--all")

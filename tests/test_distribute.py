"""`tightwad distribute`: a file reaches every named agent through the
swarm, byte for byte; a second run finds it there; targets that cannot take
it say why; the agents' pull route takes no source or destination from the
request."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import trio

from tightwad_core.config.schema import PeerConfig
from tightwad_core.peer.agent import AgentState, run_agent

TOKEN = "distribute-test-token-0123"
EXE = str(Path(sys.executable).parent / "tightwad")
AUTH = {"authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def agents(tmp_path: Path, *dirs: list[str]) -> AsyncIterator[list[AgentState]]:
    async with trio.open_nursery() as nursery:
        states = []
        for i, model_dirs in enumerate(dirs):
            cfg = PeerConfig(listen="127.0.0.1:0", discovery=False, token=TOKEN, model_dirs=model_dirs)
            states.append(await nursery.start(partial(
                run_agent, cfg, run_path=tmp_path / f"run{i}", signals=False)))
        try:
            yield states
        finally:
            for s in states:
                s.shutdown.set()


async def _distribute(*args: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    env = {**os.environ, "DIST_TOKEN": token or ""}
    res = await trio.run_process([EXE, "distribute", *args, "--token-env", "DIST_TOKEN",
                                  "--serve", "127.0.0.1:0", "--piece-size", "256KiB"],
                                 capture_stdout=True, capture_stderr=True, check=False, env=env)
    return res.returncode, res.stdout.decode(), res.stderr.decode()


def _model(path: Path, mb: int) -> Path:
    path.write_bytes(os.urandom(mb << 20))
    return path


async def test_a_file_reaches_every_agent(tmp_path: Path) -> None:
    src = _model(tmp_path / "model.gguf", 6)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    async with agents(tmp_path, [str(a)], [str(b)]) as (ag, bg):
        rc, out, err = await _distribute(str(src), "--to", ag.url, "--to", bg.url, "--json")
        assert rc == 0, err
        results = json.loads(out)
        assert [r["state"] for r in results] == ["done", "done"]
        want = hashlib.sha256(src.read_bytes()).hexdigest()
        for folder in (a, b):
            got = folder / "model.gguf"
            assert hashlib.sha256(got.read_bytes()).hexdigest() == want
            assert (folder / "model.gguf.manifest.json").is_file()  # seeded from now on
        assert all(r["transferred"] == src.stat().st_size for r in results)
        async with httpx.AsyncClient() as c:  # the agent now serves it to others
            files = (await c.get(ag.url + "/v1/swarm/files", headers=AUTH)).json()["files"]
            assert [f["name"] for f in files] == ["model.gguf"] and files[0]["sha256"] == want
        # a second run finds the file in place and sends nothing
        rc, out, err = await _distribute(str(src), "--to", ag.url, "--json")
        assert rc == 0, err
        again = json.loads(out)[0]
        assert again["state"] == "done" and again["transferred"] == 0


async def test_targets_that_cannot_take_it_say_why(tmp_path: Path) -> None:
    src = _model(tmp_path / "model.gguf", 1)
    full = tmp_path / "full"
    full.mkdir()
    (full / "model.gguf").write_bytes(b"another file of the same name")
    async with agents(tmp_path, [], [str(full)], [str(tmp_path / "gone")]) as (nodirs, clash, gone):
        rc, out, err = await _distribute(str(src), "--to", nodirs.url, "--to", clash.url,
                                         "--to", gone.url)
        assert rc == 1, (out, err)
        assert "no model_dirs to pull into" in out and "already exists here" in out
        assert "gone does not exist" in out and not (tmp_path / "gone").exists()
        assert (full / "model.gguf").read_bytes() == b"another file of the same name"
        rc, out, err = await _distribute(str(src), "--to", clash.url, token="not-the-right-token-xx")
        assert rc == 1 and "refused the token" in out
    rc, out, err = await _distribute(str(src), "--to", "http://127.0.0.1:9")
    assert rc == 1 and "cannot reach the agent" in out
    rc, out, err = await _distribute(str(src), "--to", "10.0.0.5:9191")
    assert rc == 2 and err.startswith("error:") and "agent URL" in err


async def test_the_pull_route_takes_no_source_or_path(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    async with agents(tmp_path, [str(d)]) as (ag,):
        async with httpx.AsyncClient() as c:
            async def post(body: Any) -> httpx.Response:
                return await c.post(ag.url + "/v1/swarm/pulls", json=body, headers=AUTH)

            sha = "0" * 64
            for body, status in [
                ({"name": "m.gguf", "sha256": sha, "peers": ["http://evil:1"]}, 400),
                ({"name": "m.gguf", "sha256": sha, "path": "/etc/x"}, 400),
                ({"name": "../m.gguf", "sha256": sha}, 400),
                ({"name": "sub/m.gguf", "sha256": sha}, 400),
                ({"name": "m.gguf", "sha256": "abc"}, 400),
                ({"name": "m.gguf", "sha256": sha}, 409),  # no configured peers, no from_port
            ]:
                r = await post(body)
                assert r.status_code == status, (body, r.text)
            r = await c.post(ag.url + "/v1/swarm/pulls", json={"name": "m.gguf", "sha256": sha})
            assert r.status_code == 401
            # from_port: the source is the caller's own address; nothing serves there, so it fails
            r = await post({"name": "m.gguf", "sha256": sha, "from_port": 9})
            assert r.status_code == 202 and r.json()["sources"] == ["http://127.0.0.1:9"]
            job = r.json()["id"]
            with trio.fail_after(30):
                while (j := (await c.get(f"{ag.url}/v1/swarm/pulls/{job}", headers=AUTH)).json())[
                        "state"] == "running":
                    await trio.sleep(0.2)
            assert j["state"] == "failed" and j["error"]
    assert not list(d.iterdir())

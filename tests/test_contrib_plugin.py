"""The example plugin in contrib/ installs like any third-party package, shows
up in `tightwad plugins`, adds its command, and serves through the proxy."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import trio

from tightwad_core.config.profiles import BackendConfig, load_profile
from tightwad_core.http.server import serve_profile
from tightwad_core.plugins import load_registry
from tightwad_core.roles import Backend, BackendContext

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "contrib" / "tightwad-example-plugin"
FIRST_PARTY = {"llama-server": ("backends", "llama-server"), "openai": ("backends", "openai"),
               "ollama": ("backends", "ollama"), "direct": ("modes", "direct")}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, pip-installed into a folder of its own (offline)."""
    tmp = tmp_path_factory.mktemp("example-plugin")
    src = shutil.copytree(SOURCE, tmp / "src")  # the build writes into its source tree
    target = tmp / "site"
    argv = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
            "--disable-pip-version-check", "--no-input", "--target", str(target), str(src)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-3000:]
        hint = ""
        if "bdist_wheel" in out:
            hint = ("\nThis interpreter's setuptools cannot build wheels on its own: it needs "
                    "setuptools>=70.1 or the `wheel` package installed next to it.")
        pytest.fail(f"pip could not install {SOURCE} (exit {proc.returncode}){hint}\n{out}")
    return target


def tightwad(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("tightwad")
    argv = [str(script)] if script.exists() else [sys.executable, "-c",
                                                  "from tightwad_core.cli import main; main()"]
    full = {k: v for k, v in os.environ.items() if k != "TIGHTWAD_LOAD_PLUGINS"}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    full.update(env)
    proc = subprocess.run(argv + list(args), capture_output=True, text=True, env=full, timeout=120)
    command = " ".join(("tightwad",) + args)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{proc.stderr}"
    return proc


def plugins_json(site: Path, **env: str) -> dict[str, dict[str, object]]:
    out = tightwad(site, "plugins", "--json", **env).stdout
    return {p["name"]: p for p in json.loads(out)}


def test_plugins_lists_example_with_first_party(site: Path) -> None:
    found = plugins_json(site)
    example = found.get("example")
    assert example is not None, f"the example plugin was not loaded; plugins: {sorted(found)}"
    assert example["distribution"] == "tightwad-example-plugin"
    assert example["version"] == "0.1.0"
    assert example["registered"] == {"backends": ["echo-example"], "commands": ["example-hello"]}
    for name, (kind, item) in FIRST_PARTY.items():
        assert name in found, f"first-party plugin {name!r} missing; plugins: {sorted(found)}"
        assert found[name]["distribution"] == "tightwad"
        assert item in found[name]["registered"].get(kind, []), found[name]


def test_load_plugins_allowlist(site: Path) -> None:
    found = plugins_json(site, TIGHTWAD_LOAD_PLUGINS="llama-server,direct")
    assert sorted(found) == ["direct", "llama-server"]


def test_example_command(site: Path) -> None:
    assert tightwad(site, "example-hello").stdout == "hello, world, from tightwad-example-plugin\n"
    out = tightwad(site, "example-hello", "--name", "tester").stdout
    assert out.strip() == "hello, tester, from tightwad-example-plugin"
    assert "example-hello" in tightwad(site, "--help").stdout


CONFIG = """\
default_profile = "echo"

[profiles.echo]
description = "the example plugin's echo backend"
listen = "127.0.0.1:0"

[profiles.echo.target]
backend = "echo-example"
url = "http://127.0.0.1:1"  # required by the validator; the echo backend ignores it
"""


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The plugin module, imported from its source folder. That folder holds no
    dist-info, so the plugin is not also found as an entry point."""
    monkeypatch.syspath_prepend(str(SOURCE))
    monkeypatch.delenv("TIGHTWAD_LOAD_PLUGINS", raising=False)
    return importlib.import_module("tightwad_example")


def test_echo_backend_fills_the_backend_protocol(example: ModuleType, tmp_path: Path) -> None:
    config = BackendConfig(backend="echo-example", url="http://127.0.0.1:1")
    backend = example.EchoBackend(config, BackendContext("draft", tmp_path, tmp_path))
    assert isinstance(backend, Backend)
    assert (backend.kind, backend.role) == ("echo-example", "draft")
    assert backend.passthrough == frozenset()


async def test_echo_backend_through_the_proxy(tmp_path: Path, example: ModuleType) -> None:
    path = tmp_path / "tightwad.toml"
    path.write_text(CONFIG)
    name, profile = load_profile(path, check_files=False)
    registry = load_registry(extra={"example": example})
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(partial(serve_profile, name, profile, config_dir=tmp_path,
                                                  registry=registry, listen="127.0.0.1:0",
                                                  run_dir=tmp_path))
            try:
                await check_echo(running.url)
            finally:
                running.shutdown.set()


async def check_echo(url: str) -> None:
    said = "echo these five words please"
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": said}]
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:
        health = (await client.get("/health")).json()
        assert health["status"] == "ok", health
        assert health["backends"]["target"]["backend"] == "echo-example"

        r = await client.post("/v1/chat/completions", json={"messages": msgs})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == said
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 5  # words: the backend has no tokenizer

        r = await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2})
        choice = r.json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == ("echo these", "length")

        r = await client.post("/v1/chat/completions", json={"messages": msgs, "stop": [" words"]})
        assert r.json()["choices"][0]["message"]["content"] == "echo these five"

        req = {"messages": msgs, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=req) as resp:
            assert resp.status_code == 200
            pieces = [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]
        assert pieces[-1] == "[DONE]"
        chunks = [json.loads(p) for p in pieces[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == said
        assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) == 5

        r = await client.post("/v1/chat/completions", json={"messages": msgs, "logit_bias": {}})
        assert r.status_code == 400 and "logit_bias" in r.text  # passthrough is empty

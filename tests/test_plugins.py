"""The plugin manager: entry points, the allowlist, duplicate names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tightwad_core.hookspecs import hookimpl
from tightwad_core.plugins import DuplicateNameError, load_registry

FIRST_PARTY = {"direct", "llama-server", "openai", "ollama"}


def test_first_party_plugins_come_from_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIGHTWAD_LOAD_PLUGINS", raising=False)
    reg = load_registry()
    infos = {p.name: p for p in reg.plugins()}
    assert FIRST_PARTY <= set(infos)
    assert infos["llama-server"].distribution == "tightwad"
    assert infos["llama-server"].registered == {"backends": ("llama-server",)}
    assert infos["direct"].registered == {"modes": ("direct",)}
    assert set(reg.names("backends")) >= {"llama-server", "openai", "ollama"}


def test_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIGHTWAD_LOAD_PLUGINS", "direct, openai")
    reg = load_registry()
    assert {p.name for p in reg.plugins()} == {"direct", "openai"}
    with pytest.raises(KeyError, match="no backend named 'llama-server'"):
        reg.get("backends", "llama-server")
    monkeypatch.setenv("TIGHTWAD_LOAD_PLUGINS", "")
    assert load_registry().plugins() == []


class _Dup:
    @hookimpl
    def register_backends(self, register):  # type: ignore[no-untyped-def]
        register("openai", object)


def test_duplicate_names_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIGHTWAD_LOAD_PLUGINS", raising=False)
    with pytest.raises(DuplicateNameError, match="'openai' registered by both"):
        load_registry(extra={"dup": _Dup()})


def test_plugins_json_cli() -> None:
    exe = Path(sys.executable).parent / "tightwad"
    r = subprocess.run([str(exe), "plugins", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    data = {p["name"]: p for p in json.loads(r.stdout)}
    assert FIRST_PARTY <= set(data)
    assert data["ollama"]["registered"] == {"backends": ["ollama"]}
    assert data["ollama"]["version"]

"""Shared fixtures: real llama-server processes on real models (the tiny
random-weight model for fast tests, the Qwen pair from `tightwad setup` for
output checks) and an in-process proxy in front of them."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from tightwad_core.config.profiles import BackendConfig, Profile
from tightwad_core.http.server import Running, serve_profile
from tightwad_core.runtime import catalog
from tightwad_core.runtime.procs import StartupError, find_engine, free_port


def engine(name: str = "llama-server") -> Path:
    try:
        return find_engine(name)
    except StartupError as exc:
        pytest.fail(f"{exc} (the test suite needs the engines: run `tightwad setup`)")


def qwen(name: str) -> Path:
    path = catalog.model_path(name)
    if not path.exists():
        pytest.fail(f"{path} is missing: run `tightwad setup` first")
    return path


class ServerProc:
    """A llama-server subprocess for the whole test session."""

    def __init__(self, model: Path, log: Path, *extra: str, parallel: int = 4, ctx: int = 2048,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = [str(engine()), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                "-c", str(ctx * parallel), "-np", str(parallel), "--jinja", "--no-webui",
                "-t", "2", "--alias", model.stem, "--no-cache-prompt", *extra]
        self._logf = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("llama-server did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._logf.close()


@pytest.fixture(scope="session")
def llama_cpp_installed() -> None:
    """The worker's engine; `tightwad setup` installs it. Missing is a failure, not a skip."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed: run `tightwad setup`")


@pytest.fixture(scope="session")
def qwen_target_file() -> Path:
    return qwen(catalog.DEFAULT_TARGET)


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    return engine()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tightwad_core.testing.tinymodels import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", seed=1)


@pytest.fixture(scope="session")
def tiny_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc(tiny_model, tmp_path_factory.mktemp("logs") / "tiny.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def qwen_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc(qwen(catalog.DEFAULT_TARGET), tmp_path_factory.mktemp("logs") / "qwen.log")
    yield srv
    srv.stop()


def relay_profile(url: str, **kw: object) -> Profile:
    backend = kw.pop("backend", "llama-server")
    target = BackendConfig(backend=str(backend), url=url, **kw.pop("target_kw", {}))  # type: ignore[arg-type]
    return Profile(mode="direct", listen="127.0.0.1:0", target=target, **kw)  # type: ignore[arg-type]


async def start_proxy(nursery, profile: Profile, tmp_path: Path, name: str = "test") -> Running:  # type: ignore[no-untyped-def]
    return await nursery.start(partial(serve_profile, name, profile, config_dir=tmp_path,
                                       run_dir=tmp_path))


@pytest.fixture
def env_no_plugins_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIGHTWAD_LOAD_PLUGINS", raising=False)


os.environ.setdefault("NO_COLOR", "1")

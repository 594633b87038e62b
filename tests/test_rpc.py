"""The RPC pool: a real handshake with real rpc-servers, and the worker placing
a model on them (the output layer kept local), giving the same tokens."""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from click.testing import CliRunner

from tightwad_core.runtime import catalog, rpc
from tightwad_core.runtime.procs import free_port
from tightwad_core.testing.tinymodels import write_tiny_model
from tightwad_plugins.worker.cli import WorkerConfigError, serve_worker, worker_command


class RpcServer:
    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self._log = log.open("wb")
        self.proc = subprocess.Popen([str(catalog.engine_binary("rpc-server")), "-H", "127.0.0.1",
                                      "-p", str(self.port), "-t", "1"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with __import__("socket").create_connection(("127.0.0.1", self.port), 0.2):
                    return  # listening (the connection is dropped before any handshake)
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"rpc-server did not listen: {log.read_text()[-1000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[RpcServer]]:
    pool = [RpcServer(tmp_path / f"rpc{i}.log") for i in range(2)]
    yield pool
    for s in pool:
        s.stop()


async def test_handshake_says_version_and_refuses_what_is_not_a_pool(servers, tmp_path):
    ours = rpc.engine_version()
    assert ours is not None and ours.major >= 1
    assert await rpc.hello(servers[0].endpoint) == ours
    assert (await rpc.check_servers([s.endpoint for s in servers], ours)) == {
        s.endpoint: ours for s in servers}
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(rpc.RpcError, match=f"{dead} is unreachable"):
        await rpc.hello(dead, timeout=2)
    # a server of another protocol version is refused, naming both versions
    newer = rpc.RpcVersion(ours.major + 1, 0, 0)

    async def other_version(stream: trio.SocketStream) -> None:
        await stream.receive_some(1 + 8 + rpc.CAPS_SIZE)
        await stream.send_all(struct.pack("<Q", 28) + bytes([newer.major, 0, 0, 0]) + bytes(24))

    async def not_rpc(stream: trio.SocketStream) -> None:
        await stream.receive_some(100)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    async with trio.open_nursery() as nursery:
        a = (await nursery.start(trio.serve_tcp, other_version, 0))[0].socket.getsockname()[1]
        b = (await nursery.start(trio.serve_tcp, not_rpc, 0))[0].socket.getsockname()[1]
        with pytest.raises(rpc.RpcError, match=f"protocol {newer}, this engine {ours}"):
            await rpc.check_servers([f"127.0.0.1:{a}"], ours)
        with pytest.raises(rpc.RpcError, match="not an rpc-server"):
            await rpc.hello(f"127.0.0.1:{b}", timeout=2)
        nursery.cancel_scope.cancel()


async def test_worker_on_the_pool_gives_the_local_tokens(nursery, servers, tmp_path):
    model = write_tiny_model(tmp_path / "pool.gguf", seed=7, n_layer=4)
    body = {"prompt": "once upon a time", "max_tokens": 16, "temperature": 0}
    local = await nursery.start(partial(serve_worker, model, "127.0.0.1", 0, ctx=256, threads=1))
    pooled = await nursery.start(partial(serve_worker, model, "127.0.0.1", 0, ctx=256, threads=1,
                                         rpc=[s.endpoint for s in servers]))
    async with httpx.AsyncClient(timeout=60) as c:
        want = (await c.post(local.url + "/v1/completions", json=body)).json()["choices"][0]["text"]
        got = (await c.post(pooled.url + "/v1/completions", json=body)).json()["choices"][0]["text"]
        info = (await c.get(pooled.url + "/v1/tightwad/info")).json()
    assert got == want
    assert all(d.startswith("RPC") for d in info["devices"]) and len(info["devices"]) == 2
    # llama.cpp offloads the last N of the 4 + 1 layers: all of them, with the output
    # layer's tensors overridden back to this machine
    assert info["n_gpu_layers"] == 5
    assert "the last 5 of 5 layers" in info["placement"] and "=CPU" in info["placement"]
    pooled.shutdown.set()


async def test_worker_with_a_pool_member_down_fails_fast_naming_it(servers, tmp_path):
    model = write_tiny_model(tmp_path / "down.gguf", seed=7)
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(WorkerConfigError, match=f"{dead} is unreachable"):
        await serve_worker(model, "127.0.0.1", 0, ctx=256, threads=1, rpc=[servers[0].endpoint, dead])


def test_worker_command_names_the_member_that_is_down(servers, tmp_path):
    model = write_tiny_model(tmp_path / "down.gguf", seed=7)
    dead = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(worker_command, ["--model", str(model), "--port", "0",
                                                 "--rpc", f"{servers[0].endpoint},{dead}"])
    assert result.exit_code == 2 and dead in result.output and "Traceback" not in result.output

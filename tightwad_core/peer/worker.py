"""The node's `tightwad rpc-worker`, started and stopped through the agent.

The executable comes from the config only (default: this install's
`tightwad`), the port from the configured range only; the request names
nothing else. The process is supervised (restarted if it dies) and its
output kept in a ring buffer for the logs route.
"""

from __future__ import annotations

import logging
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from tightwad_core.peer.config import Settings
from tightwad_core.peer.logs import Ring
from tightwad_core.runtime.procs import StartupError, Supervised, tcp_listening

log = logging.getLogger("tightwad.peer")
FINGERPRINT = re.compile(r"certificate fingerprint: (sha256:[0-9a-f]{64})")
TOKEN_FILE = re.compile(r"^token: in (\S.*?)(?: \(or the variable|$)")


class Refused(Exception):
    """A start the agent will not do; the message is one line for the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def default_binary() -> Path:
    return Path(sys.executable).parent / "tightwad"


class RpcWorkerControl:
    """One rpc-worker at most; `start` and `stop` from request handlers,
    with the agent's long-lived nursery given to `attach`."""

    def __init__(self, settings: Settings, run_dir: Path, ring: Ring) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.ring = ring
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()
        self._proc: Supervised | None = None
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None
        self.port: int | None = None
        self.error: str | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    @property
    def running(self) -> bool:
        return self._done is not None and not self._done.is_set()

    def argv(self, port: int, threads: int | None) -> list[str]:
        binary = self.settings.cfg.rpc_worker_binary
        host = self.settings.host
        argv = [str(Path(binary).expanduser() if binary else default_binary()), "rpc-worker",
                "--listen", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        return argv + (["--threads", str(threads)] if threads else [])

    async def start(self, port: int, threads: int | None) -> dict[str, Any]:
        if port not in self.settings.rpc_ports:
            raise Refused(f"port {port} is outside this agent's rpc_ports "
                          f"({self.settings.cfg.rpc_ports})")
        if threads is not None and not 0 < threads <= 1024:
            raise Refused("threads must be from 1 to 1024")
        async with self._lock:
            if self.running:
                raise Refused(f"an rpc-worker already runs on port {self.port}: stop it first", 409)
            assert self._nursery is not None, "attach() the agent's nursery first"
            probe = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else (
                "::1" if self.settings.host == "::" else self.settings.host)
            self.ring.add(f"--- starting rpc-worker on port {port}")
            proc = Supervised("rpc-worker", self.argv(port, threads), self.run_dir / "rpc-worker.log",
                              None, ready=partial(tcp_listening, probe, port), startup_timeout=90,
                              on_output=self.ring.add)
            self.error = None
            try:
                await self._nursery.start(self._supervise, proc)
            except StartupError as exc:
                self.error = str(exc).splitlines()[0]
                raise Refused(f"the rpc-worker did not start: {self.error}", 502) from None
            self._proc, self.port = proc, port
            log.info("rpc-worker started on port %s (pid %s)", port, proc.pid)
            return self.state()

    async def _supervise(self, proc: Supervised, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run ``proc`` until `stop` (restarted when it dies: ``serve`` raises
        only when the first start fails, out of `Nursery.start`)."""
        done = trio.Event()
        self._done = done
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                await proc.serve(task_status=task_status)
        finally:
            done.set()

    async def stop(self) -> dict[str, Any]:
        async with self._lock:
            if self.running and self._scope is not None and self._done is not None:
                self._scope.cancel()
                await self._done.wait()
                log.info("rpc-worker stopped")
            return self.state()

    def state(self) -> dict[str, Any]:
        proc = self._proc
        fingerprint = token_file = None
        for line in self.ring.lines():
            if m := FINGERPRINT.search(line):
                fingerprint = m.group(1)
            if m := TOKEN_FILE.search(line):
                token_file = m.group(1)
        state = "stopped"
        if self.running and proc is not None:
            state = "running" if proc.healthy else "restarting"
        return {"state": state, "port": self.port if self.running else None,
                "pid": proc.pid if proc is not None and self.running else None,
                "fingerprint": fingerprint, "token_file": token_file,
                "state_dir": str(Path(token_file).parent) if token_file else None,
                "restarts": proc.restarts if proc is not None else 0,
                "last_exit": proc.last_exit if proc is not None else None, "error": self.error,
                "log": str(self.run_dir / "rpc-worker.log"),
                "ports": self.settings.cfg.rpc_ports}

"""Launching and supervising engine processes (llama-server, rpc-server).

A `Supervised` process is started without a shell, logs to a file, is healthy
once its health URL answers 200, is restarted (with back-off) when it dies if
asked to, and is terminated (then killed) when its task is cancelled.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import httpx
import trio

from tightwad_core.runtime.catalog import engine_binary

log = logging.getLogger("tightwad.procs")


class StartupError(Exception):
    """A launched process never became healthy; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_engine(name: str) -> Path:
    """A llama.cpp binary: ``TIGHTWAD_<NAME>`` env var, the set-up cache, then PATH."""
    env = os.environ.get("TIGHTWAD_" + name.upper().replace("-", "_"))
    if env:
        return Path(env)
    cached = engine_binary(name)
    if cached.exists():
        return cached
    found = shutil.which(name)
    if found:
        return Path(found)
    raise StartupError(f"{name} not found: run `tightwad setup` (or put {name} on PATH)")


def usable_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2
    CPU quota (``cpu.max`` of ``"<quota> <period>"``) when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, _, period = cgroup_cpu_max.read_text().strip().partition(" ")
        if quota != "max" and int(period) > 0:
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


async def tcp_listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (a
    `Supervised` readiness check for processes that speak no HTTP)."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return False
    await stream.aclose()
    return True


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


class Supervised:
    """One supervised child process; run `serve` in a nursery.

    Healthy once ``health_url`` answers 200 (or ``ready()`` says True, for
    processes that speak no HTTP). ``before_start`` runs before every start
    (e.g. waiting for the machines a process needs); its exception ends the
    supervision. ``on_output``, when given, also receives each line the
    process prints (stdout and stderr), as it comes."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        health_url: str | None,
        *,
        ready: Callable[[], Awaitable[bool]] | None = None,
        before_start: Callable[[], Awaitable[None]] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 180.0,
        restart: bool = True,
        max_backoff: float = 30.0,
        on_output: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.ready = ready
        self.before_start = before_start
        self.env = {**os.environ, **env} if env else None
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.health_url = health_url
        self.startup_timeout = startup_timeout
        self.restart = restart
        self.max_backoff = max_backoff
        self.on_output = on_output
        self.healthy = False
        self.restarts = 0
        self.pid: int | None = None
        self.last_exit: int | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        backoff = 0.5
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            if self.before_start is not None:
                await self.before_start()
            with open(self.log_path, "ab") as logf:
                proc = await trio.lowlevel.open_process(
                    self.argv, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                    stdout=logf if self.on_output is None else subprocess.PIPE,
                    start_new_session=True, env=self.env,
                )
            self.pid = proc.pid
            failure: StartupError | None = None
            async with trio.open_nursery() as pumps:  # the output's reader, with on_output
                if self.on_output is not None and proc.stdout is not None:
                    pumps.start_soon(self._pump, proc.stdout, self.on_output)
                try:
                    healthy = await self._start_once(proc, started, task_status)
                    started = started or healthy
                    backoff = 0.5 if healthy else backoff
                except StartupError as exc:  # raised below, outside the nursery (not in a group)
                    failure = exc
                finally:
                    self.healthy = False
                    with trio.CancelScope(shield=True):
                        await stop_process(proc)
                pumps.cancel_scope.deadline = trio.current_time() + 1.0  # its last lines
            if failure is not None:
                raise failure
            self.restarts += 1
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _start_once(self, proc: trio.Process, started: bool,
                          task_status: trio.TaskStatus[None]) -> bool:
        """Wait for this start of the process to be healthy, then for its end;
        whether it was healthy (False: it failed to come back, will be retried)."""
        try:
            await self._wait_healthy(proc)
        except StartupError:
            if not started or not self.restart:
                raise
            log.warning("%s failed to come back: %s", self.name, log_tail(self.log_path, 3))
            return False
        self.healthy = True
        if not started:
            task_status.started()
        else:
            log.warning("%s is back (pid %s)", self.name, proc.pid)
        self.last_exit = await proc.wait()
        self.healthy = False
        log.warning("%s exited with status %s", self.name, self.last_exit)
        if not self.restart:
            raise StartupError(f"{self.name} exited with status {self.last_exit}")
        return True

    async def _pump(self, stream: trio.abc.ReceiveStream, sink: Callable[[str], None]) -> None:
        """Copy the process's output to its log file and, line by line, to ``sink``."""
        pending = b""
        async with await trio.open_file(self.log_path, "ab") as logf:
            async for chunk in stream:
                await logf.write(chunk)
                await logf.flush()
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    sink(line.decode("utf-8", "replace").rstrip("\r"))
                if len(pending) > 65536:  # a line without an end: pass it on in pieces
                    sink(pending.decode("utf-8", "replace"))
                    pending = b""
        if pending:
            sink(pending.decode("utf-8", "replace"))

    async def _wait_healthy(self, proc: trio.Process) -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            with trio.move_on_after(self.startup_timeout) as scope:
                while True:
                    if proc.poll() is not None:
                        raise StartupError(
                            f"{self.name} exited with status {proc.returncode} while starting; "
                            f"log {self.log_path}:\n{log_tail(self.log_path)}"
                        )
                    if self.ready is not None:
                        if await self.ready():
                            return
                    elif self.health_url is not None:
                        try:
                            r = await client.get(self.health_url)
                            if r.status_code == 200:
                                return
                        except httpx.TransportError:
                            pass
                    await trio.sleep(0.1)
            if scope.cancelled_caught:
                raise StartupError(
                    f"{self.name} was not healthy after {self.startup_timeout:.0f}s; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )


async def stop_process(proc: trio.Process, grace: float = 5.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; always reaps."""
    if proc.returncode is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        with trio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
    await proc.wait()

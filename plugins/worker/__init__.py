"""``tightwad worker``: a target (and drafter) server on llama-cpp-python that
verifies K draft tokens in one forward pass per request, with the KV cache
kept per session. See docs/worker.md."""

from __future__ import annotations

from typing import Callable

from tightwad_core.hookspecs import hookimpl


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    from tightwad_plugins.worker.cli import worker_command

    register(worker_command)

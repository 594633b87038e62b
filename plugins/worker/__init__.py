"""``tightwad worker``: a target (and drafter) server on llama-cpp-python that
verifies K draft tokens in one forward pass per request, with the KV cache
kept per session. See docs/worker.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tightwad_core.hookspecs import hookimpl

if TYPE_CHECKING:
    import click


@hookimpl
def register_commands(register: Callable[[click.Command], None]) -> None:
    from tightwad_plugins.worker.cli import worker_command

    register(worker_command)

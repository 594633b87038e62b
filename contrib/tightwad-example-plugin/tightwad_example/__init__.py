"""An example Tightwad plugin: the ``echo-example`` backend and the
``tightwad example-hello`` command."""

from __future__ import annotations

from collections.abc import Callable

import click

from tightwad_core.hookspecs import hookimpl
from tightwad_core.roles import BackendFactory

from .echo import EchoBackend

__all__ = ["EchoBackend", "hello", "register_backends", "register_commands"]


@hookimpl
def register_backends(register: Callable[[str, BackendFactory], None]) -> None:
    register("echo-example", EchoBackend)


@click.command("example-hello")
@click.option("--name", default="world", show_default=True, help="Who to greet.")
def hello(name: str) -> None:
    """Print one friendly line (shows how a plugin adds a command)."""
    click.echo(f"hello, {name}, from tightwad-example-plugin")


@hookimpl
def register_commands(register: Callable[[click.Command], None]) -> None:
    register(hello)

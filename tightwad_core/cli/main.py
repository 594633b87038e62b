"""The `tightwad` command group and what its commands share: one-line errors,
logging, the --config/--profile options and finding the profile to serve."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tightwad_core import __version__
from tightwad_core.config.profiles import load_profile
from tightwad_core.config.shipped import builtin_config


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def byte_progress(quiet: bool = False, *, eta: bool = True, transient: bool = True) -> Any:
    """A rich progress bar for bytes moving (description, bar, bytes, speed,
    time left) on stderr; off with ``quiet`` (``--json``) or when stderr is
    not a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                          TransferSpeedColumn()]
    if eta:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, transient=transient,
                    disable=quiet or not console.is_terminal)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        datefmt="[%X]", handlers=[RichHandler(rich_tracebacks=False, show_path=False)])
    logging.getLogger("httpx").setLevel(logging.WARNING)


config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Config file (default: $TIGHTWAD_CONFIG, ./tightwad.toml, ~/.config/tightwad/tightwad.toml).")
profile_option = click.option("--profile", "-p", default=None,
                              help="Profile to use (default: the file's default_profile).")


class _Main(click.Group):
    """Adds the commands plugins register, once, when the CLI is built."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._plugins_loaded = False

    def _load(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        try:
            from tightwad_core.plugins import load_registry

            for name, cmd in load_registry().entries.get("commands", {}).items():
                if name not in self.commands:
                    self.add_command(cmd, name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the CLI
            click.echo(f"warning: plugin commands not loaded: {exc}", err=True)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, name)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tightwad")
def main() -> None:
    """Tightwad: one OpenAI- and Ollama-compatible URL in front of your model
    servers, with speculative decoding and pooled machines.

    Start with `tightwad setup` (engines and models), then `tightwad run
    --profile demo` and point any OpenAI SDK at http://127.0.0.1:8088/v1.
    """


def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _load_for_run(path: Path, profile: str | None, explicit: bool) -> tuple[str, Any]:
    """With no config file of the user's, the shipped profiles serve."""
    if not path.exists() and not explicit:
        return load_profile(builtin_config(), profile)
    return load_profile(path, profile)


_run_options = [
    config_option, profile_option,
    click.option("--listen", default=None, help="host:port to listen on (overrides the profile)."),
    click.option("--verbose", "-v", is_flag=True, help="Debug logging."),
]


def _with(options: list[Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco

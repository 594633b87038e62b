"""`tightwad setup`: engines, the Python binding and the model pair."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from tightwad_core.cli.main import _fail, main


@main.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print the paths of the binaries and model files as JSON (progress goes to stderr).")
@click.option("--check", is_flag=True, help="Only report what is present or missing; change nothing.")
@click.option("--no-engine", is_flag=True, help="Skip building llama.cpp (its libraries, llama-server, rpc-server, llama-quantize).")
@click.option("--no-binding", is_flag=True, help="Skip installing llama-cpp-python on the engine's libraries.")
@click.option("--models", default=None, metavar="A,B",
              help="Comma-separated built-in models to fetch (default: all); empty for none.")
@click.option("--jobs", "-j", type=int, default=None, help="Parallel build jobs (default: all cores).")
@click.option("--tiny-model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Instead, write a tiny random-weight GGUF (for fast tests) to this path.")
def setup(as_json: bool, check: bool, no_engine: bool, no_binding: bool, models: str | None,
          jobs: int | None, tiny_model: Path | None) -> None:
    """Build and fetch everything Tightwad runs on, into the cache.

    Builds llama.cpp once, as shared libraries with RPC support plus
    llama-server, rpc-server and llama-quantize, from the sources pinned by
    Tightwad; installs llama-cpp-python packaged around those same libraries
    (no second compile); and fetches the Qwen2.5-Coder 0.5B/1.5B GGUF pair, checking
    each file's SHA-256. The cache is ~/.cache/tightwad (TIGHTWAD_CACHE
    overrides) and is keyed by version: a second run does nothing and says so.
    """
    from tightwad_core.runtime import setup as sr

    if tiny_model is not None:
        from tightwad_core.testing.tinymodels import write_tiny_model

        path = write_tiny_model(tiny_model)
        click.echo(json.dumps({"tiny_model": str(path)}) if as_json else f"wrote {path}")
        return
    if check:
        st = sr.status()
        if as_json:
            click.echo(json.dumps(st, indent=2))
        else:
            click.echo(f"cache: {st['cache']}")
            for item in st["missing"]:
                click.echo(f"missing: {item}")
            click.echo("everything is set up" if st["ok"] else "run `tightwad setup` to fix the above")
        sys.exit(0 if st["ok"] else 1)
    names = None if models is None else [m.strip() for m in models.split(",") if m.strip()]
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        DownloadColumn(), TimeElapsedColumn(), console=console, transient=False)
    try:
        with progress:
            result = sr.run_setup(engine=not no_engine, python_binding=not no_binding, models=names,
                                  progress=progress, jobs=jobs)
    except sr.SetupError as exc:
        _fail(str(exc), 1)
        return
    except KeyboardInterrupt:
        _fail("interrupted; partial downloads are discarded and the next run resumes", 130)
        return
    if as_json:
        data = asdict(result)
        data["cache"] = str(result.cache)
        click.echo(json.dumps(data, indent=2))
        return
    for line in result.steps:
        click.echo(line)
    click.echo("setup: everything was already in place, nothing to do" if not result.did_work
               else f"setup: done; cache {result.cache}")

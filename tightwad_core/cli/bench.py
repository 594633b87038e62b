"""`tightwad bench`: the speculative proxy against its own target, side by side."""

from __future__ import annotations

import logging
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

import click

from tightwad_core.bench.link import LinkSpec, parse_bandwidth, parse_delay
from tightwad_core.cli.link import checked
from tightwad_core.cli.main import _fail, _leaf, _load_for_run, builtin_config, main


def _load(config: Path | None, profile: str | None) -> tuple[str, Any, Path]:
    """The profile, as `tightwad run` finds it (the shipped profiles without a config file)."""
    from tightwad_core.config.profiles import find_config

    path = find_config(config)
    explicit = config is not None or "TIGHTWAD_CONFIG" in os.environ
    name, prof = _load_for_run(path, profile, explicit)
    if not path.exists() and not explicit:
        path = builtin_config()
    return name, prof, path.parent


def link_of(delay: float | None, bandwidth: float | None) -> LinkSpec | None:
    """The emulated link --link-delay/--link-bandwidth ask for (None: none)."""
    if delay is None and bandwidth is None:
        return None
    return LinkSpec(delay or 0.0, bandwidth)


def exit_for(exc: BaseException) -> None:
    """A failed bench run as one line and its exit status: 2 for a config or
    prompts error, 1 for a server that failed, 130 after Ctrl-C; anything
    else that is not an Exception is raised again."""
    from tightwad_core.bench.prompts import BenchError
    from tightwad_core.config.profiles import ConfigError
    from tightwad_core.runtime.procs import StartupError

    leaf = _leaf(exc)
    if isinstance(leaf, (ConfigError, BenchError)):
        _fail(str(leaf), 2)
    if isinstance(leaf, StartupError):
        _fail(str(leaf).splitlines()[0], 1)
    if isinstance(leaf, KeyboardInterrupt):
        _fail("interrupted", 130)
    if isinstance(leaf, Exception):
        first = (str(leaf).splitlines() or [""])[0]
        _fail(f"{leaf.__class__.__name__}: {first}", 1)
    raise exc


async def _bench(name: str, prof: Any, config_dir: Path, prompts: list[dict[str, str]], max_tokens: int,
                 draft_tokens: int | None, link: LinkSpec | None, repeat: int,
                 progress: Any, baseline: str | None = None) -> tuple[dict[str, Any] | None, bool]:
    """Run the bench until done or Ctrl-C; returns (report so far, interrupted)."""
    import trio

    from tightwad_core.bench.run import run_bench

    last: dict[str, Any] = {}
    interrupted = False
    task = progress.add_task("starting the target and the proxy", total=len(prompts))

    def step(done: int, total: int, report: dict[str, Any]) -> None:
        last["report"] = report
        progress.update(task, completed=done, description=f"prompt {min(done + 1, total)} of {total}")

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                nonlocal interrupted
                async for _ in signals:
                    interrupted = True
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            report = await run_bench(name, prof, config_dir=config_dir, prompts=prompts,
                                     max_tokens=max_tokens, draft_tokens=draft_tokens, link=link,
                                     repeat=repeat, progress=step, baseline=baseline)
            last["report"] = report
            nursery.cancel_scope.cancel()
    return last.get("report"), interrupted


@main.command("bench")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="PATH",
              help="Config file (default: $TIGHTWAD_CONFIG, ./tightwad.toml, "
                   "~/.config/tightwad/tightwad.toml).")
@click.option("--profile", "-p", default=None, metavar="NAME",
              help="A speculative profile (default: the file's default_profile).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE", help="A JSON list of prompts, or a text file with one prompt per line "
                                   "(default: the shipped set).")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Run only the first N prompts.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True, metavar="N",
              help="Tokens generated per prompt.")
@click.option("--draft-tokens", type=click.IntRange(0, 64), default=None, metavar="K",
              help="Pin K, the draft tokens per round (default: the profile's).")
@click.option("--link-delay", default=None, metavar="TIME", callback=checked(parse_delay),
              help="Emulate a link to the target with this one-way delay: 10ms, 0.5s.")
@click.option("--link-bandwidth", default=None, metavar="RATE", callback=checked(parse_bandwidth),
              help="...and this bandwidth per direction: 100mbit, 1gbit, 10MB.")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Run each prompt N times and report medians.")
@click.option("--baseline", default=None, metavar="BACKEND",
              help="Also time this backend launched alone on the target's GGUF, e.g. "
                   "llama-server (the server you would run instead), as a third side: the "
                   "report gives both ratios.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE",
              help="Also write the report to this JSON file.")
def bench(config: Path | None, profile: str | None, prompts_file: Path | None, limit: int | None,
          max_tokens: int, draft_tokens: int | None, link_delay: float | None,
          link_bandwidth: float | None, repeat: int, baseline: str | None,
          json_file: Path | None) -> None:
    """Measure a speculative profile against its own target, prompt by prompt.

    Starts the profile's target on its own, then the proxy in front of it
    (which launches the draft), and sends every prompt both ways, greedy,
    alternating which side goes first. Prints wall times, speed-up,
    acceptance, tokens per round and whether the proxy's answer was the
    target's own. With --link-delay/--link-bandwidth both sides reach the
    target through an emulated network link. With --baseline llama-server a
    stock llama-server on the target's GGUF is timed too, so a worker target
    is compared both with itself alone and with the server users run
    instead. Ctrl-C stops early and prints what was measured.
    """
    import trio
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tightwad_core.bench.prompts import BenchError, load_prompts
    from tightwad_core.bench.report import render, write_json
    from tightwad_core.bench.run import check_profile
    from tightwad_core.config.profiles import ConfigError

    console = Console()
    try:
        name, prof, config_dir = _load(config, profile)
        check_profile(name, prof)
        prompts = load_prompts(prompts_file, limit)
    except (ConfigError, BenchError) as exc:
        _fail(str(exc), 2)
        return
    link = link_of(link_delay, link_bandwidth)

    from rich.logging import RichHandler

    # warnings of the proxy and the backends go above the progress bar, then the old setup returns
    logger = logging.getLogger("tightwad")
    saved = (logger.level, logger.propagate)
    handler = RichHandler(console=console, show_path=False)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
    try:
        with progress:
            report, interrupted = trio.run(partial(_bench, name, prof, config_dir, prompts, max_tokens,
                                                   draft_tokens, link, repeat, progress, baseline))
    except BaseException as exc:  # noqa: BLE001 - mapped to one clear line
        exit_for(exc)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    if report is None or not report["prompts"]:
        _fail("interrupted before any prompt was measured" if interrupted else "nothing was measured",
              130 if interrupted else 1)
        return
    title = None
    if interrupted:
        n = report["totals"]["prompts"]
        title = f"interrupted: {n} of {len(prompts)} prompt(s) measured"
        report["complete"] = False
    render(report, console, title=title)
    if json_file is not None:
        write_json(report, json_file)
        console.print(f"report written to {json_file}")
    if interrupted:
        sys.exit(130)

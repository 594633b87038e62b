"""`tightwad moe bench`: a live table of streamed chat completions from any
OpenAI-compatible server (see tightwad_core.moe.bench)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tightwad_core.cli.main import _fail
from tightwad_core.cli.moe import moe

if TYPE_CHECKING:
    from tightwad_core.moe.bench import BenchRun


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(run: BenchRun, *, width: int = 80, limit: int | None = None, title: str | None = None) -> Any:
    """The table, ``width`` columns wide at most: a row per request (at most
    ``limit``: those in flight and the latest finished) and the summary row.
    Prompts, errors and the title are plain text, never rich markup."""
    from rich.table import Table
    from rich.text import Text

    from tightwad_core.moe.bench import acceptance, summary

    now = time.perf_counter()
    spec = run.before is not None
    s = summary(run, now)
    acc = acceptance(run)
    caption = (f"TTFT median {_num(s['ttft_median_s'], '.3f')} s, p90 {_num(s['ttft_p90_s'], '.3f')} s; "
               f"tok/s median {_num(s['tok_s_median'], '.1f')}, aggregate {_num(s['tok_s_aggregate'], '.1f')}")
    if acc is not None:
        caption += f"; accepted {acc['accepted']} of {acc['drafted']} drafted" + (
            "" if acc["rate"] is None else f" ({acc['rate']:.0%})")
    table = Table(title=None if title is None else Text(title), title_justify="left", caption=caption, caption_justify="left")
    widths = {"#": 3, "state": 9, "TTFT s": 6, "tokens": 6, "tok/s": 7, "seconds": 7, "accepted": 8}
    for col, w in widths.items():
        if col != "accepted" or spec:
            table.add_column(col, justify="left" if col == "state" else "right", no_wrap=True,
                             min_width=w)
    used = sum(w + 3 for col, w in widths.items() if col != "accepted" or spec) + 4
    table.add_column("prompt / error", overflow="ellipsis", no_wrap=True,
                     max_width=min(max(width - used, 8), 60))
    rows = run.rows if limit is not None else [r for r in run.rows if r.state != "waiting"]
    if limit is not None and len(rows) > limit:
        started = [r for r in rows if r.state != "waiting"]
        rows = started[-limit:] if started else rows[:limit]
    style = {"failed": "red", "cancelled": "yellow", "done": "green", "streaming": "cyan"}
    for r in rows:
        cells: list[Any] = [str(r.index + 1), Text(r.state, style=style.get(r.state, "dim")),
                            _num(r.ttft_s, ".3f"), str(r.tokens()), _num(r.tok_s(), ".1f"),
                            _num(r.seconds(now), ".2f")]
        if spec:
            cells.append("-" if r.drafted is None else f"{r.accepted}/{r.drafted}")
        cells.append(Text(r.error, style="red") if r.error else Text(r.prompt))
        table.add_row(*cells)
    cells = ["all", f"{s['done']} done",
             _num(s["ttft_median_s"], ".3f"), str(s["tokens"]), _num(s["tok_s_median"], ".1f"),
             _num(s["wall_s"], ".2f")]
    if spec:
        cells.append("-" if acc is None else f"{acc['accepted']}/{acc['drafted']}")
    cells.append(", ".join(f"{s[k]} {k.replace('_', ' ')}" for k in ("failed", "cancelled", "not_sent")
                           if s[k]))
    table.add_section()
    table.add_row(*cells, style="bold")
    return table


async def _main(run: BenchRun, live: Any | None) -> bool:
    """Run until done or Ctrl-C (True: interrupted), refreshing ``live`` as tokens come."""
    import trio

    from tightwad_core.moe.bench import run_bench

    interrupted = False
    size = live.console.size if live is not None else None
    limit = max(size.height - 9, 4) if size is not None else None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                nonlocal interrupted
                async for _ in signals:
                    interrupted = True
                    nursery.cancel_scope.cancel()
                    return

            async def refresh(live: Any) -> None:
                while True:
                    live.update(render(run, width=live.console.width, limit=limit), refresh=True)
                    await trio.sleep(0.1)

            nursery.start_soon(watch)
            if live is not None:
                nursery.start_soon(refresh, live)
            await run_bench(run)
            nursery.cancel_scope.cancel()
    return interrupted


@moe.command("bench")
@click.option("--url", required=True, metavar="URL",
              help="The server's base URL, e.g. http://127.0.0.1:8080 (a trailing /v1 is dropped).")
@click.option("--model", default=None, metavar="NAME",
              help="The model field of each request (default: the first of the server's /v1/models).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="A JSON list of prompts, or a text file with one per line (default: the shipped set).")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=8, show_default=True,
              metavar="N", help="Requests in all; the prompts are used in turn.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True, metavar="C",
              help="Requests in flight at once.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True, metavar="N",
              help="max_tokens of each request.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              metavar="T", help="Sampling temperature of each request (0: greedy).")
@click.option("--token-env", default=None, metavar="VAR",
              help="Send the bearer token held in this environment variable.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document at the end instead of the live table.")
def moe_bench(url: str, model: str | None, prompts_file: Path | None, n_requests: int,
              concurrency: int, max_tokens: int, temperature: float, token_env: str | None,
              as_json: bool) -> None:
    """Stream chat completions from URL and show, live, each request's time
    to first token, tokens so far, tokens per second and state, with medians,
    p90 and the aggregate rate below.

    Works on any OpenAI-compatible server and any model (llama-server,
    Ollama, vLLM, a Tightwad proxy); it is under `moe` because it was made
    for timing Mixture-of-Experts models. Against a speculative Tightwad
    proxy it also shows acceptance: draft tokens accepted out of drafted over
    the run, and per request with --concurrency 1. Tokens are the server's
    usage counts when its stream reports them, else content chunks. A request
    that fails shows as failed and the others go on; Ctrl-C stops and prints
    what was measured. Exit status 2 when nothing answers at URL or for bad
    input, 1 when every request failed, 130 after Ctrl-C.
    """
    from tightwad_core.bench.prompts import BenchError, load_prompts
    from tightwad_core.moe.bench import BenchConfig, BenchRun, report

    base = url.rstrip("/")
    base = base.removesuffix("/v1")
    if not base.startswith(("http://", "https://")):
        _fail(f"--url {url}: give an http:// or https:// URL")
    token = None
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            _fail(f"--token-env {token_env}: the variable is not set")
    try:
        prompts = tuple(p["prompt"] for p in load_prompts(prompts_file))
    except BenchError as exc:
        _fail(str(exc))
        return
    run = BenchRun(BenchConfig(url=base, prompts=prompts, requests=n_requests, concurrency=concurrency,
                               max_tokens=max_tokens, model=model, token=token, temperature=temperature))
    interrupted = _execute(run, as_json)
    if as_json:
        click.echo(json.dumps(report(run, interrupted), indent=2))
    else:
        from rich.console import Console

        title = f"{run.model} at {base}" + (" (interrupted)" if interrupted else "")
        console = Console()
        console.print(render(run, width=console.width, title=title))
    if interrupted:
        sys.exit(130)
    if all(r.state == "failed" for r in run.rows):
        sys.exit(1)


def _execute(run: BenchRun, as_json: bool) -> bool:
    """Run the bench (True: interrupted); a bench error is one line: exit 2 when the
    target cannot be reached or named, 1 for anything else."""
    import trio
    from rich.console import Console
    from rich.live import Live

    from tightwad_core.bench.prompts import BenchError
    from tightwad_core.cli.main import _leaf

    try:
        if as_json:
            return trio.run(_main, run, None)
        with Live(console=Console(), auto_refresh=False, transient=True) as live:
            return trio.run(_main, run, live)
    except BaseException as exc:  # mapped to one clear line
        leaf = _leaf(exc)
        if isinstance(leaf, BenchError):
            _fail(str(leaf))
        if isinstance(leaf, KeyboardInterrupt):
            return True
        if isinstance(leaf, Exception):
            _fail(f"{type(leaf).__name__}: {(str(leaf).splitlines() or [''])[0]}", 1)
        raise

"""`tightwad benchmark`: a [cluster] profile's pool on its own."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import click

from tightwad_core.bench.link import parse_bandwidth, parse_delay
from tightwad_core.cli.bench import _load, exit_for, link_of
from tightwad_core.cli.link import checked
from tightwad_core.cli.main import _fail, main


@main.command("benchmark")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="PATH", help="Config file (as for `tightwad run`).")
@click.option("--profile", "-p", default=None, metavar="NAME", help="A profile with a [cluster] pool.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE", help="A JSON list of prompts or one per line "
                                                 "(default: the shipped set).")
@click.option("--limit", type=click.IntRange(min=1), default=4, show_default=True, metavar="N",
              help="Run only the first N prompts.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=64, show_default=True,
              metavar="N", help="Tokens generated per prompt.")
@click.option("--link-delay", default=None, metavar="TIME", callback=checked(parse_delay),
              help="One-way delay for the pool's emulated workers: 10ms, 0.1s.")
@click.option("--link-bandwidth", default=None, metavar="RATE", callback=checked(parse_bandwidth),
              help="...and their bandwidth per direction: 100mbit, 1gbit.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
def benchmark(config: Path | None, profile: str | None, prompts_file: Path | None, limit: int,
              max_tokens: int, link_delay: float | None, link_bandwidth: float | None,
              as_json: bool) -> None:
    """Time a [cluster] profile's pool itself, without speculation.

    Starts the pool and the target on it, streams each prompt (greedy) and
    reports prompt and generation tokens per second, milliseconds per token,
    round trips and bytes to the pool per token, and each worker's share of
    the layers and of the traffic.
    """
    import trio
    from rich.console import Console

    from tightwad_core.bench.pool import run_pool_benchmark
    from tightwad_core.bench.prompts import BenchError, load_prompts
    from tightwad_core.config.profiles import ConfigError

    try:
        name, prof, config_dir = _load(config, profile)
        prompts = load_prompts(prompts_file, limit)
    except (ConfigError, BenchError) as exc:
        _fail(str(exc), 2)
        return
    link = link_of(link_delay, link_bandwidth)
    console = Console(stderr=as_json)
    logging.getLogger("tightwad").setLevel(logging.WARNING)
    try:
        with console.status("starting the pool and the target") as spinner:
            def step(done: int, total: int) -> None:
                spinner.update(f"prompt {min(done + 1, total)} of {total}")

            report = trio.run(partial(run_pool_benchmark, name, prof, config_dir=config_dir,
                                      prompts=prompts, max_tokens=max_tokens, link=link,
                                      progress=step))
    except BaseException as exc:  # noqa: BLE001 - one clear line
        exit_for(exc)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _render(report, console)


def _render(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    from tightwad_core.cluster.sizes import human

    t = report["totals"]
    console.print(f"pool of profile {report['profile']!r}: {report['target']}, placement "
                  f"{report['placement']}, output layer "
                  f"{'local' if report['output_local'] else 'on the pool'}", highlight=False)
    console.print(f"prompt (prefill) {t['prompt_tok_s_median']} tok/s (median), first token after "
                  f"{t['ttft_s_median']} s; generation {t['gen_tok_s']} tok/s, "
                  f"{t['ms_per_token']} ms per token; per token {t['round_trips_per_token']} round "
                  f"trips and {human(t['bytes_per_token'] or 0)}", highlight=False)
    table = Table(title="per worker")
    for col in ("name", "transport", "backend", "layers", "traffic share", "round trips/token",
                "bytes/token"):
        table.add_column(col)
    for w in report["workers"]:
        share = "-" if w["bytes_share"] is None else f"{w['bytes_share']:.0%}"
        table.add_row(w["name"], w["transport"], w["backend"] or "-", str(w["layers"]), share,
                      str(w["round_trips_per_token"]), human(w["bytes_per_token"] or 0))
    console.print(table)

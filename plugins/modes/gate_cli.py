"""`tightwad gate start` and `tightwad gate status`: serve a gate profile
(the same machinery as `tightwad run`) and show a running gate's verdicts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from tightwad_core.cli.main import _fail, _load_for_run, config_option
from tightwad_core.config.profiles import ConfigError, find_config


@click.group("gate")
def gate_group() -> None:
    """Serve drafts a fleet writes and the target reviews (gate mode)."""


@gate_group.command("start")
@config_option
@click.option("--profile", "-p", default="gate", show_default=True, help="A profile whose mode is gate.")
@click.option("--listen", default=None, help="host:port to listen on (overrides the profile).")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def gate_start(config: Path | None, profile: str, listen: str | None, verbose: bool) -> None:
    """Serve a gate profile until Ctrl-C (the shipped `gate` profile by default)."""
    from tightwad_core.cli.run import _run

    path = find_config(config)
    try:
        name, prof = _load_for_run(path, profile,
                                   explicit=config is not None or "TIGHTWAD_CONFIG" in os.environ)
    except ConfigError as exc:
        _fail(str(exc))
        return
    if prof.mode != "gate":
        _fail(f"profile {name!r} has mode {prof.mode!r}, not \"gate\": use `tightwad run --profile "
              f"{name}`, or a profile with mode = \"gate\"")
    _run(config, profile, listen, verbose)


@gate_group.command("status")
@click.option("--url", default="http://127.0.0.1:8088", show_default=True, help="The proxy's base URL.")
@click.option("--api-key", envvar="TIGHTWAD_API_KEY", default=None, help="Bearer token ($TIGHTWAD_API_KEY).")
@click.option("--json", "as_json", is_flag=True, help="Print the gate's figures as JSON.")
def gate_status(url: str, api_key: str | None, as_json: bool) -> None:
    """Show a running gate's approved / corrected / rejected split and time saved.

    Exits 1 when nothing answers or the proxy is not in gate mode.
    """
    from tightwad_core.cli.run import fetch_status

    data = fetch_status(url, api_key)
    gate = (data.get("mode_status") or {}).get("gate")
    if not isinstance(gate, dict):
        _fail(f"{url} is not in gate mode (mode {data.get('mode')!r})", 1)
        return
    if as_json:
        click.echo(json.dumps(gate, indent=2))
        return
    _print(url, gate)
    sys.exit(0)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.0%}"


def _print(url: str, g: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"{url}  gate: {g['review']} review, threshold {g['threshold']} nats, "
                    f"min_prefix {g['min_prefix']}, {g['pick']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    r = g["rates"]
    for label, value in (
        ("approved", f"{g['approved']} ({_pct(r['approved'])})"),
        ("corrected", f"{g['corrected']} ({_pct(r['corrected'])})"),
        ("rejected", f"{g['rejected']} ({_pct(r['rejected'])})"),
        ("unreviewed (fail_open)", str(g["unreviewed"])),
        ("cached / relayed / fresh, no draft", f"{g['cached']} / {g['relayed']} / {g['fresh_no_draft']}"),
        ("draft tokens kept / written", f"{g['draft_tokens_kept']} / {g['draft_tokens_written']}"),
        ("target tokens generated", str(g["target_tokens_generated"])),
        ("target time saved s", "not known yet (the target has not generated)"
         if g.get("target_time_saved_s") is None else f"{g['target_time_saved_s']:.2f}"),
        ("review s", f"{g['review_s']:.2f}"),
    ):
        t.add_row(label, value)
    console.print(t)
    d = Table(title="drafters")
    for col in ("drafter", "backend", "responses", "failures", "refused", "busy", "usable"):
        d.add_column(col)
    for m in g["drafters"]:
        d.add_row(m["name"], m["backend"], str(m["responses"]), str(m["failures"]), str(m["refused"]),
                  str(m["busy"]), "yes" if m["usable"] else "cooling down")
    console.print(d)

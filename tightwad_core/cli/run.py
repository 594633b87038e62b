"""`tightwad run`, `proxy start` and `proxy status`."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from tightwad_core.cli.main import (
    _fail,
    _leaf,
    _load_for_run,
    _run_options,
    _setup_logging,
    _with,
    main,
)
from tightwad_core.config.profiles import ConfigError, find_config


def _run(config: Path | None, profile: str | None, listen: str | None, verbose: bool) -> None:
    import trio

    from tightwad_core.http.server import run_until_signal
    from tightwad_core.runtime.procs import StartupError

    _setup_logging(verbose)
    path = find_config(config)
    try:
        name, prof = _load_for_run(path, profile, explicit=config is not None or 'TIGHTWAD_CONFIG' in os.environ)
        log = logging.getLogger("tightwad")

        def ready(running: Any) -> None:
            log.info("profile %r (%s mode) serving on %s  (OpenAI: %s/v1, Ollama: %s)", name,
                     prof.mode, running.url, running.url, running.url)

        trio.run(lambda: run_until_signal(name, prof, config_dir=path.parent, listen=listen,
                                          on_ready=ready))
    except BaseException as exc:  # noqa: BLE001 - mapped to one clear line below
        leaf = _leaf(exc)
        if isinstance(leaf, ConfigError):
            _fail(str(leaf))
        if isinstance(leaf, StartupError):
            _fail(str(leaf), 1)
        if isinstance(leaf, KeyboardInterrupt):
            return
        raise


@main.command()
@_with(_run_options)
def run(config: Path | None, profile: str | None, listen: str | None, verbose: bool) -> None:
    """Serve a profile until Ctrl-C.

    Launches the backends the profile names (or connects to them), then serves
    the OpenAI routes (/v1/chat/completions, /v1/completions, /v1/models), the
    Ollama routes (/api/chat, /api/generate, /api/tags, /api/show, /api/ps,
    /api/version) and /health. Without a config file, `--profile demo` uses
    the built-in profiles.
    """
    _run(config, profile, listen, verbose)


@main.group()
def proxy() -> None:
    """Start the proxy or ask a running one how it is doing."""


@proxy.command("start")
@_with(_run_options)
def proxy_start(config: Path | None, profile: str | None, listen: str | None, verbose: bool) -> None:
    """Same as `tightwad run`: serve a profile until Ctrl-C (default :8088)."""
    _run(config, profile, listen, verbose)


@proxy.command("status")
@click.option("--url", default="http://127.0.0.1:8088", show_default=True, help="The proxy's base URL.")
@click.option("--api-key", envvar="TIGHTWAD_API_KEY", default=None, help="Bearer token ($TIGHTWAD_API_KEY).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON of /v1/tightwad/status.")
def proxy_status(url: str, api_key: str | None, as_json: bool) -> None:
    """Show a running proxy's backends, verifier rung and speculation figures.

    Exits 1 when the proxy cannot be reached or a backend is down.
    """
    data = fetch_status(url, api_key)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _print_status(url, data)
    if not all(b.get("ok") for b in (data.get("backends") or {}).values()):
        sys.exit(1)


def fetch_status(url: str, api_key: str | None) -> dict[str, Any]:
    """A running proxy's ``/v1/tightwad/status``; exits 1 with one line when
    nothing answers, the answer is not a status object, or it is not a 200."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(url.rstrip("/") + "/v1/tightwad/status", headers=headers, timeout=10)
        data = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        _fail(f"no proxy answering at {url}: {exc}", 1)
    if not isinstance(data, dict):
        _fail(f"{url} answered {resp.status_code} with JSON that is not a status object", 1)
    if resp.status_code != 200:
        _fail(f"{url} answered {resp.status_code}: {data.get('error', data)}", 1)
    return data


def _print_status(url: str, data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{url}  profile {data.get('profile')!r}, {data.get('mode')} mode, "
                        f"up {data.get('uptime_s')} s")
    for col in ("role", "backend", "url", "healthy", "detail"):
        table.add_column(col)
    for role, b in (data.get("backends") or {}).items():
        table.add_row(role, b.get("backend", ""), b.get("url") or "", "yes" if b.get("ok") else "NO",
                      b.get("detail", ""))
    console.print(table)
    ms = data.get("mode_status") or {}
    if "rounds" not in ms:
        return
    spec = Table(title=f"verifier: {ms['verifier']['label']}")
    spec.add_column("figure")
    spec.add_column("value", justify="right")
    acc = ms.get("acceptance")
    tpr = ms.get("tokens_per_round")
    rows = [
        ("requests (speculated / relayed)", f"{ms['requests']} / {ms['relayed']}"),
        ("rounds", str(ms["rounds"])),
        ("acceptance", "-" if acc is None else f"{acc:.1%}"),
        ("tokens per round", "-" if tpr is None else f"{tpr:.2f}"),
        ("current K", f"{ms['draft_length']['k']} ({ms['draft_length']['mode']})"),
        ("draft / verify / network s", " / ".join(
            "-" if ms["time_s"][k] is None else f"{ms['time_s'][k]:.2f}" for k in ("draft", "verify", "network"))),
        ("draft failures", str(ms["draft_failures"])),
    ]
    for k, v in rows:
        spec.add_row(k, v)
    console.print(spec)

"""`tightwad peer start|stop|status`: this machine's peer agent.

`start` runs the agent in the background (a process of its own session,
recorded in the state folder's ``peer/agent.json``, as `tightwad start`
does for a profile) or, with ``--foreground``, in the terminal until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from tightwad_core.cli.daemon import _alive, _read, _stop, _url
from tightwad_core.cli.main import _fail, _leaf, _setup_logging, config_option, main
from tightwad_core.config.profiles import ConfigError, find_config, secret
from tightwad_core.peer.config import PeerConfig, Settings, load_peer, override, resolve

VERB = b"peer"  # what `_alive` looks for in the agent's command line


@main.group()
def peer() -> None:
    """This machine's peer agent: version, devices, models, its rpc-worker
    and swarm pieces, for the coordinator and the other machines."""


def _record() -> Path:
    from tightwad_core.peer.agent import run_dir

    return run_dir() / "agent.json"


def _settings(config: Path | None, **flags: Any) -> tuple[Path, bool, PeerConfig, Settings]:
    path = find_config(config)
    explicit = config is not None or "TIGHTWAD_CONFIG" in os.environ
    try:
        cfg = override(load_peer(path, explicit), **flags)
        return path, path.exists(), cfg, resolve(cfg, f"{path} [peer]" if path.exists() else "[peer]")
    except ConfigError as exc:
        _fail(str(exc))
        raise AssertionError from exc  # _fail exits


@peer.command("start")
@config_option
@click.option("--listen", default=None, help="host:port to listen on (default: [peer].listen, "
              "127.0.0.1:9191). Beyond loopback a token is required.")
@click.option("--token-env", default=None, help="Variable holding the token clients must send.")
@click.option("--model-dir", "model_dirs", multiple=True, type=click.Path(file_okay=False),
              help="A folder of models to list and seed (repeatable; replaces [peer].model_dirs).")
@click.option("--peer", "peers", multiple=True, help="Agent URL of another machine (repeatable).")
@click.option("--allow", multiple=True, help="Client network allowed, as a CIDR (repeatable).")
@click.option("--rpc-ports", default=None, help='Ports an rpc-worker may be started on, e.g. "50052-50059".')
@click.option("--discovery/--no-discovery", default=None,
              help="Announce the agent on the local network (default: [peer].discovery, on).")
@click.option("--foreground", is_flag=True, help="Run in this terminal until Ctrl-C.")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(1),
              help="Seconds to wait for a background agent to answer.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def start(config: Path | None, listen: str | None, token_env: str | None, model_dirs: tuple[str, ...],
          peers: tuple[str, ...], allow: tuple[str, ...], rpc_ports: str | None,
          discovery: bool | None, foreground: bool, timeout: float, verbose: bool) -> None:
    """Start this machine's peer agent (default port 9191).

    It answers /v1/peer/health to anyone, and everything else only with the
    bearer token (an agent without one listens on loopback only).
    """
    flags: dict[str, Any] = {"listen": listen, "token_env": token_env,
                             "model_dirs": [str(Path(d).resolve()) for d in model_dirs] or None,
                             "peers": list(peers) or None, "allow": list(allow) or None,
                             "rpc_ports": rpc_ports, "discovery": discovery}
    path, from_file, cfg, settings = _settings(config, **flags)
    if foreground:
        _foreground(cfg, verbose)
        return
    _background(path, from_file, settings, timeout, verbose)


def _foreground(cfg: PeerConfig, verbose: bool) -> None:
    import trio

    from tightwad_core.peer.agent import run_agent

    _setup_logging(verbose)
    try:
        trio.run(run_agent, cfg)
    except BaseException as exc:  # one clear line
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return
        if isinstance(leaf, (OSError, ConfigError)):
            _fail(str(leaf), 1)
        raise


def _background(path: Path, from_file: bool, settings: Settings, timeout: float,
                verbose: bool) -> None:
    import httpx

    rec = _record()
    old = _read(rec)
    if old and _alive(old["pid"], VERB):
        _fail(f"the peer agent is already running (pid {old['pid']}, {old['url']}); "
              "`tightwad peer stop` first", 1)
    if settings.port == 0:
        _fail("a background agent needs a fixed port in --listen (or [peer].listen)")
    url = settings.url()
    rec.parent.mkdir(parents=True, exist_ok=True)
    log_path = rec.with_suffix(".log")
    cfg = settings.cfg
    argv = [str(Path(sys.executable).parent / "tightwad"), "peer", "start", "--foreground",
            "--listen", cfg.listen, "--rpc-ports", cfg.rpc_ports,
            "--discovery" if cfg.discovery else "--no-discovery"]
    if from_file:
        argv += ["--config", str(path.resolve())]
    if cfg.token_env:
        argv += ["--token-env", cfg.token_env]
    for opt, values in (("--model-dir", cfg.model_dirs), ("--peer", cfg.peers), ("--allow", cfg.allow)):
        for v in values:
            argv += [opt, v]
    if verbose:
        argv.append("--verbose")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    rec.write_text(json.dumps({"pid": proc.pid, "url": url, "log": str(log_path),
                               "config": str(path.resolve()) if from_file else None,
                               "token_env": cfg.token_env, "started": time.time()}))
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            rec.unlink(missing_ok=True)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-4:]
            _fail(f"the peer agent exited with status {code} while starting:\n  " + "\n  ".join(tail), 1)
        try:
            if httpx.get(url + "/v1/peer/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            _stop(proc.pid, 10, VERB)
            rec.unlink(missing_ok=True)
            _fail(f"the peer agent did not answer after {timeout:g}s (log {log_path})", 1)
        time.sleep(0.2)
    click.echo(f"peer agent on {url} (pid {proc.pid}); log {log_path}; `tightwad peer stop` ends it")


@peer.command("stop")
def stop() -> None:
    """Stop the peer agent started with `tightwad peer start` (SIGTERM: its
    rpc-worker stops too)."""
    rec_path = _record()
    rec = _read(rec_path)
    if rec is None:
        _fail("no peer agent was started with `tightwad peer start`", 1)
        return
    if _alive(rec["pid"], VERB):
        if not _stop(rec["pid"], 20, VERB):
            _fail(f"the peer agent (pid {rec['pid']}) did not stop", 1)
        click.echo(f"stopped the peer agent (pid {rec['pid']})")
    else:
        click.echo("the peer agent was not running (stale record removed)")
    rec_path.unlink(missing_ok=True)


@peer.command("status")
@config_option
@click.option("--token-env", default=None, help="Variable holding the agent's token "
              "(default: the one it was started with, else [peer].token_env).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(config: Path | None, token_env: str | None, as_json: bool) -> None:
    """Show this machine's peer agent: version, devices, models, rpc-worker.

    Asks the agent `tightwad peer start` recorded, else the one [peer].listen
    names. Exits 1 when it does not answer.
    """
    from tightwad_core.peer.client import agent_report

    rec = _read(_record())
    running = rec is not None and _alive(rec["pid"], VERB)
    path = Path(rec["config"]) if rec and rec.get("config") and not config else find_config(config)
    try:
        cfg = load_peer(path, explicit=config is not None)
    except ConfigError as exc:
        _fail(str(exc))
        return
    env = token_env or (rec or {}).get("token_env") or cfg.token_env
    token = secret(cfg.token, env)
    try:
        url = rec["url"] if running and rec is not None else _url(cfg.listen)
    except ValueError as exc:
        _fail(f"[peer] listen: {exc}")
        return
    report = agent_report(url, token)
    out = {"url": url, "pid": rec["pid"] if running and rec else None,
           "log": rec["log"] if rec else None, **{k: report[k] for k in ("state", "version", "detail")},
           "info": report["info"]}
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        _print(out)
    if report["state"] not in ("ok", "mismatch"):
        sys.exit(1)


def _print(out: dict[str, Any]) -> None:
    from tightwad_core.cluster.sizes import human

    info = out["info"]
    if info is None:
        click.echo(f"peer agent {out['url']}: {out['detail'] or out['state']}")
        return
    mem = info["memory"]
    gpus = ", ".join(f"{g['name']} ({human(g['free'])} free of {human(g['total'])})"
                     for g in info["gpus"]) or "none"
    lines = [f"peer agent {out['url']}" + (f" (pid {out['pid']})" if out["pid"] else "")
             + f": tightwad {info['version']} on {info['hostname']}",
             (f"  engine: {info['engine_backend'] or 'not set up'}, RPC protocol "
              f"{info['engine_protocol'] or 'unknown'}"),
             f"  GPUs: {gpus}",
             f"  CPU: {info['cpu']['usable']} cores usable of {info['cpu']['count']}; memory "
             + (f"{human(mem['available'])} available of {human(mem['total'])}"
                if mem["total"] else "unknown"),
             f"  models: folders {', '.join(info['model_dirs']) or 'none'}; seeding {info['seeding']}",
             f"  rpc-worker: {info['rpc_worker']}; discovery {'on' if info['discovery'] else 'off'}"]
    if out["state"] == "mismatch":
        lines.append(f"  {out['detail']}")
    click.echo("\n".join(lines))

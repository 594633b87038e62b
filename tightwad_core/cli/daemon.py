"""`tightwad start`, `stop` and `status`: a profile served in the background.

`start` runs `tightwad run` for the profile as a process of its own session
(it outlives the terminal), waits until its /health answers, and records it
in the state folder (``$XDG_STATE_HOME/tightwad/running``, else
``~/.local/state/tightwad/running``); `stop` ends it with SIGTERM (a clean
shutdown: in-flight answers end, engines stop); `status` asks it how it and
its pool are doing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from tightwad_core.cli.main import _fail, _load_for_run, config_option, main, profile_option
from tightwad_core.config.profiles import ConfigError, find_config, parse_listen, secret


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tightwad" / "running"


def _alive(pid: int, verb: bytes = b"run") -> bool:
    """Whether ``pid`` still is a `tightwad run` (``verb``: another `tightwad`
    command; a stale record's pid may have been given to another program
    since: that one is left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # not ours
    try:  # a zombie (our own child, not yet reaped) is not alive
        if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
            return False
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (not Linux): trust the record
    return any(a.endswith(b"tightwad") for a in argv) and verb in argv


def _record(name: str) -> Path:
    return state_dir() / f"{name}.json"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _resolve(config: Path | None, profile: str | None) -> tuple[Path, bool, str, Any]:
    path = find_config(config)
    explicit = config is not None or "TIGHTWAD_CONFIG" in os.environ
    try:
        name, prof = _load_for_run(path, profile, explicit)
    except ConfigError as exc:
        _fail(str(exc))
        raise AssertionError from exc  # _fail exits
    return path, path.exists() or explicit, name, prof


def _url(listen: str) -> str:
    host, port = parse_listen(listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@main.command()
@config_option
@profile_option
@click.option("--listen", default=None, help="host:port to listen on (overrides the profile).")
@click.option("--timeout", default=900.0, show_default=True, type=click.FloatRange(1),
              help="Seconds to wait for the profile to become healthy (models load, weights "
                   "travel to the pool).")
def start(config: Path | None, profile: str | None, listen: str | None, timeout: float) -> None:
    """Serve a profile in the background until `tightwad stop`.

    Waits until the proxy answers /health, then prints its URL. A profile
    with a [cluster] pool checks every worker first: a worker that is down,
    busy or of another RPC protocol version stops the start, named.
    """
    import httpx
    from rich.console import Console

    path, from_file, name, prof = _resolve(config, profile)
    rec = _record(name)
    old = _read(rec)
    if old and _alive(old["pid"]):
        _fail(f"profile {name!r} is already running (pid {old['pid']}, {old['url']}); "
              f"`tightwad stop -p {name}` first", 1)
    addr = listen or prof.listen
    url = _url(addr)
    rec.parent.mkdir(parents=True, exist_ok=True)
    log_path = rec.with_suffix(".log")
    exe = Path(sys.executable).parent / "tightwad"
    argv = [str(exe), "run", "-p", name, "--listen", addr]
    if from_file:
        argv[2:2] = ["--config", str(path.resolve())]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    rec.write_text(json.dumps({"pid": proc.pid, "profile": name, "url": url, "log": str(log_path),
                               "config": str(path.resolve()) if from_file else None,
                               "started": time.time()}))
    console = Console(stderr=True)
    deadline = time.monotonic() + timeout
    with console.status(f"starting {name!r} (log {log_path})") as spinner:
        while True:
            code = proc.poll()
            if code is not None:
                rec.unlink(missing_ok=True)
                tail = log_path.read_text(errors="replace").strip().splitlines()[-6:]
                _fail(f"profile {name!r} exited with status {code} while starting:\n  "
                      + "\n  ".join(tail), 1)
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                _stop(proc.pid)
                rec.unlink(missing_ok=True)
                _fail(f"profile {name!r} was not healthy after {timeout:g}s (log {log_path})", 1)
            lines = log_path.read_text(errors="replace").strip().splitlines()
            if lines:
                spinner.update(f"starting {name!r}: {lines[-1].strip()[:100]}")
            time.sleep(0.5)
    click.echo(f"profile {name!r} serving on {url} (pid {proc.pid}); OpenAI base URL {url}/v1; "
               f"log {log_path}; `tightwad stop -p {name}` ends it")


def _stop(pid: int, grace: float = 30.0, verb: bytes = b"run") -> bool:
    """SIGTERM the process group, then SIGKILL after ``grace`` s; whether it ended."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid, verb):
            return True
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return not _alive(pid, verb)


def _auth_headers(rec: dict[str, Any], config: Path | None) -> dict[str, str]:
    """The bearer header for a running profile: its token from the config
    file `tightwad start` used (else ``config``); none if it has none."""
    path = Path(rec["config"]) if rec.get("config") else find_config(config)
    try:
        _, prof = _load_for_run(path, rec["profile"], explicit=path.exists())
    except ConfigError:
        return {}
    key = secret(prof.api_key, prof.api_key_env)
    return {"authorization": f"Bearer {key}"} if key else {}


def _running(profile: str | None) -> list[dict[str, Any]]:
    files = [_record(profile)] if profile else sorted(state_dir().glob("*.json"))
    out = []
    for f in files:
        rec = _read(f)
        if rec is not None:
            rec["running"] = _alive(rec["pid"])
            rec["_file"] = str(f)
            out.append(rec)
    return out


@main.command()
@profile_option
@click.option("--all", "every", is_flag=True, help="Stop every profile started with `tightwad start`.")
def stop(profile: str | None, every: bool) -> None:
    """Stop a profile started with `tightwad start` (SIGTERM: a clean shutdown)."""
    recs = _running(None if every else profile)
    if not every and profile is None:
        live = [r for r in recs if r["running"]]
        if len(live) > 1:
            _fail("several profiles are running (" + ", ".join(r["profile"] for r in live)
                  + "): name one with -p, or --all", 2)
        recs = live or recs
    if not recs:
        _fail(f"no profile {profile!r} was started with `tightwad start`" if profile
              else "nothing was started with `tightwad start`", 1)
    for r in recs:
        if r["running"] and not _stop(r["pid"]):
            _fail(f"profile {r['profile']!r} (pid {r['pid']}) did not stop", 1)
        Path(r["_file"]).unlink(missing_ok=True)
        click.echo(f"stopped {r['profile']!r}" if r["running"] else
                   f"{r['profile']!r} was not running (stale record removed)")


@main.command()
@config_option
@profile_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one entry per profile.")
def status(config: Path | None, profile: str | None, as_json: bool) -> None:
    """Show the profiles started with `tightwad start`: health, backends,
    speculation figures and, for a cluster, every worker (state, RPC protocol,
    memory, layers, bytes and round trips).

    Exits 1 when a profile is down or degraded, or none is running.
    """
    import httpx

    out = []
    for r in _running(profile):
        entry: dict[str, Any] = {k: v for k, v in r.items() if not k.startswith("_")}
        if r["running"]:
            headers = _auth_headers(r, config)
            try:
                resp = httpx.get(r["url"] + "/v1/tightwad/status", headers=headers, timeout=10)
                entry["status"] = resp.json() if resp.status_code == 200 else None
                entry["error"] = None if resp.status_code == 200 else f"HTTP {resp.status_code}"
                _agents(entry["status"])
            except (httpx.HTTPError, ValueError) as exc:
                entry["status"], entry["error"] = None, f"not answering: {exc}"
        out.append(entry)
    healthy = bool(out) and all(_healthy(e) for e in out)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    elif not out:
        click.echo("nothing was started with `tightwad start`" if profile is None
                   else f"profile {profile!r} was not started with `tightwad start`")
    else:
        for e in out:
            _print(e)
    if not healthy:
        sys.exit(1)


def _agents(status: dict[str, Any] | None) -> None:
    """Each worker's peer agent (version, or why it cannot be asked)."""
    from tightwad_core.peer.client import annotate_workers

    annotate_workers(((status or {}).get("cluster") or {}).get("workers") or [])


def _healthy(e: dict[str, Any]) -> bool:
    st = e.get("status")
    if not e.get("running") or not st:
        return False
    ok = all(b.get("ok") for b in (st.get("backends") or {}).values())
    workers = (st.get("cluster") or {}).get("workers") or []
    return ok and all(w.get("state") == "up" for w in workers)


def _print(e: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from tightwad_core.cli.run import _print_status
    from tightwad_core.cluster.sizes import human

    console = Console()
    if not e["running"]:
        console.print(f"[red]{e['profile']}[/]: not running (pid {e['pid']} is gone; log {e['log']})")
        return
    if e.get("status") is None:
        console.print(f"[red]{e['profile']}[/]: pid {e['pid']} runs but {e['url']} is {e['error']}")
        return
    _print_status(e["url"], e["status"])
    cluster = e["status"].get("cluster")
    if not cluster:
        return
    t = Table(title=f"pool: placement {cluster['placement']}, engine RPC protocol "
                    f"{cluster['engine_protocol']}, output layer "
                    f"{'local' if cluster['output_local'] else 'on the pool'}")
    for col in ("name", "transport", "state", "backend", "protocol", "free / total", "layers",
                "sent", "received", "round trips", "drops"):
        t.add_column(col)
    agents = any(w.get("agent_report") for w in cluster["workers"])
    if agents:
        t.add_column("agent")
    for w in cluster["workers"]:
        rep = w.get("agent_report")
        agent = [] if not agents else ["-"] if rep is None else [
            rep["detail"] if rep["state"] == "ok" else f"[red]{rep['detail']}[/]"]
        mem = " + ".join(f"{human(d['free'])} / {human(d['total'])}" for d in w["devices"]) or "-"
        state = w["state"] if w["state"] == "up" else f"[red]{w['state']}[/]: {w['detail']}"
        t.add_row(w["name"], w["transport"], state, w.get("backend") or "-", w["protocol"] or "-",
                  mem, str(w["layers"]),
                  human(w["bytes_up"]), human(w["bytes_down"]), str(w["round_trips"]), str(w["drops"]),
                  *agent)
    console.print(t)


@main.command()
@click.argument("model")
@config_option
@profile_option
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
def swap(model: str, config: Path | None, profile: str | None, as_json: bool) -> None:
    """Serve MODEL on a running profile's target instead, without a restart.

    MODEL is a built-in (`@name`) or a .gguf file in a folder the profile
    uses (the set-up cache, the target's folder, the config's folder). On one
    machine the new model loads beside the old one, which keeps serving until
    the new one is healthy; on a pool, in-flight requests finish, then the
    new model loads on the same workers (503 meanwhile). A speculative
    profile needs a target with the draft's vocabulary.
    """
    import httpx
    from rich.console import Console

    live = [r for r in _running(profile) if r["running"]]
    if not live:
        _fail(f"profile {profile!r} is not running (start it with `tightwad start`)" if profile
              else "nothing was started with `tightwad start`", 1)
    if len(live) > 1:
        _fail("several profiles are running (" + ", ".join(r["profile"] for r in live)
              + "): name one with -p", 2)
    rec = live[0]
    headers = _auth_headers(rec, config)
    with Console(stderr=True).status(f"swapping {rec['profile']!r} to {model}"):
        try:
            resp = httpx.post(rec["url"] + "/v1/tightwad/swap", json={"model": model},
                              headers=headers, timeout=httpx.Timeout(1800, connect=10))
            data = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            _fail(f"{rec['url']} did not answer the swap: {exc}", 1)
            return
    if as_json:
        click.echo(json.dumps(data, indent=2))
    if resp.status_code != 200:
        err = data.get("error", {})
        _fail(err.get("message", str(data)) if isinstance(err, dict) else str(err), 1)
    if not as_json:
        for step in data["steps"]:
            click.echo(f"- {step}")
        click.echo(f"profile {rec['profile']!r} now serves {data['model']}")

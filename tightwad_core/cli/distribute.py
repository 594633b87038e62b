"""`tightwad distribute MODEL --to AGENT...`: put a model on other nodes
through their peer agents and the swarm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import trio

from tightwad_core.cli.link import checked, parse_address
from tightwad_core.cli.main import _fail, _leaf, byte_progress, main

POLL = 0.5  # seconds between progress polls of each target


async def _ask(client: Any, url: str, token: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """Start the pull on one agent; its job, or `RuntimeError` in one line."""
    import httpx

    from tightwad_core.peer.client import headers

    try:
        resp = await client.post(url.rstrip("/") + "/v1/swarm/pulls", json=body,
                                 headers=headers(token))
    except httpx.HTTPError as exc:
        raise RuntimeError(f"{url}: cannot reach the agent ({exc.__class__.__name__}: {exc}); "
                           "is `tightwad peer start` running there?") from None
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code in (401, 403):
        raise RuntimeError(f"{url}: the agent refused the token (HTTP {resp.status_code}); "
                           "pass the agents' token with --token-env")
    if resp.status_code == 404:
        raise RuntimeError(f"{url}: no pull route (not a tightwad agent, or an older version)")
    if resp.status_code not in (200, 202) or not isinstance(data, dict):
        msg = (data or {}).get("error", {}).get("message") if isinstance(data, dict) else None
        raise RuntimeError(f"{url}: {msg or f'HTTP {resp.status_code}'}")
    return data


async def distribute(file: Path, targets: list[str], token: str | None, host: str, port: int,
                     piece_size: int, show: Any) -> list[dict[str, Any]]:
    """Serve ``file`` on ``host:port`` and have every target agent pull it;
    one result per target (``state`` done or failed)."""
    import httpx

    from tightwad_core.peer.client import headers
    from tightwad_core.swarm.manifest import manifest_for
    from tightwad_core.swarm.routes import serve_pieces
    from tightwad_core.swarm.store import SeedStore

    manifest = await trio.to_thread.run_sync(
        lambda: manifest_for(file, piece_size, lambda d, t: show("hash", d, t)))
    store = SeedStore()
    store.add(file, manifest)
    results: dict[str, dict[str, Any]] = {}
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(lambda task_status: serve_pieces(
            store, host, port, shutdown, token=token, task_status=task_status))
        served_port = int(url.rsplit(":", 1)[1])
        body = {"name": manifest.name, "sha256": manifest.sha256, "from_port": served_port}
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0),
                                     trust_env=False) as client:
            async def one(target: str) -> None:
                try:
                    job = await _ask(client, target, token, body)
                    while job.get("state") == "running":
                        show(target, int(job.get("held") or 0), manifest.size)
                        await trio.sleep(POLL)
                        resp = await client.get(f"{target.rstrip('/')}/v1/swarm/pulls/{job['id']}",
                                                headers=headers(token))
                        if resp.status_code != 200:
                            raise RuntimeError(f"{target}: lost track of the pull (HTTP "
                                               f"{resp.status_code})")
                        job = resp.json()
                    show(target, manifest.size if job.get("state") == "done" else 0, manifest.size)
                    results[target] = {"agent": target, **job}
                except (RuntimeError, httpx.HTTPError, ValueError) as exc:
                    results[target] = {"agent": target, "state": "failed", "error": str(exc)}

            async with trio.open_nursery() as asks:
                for target in targets:
                    asks.start_soon(one, target)
        shutdown.set()
    return [results[t] for t in targets]


@main.command("distribute")
@click.argument("model")
@click.option("--to", "targets", multiple=True, required=True, metavar="AGENT_URL",
              help="A node's peer agent, e.g. http://10.0.0.5:9191 (repeat for more).")
@click.option("--token-env", default=None, metavar="VAR",
              help="Environment variable holding the agents' bearer token (the pieces served "
                   "here ask for it too).")
@click.option("--serve", default="0.0.0.0:9193", show_default=True, metavar="HOST:PORT",
              callback=checked(parse_address),
              help="Where this machine serves the file's pieces to the targets (port 0: any "
                   "free port). Beyond loopback a token is required.")
@click.option("--piece-size", default="4MiB", show_default=True, metavar="SIZE",
              help="Piece size when MODEL has no manifest yet (one is written beside it).")
@click.option("--json", "as_json", is_flag=True, help="Print one result per target as JSON.")
def distribute_command(model: str, targets: tuple[str, ...], token_env: str | None,
                       serve: tuple[str, int], piece_size: str, as_json: bool) -> None:
    """Put MODEL (a .gguf path or @name) on the nodes whose agents are named
    with --to, through the swarm.

    This machine hashes MODEL into a manifest (kept beside it), serves its
    pieces, and asks each agent to pull the file into its first model
    folder. Each target pulls from this machine and from the peers it knows
    (its `[peer] peers` and the agents discovery heard, other targets
    included, which serve the pieces they have while they pull); every
    piece is verified, and pieces of files a target already has are copied
    there instead of sent. Exits 1 when a target did not get the file,
    naming why.
    """
    from tightwad_core.cli.swarm import _token
    from tightwad_core.cluster.sizes import parse_size
    from tightwad_core.config.profiles import is_loopback
    from tightwad_core.runtime.catalog import resolve_model
    from tightwad_core.swarm.manifest import SwarmError

    try:
        file = resolve_model(model)
        size = parse_size(piece_size)
    except ValueError as exc:
        _fail(str(exc))
        return
    if not file.is_file():
        _fail(f"{file} is not a file")
    for t in targets:
        if not t.startswith(("http://", "https://")):
            _fail(f"--to {t}: expected an agent URL such as http://10.0.0.5:9191")
    token = _token(token_env)
    host, port = serve
    if not token and not is_loopback(host):
        _fail(f"--serve {host} is beyond loopback: pass --token-env VAR (the agents' token) so "
              "only they can read the file")
    bar = byte_progress(as_json, eta=False, transient=False)
    tasks: dict[str, Any] = {}

    def show(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task("hashing" if what == "hash" else what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    try:
        with bar:
            results = trio.run(distribute, file, list(targets), token, host, port, size, show)
    except BaseException as exc:  # noqa: BLE001 - mapped to one line below
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            _fail("interrupted; pulls already started go on on their agents", code=130)
        if isinstance(leaf, (OSError, SwarmError)):
            _fail(str(leaf))
        raise
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            if r["state"] == "done":
                click.echo(f"{r['agent']}: {r.get('path')} ({r.get('transferred', 0):,} bytes "
                           f"received, {r.get('reused', 0):,} copied from its own files, "
                           f"{r.get('seconds')} s)")
            else:
                click.echo(f"{r['agent']}: failed: {r.get('error')}")
    if any(r["state"] != "done" for r in results):
        raise SystemExit(1)

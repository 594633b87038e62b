"""`tightwad swarm`: piece-verified file distribution between nodes
(`manifest`, `seed`, `pull`)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import trio

from tightwad_core.cli.link import checked, parse_address
from tightwad_core.cli.main import _fail, _leaf, byte_progress, main
from tightwad_core.cluster.sizes import parse_size

DEFAULT_SEED_LISTEN = "127.0.0.1:9193"


def parse_rate(text: str) -> float:
    from tightwad_core.bench.link import parse_bandwidth

    return parse_bandwidth(text)


def _token(env: str | None) -> str | None:
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        _fail(f"--token-env {env}: that environment variable is not set or empty")
    return value


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _until_signal(cancel: trio.CancelScope, interrupted: list[bool]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            interrupted.append(True)
            cancel.cancel()
            return


@main.group()
def swarm() -> None:
    """Share model files between nodes: every piece verified, from every peer at once.

    `manifest` hashes a file, `seed` serves files to peers, `pull` downloads a
    file from all the peers that have it (resumable; pieces shared with files
    you already have are copied locally). See docs/swarm.md.
    """


@swarm.command("manifest")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--piece-size", default="4MiB", show_default=True, metavar="SIZE",
              callback=checked(parse_size), help="Piece size: 4MiB, 1MiB, 262144 (16 KiB to 64 MiB).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def swarm_manifest(file: Path, piece_size: int, as_json: bool) -> None:
    """Write FILE.manifest.json beside FILE: its size, piece size, the SHA-256
    of every piece and of the whole file. Pulls check every piece against it."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from tightwad_core.cluster.sizes import human
    from tightwad_core.swarm.manifest import (
        SwarmError,
        make_manifest,
        manifest_path,
        write_manifest,
    )

    console = Console(stderr=True)
    bar = Progress(TextColumn(f"hashing [bold]{file.name}[/]"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), console=console, transient=True,
                   disable=as_json or not console.is_terminal)
    task = bar.add_task("hash", total=None)
    try:
        with bar:
            m = make_manifest(file, piece_size,
                              lambda done, total: bar.update(task, completed=done, total=total))
        target = manifest_path(file)
        write_manifest(m, target)
    except SwarmError as exc:
        _fail(str(exc))
        return
    except OSError as exc:
        _fail(f"cannot write {manifest_path(file)}: {exc.strerror or exc}", code=1)
        return
    if as_json:
        click.echo(json.dumps({"file": str(file), "manifest": str(target), "name": m.name,
                               "size": m.size, "piece_size": m.piece_size, "pieces": m.count,
                               "sha256": m.sha256}, indent=2))
        return
    click.echo(f"{target}: {m.count} pieces of {human(m.piece_size)} for {human(m.size)}, "
               f"SHA-256 {m.sha256}")


@swarm.command("seed")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--listen", default=DEFAULT_SEED_LISTEN, show_default=True, metavar="HOST:PORT",
              callback=checked(parse_address),
              help="Where to serve the pieces; port 0 picks a free port. Beyond loopback a "
                   "token is required.")
@click.option("--token-env", default=None, metavar="VAR",
              help="Environment variable holding the bearer token peers must send.")
@click.option("--rate", default=None, metavar="RATE", callback=checked(parse_rate),
              help="Cap on the bytes/s sent, all peers together: 25MB, 512KiB, 100mbit "
                   "(for test beds; default unlimited).")
@click.option("--piece-size", default="4MiB", show_default=True, metavar="SIZE",
              callback=checked(parse_size),
              help="Piece size for files that have no manifest yet (one is written beside them).")
def swarm_seed(files: tuple[Path, ...], listen: tuple[str, int], token_env: str | None,
               rate: float | None, piece_size: int) -> None:
    """Serve FILE... to peers (manifest, bitfield, pieces) until Ctrl-C.

    Uses FILE.manifest.json when it fits the file, else hashes the file and
    writes one. A running peer agent serves the same routes; this command is
    for nodes without one.
    """
    from tightwad_core.config.profiles import is_loopback
    from tightwad_core.swarm.manifest import SwarmError, manifest_for
    from tightwad_core.swarm.routes import serve_pieces
    from tightwad_core.swarm.store import SeedStore

    token = _token(token_env)
    host, port = listen
    if not token and not is_loopback(host):
        _fail(f"--listen {host} is beyond loopback: pass --token-env VAR so only peers with "
              "the token can read the files")
    store = SeedStore()
    for file in files:
        try:
            m = manifest_for(file, piece_size)
        except SwarmError as exc:
            _fail(str(exc))
            return
        if store.get(m.name) is not None:
            _fail(f"two files named {m.name!r}: peers ask for files by name")
        store.add(file, m)

    async def run() -> None:
        shutdown = trio.Event()
        interrupted: list[bool] = []
        async with trio.open_nursery() as nursery:
            try:
                url = await nursery.start(lambda task_status: serve_pieces(
                    store, host, port, shutdown, token=token, rate_limit=rate,
                    task_status=task_status))
            except OSError as exc:
                raise OSError(f"cannot listen on {host}:{port}: {exc}") from exc
            click.echo(f"seeding {len(store.names())} file(s) at {url}", nl=True)
            for name in store.names():
                entry = store.get(name)
                assert entry is not None
                click.echo(f"  {name}  {entry.manifest.size} bytes  {entry.manifest.sha256}")
            click.echo("serving until Ctrl-C", nl=True)
            with trio.CancelScope() as scope:
                await _until_signal(scope, interrupted)
            shutdown.set()

    try:
        trio.run(run)
    except BaseException as exc:  # noqa: BLE001 - mapped to one clear line below
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return
        if isinstance(leaf, (OSError, SwarmError)):
            _fail(str(leaf), code=1)
        raise


def _progress_view(as_json: bool) -> tuple[Any, Callable[[Any], None]]:
    from rich.markup import escape

    bar = byte_progress(as_json)
    overall = bar.add_task("pull", total=None)
    rows: dict[str, Any] = {}

    def show(p: Any) -> None:
        labels = {"manifest": "asking peers", "resume": "checking what a previous pull left",
                  "reuse": "copying pieces of local files", "download": "pulling",
                  "verify": "checking the whole file", "done": "done"}
        if p.phase in ("resume", "verify"):
            bar.update(overall, description=labels[p.phase], completed=p.held, total=p.total or None)
            return
        bar.update(overall, description=labels.get(p.phase, p.phase), completed=p.held,
                   total=p.total or None)
        for url, stats in p.peers.items():
            if url not in rows:
                rows[url] = bar.add_task(f"  {escape(url)}", total=None)
            desc = f"  {escape(url)}" + (f" [red]dropped: {escape(stats.dropped)}[/]"
                                         if stats.dropped else "")
            bar.update(rows[url], completed=stats.bytes, description=desc)

    return bar, show


@swarm.command("pull")
@click.argument("name_or_sha")
@click.option("--peer", "peers", multiple=True, required=True, metavar="URL",
              help="A peer serving the file (agent or `swarm seed`), e.g. http://10.0.0.5:9191; "
                   "repeat for every peer.")
@click.option("--out", default=None, type=click.Path(path_type=Path),
              help="Where to put the file: a path, or a folder for the file's own name "
                   "(default: the current folder).")
@click.option("--token-env", default=None, metavar="VAR",
              help="Environment variable holding the bearer token the peers want (also "
                   "required of peers when --serve goes beyond loopback).")
@click.option("--reuse", "reuse", multiple=True, metavar="DIR",
              type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="A folder of files that may share pieces with this one (older versions): "
                   "those pieces are copied instead of downloaded. The --out folder is always "
                   "searched. Repeatable.")
@click.option("--serve", default=None, metavar="HOST:PORT", callback=checked(parse_address),
              help="While pulling, serve the pieces already here to other peers.")
@click.option("--in-flight", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Piece requests kept open per peer.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def swarm_pull(name_or_sha: str, peers: tuple[str, ...], out: Path | None, token_env: str | None,
               reuse: tuple[Path, ...], serve: tuple[str, int] | None, in_flight: int,
               as_json: bool) -> None:
    """Download NAME_OR_SHA (a file name or whole-file SHA-256) from every --peer at once.

    Rarest pieces first, several requests per peer; every piece is checked
    against the manifest before it is written, the finished file against the
    whole-file SHA-256, then it is moved into place atomically. A killed pull
    resumes when run again. A peer sending a corrupt piece is dropped. Exits 1
    (saying what each peer did) when the file cannot be finished.
    """
    import msgspec

    from tightwad_core.cluster.sizes import human
    from tightwad_core.config.profiles import is_loopback
    from tightwad_core.swarm.manifest import SwarmError
    from tightwad_core.swarm.pull import PeerSource, PullFailed, pull
    from tightwad_core.swarm.routes import serve_pieces
    from tightwad_core.swarm.store import SeedStore

    token = _token(token_env)
    for url in peers:
        if not url.startswith(("http://", "https://")):
            _fail(f"--peer {url!r}: expected a URL such as http://10.0.0.5:9191")
    target = out or Path.cwd()
    if not target.is_dir() and not target.parent.is_dir():
        _fail(f"--out {target}: folder {target.parent} does not exist")
    if serve is not None and not token and not is_loopback(serve[0]):
        _fail(f"--serve {serve[0]} is beyond loopback: pass --token-env VAR")
    sources = [PeerSource(u.rstrip("/"), token) for u in peers]
    bar, show = _progress_view(as_json)
    interrupted: list[bool] = []

    async def run() -> Any:
        store = SeedStore() if serve is not None else None
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_signal, nursery.cancel_scope, interrupted)
            if serve is not None and store is not None:
                try:
                    await nursery.start(lambda task_status: serve_pieces(
                        store, serve[0], serve[1], shutdown, token=token, task_status=task_status))
                except OSError as exc:
                    raise OSError(f"cannot listen on {serve[0]}:{serve[1]}: {exc}") from exc
            try:
                return await pull(name_or_sha, sources, target, reuse_dirs=list(reuse),
                                  store=store, in_flight_per_peer=in_flight, progress=show)
            finally:
                shutdown.set()
                nursery.cancel_scope.cancel()

    try:
        with bar:
            result = trio.run(run)
    except BaseException as exc:  # noqa: BLE001 - mapped to one clear line below
        leaf = _leaf(exc)
        if isinstance(leaf, PullFailed):
            _fail(str(leaf), code=1)
        if isinstance(leaf, SwarmError):
            _fail(str(leaf))
        if isinstance(leaf, OSError):
            _fail(f"{leaf.strerror or leaf} ({leaf.filename or target})", code=1)
        if isinstance(leaf, KeyboardInterrupt):
            interrupted.append(True)
        else:
            raise
    if interrupted or result is None:
        _fail("interrupted: run the same command again to resume", code=130)
        return
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(result), indent=2).decode())
        return
    rate = result.bytes_transferred / max(result.seconds, 1e-9)
    click.echo(f"{result.path}: {human(result.size)}, SHA-256 {result.sha256} verified; "
               f"{human(result.bytes_transferred)} transferred in {result.seconds:.1f} s "
               f"({human(rate)}/s"
               + (f"; {human(result.bytes_wasted)} of it of no use" if result.bytes_wasted else "")
               + f"), {human(result.bytes_reused)} reused from local files, "
               f"{human(result.bytes_resumed)} from a previous pull")
    for url, p in result.per_peer.items():
        click.echo(f"  {url}: {human(p.bytes)} in {p.pieces} pieces"
                   + (f"; dropped: {p.dropped}" if p.dropped else ""))

"""`tightwad link`: a slow network link between the proxy and a model server."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from functools import partial

import click
import trio

from tightwad_core.bench.link import LinkSpec, parse_bandwidth, parse_delay, serve_link
from tightwad_core.cli.main import _leaf, main
from tightwad_core.config.profiles import is_loopback


def parse_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9000"``, ``"[::1]:9000"``, ``"localhost:0"`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9000")
    return host, int(port)


def checked(parse: Callable[[str], object]) -> Callable[..., object]:
    """A click callback that turns the parser's ValueError into one usage line."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> object:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback



async def _run(listen: tuple[str, int], target: tuple[str, int], spec: LinkSpec) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                handle = await nursery.start(partial(serve_link, *listen, *target, spec))
            except OSError as exc:
                raise OSError(f"cannot listen on {listen[0]}:{listen[1]}: {exc}") from exc
            click.echo(f"link {handle.url} -> {target[0]}:{target[1]}: {spec.describe()}")
            click.echo("relaying until Ctrl-C")
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    s = handle.stats
    click.echo(f"link closed: {s.connections} connection(s), {s.failed} failed upstream, "
               f"{s.bytes_up} bytes up, {s.bytes_down} bytes down")


@main.command("link")
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              callback=checked(parse_address),
              help="Where to accept connections; port 0 picks a free port.")
@click.option("--to", "target", required=True, metavar="HOST:PORT",
              callback=checked(parse_address),
              help="The model server (or proxy) to relay connections to.")
@click.option("--delay", default="0ms", show_default=True, metavar="TIME",
              callback=checked(parse_delay),
              help="One-way delay, added in each direction: 10ms, 0.5s, 250us "
                   "(a bare number is milliseconds).")
@click.option("--bandwidth", default=None, metavar="RATE", callback=checked(parse_bandwidth),
              help="Cap per direction: 500kbit, 100mbit, 1gbit (bits/s) or 10MB, 512KiB "
                   "(bytes/s). Default: unlimited.")
@click.option("--allow-remote", is_flag=True,
              help="Allow --listen beyond loopback. The link has no authentication: anyone who "
                   "reaches it reaches --to through it.")
def link(listen: tuple[str, int], target: tuple[str, int], delay: float,
         bandwidth: float | None, allow_remote: bool) -> None:
    """Emulate a slow network link between the proxy and a model server, for benchmarks.

    Listens on --listen and relays every TCP connection to --to, delaying the
    bytes each way by --delay (pipelined, like a real link: a steady stream keeps
    its rate and only gains latency) and, with --bandwidth, serializing them at
    that rate. Point the proxy's backend URL at the printed URL. Runs until
    Ctrl-C.

    \b
    Example:
      tightwad link --listen 127.0.0.1:9000 --to 127.0.0.1:8080 --delay 10ms --bandwidth 100mbit
    """
    if not is_loopback(listen[0]) and not allow_remote:
        click.echo(f"error: --listen {listen[0]} is beyond loopback, and the link relays anyone "
                   f"who connects to {target[0]}:{target[1]} without authentication; pass "
                   "--allow-remote if that is what you want", err=True)
        sys.exit(2)
    spec = LinkSpec(delay, bandwidth)
    try:
        trio.run(_run, listen, target, spec)
    except BaseException as exc:  # noqa: BLE001 - mapped to one clear line below
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return
        if isinstance(leaf, OSError):
            click.echo(f"error: {leaf}", err=True)
            sys.exit(1)
        raise

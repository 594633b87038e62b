"""`tightwad rpc-worker`: this machine's rpc-server, reachable only through
the TLS-and-token tunnel (see `tls_token`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from functools import partial
from pathlib import Path

import click
import trio

from tightwad_core.config.profiles import is_loopback, parse_listen
from tightwad_plugins.transports.certs import (
    default_state_dir,
    load_or_create,
    load_or_create_token,
)

log = logging.getLogger("tightwad.rpc-worker")


def _snippet(name: str, host: str, port: int, fp: str, token_env: str) -> str:
    return (f'[[profiles.YOURS.cluster.workers]]\nname = "{name}"\nhost = "{host}"\nport = {port}\n'
            f'transport = "tls-token"\nfingerprint = "{fp}"\ntoken_env = "{token_env}"   '
            "# set it on the coordinator to this worker's token")


async def _serve(listen: str, rpc_argv: list[str], state: Path, token: str, verbose: bool) -> None:
    from tightwad_core.runtime.procs import Supervised, free_port, tcp_listening
    from tightwad_plugins.transports.tls_token import serve_tunnel

    identity = load_or_create(state)
    host, port = parse_listen(listen)
    inner = free_port()
    argv = [*rpc_argv[:1], "-H", "127.0.0.1", "-p", str(inner), *rpc_argv[1:]]

    rpc = Supervised("rpc-server", argv, state / "rpc-server.log", None,
                     ready=partial(tcp_listening, "127.0.0.1", inner), startup_timeout=60)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(rpc.serve)
            from tightwad_core import __version__
            from tightwad_core.runtime.engine import installed_backend

            about = {"backend": installed_backend() or "unknown", "version": __version__,
                     "devices": _device_arg(rpc_argv) or "all"}
            bound, _stats = await nursery.start(partial(
                serve_tunnel, host, port, identity.server_context(), token, ("127.0.0.1", inner),
                info=about))
            shown = host if host not in ("0.0.0.0", "::", "") else "THIS-MACHINE"
            click.echo(f"rpc-worker: rpc-server on 127.0.0.1:{inner} (loopback only), TLS tunnel "
                       f"on {host}:{bound}\ncertificate fingerprint: {identity.fingerprint}\n"
                       f"token: in {state / 'token'} (or the variable you started it with)\n\n"
                       "On the coordinator, add to the profile:\n\n"
                       + _snippet(os.uname().nodename.split(".")[0] or "worker", shown, bound,
                                  identity.fingerprint, "TIGHTWAD_RPC_TOKEN") + "\n", err=True)
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _device_arg(argv: list[str]) -> str | None:
    return argv[argv.index("-d") + 1] if "-d" in argv[:-1] else None


@click.command("rpc-worker")
@click.option("--listen", default="0.0.0.0:50052", show_default=True,
              help="host:port of the TLS tunnel the coordinator connects to.")
@click.option("--threads", "-t", type=click.IntRange(min=1), default=None,
              help="CPU threads of rpc-server (default: its own).")
@click.option("--device", "-d", default=None, help="Devices rpc-server offers, e.g. CUDA0,CUDA1 "
              "(default: all of them).")
@click.option("--cache/--no-cache", default=False, show_default=True,
              help="Let rpc-server keep received weights in a local file cache.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the certificate, key and token live (default: "
                   "~/.config/tightwad/rpc-worker).")
@click.option("--token-env", default="TIGHTWAD_RPC_TOKEN", show_default=True,
              help="Variable holding the token; unset: the state folder's `token` file, made on "
                   "first start.")
@click.option("--show", is_flag=True, help="Print the fingerprint and the profile snippet, and exit.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def rpc_worker_command(listen: str, threads: int | None, device: str | None, cache: bool,
                       state_dir: Path | None, token_env: str, show: bool, verbose: bool) -> None:
    """Serve this machine's devices to a coordinator, safely.

    Starts llama.cpp's rpc-server bound to loopback and a tunnel in front of
    it that requires TLS (a self-signed certificate made on first start,
    pinned by fingerprint in the coordinator's profile) and a token. The
    coordinator reaches it with `transport = "tls-token"`.
    """
    from tightwad_core.cli.main import _fail, _leaf, _setup_logging
    from tightwad_core.runtime.procs import StartupError, find_engine

    _setup_logging(verbose)
    state = state_dir or default_state_dir()
    try:
        host, _port = parse_listen(listen)
        token = os.environ.get(token_env) or load_or_create_token(state)
        if len(token) < 16:
            raise ValueError(f"the token in ${token_env} is shorter than 16 characters")
        if show:
            identity = load_or_create(state)
            click.echo(f"fingerprint: {identity.fingerprint}")
            click.echo(_snippet("worker", host, _port, identity.fingerprint, "TIGHTWAD_RPC_TOKEN"))
            return
        argv = [str(find_engine("rpc-server"))]
        if threads:
            argv += ["-t", str(threads)]
        if device:
            argv += ["-d", device]
        if cache:
            argv += ["-c"]
    except (ValueError, OSError, StartupError) as exc:
        _fail(str(exc))
        return
    if is_loopback(host):
        log.info("the tunnel listens on loopback only: other machines cannot reach it")
    try:
        trio.run(_serve, listen, argv, state, token, verbose)
    except BaseException as exc:  # noqa: BLE001 - one clear line
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return
        if isinstance(leaf, (OSError, StartupError, ValueError)):
            _fail(str(leaf), 1)
        raise
    sys.exit(0)

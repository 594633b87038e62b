"""Running the agent: its state, the app with the swarm's routes (pieces
and pulls) mounted, the models with a manifest seeded, discovery's
announcements, hypercorn."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from tightwad_core.config.schema import ConfigError, PeerConfig
from tightwad_core.peer.config import Settings, resolve
from tightwad_core.peer.logs import Ring, RingHandler
from tightwad_core.peer.worker import RpcWorkerControl

if TYPE_CHECKING:
    from tightwad_core.peer.discovery import PeerBook

log = logging.getLogger("tightwad.peer")


def run_dir() -> Path:
    """Where the agent keeps its logs (the state folder's ``peer/``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tightwad" / "peer"


class AgentState:
    """What the routes share."""

    def __init__(self, settings: Settings, run_path: Path | None = None) -> None:
        from tightwad_core.swarm.jobs import Jobs
        from tightwad_core.swarm.store import SeedStore

        self.settings = settings
        self.run_dir = run_path or run_dir()
        self.agent_log = Ring()
        self.rpc_log = Ring()
        self.rpc = RpcWorkerControl(settings, self.run_dir, self.rpc_log)
        self.store = SeedStore()
        self.pulls = Jobs()  # pulls run for `tightwad distribute`
        self.url = settings.url()
        self.started = time.time()
        self.shutdown = trio.Event()  # set: the agent finishes its requests and ends
        self.book: PeerBook | None = None  # the peers discovery heard (None: discovery off)


def seed_models(state: AgentState) -> int:
    """Blocking: serve every model file that has a swarm manifest beside it
    (of its size); how many."""
    from tightwad_core.peer.host import list_models
    from tightwad_core.swarm.manifest import SwarmError, load_manifest, manifest_path

    count = 0
    for m in list_models(state.settings.model_dirs):
        man = manifest_path(m.path)
        if not man.exists():
            continue
        try:
            manifest = load_manifest(man)
            if manifest.size != m.size or manifest.name != m.path.name:
                raise SwarmError(f"{man} describes {manifest.name} of {manifest.size} bytes, "
                                 f"not this file of {m.size}")
            state.store.add(m.path, manifest)
            count += 1
        except SwarmError as exc:
            log.warning("not seeding %s: %s", m.name, exc)
    return count


async def run_agent(cfg: PeerConfig, *, run_path: Path | None = None, signals: bool = True,
                    task_status: trio.TaskStatus[AgentState] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the agent until cancelled (or, with ``signals``, SIGINT/SIGTERM):
    ConfigError before anything binds for settings it refuses;
    ``task_status.started`` receives the state (``state.url``: where it answers)."""
    from tightwad_core.http.serving import serve_app
    from tightwad_core.peer.app import create_peer_app
    from tightwad_core.swarm.jobs import pull_blueprint
    from tightwad_core.swarm.routes import swarm_blueprint

    settings = resolve(cfg)
    state = AgentState(settings, run_path)
    handler = RingHandler(state.agent_log)
    root = logging.getLogger("tightwad")
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        app = create_peer_app(state)
        app.register_blueprint(swarm_blueprint(state.store))
        app.register_blueprint(pull_blueprint(state, state.pulls))
        seeded = await trio.to_thread.run_sync(seed_models, state)
        shutdown = state.shutdown
        async with trio.open_nursery() as nursery:
            state.rpc.attach(nursery)
            state.pulls.nursery = nursery

            async def serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
                await serve_app(app, settings.host, settings.port, shutdown, task_status=task_status)
                nursery.cancel_scope.cancel()  # served its last request: the rest ends too

            bound = await nursery.start(serve)
            port = int(bound[0].rsplit(":", 1)[1]) if bound else settings.port
            state.url = settings.url(port)
            if cfg.discovery:
                await _discovery(state, nursery, port)
            log.info("peer agent on %s, seeding %d file(s), discovery %s", state.url, seeded,
                     "on" if cfg.discovery else "off")
            if signals:
                nursery.start_soon(_until_signal, shutdown)
            task_status.started(state)
            await shutdown.wait()
            await state.rpc.stop()
    finally:
        root.removeHandler(handler)


async def _discovery(state: AgentState, nursery: trio.Nursery, port: int) -> None:
    """Announce the agent (a wildcard bind: each interface's own address) and
    keep the peers heard with the same token in ``state.book``."""
    from tightwad_core.peer.discovery import DiscoveryError, PeerBook, announce_forever, discovered

    s, cfg = state.settings, state.settings.cfg
    host = f"[{s.host}]" if ":" in s.host else s.host
    own = f"http://{host}:{port}"
    wildcard = s.host in ("0.0.0.0", "::", "")
    from tightwad_core.peer.discovery import interfaces

    mine = {f"http://{addr}:{port}" for _, addr in interfaces()} if wildcard else set()
    state.book = PeerBook(s.token, self_url=state.url if wildcard else own, self_urls=mine)
    try:
        await nursery.start(partial(
            announce_forever, own, state.book.tag, name=socket.gethostname(),
            group=cfg.discovery_group, port=cfg.discovery_port, interface=cfg.discovery_interface,
            interval=cfg.announce_interval, token=s.token))
    except DiscoveryError as exc:
        raise ConfigError(f"[peer] discovery: {exc}") from None
    try:
        await nursery.start(partial(discovered, state.book, group=cfg.discovery_group,
                                    port=cfg.discovery_port, interface=cfg.discovery_interface))
    except (OSError, DiscoveryError) as exc:  # announcing still works: say so, keep serving
        log.warning("discovery: not listening for other agents: %s", exc)


async def _until_signal(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            shutdown.set()
            return

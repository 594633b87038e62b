"""Running a profile: build its backends and mode from plugins, start them in
one nursery, and serve the app with hypercorn until told to stop."""

from __future__ import annotations

import logging
import signal
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from tightwad_core.cluster.pool import RpcPool
from tightwad_core.config.profiles import (
    BackendConfig,
    ConfigError,
    Profile,
    is_loopback,
    parse_listen,
    secret,
)
from tightwad_core.http.app import create_app
from tightwad_core.http.common import ServerState
from tightwad_core.http.serving import serve_app
from tightwad_core.plugins import Registry, load_registry
from tightwad_core.roles import FLEET, POOL_CAPABILITY, Backend, BackendContext, ModeContext
from tightwad_core.runtime.procs import StartupError
from tightwad_core.runtime.rpc import RpcError

log = logging.getLogger("tightwad")


@dataclass
class Running:
    """What `serve_profile` hands to ``task_status.started``."""

    url: str  # base URL the proxy listens on
    state: ServerState
    shutdown: trio.Event  # set it to stop the proxy gracefully


def role_tables(profile_name: str, profile: Profile, roles: tuple[str, ...],
                ) -> list[tuple[str, BackendConfig]]:
    """The backend tables a mode with ``roles`` needs from ``profile``, by
    role name (a fleet as ``drafters.0``, ...); ConfigError naming the table
    that is missing."""
    wanted: list[tuple[str, BackendConfig]] = []
    for role in roles:
        if role == FLEET:
            if not profile.drafters:
                if "draft" in roles and profile.draft is not None:
                    continue  # a single draft stands in for the fleet
                raise ConfigError(f"profile {profile_name!r}: mode {profile.mode!r} needs "
                                  "[[drafters]] tables")
            wanted += [(f"{FLEET}.{i}", cfg) for i, cfg in enumerate(profile.drafters)]
            continue
        if role == "draft" and FLEET in roles and profile.draft is None:
            if profile.drafters:
                continue  # a fleet stands in for the single draft
            raise ConfigError(f"profile {profile_name!r}: mode {profile.mode!r} needs a [draft] "
                              "table or [[drafters]] tables")
        cfg = getattr(profile, role, None)
        if cfg is None:
            raise ConfigError(f"profile {profile_name!r}: mode {profile.mode!r} needs a [{role}] table")
        wanted.append((role, cfg))
    return wanted


def build_backends(profile_name: str, profile: Profile, registry: Registry, config_dir: Path,
                   run_dir: Path, roles: tuple[str, ...], pool: RpcPool | None = None,
                   ) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    for role, cfg in role_tables(profile_name, profile, roles):
        try:
            factory = registry.backend(cfg.backend)
        except KeyError as exc:
            raise ConfigError(f"profile {profile_name!r}: field '{role}.backend': {exc.args[0]}") from None
        on_pool = pool if role == "target" else None
        try:
            backends[role] = factory(cfg, BackendContext(role=role, config_dir=config_dir,
                                                         run_dir=run_dir, pool=on_pool))
        except ConfigError as exc:
            raise ConfigError(f"profile {profile_name!r}: {exc}") from None
        if on_pool is not None and POOL_CAPABILITY not in backends[role].capabilities:
            raise ConfigError(f"profile {profile_name!r}: the target backend {cfg.backend!r} cannot "
                              "be placed on a [cluster] pool (it has to launch a llama.cpp engine "
                              "from `model_path`)")
    return backends


async def serve_profile(
    profile_name: str,
    profile: Profile,
    *,
    config_dir: Path,
    registry: Registry | None = None,
    listen: str | None = None,
    run_dir: Path | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until the returned ``shutdown`` event is set or the task is cancelled."""
    registry = registry or load_registry()
    try:
        mode_factory = registry.mode(profile.mode)
    except KeyError as exc:
        raise ConfigError(f"profile {profile_name!r}: field 'mode': {exc.args[0]}") from None
    host, port = parse_listen(listen or profile.listen)
    api_key = secret(profile.api_key, profile.api_key_env)
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"profile {profile_name!r}: listening on {host} needs a bearer token, but "
                          f"neither `api_key` nor the variable named by `api_key_env` is set")
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="tightwad-run-"))
    roles = tuple(mode_factory.roles)
    pool = None
    if profile.cluster is not None:
        try:
            pool = RpcPool.from_registry(profile.cluster, registry, run_dir, config_dir)
        except ConfigError as exc:
            raise ConfigError(f"profile {profile_name!r}: {exc}") from None
    backends = build_backends(profile_name, profile, registry, config_dir, run_dir, roles, pool)
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            if pool is not None:
                log.info("starting the pool: %s", ", ".join(
                    f"{m.name} ({m.transport.describe()})" for m in pool.members))
                try:
                    await nursery.start(pool.serve)
                except RpcError as exc:
                    raise StartupError(f"profile {profile_name!r}: {exc}") from None
            for role, backend in backends.items():
                log.info("starting %s backend %s", role, backend.kind)
                await nursery.start(backend.serve)
                h = await backend.health()
                if not h.ok:
                    log.warning("%s backend (%s at %s) is not healthy yet: %s; serving anyway, "
                                "requests fail with 503 until it is", role, backend.kind, h.url, h.detail)
            try:
                mode = mode_factory(profile, backends, ModeContext(verifiers=registry.verifiers()))
                await mode.start()
            except ConfigError as exc:
                raise ConfigError(f"profile {profile_name!r}: {exc}") from None
            state = ServerState(profile_name, profile, mode, backends, api_key, pool=pool,
                                config_dir=config_dir)
            app = create_app(state, bind_host=host)
            async def http(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve_app(app, host, port, shutdown, task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: stop the backends too

            binds = await nursery.start(http)
            task_status.started(Running(binds[0], state, shutdown))
    finally:
        with trio.CancelScope(shield=True):
            for backend in backends.values():
                await backend.aclose()


async def run_until_signal(profile_name: str, profile: Profile, *, config_dir: Path,
                           listen: str | None = None, on_ready: Any = None) -> None:
    """`tightwad run`: serve until SIGINT/SIGTERM, then shut down cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(
                partial(serve_profile, profile_name, profile, config_dir=config_dir, listen=listen))
            if on_ready is not None:
                on_ready(running)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                running.shutdown.set()
                break

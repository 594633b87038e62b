"""The pool: the rpc-servers a profile's target is placed on.

Each worker is reached through its transport plugin. llama.cpp never talks to
a worker directly: it connects to a relay on loopback, one per worker, that
opens the transport for every connection. The relay counts bytes and round
trips per worker and sees which worker ended a connection first, so when
llama.cpp aborts on a broken RPC socket (it does: the whole process) the pool
can say which worker dropped, wait for it, and let the supervisor restart
the target.

A worker marked ``launch`` gets an rpc-server started (and restarted) here:
the one-machine test bed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from tightwad_core.bench.link import LinkStats, relay
from tightwad_core.cluster.sizes import human, parse_size
from tightwad_core.config.schema import ClusterConfig, ConfigError, RpcWorkerConfig
from tightwad_core.runtime.rpc import RpcError, RpcInfo, engine_version, probe_stream, refusal

if TYPE_CHECKING:
    from tightwad_core.moe.plan import Plan
    from tightwad_core.plugins import Registry
    from tightwad_core.roles import ExpertPlacement, PlacementStrategy, Transport
    from tightwad_core.runtime.procs import Supervised

log = logging.getLogger("tightwad.cluster")


#: The output layer's tensors (and token_embd, which tied-embedding models
#: reuse as the output matrix), pinned to the target's own CPU buffers.
OUTPUT_LAYER = r"^output(_norm)?\.(weight|bias)$|^token_embd\.weight$"


@dataclass(frozen=True)
class PoolPlan:
    """llama.cpp's view of a placement: endpoints, devices, layers, split.

    llama.cpp offloads the *last* ``--n-gpu-layers`` of the n + 1 layers
    (the output layer counts as the last), so every layer is offloaded and,
    with ``output_local``, the output layer is pulled back to the CPU with an
    ``--override-tensor``; the split gives its slot to the last device. With
    an expert plan, its patterns join that override (one flag, comma-separated)."""

    endpoints: list[str]  # the relays, in worker order
    n_devices: int        # RPC devices over all workers (RPC0, RPC1, ...)
    n_layer: int          # repeating layers of the model
    split: list[int]      # repeating layers per device
    output_local: bool
    experts: tuple[tuple[str, str], ...] = ()  # (pattern, device: RPCn or CPU) of the expert plan
    buffers: dict[str, str] = field(default_factory=dict)  # RPCn -> llama-server's buffer type name

    def args(self, devices: bool = True) -> list[str]:
        """The flags llama-server (and `tightwad worker`) take for it;
        ``devices``: name the RPC devices with ``--device`` (without it
        llama-server keeps the layers on its own machine) and the expert
        overrides' RPC devices by llama-server's buffer types, ``RPC0[host:port]``
        (`tightwad worker` takes the device names)."""
        from tightwad_core.moe.plan import flag_value

        out = ["--rpc", ",".join(self.endpoints)]
        if devices:
            out += ["--device", ",".join(f"RPC{i}" for i in range(self.n_devices))]
        split = list(self.split)
        split[-1] += 1  # the output layer's slot in llama.cpp's split
        out += ["--n-gpu-layers", str(self.n_layer + 1), "--tensor-split", ",".join(map(str, split))]
        pairs = [(OUTPUT_LAYER, "CPU")] if self.output_local else []
        pairs += [(pat, self.buffers.get(dev, dev) if devices else dev) for pat, dev in self.experts]
        if pairs:
            out += ["--override-tensor", flag_value(pairs)]
        return out


@dataclass
class Member:
    """One worker of the pool and what the pool knows about it."""

    cfg: RpcWorkerConfig
    transport: Transport
    stats: LinkStats = field(default_factory=LinkStats)
    endpoint: str = ""          # the loopback relay llama.cpp connects to
    info: RpcInfo | None = None  # from the last handshake
    state: str = "starting"     # "up", "down" (cannot be reached) or "dropped" (ended a live connection)
    detail: str = ""
    drops: int = 0
    dropped_at: float | None = None
    process: Supervised | None = None  # the rpc-server started here (launch = true)

    @property
    def name(self) -> str:
        return self.cfg.name


class RpcPool:
    """Run `serve` in a nursery before the target starts; then `plan` gives
    the target its ``--rpc`` endpoints and split."""

    def __init__(self, cluster: ClusterConfig, transports: Mapping[str, Any],
                 placement: PlacementStrategy, run_dir: Path,
                 experts: ExpertPlacement | None = None, config_dir: Path | None = None) -> None:
        self.cluster = cluster
        self.placement = placement
        self.experts = experts  # the expert placement (cluster.experts), None: experts follow their layer
        self.run_dir = run_dir
        self.config_dir = config_dir or Path.cwd()  # where a relative routing_profile starts
        self.expert_plan: Plan | None = None  # from the last `plan`
        self.members: list[Member] = []
        for w in cluster.workers:
            if w.launch and w.port == 0:  # a launched rpc-server on any free port
                from tightwad_core.runtime.procs import free_port

                w = msgspec.structs.replace(w, port=free_port())
            try:
                factory = transports[w.transport]
            except KeyError:
                known = ", ".join(sorted(transports)) or "none"
                raise ConfigError(f"cluster worker {w.name!r}: no transport named {w.transport!r} "
                                  f"(known: {known})") from None
            self.members.append(Member(w, factory(w)))
        self.split: dict[str, int] = {}  # device -> layers, from the last `server_args`
        self.started = False

    @classmethod
    def from_registry(cls, cluster: ClusterConfig, registry: Registry, run_dir: Path,
                      config_dir: Path | None = None) -> RpcPool:
        from tightwad_core.moe.plan import PlanError, parse_devices, pick_strategy

        try:
            placement = registry.get("placement_strategies", cluster.placement)()
        except KeyError as exc:
            raise ConfigError(f"field 'cluster.placement': {exc.args[0]}") from None
        if not callable(getattr(placement, "assign", None)):
            raise ConfigError(f"field 'cluster.placement': {cluster.placement!r} places experts, not "
                              "layers: name it in `cluster.experts`")
        experts = None
        try:
            if cluster.experts is not None:
                experts = pick_strategy(registry, cluster.experts, cluster.routing_profile is not None)
        except PlanError as exc:
            raise ConfigError(f"field 'cluster.experts': {exc}") from None
        try:
            if cluster.expert_cpu is not None:
                parse_devices(f"CPU={cluster.expert_cpu}")
        except PlanError as exc:
            raise ConfigError(f"field 'cluster.expert_cpu': {exc}") from None
        bad = [w.name for w in cluster.workers if not w.speed > 0]
        if bad:
            raise ConfigError(f"cluster worker {bad[0]!r}: `speed` must be above zero")
        return cls(cluster, dict(registry.entries.get("transports", {})), placement, run_dir,
                   experts, config_dir)

    # ------------------------------------------------------------------ serving

    async def serve(self, *, task_status: trio.TaskStatus[RpcPool] = trio.TASK_STATUS_IGNORED) -> None:
        """Start launched rpc-servers and the relays, handshake every worker
        (RpcError naming the first that fails), then serve until cancelled."""
        from tightwad_core.runtime.procs import StartupError

        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            try:
                for m in self.members:
                    if m.cfg.launch:
                        m.process = self._launch(m)
                        await nursery.start(m.process.serve)
                for m in self.members:
                    m.endpoint = await nursery.start(self._relay, m)
                await self.check()
                await self.check_agents()
            except (RpcError, StartupError, OSError) as exc:  # one line for the user, unwrapped
                failure = exc
                nursery.cancel_scope.cancel()
            else:
                self.started = True
                task_status.started(self)
        if failure is not None:
            raise failure

    def _launch(self, m: Member) -> Supervised:
        from tightwad_core.runtime.procs import Supervised, find_engine, tcp_listening

        argv = [str(find_engine("rpc-server")), "-H", m.cfg.host, "-p", str(m.cfg.port)]
        if m.cfg.threads:
            argv += ["-t", str(m.cfg.threads)]
        argv += list(m.cfg.extra_args)
        return Supervised(f"rpc-server {m.name}", argv, self.run_dir / f"rpc-server-{m.name}.log",
                          None, ready=partial(tcp_listening, m.cfg.host, m.cfg.port),
                          startup_timeout=60, env=dict(m.cfg.env))

    async def _relay(self, m: Member, *, task_status: trio.TaskStatus[str]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        try:
            port = listeners[0].socket.getsockname()[1]
            task_status.started(f"127.0.0.1:{port}")
            await trio.serve_listeners(partial(self._connection, m), listeners)
        finally:
            for listener in listeners:
                listener.socket.close()

    async def _connection(self, m: Member, client: trio.SocketStream) -> None:
        m.stats.connections += 1
        m.stats.active += 1
        try:
            async with client:
                try:
                    upstream = await m.transport.connect()
                except RpcError as exc:
                    m.stats.failed += 1
                    self._mark(m, "down", str(exc))
                    return
                def dropped(side: str) -> None:  # before llama.cpp sees its socket close
                    if side == "upstream":
                        self._mark(m, "dropped", "it closed the connection")

                async with upstream:
                    await relay(client, upstream, m.transport.link, m.stats, on_end=dropped)
        finally:
            m.stats.active -= 1

    def _mark(self, m: Member, state: str, detail: str) -> None:
        if state in ("down", "dropped") and m.state == "up":
            m.drops += 1
            m.dropped_at = time.time()
            log.error("rpc worker %r (%s) dropped out of the pool: %s", m.name,
                      m.transport.describe(), detail)
        m.state, m.detail = state, detail

    # ------------------------------------------------------------------ health

    async def probe(self, m: Member) -> RpcInfo:
        """Handshake with one worker through its transport (not while the
        target holds its connection: rpc-server serves one client at a time)."""
        timeout = self.cluster.connect_timeout
        with trio.fail_after(timeout * 3):
            stream = await m.transport.connect()
        async with stream:
            return await probe_stream(stream, f"{m.name!r} ({m.transport.describe()})", timeout)

    async def check(self) -> None:
        """Handshake with every worker; RpcError naming the first one that is
        down, busy, not an rpc-server, or of another RPC protocol version."""
        ours = engine_version()
        for m in self.members:
            try:
                info = await self.probe(m)
            except trio.TooSlowError:
                self._mark(m, "down", f"rpc worker {m.name!r} did not answer")
                raise RpcError(f"rpc worker {m.name!r} ({m.transport.describe()}) did not answer "
                               "the RPC handshake") from None
            except RpcError as exc:
                self._mark(m, "down", str(exc))
                raise
            why = refusal(f"{m.name!r} ({m.transport.describe()})", info.version, ours) if ours else None
            if why:
                self._mark(m, "down", why)
                raise RpcError(why)
            m.info = info
            if m.state != "up":
                log.info("rpc worker %s up: protocol %s, %s free (%s)", m.name, info.version,
                         human(info.free), m.transport.describe())
            m.state, m.detail = "up", ""

    async def check_agents(self) -> None:
        """For workers that name their peer ``agent``: say in the log when it
        runs another tightwad version than this coordinator, or cannot be
        asked (the RPC handshake has already decided whether the pool works)."""
        from tightwad_core.peer.client import agent_report

        async def one(m: Member, url: str) -> None:
            env = m.cfg.agent_token_env
            token = os.environ.get(env) if env else None
            report = await trio.to_thread.run_sync(agent_report, url, token, 3.0)
            if report["state"] == "mismatch":
                log.warning("rpc worker %s: %s; run the same version on every machine",
                            m.name, report["detail"])
            elif report["state"] != "ok":
                log.warning("rpc worker %s: peer agent: %s", m.name, report["detail"])

        async with trio.open_nursery() as nursery:
            for m in self.members:
                if m.cfg.agent:
                    nursery.start_soon(one, m, m.cfg.agent)

    async def wait_ready(self) -> None:
        """Before the target (re)starts: handshake every worker, waiting up to
        ``rejoin_timeout`` for one that dropped to come back."""
        deadline = trio.current_time() + self.cluster.rejoin_timeout
        said = ""
        while True:
            try:
                await self.check()
                return
            except RpcError as exc:
                if trio.current_time() >= deadline:
                    raise RpcError(f"{exc} (waited {self.cluster.rejoin_timeout:g}s for it)") from None
                if str(exc) != said:
                    log.warning("waiting for the pool: %s", exc)
                    said = str(exc)
            await trio.sleep(1.0)

    def recent_drop(self, within: float = 300.0) -> str | None:
        """What to tell a client whose request failed: the worker that dropped lately."""
        now = time.time()
        hits = [m for m in self.members if m.dropped_at is not None and now - m.dropped_at < within]
        if not hits:
            return None
        m = max(hits, key=lambda x: x.dropped_at or 0)
        why = "it cannot be reached" if m.state == "down" else (
            "it closed the connection" if m.state == "dropped" else "it is back")
        return f"rpc worker {m.name!r} dropped out of the pool ({why})"

    # ------------------------------------------------------------------ placement

    def devices(self) -> dict[str, int]:
        """Every RPC device of the pool, in llama.cpp's order, with the memory
        the model may use on it (the worker's `memory`, else what it reports free)."""
        out: dict[str, int] = {}
        for m in self.members:
            devs = m.info.devices if m.info and m.info.devices else ()
            offered = parse_size(m.cfg.memory) if m.cfg.memory else None
            if not devs:
                out[f"{m.name}/0"] = offered or 0
                continue
            free = sum(d.free for d in devs) or 1
            for i, d in enumerate(devs):
                out[f"{m.name}/{i}"] = int(offered * d.free / free) if offered else d.free
        return out

    def layout(self, model_file: Path) -> tuple[dict[str, str], Plan | None, int]:
        """Blocking (it reads the model's header): the layers' assignment to
        the pool's devices, the expert plan (None unless ``cluster.experts``)
        and the block count. With an expert plan the layers are placed
        without their experts first; the experts then get what is left on
        each device (RPC0.. in worker order) and ``expert_cpu``."""
        from tightwad_core.moe.plan import (
            Device,
            ExpertProblem,
            PlanError,
            load_routing,
            make_plan,
            parse_devices,
            read_model,
        )

        layers, n_layer = layer_sizes(model_file)
        devices = self.devices()
        model = None
        if self.experts is not None:
            try:
                model = read_model(model_file)
            except PlanError as exc:
                raise ConfigError(f"cluster.experts: {exc}") from None
            for layer in model.layers:
                layers[f"blk.{layer.index}"] -= layer.bytes
        try:
            assigned = self.placement.assign(layers, devices)
        except ValueError as exc:
            raise ConfigError(f"cluster placement ({self.placement.name}): {exc}") from None
        if self.experts is None or model is None:
            return assigned, None, n_layer
        used = {d: 0 for d in devices}
        for name, dev in assigned.items():
            used[dev] += layers[name]
        speeds = [m.cfg.speed for m in self.members
                  for _ in range(len(m.info.devices) if m.info and m.info.devices else 1)]
        devs = [Device(f"RPC{i}", max(0, devices[d] - used[d]), speeds[i])
                for i, d in enumerate(devices)]
        try:
            if self.cluster.expert_cpu is not None:
                devs += parse_devices(f"CPU={self.cluster.expert_cpu}")
            profile = None
            if self.cluster.routing_profile is not None:
                profile = load_routing(self.config_dir / self.cluster.routing_profile, model)
            problem = ExpertProblem(model, devs, profile, profile.ubatch if profile else 1)
            return assigned, make_plan(problem, self.experts), n_layer
        except PlanError as exc:
            raise ConfigError(f"cluster.experts ({self.experts.name}): {exc}") from None

    def buffer_names(self) -> dict[str, str]:
        """RPCn -> the buffer type llama-server names it by, ``RPCj[endpoint]``
        (j: the device's index on its worker)."""
        from tightwad_core.moe.plan import rpc_buffer_names

        return rpc_buffer_names([(m.endpoint or f"{m.cfg.host}:{m.cfg.port}",
                                  len(m.info.devices) if m.info and m.info.devices else 1)
                                 for m in self.members])

    async def plan(self, model_file: Path) -> PoolPlan:
        """Where the model's layers go: the placement strategy's split of the
        repeating layers over the pool's devices (the output layer stays on
        the target's machine when ``output_local``), and with ``experts`` the
        expert plan's overrides."""
        assigned, experts, n_layer = await trio.to_thread.run_sync(self.layout, model_file)
        devices = self.devices()
        counts = {d: 0 for d in devices}
        for dev in assigned.values():
            counts[dev] += 1
        self.split = counts
        self.expert_plan = experts
        log.info("placement %s: %s%s", self.placement.name,
                 ", ".join(f"{d} {c} layers" for d, c in counts.items()),
                 ", output layer local" if self.cluster.output_local else "")
        if experts is not None:
            log.info("experts %s: %s", experts.strategy, ", ".join(
                f"{d['device']} {human(d['bytes'])}" for d in experts.devices()))
        return PoolPlan([m.endpoint for m in self.members], len(devices), n_layer,
                        list(counts.values()), self.cluster.output_local,
                        tuple(experts.overrides()) if experts else (), self.buffer_names())

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        workers = []
        for m in self.members:
            info = m.info
            workers.append({
                "name": m.name, "transport": m.transport.describe(), "state": m.state,
                "backend": (getattr(m.transport, "info", None) or {}).get("backend"),
                "detail": m.detail, "protocol": str(info.version) if info else None,
                "devices": [{"free": d.free, "total": d.total} for d in info.devices] if info else [],
                "memory_offered": parse_size(m.cfg.memory) if m.cfg.memory else None,
                "layers": sum(c for d, c in self.split.items() if d.split("/")[0] == m.name),
                "drops": m.drops, "launched": m.cfg.launch,
                "restarts": m.process.restarts if m.process else None,
                "connections": m.stats.connections, "bytes_up": m.stats.bytes_up,
                "bytes_down": m.stats.bytes_down, "round_trips": m.stats.round_trips,
                "agent": m.cfg.agent, "agent_token_env": m.cfg.agent_token_env,
            })
        return {"placement": self.placement.name, "output_local": self.cluster.output_local,
                "experts": self.experts.name if self.experts else None,
                "engine_protocol": str(engine_version() or "unknown"), "workers": workers}


def layer_sizes(model_file: Path) -> tuple[dict[str, int], int]:
    """Bytes of each repeating layer (``blk.N``) of a GGUF, in order, and the block count."""
    from tightwad_core.runtime.ggufio import MoeError, read_header

    try:
        header = read_header(model_file)
    except MoeError as exc:
        raise ConfigError(f"cannot read the model: {exc}") from None
    sizes: dict[int, int] = {}
    for t in header.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit():
            sizes[int(parts[1])] = sizes.get(int(parts[1]), 0) + t.nbytes
    n = max(sizes) + 1 if sizes else 0
    return {f"blk.{i}": sizes.get(i, 0) for i in range(n)}, n

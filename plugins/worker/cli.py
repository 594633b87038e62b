"""``tightwad worker``: serve one GGUF with llama-cpp-python for speculative
verification (and drafting), plus plain OpenAI routes."""

from __future__ import annotations

import logging
import re
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import click
import trio

from tightwad_core.cli.main import _fail, _leaf
from tightwad_core.config.profiles import is_loopback
from tightwad_core.http.serving import serve_app
from tightwad_core.runtime.procs import usable_cores
from tightwad_core.runtime.rpc import RpcError, check_servers, engine_version
from tightwad_plugins.worker.app import create_worker_app
from tightwad_plugins.worker.engine import Engine

log = logging.getLogger("tightwad.worker")


@dataclass
class RunningWorker:
    """What `serve_worker` hands to ``task_status.started``."""

    url: str  # base URL, e.g. http://127.0.0.1:8090
    engine: Engine
    shutdown: trio.Event  # set it to stop gracefully


class WorkerConfigError(Exception):
    """The worker cannot start as configured; the message says why."""


async def serve_worker(model: Path, host: str = "127.0.0.1", port: int = 8090, *,
                       slots: int = 2, ctx: int = 4096, threads: int | None = None,
                       api_key: str | None = None, session_ttl: float = 60.0,
                       max_body_bytes: int = 8 << 20, max_tokens_limit: int = 4096,
                       queue_max: int = 64, queue_timeout: float = 120.0,
                       n_gpu_layers: int | None = None, devices: list[str] | None = None,
                       rpc: list[str] | None = None, kv_unified: bool = True,
                       tensor_split: list[float] | None = None,
                       overrides: list[tuple[str, str]] | None = None, verbose: bool = False,
                       record_routing: bool = False,
                       task_status: trio.TaskStatus[RunningWorker] = trio.TASK_STATUS_IGNORED,
                       ) -> None:
    """Load the model (in a thread), then serve until cancelled or until the
    ``shutdown`` event handed to ``task_status.started`` is set."""
    model = Path(model)
    if not is_loopback(host) and not api_key:
        raise WorkerConfigError(f"listening on {host} needs a bearer token: pass --api-key or "
                                "set TIGHTWAD_API_KEY")
    if not model.is_file():
        raise WorkerConfigError(f"model file not found: {model}")
    if rpc:  # a real handshake with each, before llama.cpp (which aborts on a bad one)
        try:
            found = await check_servers(rpc, engine_version())
        except (RpcError, ValueError) as exc:
            raise WorkerConfigError(str(exc)) from exc
        log.info("rpc-servers: %s", ", ".join(f"{ep} (protocol {v})" for ep, v in found.items()))
    try:
        eng = await Engine.load(model, slots=slots, ctx=ctx, threads=threads,
                                session_ttl=session_ttl, verbose=verbose,
                                n_gpu_layers=n_gpu_layers, devices=devices, rpc=rpc,
                                tensor_split=tensor_split, overrides=overrides,
                                queue_max=queue_max, queue_timeout=queue_timeout,
                                unified=kv_unified, record_routing=record_routing)
    except ValueError as exc:  # an unknown --device
        raise WorkerConfigError(str(exc)) from exc
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(eng.run)
            app = create_worker_app(eng, api_key, max_body_bytes, max_tokens_limit, host)
            async def http(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve_app(app, host, port, shutdown, task_status=task_status)
                nursery.cancel_scope.cancel()

            binds = await nursery.start(http)
            log.info("worker serving %s on %s (%d sequences of up to %d tokens in one %s "
                     "KV cache; queue %d)", model.name, binds[0], slots, eng.n_ctx,
                     "unified" if kv_unified else "per-sequence", queue_max)
            log.info("devices: %s; available: %s", eng.model.placement(),
                     ", ".join(d.line() for d in eng.model.available) or "none")
            log.info("threads %d (usable cores: %d); llama.cpp: %s",
                     threads or usable_cores(), usable_cores(), eng.model.system_info())
            if record_routing:
                rec = eng.context.routing
                log.info("recording routing: %s", "no experts in this model" if rec is None else
                         f"{len(rec.layers)} MoE layers, {rec.n_expert} experts, "
                         f"{rec.n_used} per token (GET /v1/tightwad/routing)")
            task_status.started(RunningWorker(binds[0], eng, shutdown))
    finally:
        await eng.close()


async def _until_signal(**kw: Any) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running: RunningWorker = await nursery.start(partial(serve_worker, **kw))
            click.echo(f"tightwad worker listening on {running.url}", err=True)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                running.shutdown.set()
                break


@click.command("worker")
@click.option("--model", "model_ref", required=True, metavar="PATH",
              help='GGUF file to serve, or a built-in model such as "@qwen2.5-coder-1.5b".')
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8090, show_default=True, type=click.IntRange(0, 65535))
@click.option("--slots", "--parallel", "slots", default=2, show_default=True,
              type=click.IntRange(1, 64),
              help="Sequences of the one batched context: how many sessions (requests) run at "
                   "once; their rounds share each forward pass.")
@click.option("--ctx-size", "ctx", default=4096, show_default=True, type=click.IntRange(16),
              help="Most tokens one sequence (request) may hold; the KV cache holds "
                   "slots x ctx-size.")
@click.option("--queue", "queue_max", default=64, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a sequence when all are in use; more get 503 "
                   "with Retry-After.")
@click.option("--queue-timeout", default=120.0, show_default=True, type=click.FloatRange(0.0),
              help="Seconds a request waits for a sequence before it gets 503.")
@click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", default=None, type=click.IntRange(-1),
              help="Layers to offload to the GPU devices (-1: all). Default: all when this "
                   "build of llama.cpp has a GPU, else 0.")
@click.option("--device", "-dev", "devices", default=None, metavar="NAME[,NAME...]",
              help="Devices to load the model onto, by llama.cpp's names (CUDA0, ROCm0, MTL0, "
                   "Vulkan0, RPC[host:port]; CPU or none: no offload). Default: every GPU. "
                   "The start-up log lists the names this build has.")
@click.option("--rpc", "rpc", default=None, metavar="HOST:PORT[,HOST:PORT...]",
              help="rpc-servers (`rpc-server` of the same llama.cpp) to place the model on: each "
                   "is checked with the RPC handshake first; every repeating layer goes to them "
                   "and the output layer stays here, unless --device or --n-gpu-layers say "
                   "otherwise.")
@click.option("--tensor-split", "-ts", "tensor_split", default=None, metavar="N[,N...]",
              help="Share of the offloaded layers per device, in device order (e.g. 3,1), as "
                   "llama.cpp's --tensor-split. Default: by each device's free memory.")
@click.option("--override-tensor", "-ot", "override", default=None,
              metavar="PATTERN=DEVICE[,...]",
              help="Put the tensors whose names match a regular expression on a device, as "
                   "llama.cpp's --override-tensor (e.g. 'ffn_.*_exps=CPU'). With --rpc and no "
                   "--n-gpu-layers the output layer is kept here this way by default.")
@click.option("--kv-unified/--no-kv-unified", default=True, show_default=True,
              help="One KV buffer shared by all sequences (prefixes can be shared between "
                   "them) or one per sequence.")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads per eval.")
@click.option("--api-key", envvar="TIGHTWAD_API_KEY", default=None,
              help="Bearer token clients must send (env TIGHTWAD_API_KEY); required when "
                   "listening beyond loopback.")
@click.option("--session-ttl", default=60.0, show_default=True, type=click.FloatRange(1.0),
              help="Seconds a session may sit idle between rounds before its sequence is freed "
                   "(clients re-open expired sessions by re-sending the context).")
@click.option("--max-tokens", "max_tokens_limit", default=4096, show_default=True,
              type=click.IntRange(1), help="Upper bound on max_tokens for plain completions.")
@click.option("--record-routing", is_flag=True,
              help="Count which experts a Mixture-of-Experts model's router picks, per layer, "
                   "for every evaluated token; read the counts at GET /v1/tightwad/routing "
                   "(`tightwad moe profile --worker URL`). Every position of a batch is then "
                   "an output, so the last layer sees every token.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, including llama.cpp's.")
def worker_command(model_ref: str, host: str, port: int, slots: int, ctx: int,
                   queue_max: int, queue_timeout: float, n_gpu_layers: int | None,
                   devices: str | None, rpc: str | None, tensor_split: str | None,
                   override: str | None, kv_unified: bool,
                   threads: int | None, api_key: str | None, session_ttl: float,
                   max_tokens_limit: int, record_routing: bool, verbose: bool) -> None:
    """Serve one model for speculative decoding: each verify request checks K
    draft tokens in one forward pass on a KV cache kept per session."""
    from tightwad_core.runtime.catalog import resolve_model

    try:
        model = resolve_model(model_ref)
    except ValueError as exc:
        _fail(str(exc))
    if not model.is_file():
        hint = " (run `tightwad setup`)" if model_ref.startswith("@") else ""
        _fail(f"model file not found: {model}{hint}")
    if not is_loopback(host) and not api_key:
        _fail(f"listening on {host} needs a bearer token: pass --api-key or set TIGHTWAD_API_KEY")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        dev_list = None if devices is None else [d for d in devices.split(",") if d.strip()]
        try:
            split = [float(x) for x in tensor_split.split(",")] if tensor_split else None
        except ValueError:
            _fail(f"--tensor-split expects numbers separated by commas, got {tensor_split!r}")
        if split and (any(x < 0 for x in split) or not sum(split) > 0):
            _fail("--tensor-split needs shares of zero or more that add up to more than zero")
        pairs: list[tuple[str, str]] | None = None
        if override:
            pairs = []
            for item in override.split(","):
                pattern, eq, dev = item.rpartition("=")
                if not (pattern and eq and dev):
                    _fail(f"--override-tensor expects PATTERN=DEVICE[,...], got {override!r}")
                try:
                    re.compile(pattern)
                except re.error as exc:
                    _fail(f"--override-tensor: {pattern!r} is not a regular expression: {exc}")
                pairs.append((pattern, dev))
        trio.run(partial(_until_signal, model=model, host=host, port=port, slots=slots, ctx=ctx,
                         threads=threads, api_key=api_key, session_ttl=session_ttl,
                         max_tokens_limit=max_tokens_limit, queue_max=queue_max,
                         queue_timeout=queue_timeout, n_gpu_layers=n_gpu_layers,
                         devices=dev_list, kv_unified=kv_unified, verbose=verbose,
                         tensor_split=split, overrides=pairs, record_routing=record_routing,
                         rpc=[e.strip() for e in rpc.split(",") if e.strip()] if rpc else None))
    except KeyboardInterrupt:
        pass
    except (WorkerConfigError, OSError, RuntimeError, BaseExceptionGroup) as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return
        if not isinstance(leaf, (WorkerConfigError, OSError, RuntimeError)):
            raise
        _fail(str(leaf))

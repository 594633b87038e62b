"""`tightwad moe plan`: which device holds each expert tensor, and the
llama-server flags that put them there."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import click

from tightwad_core.cli.main import _fail
from tightwad_core.cli.moe import moe


@moe.command("plan")
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--devices", "spec", default=None, metavar="NAME=MEMORY[@SPEED],...",
              help="The devices and what each offers: memory for experts and a relative speed "
                   "(default 1.0), e.g. 'RPC0=8GiB@1.0,RPC1=6GiB@0.8,CPU=32GiB@0.3'. Names are "
                   "llama.cpp's: CPU, CUDA0, RPC0.. (in --device order) or RPC0[HOST:PORT].")
@click.option("--profile", "-p", "profile_name", default=None, metavar="NAME",
              help="Plan for this profile's [cluster] pool instead: RPC0.. are its workers (each "
                   "needs `memory`), after the layers' other tensors; the CPU is `expert_cpu`. "
                   "MODEL defaults to its target's model_path.")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="PATH", help="Config file for --profile (as for `tightwad run`).")
@click.option("--strategy", default=None, metavar="NAME",
              help="An expert placement strategy (see `tightwad plugins`), or auto: with a "
                   "routing profile the one that uses it. Default: the profile's "
                   "`cluster.experts`, else auto.")
@click.option("--routing", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="PROFILE.json", help="A routing profile (tightwad-moe-routing JSON) of "
                                           "this model.")
@click.option("--ubatch", type=click.IntRange(min=1), default=None, metavar="B",
              help="Tokens per ubatch the routing figures assume (default: the profile's "
                   "tokens per recorded ubatch); only with a routing profile.")
@click.option("--rpc", default=None, metavar="HOST:PORT,...",
              help="The rpc-servers as given to llama-server's --rpc, one device each: names "
                   "RPCn's buffer type (RPC0[HOST:PORT]) in the flags.")
@click.option("--emit-ot", "emit_ot", is_flag=True,
              help="Print only the llama-server flag: one --override-tensor line to paste.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def moe_plan(model: Path | None, spec: str | None, profile_name: str | None, config: Path | None,
             strategy: str | None, routing: Path | None, ubatch: int | None, rpc: str | None,
             emit_ot: bool, as_json: bool) -> None:
    """Plan where MODEL's expert tensors go over a few devices: a table of
    layer, tensor, bytes and device, and the totals per device.

    llama.cpp fuses a layer's experts into one tensor per projection and
    --override-tensor moves whole tensors, so a plan moves one layer's
    projection at a time, never single experts. `balanced` spreads the bytes
    in proportion to memory x speed; `profile-guided` gives the fastest
    devices the layers that, by the routing profile, read the most expert
    bytes per ubatch, and lists each layer's hot experts. Refused (exit 2):
    a dense model, experts that do not fit (by how much), a bad device spec,
    an unknown strategy, a routing profile of another format, version or
    expert count.
    """
    from tightwad_core.moe.plan import (
        ExpertProblem,
        PlanError,
        flag_value,
        load_routing,
        make_plan,
        parse_devices,
        pick_strategy,
        read_model,
        rpc_buffer_names,
    )
    from tightwad_core.plugins import load_registry

    if (spec is None) == (profile_name is None):
        _fail("give --devices SPEC or --profile NAME (one of them)")
    registry = load_registry()
    try:
        if profile_name is not None:
            plan, buffers = _profile_plan(registry, model, profile_name, config, strategy, routing)
        else:
            if model is None:
                _fail("give the MODEL.gguf to plan")
            assert model is not None and spec is not None
            devices = parse_devices(spec)
            moe_model = read_model(model)
            prof = load_routing(routing, moe_model) if routing is not None else None
            chosen = pick_strategy(registry, strategy, prof is not None)
            plan = make_plan(ExpertProblem(moe_model, devices, prof, prof.ubatch if prof else 1),
                             chosen)
            servers = [(e.strip(), 1) for e in rpc.split(",")] if rpc else []
            buffers = rpc_buffer_names(servers, devices) if rpc or emit_ot else {}
        if ubatch is not None and plan.problem.profile is None:
            _fail("--ubatch sets what the routing figures assume: it needs a routing profile "
                  "(--routing PROFILE.json, or the cluster's routing_profile)")
        if ubatch is not None:
            plan.problem.ubatch = ubatch
            plan = make_plan(plan.problem, pick_strategy(registry, plan.strategy, True))
    except PlanError as exc:
        _fail(str(exc))
        return
    flag = flag_value(plan.overrides(buffers))
    if emit_ot:
        click.echo(f"--override-tensor {shlex.quote(flag)}")
        return
    if as_json:
        click.echo(json.dumps({**plan.to_json(), "override_tensor": flag}, indent=2))
        return
    _show(plan, flag)


def _profile_plan(registry: Any, model: Path | None, name: str, config: Path | None,
                  strategy: str | None, routing: Path | None) -> tuple[Any, dict[str, str]]:
    """The plan the pool of profile ``name`` would make (its workers' `memory`)."""
    import msgspec

    from tightwad_core.cli.bench import _load
    from tightwad_core.cluster.pool import RpcPool
    from tightwad_core.config.profiles import ConfigError
    from tightwad_core.moe.plan import PlanError
    from tightwad_core.runtime.catalog import resolve_model

    try:
        _, prof, config_dir = _load(config, name)
        cluster = prof.cluster
        if cluster is None:
            raise PlanError(f"profile {name!r} has no [cluster]")
        for w in cluster.workers:
            if not w.memory:
                raise PlanError(f"cluster worker {w.name!r} sets no `memory`: set it or plan "
                                "with --devices")
        if model is None:
            if prof.target is None or prof.target.model_path is None:
                raise PlanError(f"profile {name!r}'s target launches no model: give MODEL.gguf")
            model = resolve_model(prof.target.model_path, config_dir)
        cluster = msgspec.structs.replace(
            cluster, experts=strategy or cluster.experts or "auto",
            routing_profile=str(routing.resolve()) if routing else cluster.routing_profile)
        pool = RpcPool.from_registry(cluster, registry, config_dir, config_dir)
        _, plan, _ = pool.layout(model)
    except (ConfigError, ValueError) as exc:
        raise PlanError(str(exc)) from None
    assert plan is not None
    return plan, pool.buffer_names()


def _show(plan: Any, flag: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from tightwad_core.cluster.sizes import human

    console = Console()
    m, prof = plan.problem.model, plan.problem.profile
    routing = f", routing profile ({plan.problem.ubatch} tokens per ubatch)" if prof else ""
    console.print(f"{escape(m.file)}: {m.expert_count} experts, {m.expert_used_count} per token, "
                  f"{len(m.layers)} MoE layers, experts hold {human(m.bytes)}; strategy "
                  f"{escape(plan.strategy)}{routing}", highlight=False)
    table = Table()
    for col in ("layer", "tensor", "bytes", "device"):
        table.add_column(col)
    for row in plan.rows():
        table.add_row(str(row["layer"]), Text(" + ".join(row["tensors"])), human(row["bytes"]),
                      Text(row["device"]))
    console.print(table)
    totals = Table(title="per device")
    cols = ["device", "memory", "speed", "experts", "used", "layers"]
    cols += ["read / ubatch", "read time"] if prof else []
    total_time = plan.cost() or 1.0
    for col in cols:
        totals.add_column(col)
    for d in plan.devices():
        cells: list[Any] = [Text(d["device"]), human(d["memory"]), f"{d['speed']:g}", human(d["bytes"]),
                 f"{d['bytes'] / max(d['memory'], 1):.0%}", _ranges(d["layers"])]
        cells += [human(d["read_per_ubatch"]), f"{d['read_time'] / total_time:.0%}"] if prof else []
        totals.add_row(*cells)
    console.print(totals)
    for layer in plan.hot():
        console.print(f"layer {layer['layer']}: hot experts {','.join(map(str, layer['hot']))} "
                      f"({layer['share']:.0%} of the routings)", highlight=False)
    console.print("granularity: one layer's projection (llama.cpp places whole fused tensors, "
                  "never single experts)", highlight=False)
    if "=RPC" in flag and "[" not in flag:
        console.print("llama-server flags: give --rpc HOST:PORT,... to name the RPC buffer types "
                      "(or use --emit-ot with it)", highlight=False)
    else:
        console.file.flush()
        click.echo(f"llama-server: --override-tensor {shlex.quote(flag)}")  # unwrapped, to paste


def _ranges(items: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out: list[str] = []
    for i in items:
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out) or "-"

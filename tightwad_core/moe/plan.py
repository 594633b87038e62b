"""Expert placement plans: which device holds each expert tensor of a MoE GGUF.

The planning model: a layer's experts are fused, one tensor per projection
(``blk.N.ffn_{gate,up,down}_exps.weight``, sometimes with a ``.bias``), and
llama.cpp's ``--override-tensor PATTERN=BUFTYPE`` places a whole tensor, so
the smallest unit a plan can move is one layer's projection (its weight and
bias together). Devices offer memory and a relative speed. A strategy plugin
(``place_experts``) maps each tensor to a device; this module reads the
inputs, checks what a strategy returns, measures the result and turns it into
llama.cpp flags.

The routing profile (JSON, format ``tightwad-moe-routing`` version 1) gives per
layer how often each expert was among a token's top K. With tokens routed
independently, expert ``e`` (chosen by a fraction ``p_e`` of tokens) is read
by a ubatch of ``B`` tokens with probability ``1 - (1 - p_e)^B``: that is the
expected number of distinct experts, hence expert bytes, a layer reads per
ubatch (`expected_distinct`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tightwad_core.cluster.sizes import human, parse_size

if TYPE_CHECKING:
    from tightwad_core.plugins import Registry
    from tightwad_core.roles import ExpertPlacement

EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.(weight|bias)$")
_INDEXED = re.compile(r"^blk\.\d+\.ffn_(gate|up|down|gate_up)\.\d+\.weight$")  # one tensor per expert
_DEVICE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\[[^\]\s=,@]+\])?$")
_RPC = re.compile(r"^RPC(\d+)$")


class PlanError(Exception):
    """Inputs a plan cannot be made from; the message is one line for the user."""


@dataclass(frozen=True)
class Device:
    name: str      # as --override-tensor names it: CPU, CUDA0, RPC0 (or RPC0[host:port])
    memory: int    # bytes the experts may use there
    speed: float = 1.0  # relative: 1.0 reads expert weights twice as fast as 0.5


@dataclass(frozen=True)
class Projection:
    """One layer's tensors of one projection: the unit a plan places."""

    layer: int
    projection: str         # gate, up, down or gate_up
    tensors: tuple[str, ...]  # the weight (and bias)
    bytes: int


@dataclass
class ExpertLayer:
    index: int
    projections: list[Projection] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.projections)


@dataclass
class MoeModel:
    file: str
    architecture: str
    expert_count: int
    expert_used_count: int
    layers: list[ExpertLayer]

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    def projections(self) -> list[Projection]:
        return [p for layer in self.layers for p in layer.projections]


@dataclass
class RoutingProfile:
    model: str
    expert_count: int
    expert_used_count: int
    tokens: int
    batches: int
    counts: dict[int, list[int]]  # MoE layer -> times each expert was chosen

    @property
    def ubatch(self) -> int:
        """Tokens per recorded ubatch, on average (the workload it saw)."""
        return max(1, round(self.tokens / max(self.batches, 1)))


@dataclass
class ExpertProblem:
    """What a strategy plugin gets."""

    model: MoeModel
    devices: list[Device]
    profile: RoutingProfile | None = None
    ubatch: int = 1  # B: tokens per ubatch the profile-based figures assume


# --------------------------------------------------------------------------- inputs


def read_model(path: Path) -> MoeModel:
    """The fused expert tensors of a GGUF by layer (header only); `PlanError`
    for a dense model or one whose experts llama.cpp cannot place."""
    from tightwad_core.runtime.ggufio import GgufError, read_header

    try:
        header = read_header(path)
    except GgufError as exc:
        raise PlanError(str(exc)) from None
    groups: dict[tuple[int, str], list[tuple[str, int]]] = {}
    for t in header.tensors:
        if m := EXPS.match(t.name):
            groups.setdefault((int(m.group(1)), m.group(2)), []).append((t.name, t.nbytes))
    if not groups:
        if any(_INDEXED.match(t.name) for t in header.tensors):
            raise PlanError(f"{path} stores its experts indexed (one tensor per expert), "
                            "which stock llama.cpp does not load: there is nothing to place")
        raise PlanError(f"{path} is a dense model (no expert tensors): there is nothing to place")
    layers: dict[int, ExpertLayer] = {}
    order = {"gate": 0, "up": 1, "gate_up": 1, "down": 2}
    for (index, proj), items in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        items.sort(key=lambda x: not x[0].endswith(".weight"))  # the weight first
        layers.setdefault(index, ExpertLayer(index)).projections.append(
            Projection(index, proj, tuple(n for n, _ in items), sum(b for _, b in items)))
    arch = str(header.meta("general.architecture") or "unknown")
    n_expert, n_used = header.meta(f"{arch}.expert_count"), header.meta(f"{arch}.expert_used_count")
    if not isinstance(n_expert, int) or n_expert <= 0:
        raise PlanError(f"{path} has expert tensors but no {arch}.expert_count")
    return MoeModel(str(path), arch, n_expert, int(n_used) if isinstance(n_used, int) and n_used > 0
                    else 1, [layers[i] for i in sorted(layers)])


def parse_devices(spec: str) -> list[Device]:
    """``"RPC0=8G@1.0,CPU=32G@0.3"``: NAME=MEMORY[@SPEED], comma-separated."""
    out: list[Device] = []
    for item in (s.strip() for s in spec.split(",")):
        name, eq, rest = item.partition("=")
        name = name.strip()
        if not eq or not _DEVICE.match(name):
            raise PlanError(f"bad device {item!r} in --devices: expected NAME=MEMORY[@SPEED], "
                            "e.g. 'RPC0=8GiB@1.0,CPU=32GiB@0.3'")
        size, _, speed_text = rest.partition("@")
        try:
            memory = parse_size(size)
        except ValueError as exc:
            raise PlanError(f"device {name}: {exc}") from None
        try:
            speed = float(speed_text) if speed_text else 1.0
        except ValueError:
            speed = -1.0
        if not (math.isfinite(speed) and speed > 0):
            raise PlanError(f"device {name}: bad speed {speed_text!r}: a number above zero, e.g. 0.5")
        if any(d.name == name for d in out):
            raise PlanError(f"device {name} is named twice in --devices")
        out.append(Device(name, memory, speed))
    return out


def load_routing(path: Path, model: MoeModel) -> RoutingProfile:
    """A routing profile (read by `tightwad_core.moe.profile`) checked against
    ``model``: its expert counts and MoE layers (one-line `PlanError` otherwise)."""
    from tightwad_core.moe.profile import ProfileError, load_profile

    try:
        raw = load_profile(path)
    except ProfileError as exc:
        raise PlanError(str(exc)) from None
    where = f"routing profile {path}"
    n_exp, k = raw.expert_count, raw.expert_used_count
    if n_exp != model.expert_count or k != model.expert_used_count:
        raise PlanError(f"{where} is for {n_exp} experts, {k} per token; {Path(model.file).name} "
                        f"has {model.expert_count}, {model.expert_used_count} per token")
    layers = {x.layer: list(x.counts) for x in raw.layers}
    want = [layer.index for layer in model.layers]
    if sorted(layers) != want:
        raise PlanError(f"{where} covers layers {sorted(layers)}, the model's MoE layers are {want}")
    return RoutingProfile(raw.model, n_exp, k, raw.tokens, raw.batches, layers)


# --------------------------------------------------------------------------- the model


def expected_distinct(counts: Sequence[int], tokens: int, ubatch: int) -> float:
    """Expected distinct experts a ubatch of ``ubatch`` tokens reads."""
    return sum(1.0 - (1.0 - min(1.0, c / tokens)) ** ubatch for c in counts)


def layer_reads(problem: ExpertProblem) -> dict[int, float]:
    """Expected expert bytes each layer reads per ubatch (every expert once
    when there is no profile: a full ubatch touches them all)."""
    m, prof = problem.model, problem.profile
    out = {}
    for layer in m.layers:
        share = 1.0 if prof is None else (
            expected_distinct(prof.counts[layer.index], prof.tokens, problem.ubatch) / m.expert_count)
        out[layer.index] = layer.bytes * share
    return out


def shares(need: int, devices: Sequence[Device]) -> list[float]:
    """Bytes per device in proportion to memory x speed, none beyond its
    memory (what one device cannot hold goes to the others, same proportion)."""
    target = [0.0] * len(devices)
    free = [i for i, d in enumerate(devices)]
    left = float(need)
    while free and left > 0:
        weight = sum(devices[i].memory * devices[i].speed for i in free)
        over = [i for i in free if left * devices[i].memory * devices[i].speed / weight > devices[i].memory]
        if not over:
            for i in free:
                target[i] = left * devices[i].memory * devices[i].speed / weight
            break
        for i in over:
            target[i] = devices[i].memory
            left -= devices[i].memory
            free.remove(i)
    return target


def pack(problem: ExpertProblem, layers: Sequence[ExpertLayer], order: Sequence[int]) -> dict[str, str]:
    """Walk ``layers`` in the given order over the devices in ``order``
    (indices), each device taking its `shares` of the bytes; a layer goes
    whole where most of it falls, whole to another device when that one is
    full, and split by projection only when no device can hold it whole."""
    devs = problem.devices
    need, room = problem.model.bytes, sum(d.memory for d in devs)
    if need > room:
        raise PlanError(f"the experts need {human(need)} but the devices offer {human(room)} "
                        f"({human(need - room)} short)")
    target = shares(need, devs)
    bounds, acc = [], 0.0
    for i in order:
        acc += target[i]
        bounds.append(acc)
    used = {i: 0 for i in order}
    plan: dict[str, str] = {}
    done, pos = 0, 0

    def put(unit: Sequence[Projection], at: int) -> None:
        for p in unit:
            for t in p.tensors:
                plan[t] = devs[at].name
            used[at] += p.bytes

    for layer in layers:
        while pos < len(order) - 1 and done + layer.bytes / 2 > bounds[pos]:
            pos += 1
        prefer = list(order[pos:]) + list(reversed(order[:pos]))
        whole = next((i for i in prefer if used[i] + layer.bytes <= devs[i].memory), None)
        if whole is not None:
            put(layer.projections, whole)
        else:
            for p in layer.projections:
                at = next((i for i in prefer if used[i] + p.bytes <= devs[i].memory), None)
                if at is None:
                    most = max(devs[i].memory - used[i] for i in order)
                    raise PlanError(f"{p.tensors[0]} ({human(p.bytes)}) fits on no device: the most "
                                    f"left on one is {human(most)} ({human(p.bytes - most)} short)")
                put([p], at)
        done += layer.bytes
    return plan


# --------------------------------------------------------------------------- strategies


def expert_strategies(registry: Registry) -> dict[str, ExpertPlacement]:
    """The registered placement strategies that place experts."""
    out = {}
    for name, factory in registry.entries.get("placement_strategies", {}).items():
        strategy = factory()
        if callable(getattr(strategy, "place_experts", None)):
            out[name] = strategy
    return out


def pick_strategy(registry: Registry, name: str | None, has_profile: bool) -> ExpertPlacement:
    """``name``, or for ``None``/``"auto"`` the lowest-ranked strategy whose
    needs the inputs meet (one that needs a routing profile only with one)."""
    known = expert_strategies(registry)
    if name in (None, "auto"):
        fits = [s for s in known.values() if has_profile or not s.needs_profile]
        if not fits:
            raise PlanError("no expert placement strategy is registered")
        return min(fits, key=lambda s: s.rank)
    if name not in known:
        raise PlanError(f"no expert placement strategy named {name!r} "
                        f"(known: {', '.join(sorted(known)) or 'none'}, auto)")
    strategy = known[name]
    if strategy.needs_profile and not has_profile:
        raise PlanError(f"strategy {name!r} needs a routing profile (--routing PROFILE.json)")
    return strategy


def make_plan(problem: ExpertProblem, strategy: ExpertPlacement) -> Plan:
    """Run ``strategy`` and check what it returns: every expert tensor on one
    of the devices, none beyond the memory it offers."""
    if not problem.devices:
        raise PlanError("no devices to place the experts on")
    assigned = strategy.place_experts(problem)
    names = {d.name: d for d in problem.devices}
    used = {d.name: 0 for d in problem.devices}
    plan: dict[str, str] = {}
    for p in problem.model.projections():
        devs = {assigned.get(t) for t in p.tensors}
        dev = devs.pop() if len(devs) == 1 else None
        if dev not in names:
            raise PlanError(f"strategy {strategy.name!r} put {p.tensors[0]} on "
                            f"{assigned.get(p.tensors[0])!r}, not one of the devices")
        assert dev is not None
        used[dev] += p.bytes
        plan.update((t, dev) for t in p.tensors)
    for name, size in used.items():
        if size > names[name].memory:
            raise PlanError(f"strategy {strategy.name!r} put {human(size)} on {name}, which offers "
                            f"{human(names[name].memory)}")
    return Plan(strategy.name, problem, plan)


# --------------------------------------------------------------------------- the result


@dataclass
class Plan:
    strategy: str
    problem: ExpertProblem
    assignment: dict[str, str]  # tensor -> device name

    def rows(self) -> list[dict[str, Any]]:
        return [{"layer": p.layer, "projection": p.projection, "tensors": list(p.tensors),
                 "bytes": p.bytes, "device": self.assignment[p.tensors[0]]}
                for layer in self.problem.model.layers for p in layer.projections]

    def devices(self) -> list[dict[str, Any]]:
        """Per device: bytes held, and the expected expert bytes it reads per
        ubatch and the time that takes (bytes / speed, relative units)."""
        reads = layer_reads(self.problem)
        sizes = {layer.index: layer.bytes for layer in self.problem.model.layers}
        out = []
        for d in self.problem.devices:
            rows = [r for r in self.rows() if r["device"] == d.name]
            held = sum(r["bytes"] for r in rows)
            read = sum(reads[r["layer"]] * r["bytes"] / sizes[r["layer"]] for r in rows)
            out.append({"device": d.name, "memory": d.memory, "speed": d.speed, "bytes": held,
                        "layers": sorted({r["layer"] for r in rows}),
                        "read_per_ubatch": round(read), "read_time": read / d.speed})
        return out

    def cost(self) -> float:
        """Expected time spent reading expert weights per ubatch (relative):
        what profile-guided lowers. llama.cpp runs layers one after another,
        so the devices' times add up."""
        return sum(d["read_time"] for d in self.devices())

    def hot(self, cover: float = 0.8) -> list[dict[str, Any]]:
        """Per layer, the experts by how often they are chosen, and the fewest
        that take ``cover`` of the routings (for a runtime with per-expert tensors)."""
        prof = self.problem.profile
        if prof is None:
            return []
        out = []
        for index, counts in sorted(prof.counts.items()):
            ranked = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
            total, acc, hot = sum(counts) or 1, 0, []
            for e in ranked:
                if acc >= cover * total:
                    break
                hot.append(e)
                acc += counts[e]
            out.append({"layer": index, "hot": hot, "share": acc / total,
                        "experts": [{"expert": e, "tokens": counts[e] / prof.tokens} for e in ranked]})
        return out

    def overrides(self, names: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
        """(pattern, buffer type) pairs for ``--override-tensor``: one pattern
        per device for the layers it holds whole, one per split layer;
        ``names`` maps device names to the buffer types llama.cpp knows."""
        out = []
        for d in self.problem.devices:
            whole: dict[tuple[str, ...], list[int]] = {}
            parts: list[tuple[int, list[str]]] = []
            for layer in self.problem.model.layers:
                here = [p.projection for p in layer.projections if self.assignment[p.tensors[0]] == d.name]
                if len(here) == len(layer.projections):
                    whole.setdefault(tuple(here), []).append(layer.index)
                elif here:
                    parts.append((layer.index, here))
            buft = (names or {}).get(d.name, d.name)
            for projs, idx in whole.items():
                out.append((rf"^blk\.{_alt(map(str, idx))}\.ffn_{_alt(projs)}_exps\.", buft))
            for index, projs_list in parts:
                out.append((rf"^blk\.{index}\.ffn_{_alt(projs_list)}_exps\.", buft))
        return out

    def to_json(self) -> dict[str, Any]:
        m = self.problem.model
        return {"file": m.file, "strategy": self.strategy, "granularity": "layer projection",
                "expert_count": m.expert_count, "expert_used_count": m.expert_used_count,
                "expert_bytes": m.bytes, "ubatch": self.problem.ubatch,
                "profile": self.problem.profile is not None, "cost": self.cost(),
                "devices": self.devices(), "tensors": self.rows(), "hot": self.hot(),
                "overrides": [f"{p}={b}" for p, b in self.overrides()]}


def _alt(items: Any) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else "(" + "|".join(items) + ")"


def rpc_buffer_names(servers: Sequence[tuple[str, int]],
                     devices: Sequence[Device] = ()) -> dict[str, str]:
    """``RPCn`` -> the buffer type llama-server names it by, ``RPCj[endpoint]``,
    for ``servers`` as (endpoint, device count) pairs in --rpc order: llama.cpp
    numbers RPCn over every server's devices in turn, j is the device's index
    on its server. `PlanError` when one of ``devices`` is an RPCn beyond them."""
    out, n = {}, 0
    for endpoint, count in servers:
        for j in range(max(count, 1)):
            out[f"RPC{n}"] = f"RPC{j}[{endpoint}]"
            n += 1
    for d in devices:
        if _RPC.match(d.name) and d.name not in out:
            raise PlanError(f"device {d.name} needs its server: give --rpc HOST:PORT,... "
                            f"(llama-server names RPC buffers RPC0[HOST:PORT])")
    return out


def flag_value(pairs: Sequence[tuple[str, str]]) -> str:
    """One ``--override-tensor`` value: comma-separated PATTERN=BUFTYPE pairs
    (llama.cpp calls a repeated flag deprecated)."""
    return ",".join(f"{p}={b}" for p, b in pairs)

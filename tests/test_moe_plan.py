"""Expert placement plans: the two strategies (shares, memory limits, the
profile's ranking, refusals), `tightwad moe plan`, the cluster's overrides,
and one real run: llama-server on two rpc-servers with the emitted flags puts
every expert tensor where the plan says and answers as it does on its own."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from click.testing import CliRunner
from conftest import ServerProc

from tightwad_core.cli import main
from tightwad_core.cluster.pool import OUTPUT_LAYER, PoolPlan, RpcPool
from tightwad_core.config.profiles import ConfigError
from tightwad_core.config.schema import ClusterConfig
from tightwad_core.moe.plan import (
    ExpertLayer,
    ExpertProblem,
    MoeModel,
    PlanError,
    Projection,
    expected_distinct,
    load_routing,
    make_plan,
    parse_devices,
    pick_strategy,
    read_model,
    rpc_buffer_names,
)
from tightwad_core.plugins import load_registry
from tightwad_core.runtime.procs import find_engine, free_port
from tightwad_core.testing.tinymodels import write_tiny_model
from tightwad_core.testing.tinymoe import write_tiny_moe

REG = load_registry()


def _model(n_layer: int = 8, size: int = 100, n_expert: int = 4, used: int = 2) -> MoeModel:
    layers = [ExpertLayer(i, [Projection(i, p, (f"blk.{i}.ffn_{p}_exps.weight",), size)
                              for p in ("gate", "up", "down")]) for i in range(n_layer)]
    return MoeModel("m.gguf", "llama", n_expert, used, layers)


def _plan(model: MoeModel, spec: str, strategy: str = "balanced", profile: Any = None) -> Any:
    problem = ExpertProblem(model, parse_devices(spec), profile, profile.ubatch if profile else 1)
    return make_plan(problem, pick_strategy(REG, strategy, profile is not None))


def _by_layer(plan: Any) -> dict[int, str]:
    out: dict[int, set[str]] = {}
    for row in plan.rows():
        out.setdefault(row["layer"], set()).add(row["device"])
    return {i: next(iter(d)) if len(d) == 1 else "split" for i, d in out.items()}


def _routing(model: MoeModel, counts: list[list[int]], tokens: int, batches: int,
             **over: Any) -> dict[str, Any]:
    return {"format": "tightwad-moe-routing", "version": 1, "model": "m.gguf",
            "architecture": "llama", "expert_count": model.expert_count,
            "expert_used_count": model.expert_used_count, "tokens": tokens, "batches": batches,
            "layers": [{"layer": i, "counts": c} for i, c in enumerate(counts)], **over}


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


# --------------------------------------------------------------------------- the strategies


def test_device_specs() -> None:
    devs = parse_devices("RPC0=8GiB@1.0, CPU=32G@0.3,RPC1[10.0.0.5:50052]=512MiB")
    assert [(d.name, d.memory, d.speed) for d in devs] == [
        ("RPC0", 8 << 30, 1.0), ("CPU", 32 << 30, 0.3), ("RPC1[10.0.0.5:50052]", 512 << 20, 1.0)]
    for bad, match in [("RPC0", "expected NAME=MEMORY"), ("RPC0=lots", "bad memory size"),
                       ("RPC0=1G@fast", "bad speed"), ("RPC0=1G@0", "bad speed"),
                       ("RPC0=1G,RPC0=2G", "named twice"), ("a b=1G", "expected NAME")]:
        with pytest.raises(PlanError, match=match):
            parse_devices(bad)


def test_balanced_shares_follow_memory_times_speed() -> None:
    model = _model()  # 8 layers of 300 B
    got = _by_layer(_plan(model, "A=2000,B=1000"))
    assert list(got.values()) == ["A"] * 5 + ["B"] * 3  # 1600:800 B, whole layers in order
    # speed counts as much as memory: the same shares from equal memory, A twice as fast
    assert _by_layer(_plan(model, "A=2000@2,B=2000@1")) == got
    assert list(_by_layer(_plan(model, "A=2000@1,B=2000@3")).values()) == ["A"] * 2 + ["B"] * 6


def test_balanced_never_exceeds_memory_and_splits_only_when_it_must() -> None:
    model = _model()
    plan = _plan(model, "A=700@10,B=5000@1")  # A's share by speed would be 1400 B
    held = {d["device"]: d["bytes"] for d in plan.devices()}
    assert held["A"] <= 700 and held["A"] + held["B"] == 2400
    # 2 layers into 500 + 100 B: only a split fits; layer 0 stays whole
    plan = _plan(_model(n_layer=2), "A=500,B=100")
    rows = {(r["layer"], r["projection"]): r["device"] for r in plan.rows()}
    assert [rows[(0, p)] for p in ("gate", "up", "down")] == ["A", "A", "A"]
    assert [rows[(1, p)] for p in ("gate", "up", "down")] == ["A", "A", "B"]
    assert any(p.endswith(r"ffn_down_exps\.") and b == "B" for p, b in plan.overrides())


def test_refusals() -> None:
    model = _model()
    with pytest.raises(PlanError, match=r"need 2.3 KiB but the devices offer 2.0 KiB \(352 B short\)"):
        _plan(model, "A=1024,B=1024")
    with pytest.raises(PlanError, match="fits on no device: the most left on one is 50 B"):
        _plan(_model(n_layer=2), "A=450,B=150")  # 600 B in all, but 5 projections' worth
    with pytest.raises(PlanError, match=r"no expert placement strategy named 'fast' \(known: "
                                        r"balanced, profile-guided, auto\)"):
        _plan(model, "A=10K", "fast")
    with pytest.raises(PlanError, match="'profile-guided' needs a routing profile"):
        _plan(model, "A=10K", "profile-guided")
    with pytest.raises(PlanError, match="no expert placement strategy named 'memory-proportional'"):
        _plan(model, "A=10K", "memory-proportional")  # a layer strategy


def test_profile_guided_gives_the_fast_device_the_layers_that_read_most(tmp_path: Path) -> None:
    model = _model(n_layer=4, n_expert=4, used=1)
    # tokens 100 in 10 ubatches: B = 10. Layer 0 always picks expert 0; 1 and 3
    # spread over all four; layer 2 over two.
    counts = [[100, 0, 0, 0], [25, 25, 25, 25], [50, 50, 0, 0], [25, 25, 25, 25]]
    prof = load_routing(_write(tmp_path / "r.json", _routing(model, counts, 100, 10)), model)
    assert prof.ubatch == 10
    assert expected_distinct(counts[0], 100, 10) == 1.0
    assert expected_distinct(counts[1], 100, 10) == pytest.approx(4 * (1 - 0.75 ** 10))
    assert expected_distinct(counts[2], 100, 10) == pytest.approx(2 * (1 - 0.5 ** 10))
    spec = "fast=600@1,slow=900@0.25"  # fast holds 2 of the 4 layers either way
    guided = _plan(model, spec, "profile-guided", prof)
    balanced = _plan(model, spec, "balanced", prof)
    assert _by_layer(guided) == {0: "slow", 1: "fast", 2: "slow", 3: "fast"}
    assert _by_layer(balanced) == {0: "fast", 1: "fast", 2: "slow", 3: "slow"}
    assert guided.cost() < balanced.cost()
    # one token per ubatch: every layer reads K experts, nothing to rank by
    one = ExpertProblem(model, parse_devices(spec), prof, ubatch=1)
    assert _by_layer(make_plan(one, pick_strategy(REG, "profile-guided", True))) == _by_layer(balanced)
    assert pick_strategy(REG, "auto", True).name == "profile-guided"
    assert pick_strategy(REG, None, False).name == "balanced"
    hot = {h["layer"]: h["hot"] for h in guided.hot()}
    assert hot[0] == [0] and hot[2] == [0, 1] and len(hot[1]) == 4
    # one pattern per device for its whole layers, matching exactly its tensors
    for pattern, dev in guided.overrides():
        hits = {r["layer"] for r in guided.rows() if re.search(pattern, r["tensors"][0])}
        assert hits == {i for i, d in _by_layer(guided).items() if d == dev}


def test_bad_routing_profiles_are_refused(tmp_path: Path) -> None:
    model = _model(n_layer=2, n_expert=4, used=2)
    good = [[50, 50, 50, 50], [100, 100, 0, 0]]

    def bad(obj: Any, match: str) -> None:
        with pytest.raises(PlanError, match=match):
            load_routing(_write(tmp_path / "bad.json", obj), model)

    bad({"format": "other"}, 'is not a routing profile \\("format": "tightwad-moe-routing"\\)')
    bad(_routing(model, good, 100, 5, version=2), "is routing profile version 2")
    eight = _model(n_layer=2, n_expert=8, used=2)
    bad(_routing(eight, [[25] * 8] * 2, 100, 5), "is for 8 experts, 2 per token; m.gguf has 4")
    bad(_routing(model, [[50, 50, 50, 49], good[1]], 100, 5), "layer 0's counts add up to 199, not 100 tokens x 2")
    bad(_routing(model, good[:1], 100, 5), r"covers layers \[0\], the model's MoE layers are \[0, 1\]")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(PlanError, match="is not JSON"):
        load_routing(tmp_path / "junk.json", model)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def moe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_moe(tmp_path_factory.mktemp("plan") / "moe.gguf", seed=5, n_layer=4,
                          dtype="q8_0")


def _cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, ["moe", "plan", *args], env=env)


def test_read_model_reads_the_header_once(moe_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import tightwad_core.moe.inspect  # noqa: F401 - its read_header is counted too
    import tightwad_core.runtime.ggufio as ggufio

    reads: list[Path] = []
    real = ggufio.read_header

    def counted(path: Path) -> Any:
        reads.append(path)
        return real(path)

    for module in list(sys.modules.values()):  # every module that holds the reader
        if getattr(module, "read_header", None) is real:
            monkeypatch.setattr(module, "read_header", counted)
    model = read_model(moe_file)
    assert reads == [moe_file]
    assert (model.architecture, model.expert_count, len(model.layers)) == ("llama", 4, 4)
    assert [p.projection for p in model.layers[0].projections] == ["gate", "up", "down"]


def test_rpc_buffer_names_count_every_servers_devices() -> None:
    names = rpc_buffer_names([("a:1", 2), ("b:2", 1), ("c:3", 0)])
    assert names == {"RPC0": "RPC0[a:1]", "RPC1": "RPC1[a:1]", "RPC2": "RPC0[b:2]",
                     "RPC3": "RPC0[c:3]"}
    with pytest.raises(PlanError, match="device RPC1 needs its server"):
        rpc_buffer_names([("a:1", 1)], parse_devices("RPC0=1G,RPC1=1G,CPU=1G"))


def test_cli_table_json_and_emit_ot(moe_file: Path, tmp_path: Path) -> None:
    layer = sum(p.bytes for p in read_model(moe_file).layers[0].projections)  # 51 KiB
    spec = f"RPC0={2 * layer},RPC1={3 * layer}@0.5"
    res = _cli(str(moe_file), "--devices", spec)
    assert res.exit_code == 0, res.output
    assert "blk.3.ffn_down_exps.weight" in res.output and "granularity: one layer's projection" in res.output
    res = _cli(str(moe_file), "--devices", spec, "--json")
    info = json.loads(res.output)
    assert {r["layer"]: r["device"] for r in info["tensors"]} == {0: "RPC0", 1: "RPC0", 2: "RPC1",
                                                                  3: "RPC1"}
    assert [d["bytes"] for d in info["devices"]] == [2 * layer, 2 * layer]
    res = _cli(str(moe_file), "--devices", spec, "--emit-ot", "--rpc", "10.0.0.5:50052,10.0.0.6:50052")
    assert res.exit_code == 0, res.output
    argv = shlex.split(res.output)
    assert len(res.output.strip().splitlines()) == 1 and argv[0] == "--override-tensor"
    assert argv[1] == (r"^blk\.(0|1)\.ffn_(gate|up|down)_exps\.=RPC0[10.0.0.5:50052],"
                       r"^blk\.(2|3)\.ffn_(gate|up|down)_exps\.=RPC0[10.0.0.6:50052]")
    for args, match in [(["--devices", spec, "--emit-ot"], "needs its server: give --rpc"),
                        (["--devices", "RPC0=10KiB"], "(194.0 KiB short)"),
                        (["--devices", "RPC0:8G"], "bad device"),
                        (["--devices", spec, "--strategy", "nope"], "known: balanced, profile-guided"),
                        (["--devices", spec, "--routing", str(_write(tmp_path / "r.json", {"format": 1}))],
                         "is not a routing profile"),
                        ([], "give --devices SPEC or --profile NAME")]:
        res = _cli(str(moe_file), *args)
        assert res.exit_code == 2 and match in res.output, (args, res.output)
    dense = write_tiny_model(tmp_path / "dense.gguf", seed=1, n_layer=2)
    res = _cli(str(dense), "--devices", spec)
    assert res.exit_code == 2 and "is a dense model" in res.output
    res = _cli(str(moe_file), "--devices", spec, "--ubatch", "8")
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "--ubatch" in res.output, res.output


def test_cli_table_shows_bracketed_names_as_they_are(moe_file: Path, tmp_path: Path) -> None:
    odd = tmp_path / "moe [red]x.gguf"
    odd.symlink_to(moe_file)
    layer = sum(p.bytes for p in read_model(moe_file).layers[0].projections)
    res = _cli(str(odd), "--devices", f"RPC0[gpu-box:50052]={2 * layer},CPU={3 * layer}@0.5",
               env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert f"{odd}: 4 experts" in res.output
    # the tensor table and the per-device table
    assert res.output.count("RPC0[gpu-box:50052]") >= 3, res.output


def test_cli_plans_for_a_cluster_profile(moe_file: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(f"""
[profiles.moe]
target = {{ backend = "llama-server", model_path = "{moe_file}" }}
[profiles.moe.cluster]
experts = "balanced"
expert_cpu = "1MiB@0.1"
workers = [{{ name = "a", port = 5001, memory = "150KiB" }}, {{ name = "b", port = 5002, memory = "150KiB" }}]
""")
    res = _cli("--config", str(cfg), "--profile", "moe", "--emit-ot")
    assert res.exit_code == 0, res.output
    flag = shlex.split(res.output)[1]
    assert "=RPC0[127.0.0.1:5001]" in flag and "=RPC0[127.0.0.1:5002]" in flag
    info = json.loads(_cli("--config", str(cfg), "--profile", "moe", "--json").output)
    assert info["strategy"] == "balanced" and [d["device"] for d in info["devices"]] == ["RPC0", "RPC1", "CPU"]
    # the layers' other tensors come first: what the experts get is less than `memory`
    assert all(d["memory"] < 150 * 1024 for d in info["devices"][:2])


# --------------------------------------------------------------------------- the cluster


def test_pool_args_carry_the_expert_overrides(moe_file: Path, tmp_path: Path) -> None:
    cluster = msgspec.convert({"experts": "balanced", "workers": [
        {"name": "a", "port": 6001, "memory": "200KiB"},
        {"name": "b", "port": 6002, "memory": "200KiB", "speed": 0.5}]}, ClusterConfig)
    pool = RpcPool.from_registry(cluster, REG, tmp_path)
    assigned, plan, n_layer = pool.layout(moe_file)
    assert plan is not None and n_layer == 4 and set(assigned.values()) == {"a/0", "b/0"}
    pp = PoolPlan(["127.0.0.1:7001", "127.0.0.1:7002"], 2, n_layer, [2, 2], True,
                  tuple(plan.overrides()), {"RPC0": "RPC0[127.0.0.1:7001]", "RPC1": "RPC0[127.0.0.1:7002]"})
    args = pp.args()
    value = args[args.index("--override-tensor") + 1]
    assert args.count("--override-tensor") == 1 and value.startswith(f"{OUTPUT_LAYER}=CPU,")
    assert "=RPC0[127.0.0.1:7001]" in value and "RPC1" not in value
    worker = pp.args(devices=False)  # `tightwad worker` names devices, not buffer types
    assert worker[worker.index("--override-tensor") + 1].endswith("=RPC1")
    for raw, match in [({"placement": "balanced"}, "places experts, not layers"),
                       ({"experts": "memory-proportional"}, "no expert placement strategy"),
                       ({"experts": "balanced", "expert_cpu": "x"}, "'cluster.expert_cpu'.*bad memory")]:
        with pytest.raises(ConfigError, match=match):
            RpcPool.from_registry(msgspec.convert({"workers": [{"name": "a"}], **raw}, ClusterConfig),
                                  REG, tmp_path)


# --------------------------------------------------------------------------- for real


def _rpc_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(find_engine("rpc-server")), "-H", "127.0.0.1", "-p", str(port),
                             "-t", "1"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"rpc-server did not listen: {log.read_text()[-1000:]}")


def _tokens(server: ServerProc) -> list[int]:
    r = httpx.post(server.url + "/completion", timeout=60, json={
        "prompt": "once upon a time", "n_predict": 16, "temperature": 0, "return_tokens": True,
        "ignore_eos": True})
    return list(r.json()["tokens"])


def test_llama_server_places_the_experts_as_planned(moe_file: Path, tmp_path: Path) -> None:
    model = read_model(moe_file)
    layer = model.layers[0].bytes
    # layer 2 routes flat, the others keep to two experts: profile-guided puts
    # layer 2 alone on the fast RPC0, where llama.cpp's own split would not
    counts = [[100, 100, 0, 0], [100, 100, 0, 0], [50, 50, 50, 50], [100, 0, 100, 0]]
    routing = _write(tmp_path / "r.json", _routing(model, counts, 100, 25))
    ports = [free_port(), free_port()]
    procs = [_rpc_server(p, tmp_path / f"rpc{i}.log") for i, p in enumerate(ports)]
    servers: list[ServerProc] = []
    try:
        eps = ",".join(f"127.0.0.1:{p}" for p in ports)
        res = _cli(str(moe_file), "--devices", f"RPC0={layer + 1000}@1,RPC1={8 * layer}@0.5",
                   "--routing", str(routing), "--rpc", eps, "--json")
        assert res.exit_code == 0, res.output
        plan = json.loads(res.output)
        want = {t: f"RPC0[127.0.0.1:{ports[int(r['device'][3])]}]"
                for r in plan["tensors"] for t in r["tensors"]}
        assert {r["layer"] for r in plan["tensors"] if r["device"] == "RPC0"} == {2}
        emitted = shlex.split(_cli(str(moe_file), "--devices", f"RPC0={layer + 1000}@1,RPC1={8 * layer}@0.5",
                                   "--routing", str(routing), "--rpc", eps, "--emit-ot").output)
        assert emitted[1] == plan["override_tensor"]
        servers.append(ServerProc(moe_file, tmp_path / "planned.log", "--rpc", eps, "--device",
                                  "RPC0,RPC1", "-ngl", "99", *emitted, "-v", parallel=1, ctx=256))
        servers.append(ServerProc(moe_file, tmp_path / "cpu.log", "-ngl", "0", "--no-repack",
                                  parallel=1, ctx=256))
        log = (tmp_path / "planned.log").read_text(errors="replace")
        landed = dict(re.findall(r"tensor (\S+) \([^)]*\) buffer type overridden to (\S+)", log))
        assert len(want) == 4 * 3 and landed == want
        tokens = _tokens(servers[0])
        assert len(tokens) == 16 and tokens == _tokens(servers[1])
    finally:
        for s in servers:
            s.stop()
        for p in procs:
            p.kill()
            p.wait()

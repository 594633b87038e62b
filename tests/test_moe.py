"""`tightwad moe inspect` on generated MoE GGUFs that llama.cpp loads, on a
dense model, and on files it must refuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
from conftest import ServerProc

from tightwad_core.testing.tinymodels import write_tiny_model
from tightwad_core.testing.tinymoe import write_tiny_moe

EXE = str(Path(sys.executable).parent / "tightwad")


def _inspect(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "moe", "inspect", str(path), *extra], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_inspect_a_fused_moe_that_llama_cpp_runs(tmp_path: Path, dtype: str) -> None:
    path = write_tiny_moe(tmp_path / f"moe-{dtype}.gguf", n_expert=4, n_expert_used=2, dtype=dtype)
    out = _inspect(path, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["moe"] is True and info["architecture"] == "llama" and info["layout"] == "fused"
    assert info["expert_count"] == 4 and info["expert_used_count"] == 2 and info["block_count"] == 2
    layer = info["layers"][0]
    assert layer["router"] == "blk.0.ffn_gate_inp.weight"
    gate = next(t for t in layer["tensors"] if t["projection"] == "gate")
    assert gate["shape"] == [64, 64, 4] and gate["type"] == dtype.upper()  # experts outermost
    assert info["expert_bytes"] == sum(t["bytes"] for x in info["layers"] for t in x["tensors"])
    assert 0 < info["expert_bytes"] < info["total_bytes"]
    table = _inspect(path)
    assert table.returncode == 0 and "4 experts, 2 used per token" in table.stdout
    if dtype == "q8_0":  # the generator writes what llama.cpp takes
        srv = ServerProc(path, tmp_path / "srv.log", parallel=1, ctx=256)
        try:
            r = httpx.post(srv.url + "/completion", json={"prompt": "hello", "n_predict": 4,
                                                          "temperature": 0}, timeout=60)
            assert r.status_code == 200 and r.json()["tokens_predicted"] == 4
        finally:
            srv.stop()


def test_inspect_an_indexed_file(tmp_path: Path) -> None:
    path = tmp_path / "indexed.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_expert_count(2)
    w.add_expert_used_count(1)
    for e in range(2):
        for proj in ("gate", "up", "down"):
            w.add_tensor(f"blk.0.ffn_{proj}.{e}.weight", np.zeros((8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = json.loads(_inspect(path, "--json").stdout)
    assert info["layout"] == "indexed" and info["expert_count"] == 2
    assert sorted({t["expert"] for t in info["layers"][0]["tensors"]}) == [0, 1]


def test_inspect_refusals(tmp_path: Path) -> None:
    dense = write_tiny_model(tmp_path / "dense.gguf")
    out = _inspect(dense, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["moe"] is False
    assert "not a Mixture-of-Experts model" in _inspect(dense).stdout
    whole = write_tiny_moe(tmp_path / "moe.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 3])
    for bad in (cut, tmp_path / "missing.gguf"):
        res = _inspect(bad)
        assert res.returncode == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr

"""`tightwad moe defuse` / `fuse`: every type llama-quantize writes round-trips
byte for byte on two MoE architectures, each expert's bytes are its slice of
the fused tensor, the fused results run in llama.cpp with the original's
tokens, and bad input is refused without leaving a file behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
from conftest import ServerProc

from tightwad_core.moe import defuse
from tightwad_core.moe.defuse import FUSED, INDEXED, rewrite
from tightwad_core.runtime.engine import lib_dir
from tightwad_core.runtime.ggufio import MoeError, read_header
from tightwad_core.testing.tinymodels import write_tiny_model
from tightwad_core.testing.tinymoe import write_tiny_moe, write_uniform_imatrix

EXE = str(Path(sys.executable).parent / "tightwad")
ARCHS = ("llama", "qwen2moe")
#: every file type llama-quantize of the pinned engine offers (its --help list)
QUANT_TYPES = (
    "Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S",
    "IQ2_M", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M",
    "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ3_XS", "IQ4_NL", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S",
    "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32", "COPY",
)
#: these refuse to run without an importance matrix
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "Q2_K_S", "IQ3_XXS",
                 "IQ3_XS"}


def _tightwad(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "moe", *args], capture_output=True, text=True, timeout=120)


def _quantize(base: Path, out: Path, qtype: str, imatrix: Path) -> None:
    exe = lib_dir() / "llama-quantize"
    cmd = [str(exe)] + (["--imatrix", str(imatrix)] if qtype in NEEDS_IMATRIX else [])
    res = subprocess.run(cmd + [str(base), str(out), qtype, "2"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "LD_LIBRARY_PATH": str(lib_dir())})
    assert res.returncode == 0, f"llama-quantize {qtype}: {res.stdout[-800:]}{res.stderr[-800:]}"


def _bytes(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _check_expert_slices(fused: Path, indexed: Path) -> int:
    """Each per-expert tensor of ``indexed`` holds exactly its slice of the fused
    tensor in ``fused``, with the fused shape less its expert dimension."""
    src = {t.name: t for t in read_header(fused).tensors}
    checked = 0
    for t in read_header(indexed).tensors:
        m = INDEXED.match(t.name)
        if not m:
            assert t.name in src and src[t.name].nbytes == t.nbytes
            continue
        layer, proj, e, suffix = m.groups()
        whole = src[f"blk.{layer}.ffn_{proj}_exps.{suffix}"]
        assert t.shape == whole.shape[:-1] and t.ggml_type == whole.ggml_type
        each = whole.nbytes // whole.shape[-1]
        assert t.nbytes == each
        assert _bytes(indexed, t.offset, t.nbytes) == _bytes(fused, whole.offset + int(e) * each, each)
        checked += 1
    return checked


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Each architecture's f32 model through every llama-quantize type."""
    root = tmp_path_factory.mktemp("quant")
    out: dict[tuple[str, str], Path] = {}
    for arch in ARCHS:
        # k-quants need rows of 256; one layer keeps the slow IQ1 types quick
        base = write_tiny_moe(root / f"{arch}-f32.gguf", arch=arch, n_layer=1, n_embd=256,
                              n_ff=256, n_expert=4, n_expert_used=2)
        imatrix = write_uniform_imatrix(base, root / f"{arch}-imatrix.gguf")
        for qtype in QUANT_TYPES:
            path = root / f"{arch}-{qtype}.gguf"
            _quantize(base, path, qtype, imatrix)
            out[(arch, qtype)] = path
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_quant_type_round_trips_byte_for_byte(quantized: dict[tuple[str, str], Path],
                                                     tmp_path: Path, arch: str) -> None:
    types_seen: set[str] = set()
    for qtype in QUANT_TYPES:
        src = quantized[(arch, qtype)]
        split, back = tmp_path / f"{qtype}-indexed.gguf", tmp_path / f"{qtype}-fused.gguf"
        a = rewrite(src, split, "defuse")
        b = rewrite(split, back, "fuse")
        assert a["expert_tensors"] == b["expert_tensors"] == 3, qtype  # one layer, three projections
        assert a["tensors_out"] == a["tensors_in"] + 3 * (4 - 1)
        assert back.read_bytes() == src.read_bytes(), f"{arch} {qtype}: fuse(defuse(x)) != x"
        assert _check_expert_slices(src, split) == 12
        head = read_header(split)
        assert head.kv == read_header(src).kv  # metadata as it was
        types_seen |= {t.type_name for t in read_header(src).tensors if FUSED.match(t.name)}
        split.unlink()
        back.unlink()
    # the mixtures put many ggml types in the expert tensors, the newest too
    assert {"Q1_0", "Q2_0", "MXFP4", "IQ1_S", "IQ2_XXS", "TQ1_0", "Q4_K", "Q6_K", "BF16"} <= types_seen


def test_the_split_is_along_the_expert_dimension(tmp_path: Path) -> None:
    src = write_tiny_moe(tmp_path / "f32.gguf", n_expert=3, dtype="f32")
    split = tmp_path / "split.gguf"
    rewrite(src, split, "defuse")
    fused = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    compared = 0
    for t in gguf.GGUFReader(str(split)).tensors:
        if m := INDEXED.match(t.name):
            layer, proj, e, suffix = m.groups()
            whole = fused[f"blk.{layer}.ffn_{proj}_exps.{suffix}"]
            np.testing.assert_array_equal(np.asarray(t.data), np.asarray(whole.data)[int(e)])
            compared += 1
    assert compared == 2 * 3 * 3  # layers x projections x experts


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_results_give_the_originals_tokens_in_llama_cpp(
        quantized: dict[tuple[str, str], Path], tmp_path: Path, arch: str) -> None:
    for qtype in ("Q4_K_M", "IQ2_XXS"):
        src = quantized[(arch, qtype)]
        split, back = tmp_path / f"{qtype}-split.gguf", tmp_path / f"{qtype}-back.gguf"
        rewrite(src, split, "defuse")
        rewrite(split, back, "fuse")
        tokens = []
        for model in (src, back):
            srv = ServerProc(model, tmp_path / f"{model.stem}.log", parallel=1, ctx=256)
            try:
                r = httpx.post(srv.url + "/completion", timeout=60, json={
                    "prompt": "the quick brown fox", "n_predict": 12, "temperature": 0,
                    "return_tokens": True})
                assert r.status_code == 200
                tokens.append(r.json()["tokens"])
            finally:
                srv.stop()
        assert len(tokens[0]) == 12 and tokens[0] == tokens[1], f"{arch} {qtype}"
    # stock llama.cpp does not take the per-expert form (docs/moe.md says so)
    with pytest.raises(RuntimeError, match="llama-server exited"):
        ServerProc(split, tmp_path / "split.log", parallel=1, ctx=256)
    assert re.search(r"tensor 'blk\.0\.ffn_\w+_exps\.weight' not found",
                     (tmp_path / "split.log").read_text(errors="replace"))


def test_cli_defuse_fuse_and_refusals(tmp_path: Path) -> None:
    src = write_tiny_moe(tmp_path / "moe.gguf", dtype="q8_0")
    split, back = tmp_path / "split.gguf", tmp_path / "back.gguf"
    res = _tightwad("defuse", str(src), str(split), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["expert_tensors"] == 6 and info["input_canonical"] is True
    assert json.loads(_tightwad("inspect", str(split), "--json").stdout)["layout"] == "indexed"
    res = _tightwad("fuse", str(split), str(back))
    assert res.returncode == 0 and "joined 6 expert tensors" in res.stdout
    assert back.read_bytes() == src.read_bytes()

    def refused(*args: str, says: str) -> None:
        r = _tightwad(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error:") and says in r.stderr and "Traceback" not in r.stderr

    # an existing output stays as it was unless --force
    before = back.read_bytes()
    refused("fuse", str(split), str(back), says="pass --force")
    assert back.read_bytes() == before
    assert _tightwad("defuse", str(src), str(back), "--force").returncode == 0
    assert json.loads(_tightwad("inspect", str(back), "--json").stdout)["layout"] == "indexed"
    refused("defuse", str(src), str(src), "--force", says="overwrite the input")
    refused("defuse", str(write_tiny_model(tmp_path / "dense.gguf")), str(tmp_path / "o1.gguf"),
            says="not a Mixture-of-Experts model")
    refused("fuse", str(src), str(tmp_path / "o2.gguf"), says="no indexed expert tensors")
    refused("defuse", str(split), str(tmp_path / "o3.gguf"), says="no fused expert tensors")
    whole = src.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) - 5000])
    refused("defuse", str(tmp_path / "cut.gguf"), str(tmp_path / "o4.gguf"), says="truncated")
    (tmp_path / "junk.gguf").write_bytes(whole[:8] + os.urandom(4000))
    refused("defuse", str(tmp_path / "junk.gguf"), str(tmp_path / "o5.gguf"), says="corrupt")
    (tmp_path / "text.gguf").write_text("not a model at all, just some text\n" * 3)
    refused("defuse", str(tmp_path / "text.gguf"), str(tmp_path / "o6.gguf"), says="not a GGUF file")
    refused("defuse", str(tmp_path / "missing.gguf"), str(tmp_path / "o7.gguf"), says="not a file")
    refused("defuse", str(src), str(tmp_path / "nodir" / "o8.gguf"), says="not a folder")
    # an indexed file that lost an expert cannot be joined
    gapped = tmp_path / "gapped.gguf"
    w = gguf.GGUFWriter(str(gapped), "llama")
    w.add_expert_count(3)
    for e in (0, 2):
        w.add_tensor(f"blk.0.ffn_up.{e}.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused("fuse", str(gapped), str(tmp_path / "o9.gguf"), says="experts 1 are missing")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("o") or "partial" in p.name]


@pytest.mark.parametrize("fault", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_an_interrupted_rewrite_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 fault: BaseException) -> None:
    src = write_tiny_moe(tmp_path / "moe.gguf", n_layer=3, dtype="f32")
    out = tmp_path / "out.gguf"
    monkeypatch.setattr(defuse, "CHUNK", 4096)  # many chunks, so the fault comes mid-file
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 5:
            raise fault

    with pytest.raises(type(fault)):
        rewrite(src, out, "defuse", progress=progress)
    assert len(calls) == 5 and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.gguf"]
    # and an existing output survives a failed replacement untouched
    out.write_bytes(b"previous")
    calls.clear()
    with pytest.raises(type(fault)):
        rewrite(src, out, "defuse", force=True, progress=progress)
    assert out.read_bytes() == b"previous"


def test_the_header_reader_refuses_corruption(tmp_path: Path) -> None:
    src = write_tiny_moe(tmp_path / "moe.gguf").read_bytes()
    # arrays of arrays nested past any real file's depth
    w = gguf.GGUFWriter(str(tmp_path / "deep.gguf"), "llama")
    nested: list[object] = [1]
    for _ in range(20):
        nested = [nested]
    w.add_array("deep", nested)
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(MoeError, match="nested"):
        read_header(tmp_path / "deep.gguf")
    # an I/O error (a dying disk, a permission) is one line too, not a traceback
    import mmap

    def failing_map(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mmap, "mmap", failing_map)
        with pytest.raises(MoeError, match="cannot read .*Input/output error"):
            read_header(tmp_path / "moe.gguf")
    bad = bytearray(src)
    bad[8:16] = (10**15).to_bytes(8, "little")  # absurd tensor count
    (tmp_path / "bad.gguf").write_bytes(bytes(bad))
    with pytest.raises(MoeError, match="corrupt"):
        read_header(tmp_path / "bad.gguf")
    for cut in (30, 200, 5000):
        (tmp_path / "cut.gguf").write_bytes(src[:cut])
        with pytest.raises(MoeError, match="truncated|corrupt"):
            read_header(tmp_path / "cut.gguf")

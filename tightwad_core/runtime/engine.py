"""llama.cpp built once, as shared libraries: ``llama-server``,
``rpc-server`` and ``llama-quantize`` plus the ``libllama``/``libggml*``
libraries they load, side by side in ``<engine>/bin`` (RPATH ``$ORIGIN``).

The Python binding is packaged around these same libraries (see
:mod:`tightwad_core.runtime.binding`), so the servers, the worker and its RPC
client share one ggml by construction, RPC protocol version included.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

from tightwad_core.runtime import catalog
from tightwad_core.runtime.catalog import LLAMA_CPP_PYTHON_VERSION as VERSION
from tightwad_core.runtime.sources import ensure_tree
from tightwad_core.runtime.steps import SetupError, Steps, run_logged

BINARIES = ("llama-server", "rpc-server", "llama-quantize")
#: The libraries the binding loads by name; their sonamed copies come along.
LIBRARIES = ("llama", "ggml", "ggml-base", "ggml-cpu", "ggml-rpc")
BASE_FLAGS = {
    "CMAKE_BUILD_TYPE": "Release", "GGML_RPC": "ON", "BUILD_SHARED_LIBS": "ON",
    "CMAKE_BUILD_WITH_INSTALL_RPATH": "ON", "CMAKE_INSTALL_RPATH": "$ORIGIN",
    "LLAMA_BUILD_TESTS": "OFF", "LLAMA_BUILD_EXAMPLES": "OFF", "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF", "LLAMA_OPENSSL": "OFF", "LLAMA_CURL": "OFF",
}
#: Compiler flags that keep ggml's AMX kernels out of a native build: on the
#: virtual machines we measured, the CPU reports AMX but its tile instructions
#: fault (SIGILL in tinygemm_kernel_amx on the first quantized matmul).
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


#: GPU backends: the CMake switch that builds each, and the library it adds.
GPU_FLAGS = {"cuda": {"GGML_CUDA": "ON"}, "rocm": {"GGML_HIP": "ON"},
             "metal": {"GGML_METAL": "ON"}, "vulkan": {"GGML_VULKAN": "ON"}}
GPU_LIBRARY = {"cuda": "ggml-cuda", "rocm": "ggml-hip", "metal": "ggml-metal",
               "vulkan": "ggml-vulkan"}
GPU_CHOICES = ("auto", "cpu", *GPU_FLAGS)


def _lists_gpu(argv: list[str], marker: str) -> bool:
    try:
        res = subprocess.run(argv, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and marker in res.stdout.decode("utf-8", "replace")


def detect_gpu(choice: str | None = None, *, system: str | None = None,
               machine: str | None = None) -> tuple[str, str]:
    """The backend to build (``cpu``, ``cuda``, ``rocm``, ``metal`` or ``vulkan``)
    and why. ``choice`` (default: ``$TIGHTWAD_GPU``, else ``auto``) forces one;
    ``auto`` looks for a GPU through the vendor's own tools: a GPU listed by
    ``nvidia-smi -L`` (and ``nvcc`` to compile for it), a ``gfx`` agent in
    ``rocminfo`` (and ``hipcc``), or Apple silicon. A compiler alone, without
    a GPU the driver lists, builds for the CPU."""
    choice = (choice or os.environ.get("TIGHTWAD_GPU") or "auto").strip().lower()
    if choice not in GPU_CHOICES:
        raise SetupError(f"TIGHTWAD_GPU={choice!r} is not one of {', '.join(GPU_CHOICES)}")
    if choice != "auto":
        return choice, "chosen with TIGHTWAD_GPU"
    system, machine = system or platform.system(), (machine or platform.machine()).lower()
    if system == "Darwin" and machine in ("arm64", "aarch64"):
        return "metal", "Apple silicon"
    if shutil.which("nvidia-smi") and _lists_gpu(["nvidia-smi", "-L"], "GPU "):
        if shutil.which("nvcc"):
            return "cuda", "nvidia-smi lists a GPU and nvcc is installed"
        return "cpu", ("nvidia-smi lists a GPU but nvcc (the CUDA toolkit) is missing: install it "
                       "and run setup again to build for the GPU")
    if shutil.which("rocminfo") and _lists_gpu(["rocminfo"], "gfx"):
        if shutil.which("hipcc"):
            return "rocm", "rocminfo lists a gfx GPU and hipcc is installed"
        return "cpu", "rocminfo lists a GPU but hipcc (ROCm's HIP compiler) is missing"
    return "cpu", "no GPU found (nvidia-smi, rocminfo)"


def cmake_flags(flags: set[str] | None = None, machine: str | None = None,
                gpu: str = "cpu") -> dict[str, str]:
    """The configure flags for this machine (``flags``: its CPU features,
    ``machine``: its architecture; both default to this machine's; ``gpu``:
    the GPU backend from `detect_gpu`)."""
    out = dict(BASE_FLAGS)
    arch = (machine or platform.machine()).lower()
    if arch in ("x86_64", "amd64") and "amx_tile" in (cpu_flags() if flags is None else flags):
        out["CMAKE_C_FLAGS"] = out["CMAKE_CXX_FLAGS"] = NO_AMX
    out.update(GPU_FLAGS.get(gpu, {}))
    return out


def libraries(gpu: str = "cpu") -> tuple[str, ...]:
    """The libraries an engine built for ``gpu`` has (and the binding loads)."""
    return LIBRARIES + ((GPU_LIBRARY[gpu],) if gpu in GPU_LIBRARY else ())


def lib_dir() -> Path:
    """Where the shared libraries live: beside the binaries."""
    return catalog.engine_dir() / "bin"


def rpc_target(src: Path) -> str:
    """The CMake target of the RPC server: ``ggml-rpc-server`` in newer trees."""
    for cml in sorted(src.glob("**/rpc/CMakeLists.txt")):
        m = re.search(r"set\s*\(\s*TARGET\s+((?:ggml-)?rpc-server)\s*\)", cml.read_text())
        if m:
            return m.group(1)
    return "rpc-server"


def binary_ok(name: str, path: Path) -> bool:
    """Cheap health check: ``llama-server --version`` succeeds, the others print usage."""
    if not (path.is_file() and os.access(path, os.X_OK)):
        return False
    flag = "--version" if name == "llama-server" else "--help"
    try:
        res = subprocess.run([str(path.absolute()), flag], capture_output=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if name == "llama-server":
        return res.returncode == 0
    return res.returncode in (0, 1) and b"usage" in (res.stdout + res.stderr).lower()


def libraries_present(gpu: str = "cpu") -> bool:
    return all((lib_dir() / f"lib{n}.so").is_file() for n in libraries(gpu))


def _stamp() -> Path:
    """Records the configure flags the installed engine was built with."""
    return lib_dir() / "build-flags.json"


def built_with(wanted: dict[str, str]) -> bool:
    try:
        return bool(json.loads(_stamp().read_text()) == wanted)
    except (OSError, ValueError):
        return False


def installed_backend(stamp: Path | None = None) -> str | None:
    """The GPU backend the installed engine was built with (``cpu``, ``cuda``,
    ``rocm``, ``metal``, ``vulkan``), from its recorded configure flags; None
    before `tightwad setup`."""
    try:
        flags = json.loads((stamp or _stamp()).read_text())
    except (OSError, ValueError):
        return None
    for gpu, switches in GPU_FLAGS.items():
        if all(str(flags.get(k, "")).upper() == v for k, v in switches.items()):
            return gpu
    return "cpu"


def _cmake_cache_matches(build: Path, wanted: dict[str, str]) -> bool:
    cache = build / "CMakeCache.txt"
    if not cache.is_file():
        return False
    found = dict(re.findall(r"^([A-Za-z_]+):[A-Z]+=(.*)$", cache.read_text(errors="replace"), re.M))
    return all(found.get(k, "").upper() == v.upper() for k, v in wanted.items())


def _install(built: Path, dst: Path) -> None:
    """Copy a built file (following links) into place atomically."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy2(built, tmp)
    os.replace(tmp, dst)


def ensure_engine(steps: Steps, jobs: int) -> dict[str, str]:
    eng = catalog.engine_dir()
    paths = {n: catalog.engine_binary(n) for n in BINARIES}
    task = steps.start(f"llama.cpp {VERSION} (shared libraries and binaries)", unit="steps")
    gpu, why = detect_gpu()
    wanted = cmake_flags(gpu=gpu)
    if (built_with(wanted) and libraries_present(gpu)
            and all(binary_ok(n, p) for n, p in paths.items())):
        steps.finish(task, f"engine ({gpu}: {why}): cached in {eng / 'bin'}", worked=False)
        return {n: str(p) for n, p in paths.items()}
    t0 = time.monotonic()
    steps.update(task, description="extracting llama.cpp sources")
    tree = ensure_tree(steps)
    build = eng / "build"
    if not _cmake_cache_matches(build, wanted):
        steps.update(task, description="configuring llama.cpp (cmake)")
        shutil.rmtree(build, ignore_errors=True)  # another layout's cache would fight the flags
        cmd = ["cmake", "-S", str(tree), "-B", str(build)]
        if shutil.which("ninja"):
            cmd += ["-G", "Ninja"]
        cmd += [f"-D{k}={v}" for k, v in wanted.items()]
        run_logged(cmd, eng / "cmake.log", "configuring llama.cpp")
    rpc = rpc_target(tree)
    log = eng / "build.log"

    def poll() -> None:  # ninja prints "[done/total]"
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            hits = re.findall(rb"\[(\d+)/(\d+)\]", f.read())
        if hits:
            steps.update(task, completed=int(hits[-1][0]), total=int(hits[-1][1]))

    steps.update(task, description=f"building llama.cpp (-j{jobs})")
    run_logged(["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-server", rpc,
                "llama-quantize", *libraries(gpu)], log, "building llama.cpp", poll=poll)
    out = eng / "bin"
    out.mkdir(parents=True, exist_ok=True)
    libs = sorted(p for p in (build / "bin").glob("lib*.so*") if p.is_file())
    if not libs:
        raise SetupError(f"the llama.cpp build produced no shared libraries in {build / 'bin'} "
                         f"[full log: {log}]")
    for lib in libs:  # every name (libggml.so, libggml.so.0, ...) as a real file
        _install(lib, out / lib.name)
    for name, dst in paths.items():
        built = build / "bin" / (rpc if name == "rpc-server" else name)
        if not built.is_file():
            raise SetupError(f"the llama.cpp build did not produce {built} [full log: {log}]")
        _install(built, dst)
        dst.chmod(0o755)
        if not binary_ok(name, dst):
            raise SetupError(f"{dst} does not run (try `{dst} --version`)")
    if not libraries_present(gpu):
        missing = [n for n in libraries(gpu) if not (out / f"lib{n}.so").is_file()]
        raise SetupError(f"the llama.cpp build did not produce lib{', lib'.join(missing)}.so "
                         f"[full log: {log}]")
    _stamp().write_text(json.dumps(wanted, indent=1) + "\n")
    steps.finish(task, f"engine ({gpu}: {why}): built and installed into {out} "
                       f"in {time.monotonic() - t0:.0f}s", worked=True)
    return {n: str(p) for n, p in paths.items()}

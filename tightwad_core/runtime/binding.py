"""The llama-cpp-python binding, without a second llama.cpp build.

The binding's own build compiles llama.cpp again (minutes). Instead its
package is built with ``LLAMA_BUILD=OFF`` (Python files only, seconds) and
the wheel is repacked with the engine's shared libraries in
``llama_cpp/lib``, where the binding loads them from. The binding, the
servers and rpc-server therefore run one ggml: the same code, the same RPC
protocol version.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import re
import shutil
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

from tightwad_core.runtime import catalog
from tightwad_core.runtime.catalog import LLAMA_CPP_PYTHON_VERSION as VERSION
from tightwad_core.runtime.engine import GPU_LIBRARY, LIBRARIES, lib_dir
from tightwad_core.runtime.sources import ensure_sdist
from tightwad_core.runtime.steps import CHUNK, SetupError, Steps, installed, run_logged

#: What the binding may load: llama.cpp and ggml, and mtmd for its multimodal chat handlers.
BINDING_LIBRARIES = frozenset(LIBRARIES) | {"mtmd"} | frozenset(GPU_LIBRARY.values())


def wheels_dir() -> Path:
    """Repacked wheels, keyed by the engine they carry."""
    return catalog.engine_dir() / "wheels"


def cached_wheel() -> Path | None:
    found = sorted(wheels_dir().glob(f"llama_cpp_python-{VERSION}-*.whl"))
    return found[-1] if found else None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def installed_lib_dir() -> Path | None:
    """``llama_cpp/lib`` of the installed binding, found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def binding_matches_engine() -> bool:
    """Whether the installed binding loads exactly the engine's libraries."""
    if installed("llama_cpp_python") != VERSION:
        return False
    lib = installed_lib_dir()
    if lib is None:
        return False
    for name in LIBRARIES:
        ours, theirs = lib_dir() / f"lib{name}.so", lib / f"lib{name}.so"
        if not (ours.is_file() and theirs.is_file()):
            return False
        if ours.stat().st_size != theirs.stat().st_size or _digest(ours) != _digest(theirs):
            return False
    return True


def wheel_matches_engine(wheel: Path) -> bool:
    """Whether a repacked wheel carries the libraries the engine has now (by CRC)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in LIBRARIES:
                info = zf.getinfo(f"llama_cpp/lib/lib{name}.so")
                ours = lib_dir() / f"lib{name}.so"
                if info.file_size != ours.stat().st_size or info.CRC != zlib.crc32(ours.read_bytes()):
                    return False
    except (OSError, KeyError, zipfile.BadZipFile):
        return False
    return True


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(pure: Path, libs: list[Path], dest_dir: Path) -> Path:
    """A copy of the wheel ``pure`` with ``libs`` added under ``llama_cpp/lib``
    and its RECORD rewritten to match."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / pure.name
    tmp = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(pure) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        names = src.namelist()
        record = next((n for n in names if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)), None)
        if record is None:
            raise SetupError(f"{pure.name} has no RECORD: not a wheel")
        lines = []
        for name in names:
            if name == record or name.startswith("llama_cpp/lib/"):
                continue
            data = src.read(name)
            out.writestr(src.getinfo(name), data)
            lines.append(_record_line(name, data))
        for lib in libs:
            name = f"llama_cpp/lib/{lib.name}"
            data = lib.read_bytes()
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o755 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            out.writestr(info, data)
            lines.append(_record_line(name, data))
        lines.append(f"{record},,")
        out.writestr(record, "\n".join(lines) + "\n")
    tmp.replace(dest)
    return dest


def _requirements(wheel: Path) -> list[str]:
    """Unconditional Requires-Dist entries of the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    reqs = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Requires-Dist:")]
    return [r.split(";")[0].strip() for r in reqs if "extra" not in r.partition(";")[2]]


def build_wheel(steps: Steps) -> Path:
    """Build the binding's Python-only wheel and repack it with the engine's libraries."""
    libs = sorted(p for p in lib_dir().glob("lib*.so*")
                  if p.is_file() and p.name[3:].split(".so")[0] in BINDING_LIBRARIES)
    if not all((lib_dir() / f"lib{n}.so").is_file() for n in LIBRARIES):
        raise SetupError(f"the engine's shared libraries are missing from {lib_dir()}: "
                         "run `tightwad setup` with the engine step")
    sdist = ensure_sdist(steps)
    log = catalog.engine_dir() / "wheel.log"
    with tempfile.TemporaryDirectory(prefix="tightwad-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", tmp, str(sdist)]
        env = {"CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
        run_logged(cmd, log, "packaging llama-cpp-python (no compile)", env=env)
        pure = sorted(Path(tmp).glob(f"llama_cpp_python-{VERSION}-*.whl"))
        if not pure:
            raise SetupError(f"pip wheel produced no llama_cpp_python-{VERSION} wheel [full log: {log}]")
        shutil.rmtree(wheels_dir(), ignore_errors=True)
        return repack(pure[-1], libs, wheels_dir())


def ensure_binding(steps: Steps) -> str:
    task = steps.start(f"llama-cpp-python {VERSION} for {sys.executable}")
    importlib.invalidate_caches()
    worked = False
    wheel = cached_wheel()
    if not binding_matches_engine():
        if wheel is None or not wheel_matches_engine(wheel):  # none yet, or from an older build
            steps.update(task, description="packaging llama-cpp-python around the engine")
            wheel = build_wheel(steps)
        steps.update(task, description=f"installing {wheel.name}")
        run_logged([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall",
                    str(wheel)], catalog.cache_dir() / "install.log", "installing llama-cpp-python")
        worked = True
    missing = [r for r in (_requirements(wheel) if wheel is not None else [])
               if installed(re.split(r"[^A-Za-z0-9._-]", r)[0]) is None]
    if missing:
        steps.update(task, description="installing " + ", ".join(missing))
        run_logged([sys.executable, "-m", "pip", "install", *missing],
                   catalog.cache_dir() / "install.log", "installing llama-cpp-python's dependencies")
        worked = True
    importlib.invalidate_caches()
    if not binding_matches_engine():
        raise SetupError(f"llama-cpp-python {VERSION} does not load the engine's libraries after "
                         f"install (found {installed('llama_cpp_python')}) "
                         f"[full log: {catalog.cache_dir()}/install.log]")
    steps.finish(task, f"binding: llama-cpp-python {VERSION} on the engine's libraries "
                       f"{'installed' if worked else 'already installed'}", worked=worked)
    return VERSION

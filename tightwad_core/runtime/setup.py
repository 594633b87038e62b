"""What `tightwad setup` does: fetch, build and verify everything it needs.

Every step caches its output under :func:`catalog.cache_dir`, keyed by the
pinned llama-cpp-python version, and is skipped when that output is present
and valid, so a second run does no work. The steps: the sources
(:mod:`.sources`), llama.cpp built once as shared libraries (:mod:`.engine`),
the binding packaged around those libraries (:mod:`.binding`) and the models
(:mod:`.models`).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tightwad_core.runtime import catalog
from tightwad_core.runtime.binding import binding_matches_engine, cached_wheel, ensure_binding
from tightwad_core.runtime.catalog import LLAMA_CPP_PYTHON_VERSION as VERSION
from tightwad_core.runtime.engine import BINARIES, LIBRARIES, ensure_engine, lib_dir
from tightwad_core.runtime.models import ensure_model, stamp_ok
from tightwad_core.runtime.sources import sdist_path
from tightwad_core.runtime.steps import SetupError, Steps, installed

if TYPE_CHECKING:
    from rich.progress import Progress


@dataclass(frozen=True)
class SetupResult:
    cache: Path  # the cache folder
    binaries: dict[str, str]  # name -> absolute path
    models: dict[str, str]  # built-in model name -> absolute path of its GGUF
    llama_cpp_python: str  # the binding's version ("" when that step was skipped)
    did_work: bool  # anything was fetched, built or installed
    steps: list[str]  # one line per step, for the user


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
    steps = Steps(progress)
    with (cache / ".setup.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        binaries = ensure_engine(steps, jobs) if engine else {
            n: str(p) for n in BINARIES if (p := catalog.engine_binary(n)).is_file()}
        binaries = {n: os.path.abspath(p) for n, p in binaries.items()}
        binding = ensure_binding(steps) if python_binding else (installed("llama_cpp_python") or "")
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
    """What is present and what is missing, without downloading or building."""
    bins = {n: {"path": str(p), "present": p.is_file() and os.access(p, os.X_OK)}
            for n, p in ((n, catalog.engine_binary(n)) for n in BINARIES)}
    libs = {n: (lib_dir() / f"lib{n}.so").is_file() for n in LIBRARIES}
    wheel, have = cached_wheel(), installed("llama_cpp_python")
    matches = binding_matches_engine()
    models = {n: {"path": str(p), "present": p.is_file(), "verified": stamp_ok(spec, p),
                  "size": spec.size, "role": spec.role}
              for n, spec, p in ((n, s, catalog.model_path(n)) for n, s in catalog.MODELS.items())}
    missing = [f"binary {n}" for n, b in bins.items() if not b["present"]]
    missing += [f"library lib{n}.so" for n, ok in libs.items() if not ok]
    if not matches:
        missing.append(f"llama-cpp-python {VERSION} on the engine's libraries "
                       f"(installed: {have or 'none'})")
    missing += [f"model {n}" + (" (present, not verified yet)" if m["present"] else "")
                for n, m in models.items() if not m["verified"]]
    return {"cache": str(catalog.cache_dir()), "version": VERSION,
            "sdist": {"path": str(sdist_path()), "present": sdist_path().is_file()},
            "binaries": bins, "libraries": {"path": str(lib_dir()), "present": libs},
            "wheel": {"path": str(wheel) if wheel else None, "present": wheel is not None},
            "llama_cpp_python": {"wanted": VERSION, "installed": have, "ok": matches},
            "models": models, "missing": missing, "ok": not missing}


__all__ = ["SetupError", "SetupResult", "run_setup", "status"]

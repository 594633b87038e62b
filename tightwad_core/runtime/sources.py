"""The pinned llama-cpp-python sdist: downloaded once, unpacked safely. It
vendors the llama.cpp tree that the engine and the binding are built from."""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import sys
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from tightwad_core.runtime import catalog
from tightwad_core.runtime.catalog import LLAMA_CPP_PYTHON_VERSION as VERSION
from tightwad_core.runtime.steps import SetupError, Steps, pip_extra, run_logged


def sdist_path() -> Path:
    return catalog.cache_dir() / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"


def ensure_sdist(steps: Steps) -> Path:
    if steps.sdist is not None:
        return steps.sdist
    path = steps.sdist = sdist_path()
    task = steps.start(f"llama-cpp-python {VERSION} sources")
    if path.is_file() and path.stat().st_size > 0:
        steps.finish(task, f"sources: cached {path.name}", worked=False)
        return path
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={VERSION}", "-d", str(path.parent), *pip_extra()]
    run_logged(cmd, catalog.cache_dir() / "sdist.log", "downloading llama-cpp-python sources")
    if not path.is_file():
        raise SetupError(f"pip did not produce {path} [full log: {catalog.cache_dir()}/sdist.log]")
    steps.finish(task, f"sources: downloaded {path.name}", worked=True)
    return path


def safe_member(name: str) -> PurePosixPath:
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
            parts = safe_member(m.name).parts[1:]
            if not parts:
                continue
            if m.issym() or m.islnk():
                base = str(PurePosixPath(*parts).parent) if m.issym() else ""
                where = posixpath.normpath(posixpath.join(base, m.linkname))
                if m.linkname.startswith("/") or where == ".." or where.startswith("../"):
                    raise SetupError(f"refusing archive link leading outside: {m.name!r}")
                if m.islnk():
                    m.linkname = str(PurePosixPath(*safe_member(m.linkname).parts[1:]))
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


def ensure_tree(steps: Steps) -> Path:
    """The unpacked sources (``<engine>/src``); returns the llama.cpp tree inside."""
    src = catalog.engine_dir() / "src"
    tree = src / "vendor" / "llama.cpp"
    if not (tree / "CMakeLists.txt").is_file() or not (src / "pyproject.toml").is_file():
        extract_sdist(ensure_sdist(steps), src)
    return tree

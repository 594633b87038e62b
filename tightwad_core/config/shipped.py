"""Where the project's shipped files live, installed or run from a checkout."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # tightwad_core/


def configs_dir() -> Path:
    """The shipped profiles: ``configs/`` of the checkout, or the packaged copy."""
    repo = PACKAGE.parent / "configs"
    if repo.is_dir():
        return repo
    return PACKAGE / "data" / "configs"


def builtin_config() -> Path:
    """The profiles shipped in configs/ (the demo and friends)."""
    return configs_dir() / "profiles.toml"


def data_file(name: str) -> Path:
    """A file shipped in ``tightwad_core/data`` (the bench's prompt set)."""
    return PACKAGE / "data" / name

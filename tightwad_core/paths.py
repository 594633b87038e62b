"""Where the project's shipped files live, installed or run from a checkout."""

from __future__ import annotations

from pathlib import Path


def configs_dir() -> Path:
    """The shipped profiles: ``configs/`` of the checkout, or the packaged copy."""
    here = Path(__file__).resolve().parent
    repo = here.parent / "configs"
    if repo.is_dir():
        return repo
    return here / "data" / "configs"

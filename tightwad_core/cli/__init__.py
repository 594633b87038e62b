"""The `tightwad` command line, one module per command group: `main` (the
group and shared options), `run` (run, proxy), `admin` (config, init,
plugins), `daemon` (start, stop, status, swap), `setup`, `bench`, `benchmark` (the pool alone), `moe` and `link`. Plugins add commands through the
`register_commands` hook."""

from __future__ import annotations

from tightwad_core.cli import admin, bench, benchmark, daemon, link, moe, run, setup  # noqa: F401  (each registers its commands)
from tightwad_core.cli.main import builtin_config, main

__all__ = ["builtin_config", "main"]

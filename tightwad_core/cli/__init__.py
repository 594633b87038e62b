"""The `tightwad` command line, one module per command group: `main` (the
group and shared options), `run` (run, proxy), `admin` (config, init,
plugins), `daemon` (start, stop, status, swap), `setup`, `bench`, `benchmark` (the pool alone), `moe` and `link`. Plugins add commands through the
`register_commands` hook."""

from __future__ import annotations

from tightwad_core.cli import (  # noqa: F401  (each registers its commands)
    admin,
    bench,
    benchmark,
    daemon,
    link,
    moe,
    moe_bench,  # noqa: F401
    moe_plan,  # noqa: F401
    moe_routing,  # noqa: F401
    run,
    setup,
)
from tightwad_core.cli.main import builtin_config, main

__all__ = ["builtin_config", "main"]

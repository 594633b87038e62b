"""The `tightwad` command line, one module per command group: `main` (the
group and shared options), `run` (run, proxy), `admin` (config, init,
plugins), `daemon` (start, stop, status, swap), `setup`, `bench`,
`benchmark` (the pool alone), `moe` with `moe_bench`, `moe_plan` and
`moe_routing`, `peer` with `peer_scan`, `swarm`, `distribute` and `link`.
Plugins add commands through the `register_commands` hook."""

from __future__ import annotations

from tightwad_core.cli import (  # noqa: F401  (each registers its commands)
    admin,
    bench,
    benchmark,
    daemon,
    distribute,
    link,
    moe,
    moe_bench,
    moe_plan,
    moe_routing,
    peer,
    peer_scan,
    run,
    setup,
    swarm,
)
from tightwad_core.cli.main import builtin_config, main

__all__ = ["builtin_config", "main"]

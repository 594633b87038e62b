"""`tightwad moe`: Mixture-of-Experts tooling."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tightwad_core.cli.main import _fail, main


@main.group()
def moe() -> None:
    """Mixture-of-Experts models: how a GGUF stores its experts."""


@moe.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def moe_inspect(file: Path, as_json: bool) -> None:
    """Show FILE's architecture, expert count, experts used per token, and per
    layer its expert tensors (name, type, shape, bytes), fused or indexed.

    Reads the header only. A file without expert tensors says so (exit 0,
    `"moe": false` in JSON); a missing, truncated or corrupt file exits 2.
    """
    from rich.console import Console
    from rich.table import Table

    from tightwad_core.cluster.sizes import human
    from tightwad_core.moe.inspect import MoeError, inspect_file

    try:
        info = inspect_file(file)
    except MoeError as exc:
        _fail(str(exc))
        return
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    console = Console()
    console.print(f"{file}: architecture {info['architecture']}, {info['block_count']} layers, "
                  f"{human(info['total_bytes'])}", highlight=False)
    if not info["moe"]:
        console.print("not a Mixture-of-Experts model: no expert tensors", highlight=False)
        return
    console.print(f"{info['expert_count']} experts, {info['expert_used_count']} used per token"
                  + (f", {info['shared_expert_count']} shared" if info["shared_expert_count"] else "")
                  + f"; layout {info['layout']}; experts hold {human(info['expert_bytes'])} "
                  f"({info['expert_bytes'] / max(info['total_bytes'], 1):.0%})", highlight=False)
    table = Table()
    for col in ("layer", "tensor", "kind", "type", "shape", "bytes"):
        table.add_column(col)
    for layer in info["layers"]:
        for t in layer["tensors"]:
            table.add_row(str(layer["layer"]), t["name"], t["kind"], t["type"],
                          "x".join(map(str, t["shape"])), human(t["bytes"]))
    console.print(table)

"""`tightwad moe`: Mixture-of-Experts tooling."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tightwad_core.cli.main import _fail, byte_progress, main


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


def _rewrite(direction: str, src: Path, dst: Path, force: bool, as_json: bool) -> None:
    import signal

    from rich.markup import escape

    from tightwad_core.moe.defuse import rewrite
    from tightwad_core.moe.inspect import MoeError

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    bar = byte_progress(as_json)
    task = bar.add_task(f"{direction} [bold]{escape(src.name)}[/]", total=None)
    try:
        with bar:
            result = rewrite(src, dst, direction, force=force,
                             progress=lambda done, total: bar.update(task, completed=done, total=total))
    except MoeError as exc:
        _fail(str(exc))
        return
    except KeyboardInterrupt:
        _fail(f"interrupted: {dst} was not written", code=130)
        return
    except OSError as exc:
        _fail(f"{direction} failed: {exc.strerror or exc} ({exc.filename or dst}); {dst} was not written")
        return
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from tightwad_core.cluster.sizes import human

    verb = "split" if direction == "defuse" else "joined"
    click.echo(f"{dst}: {verb} {result['expert_tensors']} expert tensors; "
               f"{result['tensors_in']} tensors in, {result['tensors_out']} out; "
               f"{human(result['data_bytes'])} of tensor data in {result['seconds']:.1f} s")
    if not result["input_canonical"]:
        click.echo("note: the input's tensors were not laid out in order; the output is, so a "
                   "round trip gives the same metadata and tensor bytes but not the same file")


@moe.command("defuse")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def moe_defuse(src: Path, dst: Path, force: bool, as_json: bool) -> None:
    """Split IN's fused expert tensors (blk.N.ffn_gate_exps.weight, ...) into one
    tensor per expert (blk.N.ffn_gate.E.weight, ...) and write OUT.

    Byte slicing, never dequantizing: every quantization type works. Metadata
    is copied exactly, the tensor order kept (the experts take the fused
    tensor's place), so `tightwad moe fuse OUT X` gives back IN byte for byte.
    Memory stays small whatever the size; OUT appears only when complete.
    Stock llama.cpp does not load the per-expert form (see docs/moe.md).
    """
    _rewrite("defuse", src, dst, force, as_json)


@moe.command("fuse")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def moe_fuse(src: Path, dst: Path, force: bool, as_json: bool) -> None:
    """Join IN's per-expert tensors (blk.N.ffn_gate.E.weight, ...) back into one
    fused tensor per projection, the form llama.cpp loads, and write OUT.

    Every expert 0..E-1 of a projection must be there with one shape and
    type. The fused tensor takes the place of its first expert. OUT appears
    only when complete.
    """
    _rewrite("fuse", src, dst, force, as_json)

"""`tightwad config`, `init`, `plugins` and `setup`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tightwad_core.cli.main import _fail, builtin_config, config_option, main, profile_option
from tightwad_core.config.profiles import (
    ConfigError,
    check_names,
    find_config,
    load_file,
    load_profile,
    to_toml,
)
from tightwad_core.config.starter import STARTER

if TYPE_CHECKING:
    from tightwad_core.config.schema import ClusterConfig
    from tightwad_core.plugins import Registry


def _config_path(config: Path | None) -> Path:
    path = find_config(config)
    if not path.exists() and config is None:
        return builtin_config()
    return path


@main.group()
def config() -> None:
    """Check and show config profiles."""


@config.command("check")
@config_option
@profile_option
@click.option("--no-files", is_flag=True, help="Do not check that model files exist.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def config_check(config: Path | None, profile: str | None, no_files: bool, as_json: bool) -> None:
    """Validate one profile, or every profile in the file, including the mode,
    backend and verifier names against the plugins that are installed.

    Exits 2 with one line naming the file, profile and field on the first error.
    """
    from tightwad_core.http.server import role_tables
    from tightwad_core.plugins import load_registry

    path = _config_path(config)
    reg = load_registry()
    known = {kind: reg.names(kind) for kind in ("modes", "backends", "verifiers", "placement_strategies", "transports")}
    try:
        names = [profile] if profile else sorted(load_file(path).profiles)
        results = []
        for name in names:
            _, prof = load_profile(path, name, check_files=not no_files)
            check_names(path, name, prof, known)
            try:  # the backend tables the mode needs (a fleet, a draft)
                role_tables(name, prof, tuple(reg.mode(prof.mode).roles))
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
            if prof.cluster is not None:
                _check_cluster(path, name, prof.cluster, reg, check_files=not no_files)
            results.append({"profile": name, "mode": prof.mode, "description": prof.description})
    except ConfigError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "file": str(path), "error": str(exc)}))
            sys.exit(2)
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps({"ok": True, "file": str(path), "profiles": results}, indent=2))
        return
    for r in results:
        click.echo(f"ok  {r['profile']:<24} {r['mode']:<12} {r['description']}")
    click.echo(f"{path}: {len(results)} profile(s) valid")


def _check_cluster(path: Path, name: str, cluster: ClusterConfig, reg: Registry, *,
                   check_files: bool) -> None:
    """What the pool would refuse at start: a layer strategy named as the
    expert placement or the other way round, a bad `expert_cpu` or `speed`,
    a missing routing profile. Nothing is contacted."""
    import tempfile

    from tightwad_core.cluster.pool import RpcPool

    with tempfile.TemporaryDirectory(prefix="tightwad-check-") as run_dir:
        try:
            RpcPool.from_registry(cluster, reg, Path(run_dir), path.parent)
        except ConfigError as exc:
            raise ConfigError(f"{path} [profiles.{name}]: {exc}") from None
    if check_files and cluster.routing_profile is not None:
        routing = path.parent / cluster.routing_profile
        if not routing.is_file():
            raise ConfigError(f"{path} [profiles.{name}] field 'cluster.routing_profile': "
                              f"{routing} is not a file")


@config.command("show")
@config_option
@profile_option
@click.option("--json", "as_json", is_flag=True,
              help="Print the profile and each field's origin as JSON.")
def config_show(config: Path | None, profile: str | None, as_json: bool) -> None:
    """Print a profile as TOML after `extends` is applied and defaults filled
    in, then which file and profile set each field (the rest are defaults)."""
    import msgspec

    path = _config_path(config)
    sources: dict[str, str] = {}
    try:
        name, prof = load_profile(path, profile, check_files=False, sources=sources)
    except ConfigError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps({"profile": name, "settings": msgspec.to_builtins(prof),
                               "sources": dict(sorted(sources.items()))}, indent=2))
        return
    click.echo(to_toml(prof), nl=False)
    if sources:
        width = max(map(len, sources))
        click.echo("\n# where each field was set (every other one is a default):")
        for field, where in sorted(sources.items()):
            click.echo(f"#   {field:<{width}}  {where}")


@main.command()
@click.option("--path", type=click.Path(dir_okay=False, path_type=Path), default=Path("tightwad.toml"),
              show_default=True, help="Where to write the starter config.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: Path, force: bool) -> None:
    """Write a commented starter config."""
    if path.exists() and not force:
        _fail(f"{path} already exists (use --force to overwrite)")
    text = STARTER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    click.echo(f"wrote {path}; next: `tightwad setup`, then `tightwad run --config {path}`")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def plugins(as_json: bool) -> None:
    """List loaded plugins: distribution, version and what each registered.

    Set TIGHTWAD_LOAD_PLUGINS=a,b to load only the named entry points.
    """
    from tightwad_core.plugins import load_registry

    reg = load_registry()
    infos = reg.plugins()
    if as_json:
        click.echo(json.dumps([{"name": p.name, "distribution": p.distribution, "version": p.version,
                                "registered": {k: list(v) for k, v in p.registered.items()}}
                               for p in infos], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tightwad plugins")
    for col in ("plugin", "distribution", "version", "registers"):
        table.add_column(col)
    for p in infos:
        regs = "; ".join(f"{k}: {', '.join(v)}" for k, v in p.registered.items())
        table.add_row(p.name, p.distribution, p.version, regs)
    Console().print(table)

"""The docs that a test keeps honest: every hook, config field and command is
documented, nothing documented is missing from the code, and the shipped
profiles validate."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import msgspec
import pytest

from tightwad_core.cli.main import main
from tightwad_core.config.profiles import (
    BackendConfig,
    ConfigError,
    Profile,
    SpeculationConfig,
    load_file,
    load_profile,
)
from tightwad_core.config.schema import ClusterConfig, GateConfig, PeerConfig, RpcWorkerConfig
from tightwad_core.plugins import load_registry, new_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def sections(path: Path) -> dict[str, str]:
    """``## heading`` -> the text up to the next level-2 heading."""
    out: dict[str, str] = {}
    head = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            head = line[3:].strip().strip("`")
            out[head] = ""
        elif head is not None:
            out[head] += line + "\n"
    return out


# --------------------------------------------------------------------------- hooks


def hookspecs() -> dict[str, list[str]]:
    hook = new_plugin_manager().hook
    return {name: list(caller.spec.argnames) for name, caller in vars(hook).items()
            if getattr(caller, "spec", None) is not None}


def test_every_hook_is_documented() -> None:
    docs = sections(DOCS / "hooks.md")
    specs = hookspecs()
    assert specs, "found no hookspecs in tightwad_core.hookspecs"
    for name, args in specs.items():
        assert name in docs, f"docs/hooks.md has no '## {name}' section"
        for arg in args:
            assert re.search(rf"\b{arg}\b", docs[name]), \
                f"docs/hooks.md: section '{name}' does not mention its argument {arg!r}"


def test_no_documented_hook_is_made_up() -> None:
    specs = hookspecs()
    for head in sections(DOCS / "hooks.md"):
        if re.fullmatch(r"\w+", head):
            assert head in specs, f"docs/hooks.md documents '{head}', which is not a hookspec"


# --------------------------------------------------------------------------- config


def render_default(field: msgspec.structs.FieldInfo) -> str:
    """How docs/config.md writes a default."""
    if field.default is not msgspec.NODEFAULT:
        value = field.default
    elif field.default_factory is not msgspec.NODEFAULT:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, msgspec.Struct):
        return "see below"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def render_type(struct: type[msgspec.Struct], name: str) -> str:
    return f"`{struct.__annotations__[name]}`"


def table(text: str) -> dict[str, list[str]]:
    """Rows of a markdown table whose first cell is a `field`, by field."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


@pytest.mark.parametrize(("struct", "heading"), [(Profile, "Profile fields"),
                                                 (BackendConfig, "Backend fields"),
                                                 (SpeculationConfig, "Speculation fields"),
                                                 (ClusterConfig, "Cluster fields"),
                                                 (RpcWorkerConfig, "Cluster worker fields"),
                                                 (PeerConfig, "Peer fields"),
                                                 (GateConfig, "Gate fields")])
def test_config_fields_are_documented(struct: type[msgspec.Struct], heading: str) -> None:
    docs = sections(DOCS / "config.md")
    assert heading in docs, f"docs/config.md has no '## {heading}' section ({struct.__name__})"
    rows = table(docs[heading])
    for field in msgspec.structs.fields(struct):
        where = f"docs/config.md '## {heading}': {struct.__name__}.{field.name}"
        assert field.name in rows, f"{where} is missing from the table"
        cells = rows[field.name]
        assert len(cells) == 3, f"{where}: want 4 cells (field, type, default, meaning): {cells}"
        assert cells[0] == render_type(struct, field.name), \
            f"{where}: type is {cells[0]}, expected {render_type(struct, field.name)}"
        assert cells[1] == render_default(field), \
            f"{where}: default is {cells[1]}, expected {render_default(field)}"
        assert cells[2], f"{where}: the meaning is empty"
    extra = set(rows) - set(struct.__struct_fields__)
    assert not extra, \
        f"docs/config.md '## {heading}' documents fields {struct.__name__} lacks: {sorted(extra)}"


# --------------------------------------------------------------------------- cli


def third_party_commands() -> set[str]:
    reg = load_registry()
    return {name for name, owner in reg.owners.get("commands", {}).items()
            if reg.dists.get(owner, ("", ""))[0] != "tightwad"}


def commands() -> dict[str, click.Command]:
    """Every command reachable from `tightwad`, by its full name."""
    skip = third_party_commands()
    out: dict[str, click.Command] = {}

    def walk(cmd: click.Command, path: str) -> None:
        out[path] = cmd
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd, info_name=path)
            for name in cmd.list_commands(ctx):
                if path == "tightwad" and name in skip:
                    continue
                sub = cmd.get_command(ctx, name)
                if sub is not None:
                    walk(sub, f"{path} {name}")

    walk(main, "tightwad")
    return out


def test_every_command_and_option_is_documented() -> None:
    docs = sections(DOCS / "cli.md")
    for path, cmd in commands().items():
        assert path in docs, f"docs/cli.md has no '## {path}' section"
        for param in cmd.params:
            if isinstance(param, click.Option):
                for opt in param.opts + param.secondary_opts:
                    if opt.startswith("--"):
                        assert re.search(rf"{re.escape(opt)}(?![\w-])", docs[path]), \
                            f"docs/cli.md: section '{path}' does not mention option {opt}"
            elif isinstance(param, click.Argument):
                metavar = param.human_readable_name.upper()
                assert metavar in docs[path], \
                    f"docs/cli.md: section '{path}' does not mention argument {metavar}"


def test_no_documented_command_is_made_up() -> None:
    known = commands()
    for head in sections(DOCS / "cli.md"):
        if head.startswith("tightwad"):
            assert head in known, f"docs/cli.md documents '{head}', which is not a command"


# --------------------------------------------------------------------------- configs/


CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def test_configs_folder_has_profiles() -> None:
    assert CONFIGS, "configs/ holds no *.toml file"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_profiles_validate(path: Path) -> None:
    names = sorted(load_file(path).profiles)  # raises ConfigError naming the file and field
    assert names, f"{path} defines no profiles"
    errors = []
    for name in names:
        try:
            got, _ = load_profile(path, name, check_files=False)
            assert got == name
        except ConfigError as exc:
            errors.append(str(exc))
    assert not errors, "shipped profiles that do not validate:\n" + "\n".join(errors)


def test_shipped_default_profiles_exist() -> None:
    for path in CONFIGS:
        cfg: Any = load_file(path)
        if cfg.default_profile is not None:
            assert cfg.default_profile in cfg.profiles, \
                f"{path}: default_profile {cfg.default_profile!r} is not a profile in the file"


def test_backend_capabilities_table() -> None:
    """docs/backends.md lists what each first-party backend declares."""
    import re as _re

    text = (DOCS / "backends.md").read_text()
    rows = dict(_re.findall(r"^\| `([\w-]+)` \| (.+?) \|$", text, _re.M))
    reg = load_registry()
    for name in ("llama-server", "worker", "openai", "ollama"):
        assert name in rows, f"docs/backends.md: no capabilities row for {name}"
        cell = rows[name].split("(")[0]  # what follows in brackets is commentary
        documented = set() if cell.startswith("none") else set(_re.findall(r"`([\w-]+)`", cell))
        assert documented == set(reg.backend(name).capabilities), (name, rows[name])

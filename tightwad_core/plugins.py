"""Plugin loading: every plugin, first-party or not, comes from the entry-point
group ``tightwad``. ``TIGHTWAD_LOAD_PLUGINS`` (comma-separated entry-point
names) restricts which ones load; an empty value loads none."""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pluggy

from tightwad_core import hookspecs

if TYPE_CHECKING:
    from tightwad_core.roles import BackendFactory, ModeFactory, VerifierFactory

GROUP = "tightwad"
KINDS = ("backends", "modes", "verifiers", "placement_strategies", "transports", "commands")


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin."""

    name: str  # entry-point name (or the name it was registered under)
    distribution: str  # the distribution that ships it ("" if registered by hand)
    version: str  # that distribution's version
    registered: dict[str, tuple[str, ...]]  # kind -> names it registered


class DuplicateNameError(Exception):
    """Two plugins registered the same name for one kind."""


@dataclass
class Registry:
    """What the loaded plugins registered, by kind and name."""

    pm: pluggy.PluginManager
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    owners: dict[str, dict[str, str]] = field(default_factory=dict)
    dists: dict[str, tuple[str, str]] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> Any:
        try:
            return self.entries[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.entries.get(kind, {}))) or "none"
            raise KeyError(f"no {kind[:-1].replace('_', ' ')} named {name!r} (known: {known})") from None

    def backend(self, name: str) -> BackendFactory:
        return cast("BackendFactory", self.get("backends", name))

    def mode(self, name: str) -> ModeFactory:
        return cast("ModeFactory", self.get("modes", name))

    def verifiers(self) -> dict[str, VerifierFactory]:
        return cast("dict[str, VerifierFactory]", dict(self.entries.get("verifiers", {})))

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries.get(kind, {}))

    def plugins(self) -> list[PluginInfo]:
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            reg: dict[str, list[str]] = {}
            for kind, owners in self.owners.items():
                for item, owner in owners.items():
                    if owner == name:
                        reg.setdefault(kind, []).append(item)
            dist, ver = self.dists.get(name, ("", ""))
            out.append(
                PluginInfo(name, dist, ver, {k: tuple(sorted(v)) for k, v in sorted(reg.items())})
            )
        return sorted(out, key=lambda p: p.name)


def _allowed() -> set[str] | None:
    raw = os.environ.get("TIGHTWAD_LOAD_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("tightwad")
    pm.add_hookspecs(hookspecs)
    return pm


def load_registry(extra: dict[str, object] | None = None, entry_points: bool = True) -> Registry:
    """Build a fresh registry: load entry points (honouring the allowlist), add
    ``extra`` plugins registered by hand (tests), then collect registrations."""
    pm = new_plugin_manager()
    reg = Registry(pm)
    if entry_points:
        allowed = _allowed()
        for ep in md.entry_points(group=GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            if pm.has_plugin(ep.name):
                continue
            module = ep.load()
            pm.register(module, name=ep.name)
            dist = ep.dist
            reg.dists[ep.name] = (dist.metadata["Name"], dist.version) if dist else ("", "")
    for name, plugin in (extra or {}).items():
        pm.register(plugin, name=name)
    _collect(reg)
    return reg


def _collect(reg: Registry) -> None:
    for kind in KINDS:
        hook = getattr(reg.pm.hook, f"register_{kind}")
        entries: dict[str, Any] = {}
        owners: dict[str, str] = {}
        for impl in hook.get_hookimpls():

            def register(*args: Any, _owner: str = impl.plugin_name, _kind: str = kind) -> None:
                if _kind == "commands":
                    (command,) = args
                    name, value = command.name, command
                else:
                    name, value = args
                if name in entries:
                    raise DuplicateNameError(
                        f"{_kind[:-1]} {name!r} registered by both {owners[name]!r} and {_owner!r}"
                    )
                entries[name] = value
                owners[name] = _owner

            impl.function(register=register)
        reg.entries[kind] = entries
        reg.owners[kind] = owners


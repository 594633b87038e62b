"""Typed profiles: a TOML file of named profiles that may extend one another.

A file looks like::

    default_profile = "demo"

    [profiles.base]
    listen = "127.0.0.1:8088"

    [profiles.demo]
    extends = "base"
    [profiles.demo.target]
    backend = "llama-server"
    model_path = "@qwen2.5-coder-1.5b"

Profiles are merged key by key (tables deeply) before decoding, so a child
only names what it changes. Every error names the file, the profile and the
field.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import msgspec

from tightwad_core.config.schema import (
    BackendConfig,
    ConfigError,
    ConfigFile,
    Profile,
    SpeculationConfig,
)
from tightwad_core.runtime.catalog import resolve_model

__all__ = ["BackendConfig", "ConfigError", "ConfigFile", "Profile", "SpeculationConfig", "check_names",
           "find_config", "is_loopback", "load_file", "load_profile", "parse_listen", "raw_profile",
           "secret", "to_toml", "validate"]


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--config`` wins, then ``TIGHTWAD_CONFIG``, then ``./tightwad.toml``,
    then ``~/.config/tightwad/tightwad.toml``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("TIGHTWAD_CONFIG")
    if env:
        return Path(env).expanduser()
    local = Path("tightwad.toml")
    if local.exists():
        return local
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "tightwad" / "tightwad.toml"


def _where(err: msgspec.ValidationError) -> tuple[str, str]:
    """Split msgspec's ``"... - at `$.a.b`"`` into (message, "a.b")."""
    text = str(err)
    m = re.search(r" - at `\$\.?(.*)`$", text)
    if not m:
        return text, ""
    return text[: m.start()], m.group(1)


def load_file(path: Path) -> ConfigFile:
    if not path.exists():
        raise ConfigError(f"{path}: no such config file (run `tightwad init` to write one)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return msgspec.toml.decode(data, type=ConfigFile)
    except msgspec.ValidationError as exc:
        msg, field = _where(exc)
        _raise(path, None, field, msg)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _raise(path: Path, profile: str | None, field: str, msg: str) -> NoReturn:
    parts = [str(path)]
    if profile is not None:
        parts.append(f"profile {profile!r}")
    if field:
        parts.append(f"field {field!r}")
    raise ConfigError(": ".join(parts) + f": {msg}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _shipped_for(path: Path) -> tuple[ConfigFile, Path] | None:
    """The shipped profiles, as parents for the profiles of another file."""
    from tightwad_core.config.shipped import builtin_config

    shipped = builtin_config()
    try:
        if not shipped.exists() or path.resolve() == shipped.resolve():
            return None
    except OSError:
        return None
    return load_file(shipped), shipped


def _leaves(table: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in table.items():
        if isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}.")
        elif key != "extends":
            out.append(prefix + key)
    return out


def raw_profile(cfg: ConfigFile, name: str, path: Path,
                sources: dict[str, str] | None = None) -> dict[str, Any]:
    """The profile's table after applying its ``extends`` chain. A parent this
    file does not define, or one a profile names after itself, comes from the
    shipped profiles (so a user's file can start from ``speculative``); a
    profile of the user's wins over a shipped one of the same name. With
    ``sources``, records which file and profile set each field."""
    shipped = _shipped_for(path)
    chain: list[tuple[str, dict[str, Any], str]] = []  # (name, table, where it is)
    cur: str | None = name
    in_user = True
    while cur is not None:
        table: dict[str, Any] | None = None
        where = ""
        own_name = bool(chain) and chain[-1][0] == cur  # extends = its own name: the shipped one
        if in_user and cur in cfg.profiles and not own_name:
            table, where = cfg.profiles[cur], f"{path} [profiles.{cur}]"
        elif shipped is not None and cur in shipped[0].profiles:
            in_user = False
            table, where = shipped[0].profiles[cur], f"{shipped[1]} [profiles.{cur}] (shipped)"
        if table is None:
            if not chain:
                known = ", ".join(sorted(cfg.profiles)) or "none"
                _raise(path, None, "", f"no profile named {name!r} (profiles: {known})")
            extra = " (nor in the shipped profiles)" if shipped is not None else ""
            _raise(path, chain[-1][0], "extends", f"no profile named {cur!r} to extend{extra}")
        assert table is not None
        if any(w == where for _, _, w in chain):
            names = " -> ".join([c[0] for c in chain] + [cur])
            _raise(path, name, "extends", f"profiles extend each other in a loop: {names}")
        chain.append((cur, table, where))
        parent = table.get("extends")
        if parent is not None and not isinstance(parent, str):
            _raise(path, cur, "extends", "expected a profile name (a string)")
        cur = parent
    merged: dict[str, Any] = {}
    for _, table, where in reversed(chain):
        merged = _merge(merged, table)
        if sources is not None:
            sources.update({leaf: where for leaf in _leaves(table)})
    merged.pop("extends", None)
    return merged


def _check_url(path: Path, profile: str, field: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _raise(path, profile, field, f"expected an http(s) URL like http://127.0.0.1:8080, got {url!r}")
    try:
        parts.port
    except ValueError:
        _raise(path, profile, field, f"bad port in URL {url!r}")


def parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:8088"``) -> (host, port)."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if not m:
        raise ValueError(f"expected host:port, got {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_backend(path: Path, profile: str, role: str, be: BackendConfig, check_files: bool) -> None:
    where = role
    if be.url is not None:
        _check_url(path, profile, f"{where}.url", be.url)
    if be.url is None and be.model_path is None:
        _raise(path, profile, where, "needs either `url` (a running server) or `model_path` (a GGUF to launch)")
    if be.url is not None and be.model_path is not None:
        _raise(path, profile, where, "set `url` or `model_path`, not both")
    for name in ("ctx_size", "parallel"):
        if getattr(be, name) <= 0:
            _raise(path, profile, f"{where}.{name}", "expected a positive number")
    if be.threads is not None and be.threads <= 0:
        _raise(path, profile, f"{where}.threads", "expected a positive number")
    if be.model_path is not None and check_files:
        try:
            resolved = resolve_model(be.model_path, path.parent)
        except ValueError as exc:
            _raise(path, profile, f"{where}.model_path", str(exc))
        if not resolved.is_file():
            hint = " (run `tightwad setup` to fetch it)" if be.model_path.startswith("@") else ""
            _raise(path, profile, f"{where}.model_path", f"model file {str(resolved)!r} does not exist{hint}")


def load_profile(path: Path, name: str | None = None, check_files: bool = True,
                 sources: dict[str, str] | None = None) -> tuple[str, Profile]:
    """Load, merge and validate one profile; returns (name, profile). With
    ``sources``: where each field set in a file came from (see `raw_profile`)."""
    cfg = load_file(path)
    if name is None:
        name = cfg.default_profile
        if name is None:
            if len(cfg.profiles) == 1:
                name = next(iter(cfg.profiles))
            else:
                known = ", ".join(sorted(cfg.profiles)) or "none"
                _raise(path, None, "", f"name a profile with --profile (profiles: {known}) or set default_profile")
    raw = raw_profile(cfg, name, path, sources)
    try:
        prof = msgspec.convert(raw, type=Profile)
    except msgspec.ValidationError as exc:
        msg, field = _where(exc)
        _raise(path, name, field, msg)
    validate(path, name, prof, check_files)
    return name, prof


def validate(path: Path, name: str, prof: Profile, check_files: bool = True) -> None:
    try:
        host, _ = parse_listen(prof.listen)
    except ValueError as exc:
        _raise(path, name, "listen", str(exc))
    if not is_loopback(host) and not (prof.api_key or prof.api_key_env):
        _raise(path, name, "api_key", f"listening on {host} (beyond loopback) needs `api_key` or `api_key_env`")
    if prof.max_tokens_limit <= 0:
        _raise(path, name, "max_tokens_limit", "expected a positive number")
    if prof.max_body_bytes < 1024:
        _raise(path, name, "max_body_bytes", "expected at least 1024")
    if prof.truncate not in ("error", "oldest"):
        _raise(path, name, "truncate", f'expected "error" or "oldest", got {prof.truncate!r}')
    if prof.target is None:
        _raise(path, name, "target", "every profile needs a [target] table")
    _check_backend(path, name, "target", prof.target, check_files)
    if prof.draft is not None:
        _check_backend(path, name, "draft", prof.draft, check_files)
    for i, be in enumerate(prof.drafters):
        _check_backend(path, name, f"drafters[{i}]", be, check_files)
    spec = prof.speculation
    k = spec.max_draft_tokens
    if isinstance(k, str) and k != "auto" or isinstance(k, int) and not 0 <= k <= 64:
        _raise(path, name, "speculation.max_draft_tokens", f'expected "auto" or a number from 0 to 64, got {k!r}')
    if not 1 <= spec.k_max <= 64:
        _raise(path, name, "speculation.k_max", "expected a number from 1 to 64")
    if spec.draft_timeout <= 0:
        _raise(path, name, "speculation.draft_timeout", "expected a positive number of seconds")
    if spec.consensus not in CONSENSUS_MODES:
        _raise(path, name, "speculation.consensus",
               f"expected one of {', '.join(map(repr, CONSENSUS_MODES))}, got {spec.consensus!r}")
    if spec.consensus_wait < 0:
        _raise(path, name, "speculation.consensus_wait", "expected a number of seconds, 0 or more")
    _check_gate(path, name, prof)
    if prof.cluster is not None:
        _check_cluster(path, name, prof)


#: How several drafters' proposals make one (docs/speculation.md).
CONSENSUS_MODES = ("strict", "majority", "any_disagree")


def _check_gate(path: Path, name: str, prof: Profile) -> None:
    gate = prof.gate
    if gate.pick not in ("round-robin", "least-busy"):
        _raise(path, name, "gate.pick", f'expected "round-robin" or "least-busy", got {gate.pick!r}')
    if gate.review not in ("scores", "judge"):
        _raise(path, name, "gate.review", f'expected "scores" or "judge", got {gate.review!r}')
    if gate.threshold < 0:
        _raise(path, name, "gate.threshold", "expected a margin in nats, 0 or more")
    if not 0.0 <= gate.min_prefix <= 1.0:
        _raise(path, name, "gate.min_prefix", "expected a share from 0 to 1")
    if not 0 <= gate.cache_entries <= 100_000:
        _raise(path, name, "gate.cache_entries", "expected a number from 0 to 100000")
    if gate.draft_timeout <= 0:
        _raise(path, name, "gate.draft_timeout", "expected a positive number of seconds")


def _check_cluster(path: Path, name: str, prof: Profile) -> None:
    from tightwad_core.bench.link import parse_bandwidth, parse_delay
    from tightwad_core.cluster.sizes import parse_size

    cluster = prof.cluster
    assert cluster is not None
    if not cluster.workers:
        _raise(path, name, "cluster.workers", "a cluster needs at least one [[cluster.workers]] entry")
    seen: set[str] = set()
    for i, w in enumerate(cluster.workers):
        where = f"cluster.workers[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", w.name):
            _raise(path, name, f"{where}.name", "letters, digits, '.', '_' and '-' only (at most 64)")
        if w.name in seen:
            _raise(path, name, f"{where}.name", f"two workers are named {w.name!r}")
        seen.add(w.name)
        if not (0 < w.port < 65536 or w.port == 0 and w.launch):
            _raise(path, name, f"{where}.port", f"port {w.port} is out of range (0, a free port, "
                   "only with launch = true)")
        if w.agent is not None:
            _check_url(path, name, f"{where}.agent", w.agent)
        if w.launch and not is_loopback(w.host):
            _raise(path, name, f"{where}.launch", f"only an rpc-server on this machine can be launched, "
                   f"but host is {w.host!r}: run `tightwad rpc-worker` on that machine instead")
        try:
            parse_delay(w.delay)
            if w.bandwidth is not None:
                parse_bandwidth(w.bandwidth)
            if w.memory is not None:
                parse_size(w.memory)
        except ValueError as exc:
            _raise(path, name, where, str(exc))
    if cluster.connect_timeout <= 0 or cluster.rejoin_timeout < 0:
        _raise(path, name, "cluster", "connect_timeout must be positive and rejoin_timeout not negative")


def check_names(path: Path, name: str, prof: Profile, known: Mapping[str, Sequence[str]]) -> None:
    """Check the plugin names a profile uses against what is registered:
    ``known`` maps ``"modes"``, ``"backends"`` and ``"verifiers"`` to names."""
    def one(field: str, value: str, kind: str, extra: tuple[str, ...] = ()) -> None:
        names = [*extra, *known.get(kind, ())]
        if value not in names:
            _raise(path, name, field, f"no {kind[:-1]} named {value!r} (known: {', '.join(names) or 'none'})")

    one("mode", prof.mode, "modes")
    for role in ("target", "draft"):
        cfg = getattr(prof, role)
        if cfg is not None:
            one(f"{role}.backend", cfg.backend, "backends")
    for i, cfg in enumerate(prof.drafters):
        one(f"drafters[{i}].backend", cfg.backend, "backends")
    one("speculation.verifier", prof.speculation.verifier, "verifiers", ("auto",))
    if prof.cluster is not None and "placement_strategies" in known:
        one("cluster.placement", prof.cluster.placement, "placement_strategies")
        for i, w in enumerate(prof.cluster.workers):
            one(f"cluster.workers[{i}].transport", w.transport, "transports")


def profile_names(path: Path) -> list[str]:
    return sorted(load_file(path).profiles)


def to_toml(prof: Profile) -> str:
    """The resolved profile as TOML (TOML has no null: unset fields are left out)."""
    import tomli_w

    data = msgspec.to_builtins(prof)
    return tomli_w.dumps(_drop_none(data))


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):  # arrays of tables: [[cluster.workers]]
        return [_drop_none(v) for v in obj]
    return obj


def secret(value: str | None, env: str | None) -> str | None:
    """A token given inline or through an environment variable."""
    if value:
        return value
    if env:
        return os.environ.get(env) or None
    return None

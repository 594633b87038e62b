"""The agent's settings: the `[peer]` table of tightwad.toml (`PeerConfig`,
defined with the rest of the schema), the command line's overrides, and
their checks, resolved into what the agent runs with (`Settings`)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

from tightwad_core.config.profiles import is_loopback, load_file, parse_listen, secret
from tightwad_core.config.schema import ConfigError, PeerConfig

__all__ = ["ConfigError", "PeerConfig", "Settings", "load_peer", "override", "parse_ports", "resolve"]

MIN_TOKEN = 16
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def load_peer(path: Path, explicit: bool) -> PeerConfig:
    """The file's `[peer]` table (defaults when the file or the table is
    absent and the file was not named explicitly)."""
    if not path.exists() and not explicit:
        return PeerConfig()
    return load_file(path).peer or PeerConfig()


def parse_ports(text: str) -> frozenset[int]:
    """``"50052-50059"``, ``"50052"`` or ``"50052,50060-50061"`` -> the ports."""
    ports: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"rpc_ports: expected ports like \"50052-50059\", got {text!r}") from None
        if not 0 < a <= b < 65536:
            raise ValueError(f"rpc_ports: {part.strip()!r} is not a range of ports (1-65535)")
        ports.update(range(a, b + 1))
    return frozenset(ports)


@dataclass(frozen=True)
class Settings:
    """What a running agent uses: the config, checked, with its token."""

    cfg: PeerConfig
    host: str
    port: int
    token: str | None
    allow: tuple[Network, ...]
    rpc_ports: frozenset[int]
    model_dirs: tuple[Path, ...]

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.host)

    def url(self, port: int | None = None) -> str:
        """The URL clients on this machine reach it at."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port if port is None else port}"


def resolve(cfg: PeerConfig, where: str = "[peer]") -> Settings:
    """Check ``cfg`` and resolve its token; ConfigError (one line) naming the
    field, e.g. for an agent beyond loopback without a token."""
    def bad(field: str, msg: str) -> ConfigError:
        return ConfigError(f"{where} {field}: {msg}")

    try:
        host, port = parse_listen(cfg.listen)
    except ValueError as exc:
        raise bad("listen", str(exc)) from None
    if cfg.token_env and not cfg.token and not os.environ.get(cfg.token_env):
        # named but empty: starting without one would open the agent to every local user
        raise bad("token_env", f"${cfg.token_env} is unset or empty; set it to the token, or "
                  "drop token_env to run without one (loopback only)")
    token = secret(cfg.token, cfg.token_env)
    if token is not None and len(token) < MIN_TOKEN:
        raise bad("token", f"the token is shorter than {MIN_TOKEN} characters")
    if token is None and not is_loopback(host):
        raise bad("listen", f"listening on {host} (beyond loopback) needs a token: set `token_env` "
                  "(or --token-env) to a variable holding one")
    try:
        allow = tuple(ipaddress.ip_network(c, strict=False) for c in cfg.allow)
    except ValueError as exc:
        raise bad("allow", f"{exc} (expected CIDRs like \"192.168.1.0/24\")") from None
    try:
        ports = parse_ports(cfg.rpc_ports)
    except ValueError as exc:
        raise bad("rpc_ports", str(exc).removeprefix("rpc_ports: ")) from None
    if cfg.max_body_bytes < 1024:
        raise bad("max_body_bytes", "expected at least 1024")
    if cfg.announce_interval <= 0:
        raise bad("announce_interval", "expected a positive number of seconds")
    try:
        if not ipaddress.ip_address(cfg.discovery_group).is_multicast:
            raise ValueError(f"{cfg.discovery_group} is not a multicast address")
    except ValueError as exc:
        raise bad("discovery", str(exc)) from None
    if cfg.discovery and cfg.discovery_interface is not None:
        from tightwad_core.peer.discovery import DiscoveryError, resolve_interface

        try:  # an address or a name of one of this machine's interfaces
            resolve_interface(cfg.discovery_interface)
        except DiscoveryError as exc:
            raise bad("discovery_interface", str(exc)) from None
    if not 0 < cfg.discovery_port < 65536:
        raise bad("discovery_port", f"port {cfg.discovery_port} is out of range")
    dirs = tuple(Path(d).expanduser() for d in cfg.model_dirs)
    return Settings(cfg, host, port, token, allow, ports, dirs)


def override(cfg: PeerConfig, **changes: object) -> PeerConfig:
    """``cfg`` with the command line's values (None: not given) in place."""
    given = {k: v for k, v in changes.items() if v is not None}
    return msgspec.structs.replace(cfg, **given) if given else cfg

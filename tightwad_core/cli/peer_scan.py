"""`tightwad peer scan`: what discovery hears on which interface, and for every
known peer whether this machine can reach it, in words a user can act on."""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
import trio

from tightwad_core import __version__
from tightwad_core.cli.main import _fail, config_option, profile_option
from tightwad_core.cli.peer import peer
from tightwad_core.config.profiles import find_config, is_loopback, secret
from tightwad_core.peer.config import ConfigError, PeerConfig, load_peer
from tightwad_core.peer.discovery import (
    DiscoveryError,
    Heard,
    Hearing,
    describe_interfaces,
    hear,
    interfaces,
    resolve_interface,
    tag_for,
)

AGENT_PORT = 9191  # the agent's default TCP port, named in the advice below


@dataclass
class PeerCheck:
    """Whether one peer agent answers, and if not, why (``status`` is one word
    for scripts: ok, refused, timeout, unreachable, dns, tls, not-agent,
    forbidden, no-token, wrong-token, version-mismatch, bad-url; for a heard
    peer whose announcement cannot be trusted with our token: unverified)."""

    url: str
    source: str  # "listed" (--peer, [peer].peers) or "heard on IFACE"
    status: str = "ok"
    message: str = ""
    version: str | None = None
    info: dict[str, Any] | None = None


@dataclass
class Scan:
    group: str
    port: int
    seconds: float
    tag: str
    hearing: Hearing | None = None
    listen_error: str | None = None
    discovery_off: bool = False
    checks: list[PeerCheck] = field(default_factory=list)


# --------------------------------------------------------------------------- one peer


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything under it: causes, contexts and the members of
    exception groups (trio reports a failed connect as a group of OSErrors)."""
    out: list[BaseException] = []
    todo = [exc]
    while todo and len(out) < 64:
        cur = todo.pop()
        if any(cur is seen for seen in out):
            continue
        out.append(cur)
        if isinstance(cur, BaseExceptionGroup):
            todo.extend(cur.exceptions)
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
    return out


def _os_errno(exc: BaseException) -> int | None:
    """The errno of the OSError somewhere under an httpx/anyio exception."""
    for cur in _causes(exc):
        if isinstance(cur, OSError) and cur.errno:
            return cur.errno
    return None


def _is_tls(exc: BaseException) -> bool:
    return any(isinstance(cur, ssl.SSLError) for cur in _causes(exc))


def _gib(n: object) -> str:
    return f"{n / 2**30:.0f} GiB" if isinstance(n, int) and n > 0 else ""


def devices_summary(info: dict[str, Any]) -> str:
    """``"2x NVIDIA H200 (141 GiB), 16 CPUs, 128 GiB RAM"`` from an agent's /v1/peer/info."""
    gpus = info.get("gpus", info.get("devices")) or []
    names: dict[str, int] = {}
    for gpu in gpus if isinstance(gpus, list) else []:
        if isinstance(gpu, dict):
            size = _gib(gpu.get("total"))
            name = str(gpu.get("name") or "GPU") + (f" ({size})" if size else "")
        else:
            name = str(gpu)
        names[name] = names.get(name, 0) + 1
    parts = [f"{n}x {name}" if n > 1 else name for name, n in names.items()] or ["no GPUs"]
    cpu = info.get("cpu")
    cpus = cpu.get("count") if isinstance(cpu, dict) else info.get("cpu_count")
    if isinstance(cpus, int):
        parts.append(f"{cpus} CPUs")
    memory = info.get("memory")
    if isinstance(memory, dict) and _gib(memory.get("total")):
        parts.append(_gib(memory.get("total")) + " RAM")
    return ", ".join(parts)


MAX_ANSWER = 1 << 20  # bytes of a peer's answer read (a heard peer may be anyone)


async def _get(client: httpx.AsyncClient, url: str, token: str | None) -> httpx.Response:
    """GET ``url``; the answer's body cut at MAX_ANSWER bytes (the rest is never read)."""
    from tightwad_core.http.upstream import read_at_most

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with client.stream("GET", url, headers=headers) as resp:
        body, _ = await read_at_most(resp, MAX_ANSWER)
    return httpx.Response(resp.status_code, headers={"content-type": resp.headers.get(
        "content-type", "")}, content=body, request=resp.request)


def _transport_failure(check: PeerCheck, exc: httpx.TransportError, host: str, port: int,
                       udp_port: int, timeout: float) -> PeerCheck:
    where = f"{host}:{port}"
    code = _os_errno(exc)
    if isinstance(exc, httpx.ConnectTimeout):
        check.status, check.message = "timeout", (
            f"timed out after {timeout:g}s connecting to {where}: nothing answers, most likely a "
            f"firewall drops it; on that machine open TCP {port} (the agent) and UDP {udp_port} "
            "(discovery), and check the address")
    elif isinstance(exc, httpx.TimeoutException):
        check.status, check.message = "timeout", (
            f"{where} accepted the connection but sent no answer within {timeout:g}s: the agent "
            "is stuck, or another program holds that port")
    elif code == errno.ECONNREFUSED:
        check.status, check.message = "refused", (
            f"connection refused at {where}: no agent listens there; run `tightwad peer start` "
            f"on that machine, check the port (default {AGENT_PORT}), and that it listens beyond "
            f"loopback (--listen 0.0.0.0:{port}) if it is another machine")
    elif code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        check.status, check.message = "unreachable", (
            f"no route to {host}: the machine is off, on another network, or the address is "
            "wrong")
    elif _is_tls(exc):
        check.status, check.message = "tls", (
            f"TLS failed with {where} ({exc}): the agent serves plain http:// (use that "
            "scheme) or its certificate is not trusted here")
    elif isinstance(exc, httpx.RemoteProtocolError):
        check.status, check.message = "not-agent", (
            f"something at {where} answers, but not HTTP: not a tightwad agent (check the port, "
            f"default {AGENT_PORT})")
    else:
        check.status = "unreachable"
        check.message = f"cannot reach {where}: {exc or type(exc).__name__}"
    return check


def _snippet(resp: httpx.Response) -> str:
    text = resp.text.strip().replace("\n", " ")
    return f"HTTP {resp.status_code} " + (repr(text[:60]) if text else "(empty)")


async def check_peer(url: str, token: str | None, *, source: str = "listed", timeout: float = 3.0,
                     udp_port: int = 9192, untrusted: str | None = None) -> PeerCheck:
    """Ask the agent at ``url`` for GET /v1/peer/health (open) and GET
    /v1/peer/info (with the token) and say what stands in the way. With
    ``untrusted`` (why), the token is not sent and the check ends at health."""
    check = PeerCheck(url=url, source=source)
    try:
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        scheme, host, port = "", None, 0
    if scheme not in ("http", "https") or not host:
        check.status, check.message = "bad-url", (
            f"{url!r} is not an agent URL: write it as http://HOST:{AGENT_PORT}")
        return check
    try:
        with trio.fail_after(timeout):
            await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, trio.TooSlowError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else "the resolver did not answer"
        check.status, check.message = "dns", (
            f"cannot resolve {host!r} ({why}): check the name, or use the machine's IP address")
        return check
    base = url.rstrip("/")
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        try:
            health = await _get(client, base + "/v1/peer/health", None)
            body = health.json() if health.status_code == 200 else None
        except httpx.TransportError as exc:
            return _transport_failure(check, exc, host, port, udp_port, timeout)
        except ValueError:
            body = None
        if health.status_code == 403:
            check.status, check.message = "forbidden", (
                f"the agent refuses this machine's address ({_snippet(health)}): add this "
                "machine's network to the peer's [peer].allow list")
            return check
        if not (isinstance(body, dict) and body.get("ok") is True
                and isinstance(body.get("version"), str)):
            check.status, check.message = "not-agent", (
                f"{host}:{port} answers HTTP but not as a tightwad agent (GET /v1/peer/health "
                f"gave {_snippet(health)}): check the port (the agent's default is {AGENT_PORT})")
            return check
        check.version = str(body["version"])
        if untrusted:
            check.status, check.message = "unverified", (
                f"tightwad {check.version} answers, but not asked with the token: {untrusted} "
                "(list it with --peer if you trust it)")
            return check
        try:
            info = await _get(client, base + "/v1/peer/info", token)
        except httpx.TransportError as exc:
            return _transport_failure(check, exc, host, port, udp_port, timeout)
    return _judge_info(check, info, token)


def _judge_info(check: PeerCheck, info: httpx.Response, token: str | None) -> PeerCheck:
    theirs = check.version
    if info.status_code == 401:
        if token:
            check.status, check.message = "wrong-token", (
                "the agent refused our token (401): the two machines use different tokens; "
                "give both the same one ([peer].token_env, or --token-env here)")
        else:
            check.status, check.message = "no-token", (
                "the agent needs a token and we sent none (401): pass --token-env VAR or set "
                "[peer].token_env to the variable holding the cluster's token")
        return check
    if info.status_code == 403:
        check.status, check.message = "forbidden", (
            f"the agent refuses this machine ({_snippet(info)}): add its network to the peer's "
            "[peer].allow list")
        return check
    try:
        data = info.json() if info.status_code == 200 else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        check.status, check.message = "not-agent", (
            f"GET /v1/peer/info gave {_snippet(info)}, not an agent's answer")
        return check
    check.info = data
    if theirs != __version__:
        check.status, check.message = "version-mismatch", (
            f"version mismatch: ours {__version__}, theirs {theirs}; install the same tightwad "
            "version on both machines")
        return check
    host = data.get("hostname")
    check.message = f"ok: tightwad {theirs}" + (f" on {host}" if host else "") + \
        f", {devices_summary(data)}"
    return check


# --------------------------------------------------------------------------- the scan


async def run_scan(urls: list[str], token: str | None, *, seconds: float, group: str, port: int,
                   interface: str | None, timeout: float) -> Scan:
    """Listen for ``seconds`` while checking ``urls``, then check the peers
    heard with our tag that were not listed."""
    scan = Scan(group=group, port=port, seconds=seconds, tag=tag_for(token))
    checks: dict[str, PeerCheck] = {}

    async def one(url: str, source: str, untrusted: str | None = None) -> None:
        checks[url] = await check_peer(url, token, source=source, timeout=timeout, udp_port=port,
                                       untrusted=untrusted)

    async def listen() -> None:
        try:
            scan.hearing = await hear(seconds, group=group, port=port, interface=interface)
        except DiscoveryError as exc:
            scan.listen_error = str(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        for url in urls:
            nursery.start_soon(one, url, "listed")
    if scan.hearing is not None:
        async with trio.open_nursery() as nursery:
            mine = {addr for _, addr in interfaces()}
            todo = {h.url: h for h in scan.hearing.ours(scan.tag) if h.url not in checks}
            for url, h in todo.items():
                nursery.start_soon(one, url, f"heard on {h.interface}",
                                   _untrusted(h, token, mine))
    scan.checks = [checks[u] for u in urls] + [c for u, c in checks.items() if u not in urls]
    return scan


def _untrusted(h: Heard, token: str | None, mine: set[str]) -> str | None:
    """Why our token must not go to a heard URL, or None when it may: the
    packet is signed with the token. The tag travels in the clear, so anyone
    who heard it could announce their own URL with it and collect the token;
    listed peers are the user's word."""
    if h.signature_ok(token):
        return None
    if not token:
        return None  # no token to leak
    return (f"its announcement (from {h.source}) is not signed with our token, so it may be "
            "anyone who copied the tag")


def _loopback_url(url: str) -> bool:
    try:
        return is_loopback(urlsplit(url).hostname or "")
    except ValueError:
        return False


def scan_to_json(scan: Scan) -> dict[str, Any]:
    h = scan.hearing
    return {
        "group": scan.group, "port": scan.port, "seconds": scan.seconds, "tag": scan.tag,
        "discovery_off": scan.discovery_off, "listen_error": scan.listen_error,
        "interfaces": [{"name": n, "address": a} for n, a in (h.joined if h else [])],
        "heard": [dict(x.to_dict(), ours=x.tag == scan.tag) for x in (h.heard if h else [])],
        "strangers": h.strangers(scan.tag) if h else {},
        "ignored": h.ignored if h else {},
        "peers": [asdict(c) for c in scan.checks],
        "ok": all(c.status == "ok" for c in scan.checks),
    }


def render(scan: Scan) -> list[str]:
    """The scan in words, one line per fact."""
    out: list[str] = []
    h = scan.hearing
    if scan.discovery_off:
        out.append("note: discovery is off in this machine's config ([peer].discovery = false); "
                   "listening anyway")
    if h is None:
        out.append(f"could not listen for announcements: {scan.listen_error}")
    else:
        out.append(f"listened {scan.seconds:g}s on UDP {scan.group}:{scan.port} "
                   f"({describe_interfaces(h.joined)})")
        ours = h.ours(scan.tag)
        mine = {addr for _, addr in interfaces()}
        for x in ours:
            line = (f"  heard on {x.interface}: {x.name} at {x.url} (tightwad {x.version}, "
                    f"from {x.source})")
            if _loopback_url(x.url) and x.source not in mine:
                line += " - it announces a loopback URL that other machines cannot reach"
            out.append(line)
        for iface, n in sorted(h.strangers(scan.tag).items()):
            out.append(f"  {n} stranger{'s' if n != 1 else ''} on {iface} (another token; ignored)")
        for iface, n in sorted(h.ignored.items()):
            out.append(f"  {n} unreadable packet{'s' if n != 1 else ''} on {iface} (ignored)")
        if not h.heard:
            out += [f"  nothing heard in {scan.seconds:g}s. Likely causes:",
                    f"  - multicast is blocked: allow UDP {scan.port} and group {scan.group} in "
                    "the firewall of each machine (some Wi-Fi access points drop multicast)",
                    "  - the peers are on another interface: try --interface with the IPv4 "
                    "address of the one they share with this machine",
                    "  - discovery is off on the peers ([peer].discovery = false, or started "
                    "with --no-discovery), or no agent is running (`tightwad peer start`)",
                    "  - the peers use another port or group ([peer].discovery_port/_group)"]
        elif not ours:
            out.append("  none of them is ours: our peers use another token, or are not running")
    if not scan.checks:
        out.append("no peers to check: list them with --peer URL or [peer].peers")
    for c in scan.checks:
        out.append(f"{c.url} [{c.source}]: {c.message}" if c.status == "ok"
                   else f"{c.url} [{c.source}]: {c.status}: {c.message}")
    return out


# --------------------------------------------------------------------------- the command


def _token(cfg: PeerConfig, token_env: str | None) -> str | None:
    if token_env:
        value = os.environ.get(token_env)
        if not value:
            _fail(f"--token-env {token_env}: that environment variable is not set")
        return value
    return secret(cfg.token, cfg.token_env)


@peer.command("scan")
@click.option("--seconds", default=6.0, show_default=True, type=click.FloatRange(0.1, 600),
              help="How long to listen for announcements.")
@click.option("--peer", "peers", multiple=True, metavar="URL",
              help="An agent URL to check (repeatable), besides [peer].peers.")
@config_option
@profile_option
@click.option("--token-env", default=None, metavar="VAR",
              help="The variable holding the cluster's token (default: [peer].token_env).")
@click.option("--interface", default=None, metavar="IP",
              help="Listen on this interface only (its IPv4 address or name; default: all).")
@click.option("--timeout", default=3.0, show_default=True, type=click.FloatRange(0.1, 120),
              help="Seconds to wait for each peer's answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def scan(seconds: float, peers: tuple[str, ...], config: Path | None, profile: str | None,
         token_env: str | None, interface: str | None, timeout: float, as_json: bool) -> None:
    """Show which peer agents are heard on which interface, and why a peer is
    not reachable.

    Listens for discovery announcements for --seconds, on every interface
    (or --interface), and reports ours (same token) and strangers (another
    token) per interface. Meanwhile it checks every listed peer (--peer,
    [peer].peers) and then every peer heard: ok with its version and devices,
    or refused, timed out, wrong token, version mismatch, not a tightwad
    agent, DNS failure, with what to do about it. Exits 1 when a checked peer
    is not ok.

    \b
    Example:
      tightwad peer scan --peer http://10.0.0.6:9191 --token-env TIGHTWAD_PEER_TOKEN
    """
    del profile  # [peer] is a top-level table; accepted for symmetry with other commands
    try:
        cfg = load_peer(find_config(config), explicit=config is not None)
    except ConfigError as exc:
        _fail(str(exc))
    token = _token(cfg, token_env)
    iface = interface or cfg.discovery_interface
    try:
        resolve_interface(iface)
    except DiscoveryError as exc:
        _fail(str(exc))
    urls = list(dict.fromkeys([*peers, *cfg.peers]))
    result = trio.run(partial(run_scan, urls, token, seconds=seconds, group=cfg.discovery_group,
                              port=cfg.discovery_port, interface=iface, timeout=timeout))
    result.discovery_off = not cfg.discovery
    if as_json:
        click.echo(json.dumps(scan_to_json(result), indent=2))
    else:
        for line in render(result):
            click.echo(line)
    sys.exit(0 if all(c.status == "ok" for c in result.checks) else 1)

"""Finding peer agents on the local network: UDP multicast announcements.

Every agent sends a small JSON packet to a multicast group (default
239.255.91.91, UDP 9192, TTL 1 so it never leaves the LAN) at start and then
every few seconds: its URL, its name, its version and a *tag* derived from the
cluster's token. Listeners keep only the announcements whose tag is theirs;
the rest are counted as strangers (another cluster, another token) and never
used. When the announcer knows the token it also signs the packet (a
timestamp and an HMAC over the fields), so a host that copies the tag cannot
announce a URL of its own to a listener that asks for signed packets.

The arrival interface of each packet is read from IP_PKTINFO, which is what
`tightwad peer scan` shows to tell "heard on lo" from "heard on eth0".
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import trio

from tightwad_core import __version__

log = logging.getLogger("tightwad.discovery")

DEFAULT_GROUP = "239.255.91.91"
DEFAULT_PORT = 9192
MAX_PACKET = 512
MAX_HEARD = 1024  # announcers kept by one listener (a flood must not grow memory)
KIND = "tightwad-peer"
SIGNATURE_WINDOW = 300.0  # seconds a signed packet's timestamp may be off
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux; missing from some Python builds
_SIOCGIFADDR = 0x8915
_PKTINFO_SIZE = 12  # struct in_pktinfo: int ifindex; in_addr spec_dst; in_addr addr


class DiscoveryError(Exception):
    """Discovery cannot run as asked (bad interface, group or port); the message says why."""


def tag_for(token: str | None) -> str:
    """The cluster tag announced instead of the token: agents with the same
    token have the same tag, and the tag does not reveal the token."""
    key = (token or "").encode()
    return hmac.new(key, b"tightwad-peer-discovery", hashlib.sha256).hexdigest()[:16]


# --------------------------------------------------------------------------- interfaces


def _interface_address(name: str) -> str | None:
    """The IPv4 address of interface ``name`` (SIOCGIFADDR), None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])


def interfaces() -> list[tuple[str, str]]:
    """This machine's interfaces that have an IPv4 address: (name, address)."""
    out = []
    for _, name in socket.if_nameindex():
        addr = _interface_address(name)
        if addr:
            out.append((name, addr))
    return out


def describe_interfaces(found: list[tuple[str, str]]) -> str:
    return ", ".join(f"{name} {addr}" for name, addr in found) or "none with an IPv4 address"


def resolve_interface(value: str | None) -> list[tuple[str, str]]:
    """The interfaces to use: ``value`` is an interface's IPv4 address (or its
    name, e.g. ``eth0``); None means every interface with an IPv4 address."""
    found = interfaces()
    if value is None:
        return found
    for name, addr in found:
        if value in (name, addr):
            return [(name, addr)]
    raise DiscoveryError(f"no interface of this machine is {value!r}: give the IPv4 address (or "
                         f"name) of one of: {describe_interfaces(found)}")


def _check_group(group: str, port: int) -> None:
    try:
        packed = socket.inet_aton(group)
    except OSError:
        raise DiscoveryError(f"discovery group {group!r} is not an IPv4 address") from None
    if not 224 <= packed[0] <= 239:
        raise DiscoveryError(f"discovery group {group} is not a multicast address "
                             "(224.0.0.0-239.255.255.255; the default is 239.255.91.91)")
    if not 0 < port < 65536:
        raise DiscoveryError(f"discovery port {port} is not a UDP port (1-65535)")


# --------------------------------------------------------------------------- packets


def _canonical(url: str, tag: str, name: str, version: str, ts: int) -> bytes:
    return json.dumps([url, tag, name, version, ts], separators=(",", ":")).encode()


def signature(token: str, url: str, tag: str, name: str, version: str, ts: int) -> str:
    return hmac.new(token.encode(), _canonical(url, tag, name, version, ts),
                    hashlib.sha256).hexdigest()[:32]


def encode_packet(url: str, tag: str, *, name: str, version: str = __version__,
                  token: str | None = None, now: float | None = None) -> bytes:
    """One announcement; signed when ``token`` is given. Raises DiscoveryError
    when it would not fit in MAX_PACKET bytes (a URL far too long)."""
    body: dict[str, object] = {"t": KIND, "v": 1, "url": url, "tag": tag,
                               "name": name[:64], "version": version[:32]}
    if token:
        ts = int(time.time() if now is None else now)
        body["ts"] = ts
        body["mac"] = signature(token, url, tag, str(body["name"]), str(body["version"]), ts)
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_PACKET:
        raise DiscoveryError(f"announcement for {url!r} is {len(data)} bytes, over the "
                             f"{MAX_PACKET}-byte limit: use a shorter URL and name")
    return data


def _valid_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and len(url) <= 300


def decode_packet(data: bytes) -> dict[str, object] | None:
    """The fields of a well-formed announcement, or None for anything else
    (oversized, not JSON, another kind or version, missing or odd fields)."""
    if len(data) > MAX_PACKET:
        return None
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or body.get("t") != KIND or body.get("v") != 1:
        return None
    for key, limit in (("url", 300), ("tag", 64), ("name", 64), ("version", 32)):
        value = body.get(key)
        if not isinstance(value, str) or len(value) > limit:
            return None
    if not _valid_url(str(body["url"])):
        return None
    ts, mac = body.get("ts"), body.get("mac")
    if (ts is None) != (mac is None):
        return None
    if ts is not None and (not isinstance(ts, int) or isinstance(ts, bool)
                           or not isinstance(mac, str) or len(mac) > 64):
        return None
    return body


# --------------------------------------------------------------------------- what was heard


@dataclass
class Heard:
    """One announcer as heard on one interface."""

    url: str
    tag: str
    name: str
    version: str
    source: str  # the sender's IP address
    interface: str  # the interface the packets arrived on
    first_seen: float
    last_seen: float
    packets: int = 1
    ts: int | None = None  # the latest packet's signature, if it was signed
    mac: str | None = None

    @property
    def signed(self) -> bool:
        return self.mac is not None

    def signature_ok(self, token: str | None) -> bool:
        """The latest packet is signed with ``token`` and its clock is within the window."""
        if not token or self.mac is None or self.ts is None:
            return False
        want = signature(token, self.url, self.tag, self.name, self.version, self.ts)
        return (hmac.compare_digest(want, self.mac)
                and abs(self.last_seen - self.ts) <= SIGNATURE_WINDOW)

    def to_dict(self) -> dict[str, object]:
        return {"url": self.url, "tag": self.tag, "name": self.name, "version": self.version,
                "source": self.source, "interface": self.interface, "packets": self.packets,
                "signed": self.signed, "first_seen": self.first_seen,
                "last_seen": self.last_seen}


@dataclass
class Hearing:
    """Everything a listener heard: announcers (any tag), and per interface
    how many packets it ignored as malformed."""

    heard: list[Heard] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    joined: list[tuple[str, str]] = field(default_factory=list)

    def record(self, body: dict[str, object], source: str, interface: str, now: float) -> Heard:
        url, tag = str(body["url"]), str(body["tag"])
        for h in self.heard:
            if h.url == url and h.tag == tag and h.interface == interface:
                break
        else:
            h = Heard(url, tag, str(body["name"]), str(body["version"]), source, interface,
                      now, now, packets=0)
            self.heard.append(h)
        h.name, h.version, h.source = str(body["name"]), str(body["version"]), source
        ts, mac = body.get("ts"), body.get("mac")
        h.ts = ts if isinstance(ts, int) else None
        h.mac = mac if isinstance(mac, str) else None
        h.last_seen = now
        h.packets += 1
        return h

    def ours(self, tag: str) -> list[Heard]:
        return [h for h in self.heard if h.tag == tag]

    def strangers(self, tag: str) -> dict[str, int]:
        """Interface -> how many announcers with another tag were heard there."""
        out: dict[str, int] = {}
        for h in self.heard:
            if h.tag != tag:
                out[h.interface] = out.get(h.interface, 0) + 1
        return out


# --------------------------------------------------------------------------- sockets


async def _open_listener(group: str, port: int, interface: str | None
                         ) -> tuple[trio.socket.SocketType, list[tuple[str, str]]]:
    _check_group(group, port)
    chosen = resolve_interface(interface)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # agents share the port
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        try:
            await sock.bind((group, port))  # the group's packets only, not other UDP
        except OSError as exc:
            raise DiscoveryError(f"cannot listen on UDP {group}:{port}: {exc.strerror}") from exc
        joined = []
        for name, addr in chosen:
            mreq = socket.inet_aton(group) + socket.inet_aton(addr)
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    log.debug("cannot join %s on %s (%s): %s", group, name, addr, exc)
                    continue
            joined.append((name, addr))
        if not joined:
            raise DiscoveryError(f"could not join multicast group {group} on any interface "
                                 f"({describe_interfaces(chosen)})")
    except BaseException:
        sock.close()
        raise
    return sock, joined


def _arrival(ancdata: list[tuple[int, int, bytes]]) -> str:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _PKTINFO_SIZE:
            index = struct.unpack("i", data[:4])[0]
            try:
                return socket.if_indextoname(index)
            except OSError:
                return f"if{index}"
    return "?"


async def _packets(sock: trio.socket.SocketType
                   ) -> AsyncIterator[tuple[bytes, str, str, bool]]:
    """(data, source address, arrival interface, truncated) for every datagram."""
    while True:
        data, anc, flags, src = await sock.recvmsg(MAX_PACKET + 1,
                                                   socket.CMSG_SPACE(_PKTINFO_SIZE))
        source = str(src[0]) if isinstance(src, tuple) else str(src)
        yield data, source, _arrival(anc), bool(flags & socket.MSG_TRUNC)


async def _hear_into(hearing: Hearing, sock: trio.socket.SocketType) -> None:
    async for data, source, iface, truncated in _packets(sock):
        body = None if truncated else decode_packet(data)
        if body is None:
            hearing.ignored[iface] = hearing.ignored.get(iface, 0) + 1
        elif len(hearing.heard) < MAX_HEARD:
            hearing.record(body, source, iface, time.time())


async def hear(seconds: float, *, group: str = DEFAULT_GROUP, port: int = DEFAULT_PORT,
               interface: str | None = None,
               task_status: trio.TaskStatus[list[tuple[str, str]]] = trio.TASK_STATUS_IGNORED,
               ) -> Hearing:
    """Listen for ``seconds`` and return everything heard, with the
    interfaces joined; ``task_status.started`` fires once the socket listens."""
    sock, joined = await _open_listener(group, port, interface)
    hearing = Hearing(joined=joined)
    with sock:
        task_status.started(joined)
        with trio.move_on_after(seconds):
            await _hear_into(hearing, sock)
    return hearing


async def listen(seconds: float, *, group: str = DEFAULT_GROUP, port: int = DEFAULT_PORT,
                 interface: str | None = None) -> list[Heard]:
    """The announcers heard within ``seconds``, every tag (compare ``Heard.tag``)."""
    return (await hear(seconds, group=group, port=port, interface=interface)).heard


# --------------------------------------------------------------------------- announcing


def _loopback_host(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_on(url: str, addr: str) -> str:
    """An announced URL names a reachable host: an agent listening on every
    address (0.0.0.0) announces the address of the interface it sends on."""
    parts = urlsplit(url)
    if parts.hostname in ("0.0.0.0", "::", ""):
        netloc = addr + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


async def announce_forever(url: str, tag: str, *, name: str, group: str = DEFAULT_GROUP,
                           port: int = DEFAULT_PORT, interface: str | None = None,
                           interval: float = 5.0, token: str | None = None,
                           version: str = __version__,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                           ) -> None:
    """Announce ``url`` now and then every ``interval`` seconds, on ``interface``
    (an IPv4 address or name) or on every interface with an IPv4 address (a
    loopback URL: on loopback only, no other machine could use it).
    With ``token`` the packets are signed. Network errors on one interface are
    logged and retried on the next round; bad arguments raise DiscoveryError."""
    _check_group(group, port)
    if not _valid_url(url):
        raise DiscoveryError(f"cannot announce {url!r}: not an http(s) URL with a host")
    if interval <= 0:
        raise DiscoveryError(f"announce interval must be positive, not {interval}")
    resolve_interface(interface)  # a wrong interface is an error now, not silence later
    encode_packet(url, tag, name=name, version=version, token=token)  # size check
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)  # stay on the LAN
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)  # agents on this host
        task_status.started()
        while True:
            try:
                chosen = resolve_interface(interface)
            except DiscoveryError as exc:  # the interface went away: retry next round
                log.warning("not announcing: %s", exc)
                chosen = []
            if _loopback_host(url):  # only this machine can reach it: keep it off the LAN
                chosen = [(i, a) for i, a in chosen if _loopback_host(f"http://{a}")]
            for iface, addr in chosen:
                data = encode_packet(_url_on(url, addr), tag, name=name, version=version,
                                     token=token)
                try:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                    socket.inet_aton(addr))
                    await sock.sendto(data, (group, port))
                except OSError as exc:
                    log.debug("announcement on %s (%s) failed: %s", iface, addr, exc)
            await trio.sleep(interval)


# --------------------------------------------------------------------------- a running agent


class PeerBook:
    """The peers a running agent has heard: same tag, not itself, heard within
    ``ttl`` seconds. With a token only packets signed with it count (the tag
    travels in the clear, so anyone could copy it onto an announcement of
    their own; a peer in the book is sent the token); ``signed=False`` also
    takes unsigned packets (an agent without a token has nothing to leak)."""

    def __init__(self, token: str | None, *, self_url: str | None = None, ttl: float = 30.0,
                 signed: bool | None = None, self_urls: set[str] | None = None) -> None:
        self.token = token
        self.tag = tag_for(token)
        self.self_url = self_url
        self.self_urls = set(self_urls or ())  # this agent as others hear it, per interface
        self.ttl = ttl
        self.signed = bool(token) if signed is None else signed
        self._peers: dict[str, Heard] = {}
        self.strangers: dict[str, set[str]] = {}  # interface -> source addresses
        self.rejected = 0  # our tag, but unsigned or badly signed when signatures count

    def add(self, heard: Heard) -> bool:
        """Keep ``heard`` if it is one of ours; True when it was kept."""
        if heard.tag != self.tag:
            sources = self.strangers.setdefault(heard.interface, set())
            if len(sources) < MAX_HEARD:
                sources.add(heard.source)
            return False
        if (self.signed or heard.signed) and not heard.signature_ok(self.token):
            self.rejected += 1
            return False
        if heard.url == self.self_url or heard.url in self.self_urls:
            return False
        known = self._peers.get(heard.url)
        if known is not None:
            heard.first_seen, heard.packets = known.first_seen, known.packets + heard.packets
        elif len(self._peers) >= MAX_HEARD:
            self.peers()  # drop the stale ones first
            if len(self._peers) >= MAX_HEARD:
                return False
        self._peers[heard.url] = heard
        return True

    def peers(self, now: float | None = None) -> list[Heard]:
        now = time.time() if now is None else now
        for url in [u for u, h in self._peers.items() if now - h.last_seen > self.ttl]:
            del self._peers[url]
        return sorted(self._peers.values(), key=lambda h: h.url)

    def urls(self) -> list[str]:
        return [h.url for h in self.peers()]


async def discovered(book: PeerBook, *, group: str = DEFAULT_GROUP, port: int = DEFAULT_PORT,
                     interface: str | None = None,
                     task_status: trio.TaskStatus[list[tuple[str, str]]] = trio.TASK_STATUS_IGNORED,
                     ) -> None:
    """Listen until cancelled, keeping the peers heard in ``book`` (its
    ``urls()`` are the agent's discovered peers for pulls)."""
    sock, joined = await _open_listener(group, port, interface)
    with sock:
        task_status.started(joined)
        async for data, source, iface, truncated in _packets(sock):
            body = None if truncated else decode_packet(data)
            if body is not None:
                book.add(Hearing().record(body, source, iface, time.time()))

"""Discovery on real UDP multicast over loopback, and `tightwad peer scan`'s
diagnostics against real (tiny) servers: each failure a user meets is
produced for real and must be named in words they can act on."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from tightwad_core import __version__
from tightwad_core.cli.main import main
from tightwad_core.cli.peer_scan import Scan, check_peer, devices_summary, render, run_scan
from tightwad_core.config.schema import PeerConfig
from tightwad_core.peer import discovery as d
from tightwad_core.peer.agent import run_agent
from tightwad_core.runtime.procs import free_port

LO = "127.0.0.1"
TOKEN = "a-cluster-token-of-enough-length"


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LO, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    """A UDP port of this test's own, so parallel agents on 9192 are not heard."""
    return udp_port()


def announcer(url: str, token: str | None, port: int, *, name: str = "node",
              sign: bool = False) -> Callable[..., Awaitable[None]]:
    return partial(d.announce_forever, url, d.tag_for(token), name=name, port=port,
                   interface=LO, interval=0.1, token=token if sign else None)


# --------------------------------------------------------------------------- packets


def test_tag_is_derived_from_the_token() -> None:
    assert d.tag_for(TOKEN) == d.tag_for(TOKEN)
    assert d.tag_for(TOKEN) != d.tag_for(TOKEN + "x")
    assert d.tag_for(None) == d.tag_for("")
    assert len(d.tag_for(TOKEN)) == 16 and int(d.tag_for(TOKEN), 16) >= 0
    assert TOKEN not in d.tag_for(TOKEN)


def test_packets_round_trip_and_bad_ones_are_refused() -> None:
    data = d.encode_packet("http://10.0.0.5:9191", "abc", name="n1", token=TOKEN)
    body = d.decode_packet(data)
    assert body is not None and body["url"] == "http://10.0.0.5:9191" and body["mac"]
    assert len(data) <= d.MAX_PACKET
    good = json.loads(data)
    bad: list[bytes] = [
        b"", b"\xff\xfe", b"not json", b"[1,2]", json.dumps({**good, "t": "other"}).encode(),
        json.dumps({**good, "v": 2}).encode(), json.dumps({**good, "url": 5}).encode(),
        json.dumps({**good, "url": "ftp://x/"}).encode(),
        json.dumps({**good, "url": "http://x:99999"}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "tag"}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "mac"}).encode(),
        json.dumps({**good, "name": "x" * 600}).encode(),
        json.dumps({**good, "pad": "x" * 500}).encode(),  # well-formed but oversized
    ]
    for packet in bad:
        assert d.decode_packet(packet) is None, packet[:60]
    with pytest.raises(d.DiscoveryError, match="over the 512-byte limit"):
        d.encode_packet("http://h/" + "x" * 600, "abc", name="n")


def test_bad_interface_and_group_are_one_line_errors() -> None:
    with pytest.raises(d.DiscoveryError, match="no interface of this machine is '10.9.9.9'.*lo"):
        d.resolve_interface("10.9.9.9")
    assert d.resolve_interface("lo") == [("lo", LO)]
    assert ("lo", LO) in d.interfaces()


async def test_announce_refuses_bad_arguments(port: int) -> None:
    with pytest.raises(d.DiscoveryError, match="not a multicast address"):
        await d.announce_forever("http://x:1", "t", name="n", group="10.0.0.1", port=port)
    with pytest.raises(d.DiscoveryError, match="not an http"):
        await d.announce_forever("x:1", "t", name="n", port=port)


# --------------------------------------------------------------------------- multicast on lo


async def test_peers_with_our_token_are_heard_on_lo_and_strangers_are_not_used(port: int) -> None:
    book = d.PeerBook(TOKEN, self_url="http://127.0.0.1:9999")
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(d.discovered, book, port=port, interface=LO))
        for url, token, sign in (("http://127.0.0.1:9191", TOKEN, True),
                                 ("http://127.0.0.2:9191", TOKEN, True),
                                 ("http://127.0.0.3:9191", "another-token-entirely", True),
                                 # our tag copied onto an unsigned packet: never a peer
                                 ("http://127.0.0.4:9191", TOKEN, False),
                                 ("http://127.0.0.1:9999", TOKEN, True)):  # the book's own agent
            await nursery.start(announcer(url, token, port, sign=sign))
        hearing = await d.hear(0.6, port=port, interface=LO)
        nursery.cancel_scope.cancel()
    ours = sorted((h.url, h.interface, h.source) for h in hearing.ours(d.tag_for(TOKEN)))
    assert ours == [("http://127.0.0.1:9191", "lo", LO), ("http://127.0.0.1:9999", "lo", LO),
                    ("http://127.0.0.2:9191", "lo", LO), ("http://127.0.0.4:9191", "lo", LO)]
    assert hearing.strangers(d.tag_for(TOKEN)) == {"lo": 1}
    assert book.rejected >= 1  # the unsigned copy
    assert all(h.packets >= 3 for h in hearing.heard)  # at start, then every interval
    assert hearing.joined == [("lo", LO)] and hearing.ignored == {}
    assert book.urls() == ["http://127.0.0.1:9191", "http://127.0.0.2:9191"]
    assert book.strangers == {"lo": {LO}}
    assert book.peers(now=time.time() + 1e6) == []  # forgotten once stale


async def test_wildcard_urls_name_each_interface_and_loopback_stays_local(port: int) -> None:
    """On every interface: 0.0.0.0 becomes that interface's address, and a
    loopback URL goes out on loopback only."""
    async with trio.open_nursery() as nursery:
        for url in ("http://0.0.0.0:9191", "http://127.0.0.1:9292"):
            await nursery.start(partial(d.announce_forever, url, "t", name="n", port=port,
                                        interval=0.1))
        hearing = await d.hear(0.5, port=port)
        nursery.cancel_scope.cancel()
    heard = sorted((h.interface, h.url) for h in hearing.heard)
    want = sorted([(name, f"http://{addr}:9191") for name, addr in d.interfaces()]
                  + [("lo", "http://127.0.0.1:9292")])
    assert heard == want


async def test_malformed_and_oversized_packets_are_ignored(port: int) -> None:
    good = d.encode_packet("http://127.0.0.1:9191", d.tag_for(TOKEN), name="ok")
    junk = [b"garbage", b"{}", json.dumps({"t": "tightwad-peer", "v": 1}).encode(),
            good[:-1] + b',"pad":"' + b"x" * 600 + b'"}',  # oversized: truncated on arrival
            bytes(4000)]
    result: list[d.Hearing] = []

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        result.append(await d.hear(0.5, port=port, interface=LO, task_status=task_status))

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LO))
            for packet in [*junk, good]:
                s.sendto(packet, (d.DEFAULT_GROUP, port))
    hearing = result[0]
    assert [h.url for h in hearing.heard] == ["http://127.0.0.1:9191"]
    assert hearing.ignored == {"lo": len(junk)}


async def test_signed_book_refuses_a_copied_tag(port: int) -> None:
    """Someone who heard our tag announces their own URL with it: a book that
    wants signatures ignores it, and a forged signature counts against anyone."""
    book = d.PeerBook(TOKEN, signed=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(d.discovered, book, port=port, interface=LO))
        await nursery.start(announcer("http://127.0.0.1:9191", TOKEN, port, sign=True))
        await nursery.start(announcer("http://127.0.0.6:6666", TOKEN, port))  # tag, no token
        forged = json.loads(d.encode_packet("http://127.0.0.1:9191", d.tag_for(TOKEN),
                                            name="x", token=TOKEN))
        forged["url"] = "http://127.0.0.7:7777"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LO))
            for _ in range(3):
                s.sendto(json.dumps(forged).encode(), (d.DEFAULT_GROUP, port))
                await trio.sleep(0.1)
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    assert book.urls() == ["http://127.0.0.1:9191"]
    assert book.rejected >= 4
    assert d.PeerBook(TOKEN).add(d.Hearing().record(forged, LO, "lo", forged["ts"])) is False


# --------------------------------------------------------------------------- stand-in servers


async def serve_http(nursery: trio.Nursery, answer: Callable[[str, dict[str, str]],
                                                              tuple[int, Any] | None],
                     host: str = LO) -> str:
    """A plain HTTP/1.1 server: ``answer(path, headers)`` -> (status, JSON
    body), or None to accept and never answer."""

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        head = data.split(b"\r\n\r\n")[0].decode().split("\r\n")
        path = head[0].split(" ")[1]
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        got = answer(path, headers)
        if got is None:
            await trio.sleep_forever()
        status, body = got
        raw = json.dumps(body).encode()
        await stream.send_all(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n".encode()
                              + raw)

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host=host))
    return f"http://{host}:{listeners[0].socket.getsockname()[1]}"


def agent_like(version: str = __version__, token: str | None = TOKEN,
               ) -> Callable[[str, dict[str, str]], tuple[int, Any]]:
    def answer(path: str, headers: dict[str, str]) -> tuple[int, Any]:
        if path == "/v1/peer/health":
            return 200, {"ok": True, "version": version}
        if token and headers.get("authorization") != f"Bearer {token}":
            return 401, {"error": {"message": "missing or wrong bearer token"}}
        if path == "/v1/peer/info":
            return 200, {"version": version, "hostname": "standin", "cpu": {"count": 4},
                         "gpus": [{"name": "Fake GPU", "total": 8 << 30}] * 2,
                         "memory": {"total": 16 << 30}}
        return 404, {}
    return answer


async def test_scan_names_every_failure(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        ok = await serve_http(nursery, agent_like())
        old = await serve_http(nursery, agent_like(version="0.0.1"))
        other = await serve_http(nursery, lambda p, h: (200, {"status": "up", "models": []}))
        silent = await serve_http(nursery, lambda p, h: None)
        refused = f"http://{LO}:{free_port()}"
        checks = {
            "ok": await check_peer(ok, TOKEN),
            "wrong": await check_peer(ok, "not-the-token"),
            "none": await check_peer(ok, None),
            "old": await check_peer(old, TOKEN),
            "other": await check_peer(other, TOKEN),
            "silent": await check_peer(silent, TOKEN, timeout=0.3),
            "refused": await check_peer(refused, TOKEN),
            "dns": await check_peer("http://no-such-host.invalid:9191", TOKEN, timeout=2),
            "bad": await check_peer("10.0.0.5:9191", TOKEN),
        }
        nursery.cancel_scope.cancel()
    summary = "standin, 2x Fake GPU (8 GiB), 4 CPUs, 16 GiB RAM"
    expect = {"ok": ("ok", f"ok: tightwad {__version__} on {summary}"),
              "wrong": ("wrong-token", "different tokens"),
              "none": ("no-token", "--token-env"),
              "old": ("version-mismatch", f"ours {__version__}, theirs 0.0.1"),
              "other": ("not-agent", "not as a tightwad agent"),
              "silent": ("timeout", "accepted the connection but sent no answer within 0.3s"),
              "refused": ("refused", "no agent listens there; run `tightwad peer start`"),
              "dns": ("dns", "cannot resolve 'no-such-host.invalid'"),
              "bad": ("bad-url", "not an agent URL")}
    for key, (status, words) in expect.items():
        assert checks[key].status == status, (key, checks[key])
        assert words in checks[key].message, (key, checks[key].message)


async def test_firewall_like_drop_is_a_timeout_naming_the_ports() -> None:
    """A listening socket whose backlog is full drops SYNs, as a firewall does."""
    with socket.socket() as full:
        full.bind((LO, 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((LO, port))
            fillers.append(c)
        await trio.sleep(0.1)
        try:
            check = await check_peer(f"http://{LO}:{port}", TOKEN, timeout=0.5, udp_port=9192)
        finally:
            for c in fillers:
                c.close()
    assert check.status == "timeout"
    assert f"open TCP {port}" in check.message and "UDP 9192" in check.message


def test_devices_summary_without_gpus() -> None:
    assert devices_summary({"gpus": [], "cpu": {"count": 8}}) == "no GPUs, 8 CPUs"


# --------------------------------------------------------------------------- the scan


async def test_scan_hears_checks_heard_peers_and_counts_strangers(port: int) -> None:
    async with trio.open_nursery() as nursery:
        good = await serve_http(nursery, agent_like())
        await nursery.start(announcer(good, TOKEN, port, name="alpha", sign=True))
        await nursery.start(announcer("http://127.0.0.9:1", "other-token", port))
        listed = f"http://{LO}:{free_port()}"
        scan = await run_scan([listed], TOKEN, seconds=0.5, group=d.DEFAULT_GROUP, port=port,
                              interface=LO, timeout=1)
        nursery.cancel_scope.cancel()
    assert [(c.url, c.source, c.status) for c in scan.checks] == [
        (listed, "listed", "refused"), (good, "heard on lo", "ok")]
    text = "\n".join(render(scan))
    assert f"heard on lo: alpha at {good}" in text
    assert "1 stranger on lo (another token; ignored)" in text
    assert "http://127.0.0.9:1" not in text


async def test_scan_sends_the_token_only_where_the_announcement_can_be_trusted(
        port: int) -> None:
    """A URL naming another host than the sender's, unsigned, could be anyone's
    copy of our tag: scan asks its health but never sends it the token."""
    seen: list[str | None] = []
    answer = agent_like()

    def recording(path: str, headers: dict[str, str]) -> tuple[int, Any]:
        seen.append(headers.get("authorization"))
        return answer(path, headers)

    async def scan_with(sign: bool, host: str = "127.0.0.2") -> Any:
        """The announcement comes from 127.0.0.3 (another machine, as far as
        scan can tell) and names the server on ``host``."""
        async with trio.open_nursery() as nursery:
            far = await serve_http(nursery, recording, host=host)
            packet = d.encode_packet(far, d.tag_for(TOKEN), name="far",
                                     token=TOKEN if sign else None)

            async def send() -> None:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                    out.bind(("127.0.0.3", 0))
                    out.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LO))
                    while True:
                        out.sendto(packet, (d.DEFAULT_GROUP, port))
                        await trio.sleep(0.1)

            nursery.start_soon(send)
            scan = await run_scan([], TOKEN, seconds=0.4, group=d.DEFAULT_GROUP, port=port,
                                  interface=LO, timeout=2)
            nursery.cancel_scope.cancel()
        return scan.checks

    unsigned = await scan_with(sign=False)
    assert [c.status for c in unsigned] == ["unverified"]
    assert "(from 127.0.0.3) is not signed with our token" in unsigned[0].message
    assert seen == [None]  # health only, no token
    # naming its own address proves nothing either: whoever copied the tag can do that
    own = await scan_with(sign=False, host="127.0.0.3")
    assert [c.status for c in own] == ["unverified"] and seen == [None, None]
    signed = await scan_with(sign=True)
    assert [c.status for c in signed] == ["ok"] and seen[-1] == f"Bearer {TOKEN}"


def test_scan_flags_a_loopback_url_heard_from_another_machine() -> None:
    hearing = d.Hearing(joined=[("eth0", "10.1.2.1")])
    body = json.loads(d.encode_packet("http://127.0.0.1:9191", d.tag_for(TOKEN), name="far"))
    hearing.record(body, "10.1.2.3", "eth0", time.time())
    scan = Scan(group=d.DEFAULT_GROUP, port=9192, seconds=1, tag=d.tag_for(TOKEN),
                hearing=hearing)
    assert "far at http://127.0.0.1:9191 (tightwad" in "\n".join(render(scan))
    assert "announces a loopback URL that other machines cannot reach" in "\n".join(render(scan))


async def test_scan_cli_json_and_nothing_heard(port: int, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        good = await serve_http(nursery, agent_like())
        cfg = tmp_path / "tightwad.toml"
        cfg.write_text(f'[peer]\ntoken_env = "SCAN_TEST_TOKEN"\ndiscovery_port = {port}\n'
                       f'peers = ["{good}"]\n')
        env = {"SCAN_TEST_TOKEN": TOKEN}
        args = ["peer", "scan", "--config", str(cfg), "--seconds", "0.3", "--interface", LO]

        def invoke(*extra: str) -> Any:
            return CliRunner().invoke(main, [*args, *extra], env=env)

        as_json = await trio.to_thread.run_sync(invoke, "--json")
        plain = await trio.to_thread.run_sync(invoke, "--peer", f"http://{LO}:{free_port()}")
        bad = await trio.to_thread.run_sync(invoke, "--interface", "10.9.9.9")
        nursery.cancel_scope.cancel()
    assert as_json.exit_code == 0, as_json.output
    out = json.loads(as_json.output)
    assert [(p["url"], p["status"]) for p in out["peers"]] == [(good, "ok")]
    assert out["heard"] == [] and out["interfaces"] == [{"name": "lo", "address": LO}]
    assert plain.exit_code == 1
    assert "nothing heard in 0.3s" in plain.output and "try --interface" in plain.output
    assert "refused" in plain.output and "--no-discovery" in plain.output
    assert bad.exit_code == 2 and "no interface of this machine is '10.9.9.9'" in bad.output


# --------------------------------------------------------------------------- the real agent


def agent_config(port: int, **kw: Any) -> PeerConfig:
    return PeerConfig(listen=f"{LO}:0", token=TOKEN, discovery_port=port, discovery_interface=LO,
                      announce_interval=0.2, **kw)


async def test_a_real_agent_is_heard_on_lo_and_reachable(port: int, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        state = await nursery.start(partial(run_agent, agent_config(port), run_path=tmp_path,
                                            signals=False))
        scan = await run_scan([], TOKEN, seconds=0.8, group=d.DEFAULT_GROUP, port=port,
                              interface=LO, timeout=10)
        wrong = await check_peer(state.url, "some-other-token-here", timeout=10)
        nursery.cancel_scope.cancel()
    assert [(c.url, c.source, c.status) for c in scan.checks] == [(state.url, "heard on lo", "ok")]
    assert scan.checks[0].message.startswith(f"ok: tightwad {__version__} on ")
    assert wrong.status == "wrong-token"


async def test_discovery_off_sends_nothing(port: int, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        state = await nursery.start(partial(run_agent, agent_config(port, discovery=False),
                                            run_path=tmp_path, signals=False))
        hearing = await d.hear(0.8, port=port, interface=LO)
        reachable = await check_peer(state.url, TOKEN, timeout=10)
        nursery.cancel_scope.cancel()
    assert hearing.heard == [] and hearing.ignored == {}
    assert reachable.status == "ok"  # the agent runs; it just does not announce

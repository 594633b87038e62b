"""Swarm on real servers on loopback: manifests, pulls from several seeds
(one killed mid-transfer, one sending corrupt pieces), a killed pull resumed,
delta pulls, two pullers feeding each other, and the routes' refusals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
from click.testing import CliRunner
from quart import Response
from quart_trio import QuartTrio

from tightwad_core.cli.main import main
from tightwad_core.http.serving import serve_app
from tightwad_core.runtime.procs import free_port
from tightwad_core.swarm import routes
from tightwad_core.swarm.manifest import (
    Manifest,
    SwarmError,
    encode_manifest,
    load_manifest,
    make_manifest,
    manifest_path,
    write_manifest,
)
from tightwad_core.swarm.pull import PeerSource, PullFailed, pull
from tightwad_core.swarm.routes import piece_app, serve_pieces
from tightwad_core.swarm.store import Bitfield, SeedStore

PS = 256 << 10
EXE = str(Path(sys.executable).parent / "tightwad")


def make_file(path: Path, size: int, seed: int = 0) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    write_manifest(make_manifest(path, PS), manifest_path(path))
    return path


def same(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


@asynccontextmanager
async def servers() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def start_seed(nursery: trio.Nursery, *files: Path, token: str | None = None,
                     rate: float | None = None, store: SeedStore | None = None) -> tuple[str, SeedStore]:
    store = store or SeedStore()
    for f in files:
        store.add(f, load_manifest(manifest_path(f)))
    url = await nursery.start(partial(serve_pieces, store, "127.0.0.1", 0, trio.Event(),
                                      token=token, rate_limit=rate))
    return url, store


async def evil_seed(nursery: trio.Nursery, file: Path, mangle: Callable[[bytes], bytes]) -> str:
    """A seed that serves the right manifest but ``mangle(piece)`` for every piece."""
    entry = SeedStore().add(file, load_manifest(manifest_path(file)))
    app = QuartTrio("evil-seed")

    @app.get("/v1/swarm/files/<name>/manifest")
    async def manifest(name: str) -> Response:
        return Response(encode_manifest(entry.manifest), content_type="application/json")

    @app.get("/v1/swarm/files/<name>/bitfield")
    async def bitfield(name: str) -> dict[str, object]:
        return {"have": entry.have_hex()[0], "count": entry.manifest.count}

    @app.get("/v1/swarm/files/<name>/pieces/<int:index>")
    async def piece(name: str, index: int) -> Response:
        return Response(mangle(entry.read_piece(index)), content_type="application/octet-stream")

    urls = await nursery.start(partial(serve_app, app, "127.0.0.1", 0, trio.Event()))
    return str(urls[0]).rstrip("/")


def partial_name(out: Path, sha: str, kind: str = "swarm-partial") -> Path:
    return out.with_name(f".{out.name}.{sha[:16]}.{kind}")


async def seed_process(file: Path, *args: str) -> tuple[trio.Process, str]:
    """`tightwad swarm seed` on a free port; returns it and its URL."""
    proc = await trio.lowlevel.open_process([EXE, "swarm", "seed", str(file), "--listen",
                                             "127.0.0.1:0", *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(20):
        while b"serving until" not in buf:
            chunk = await proc.stdout.receive_some()
            assert chunk, f"seed exited: {buf!r}"
            buf += chunk
    url = buf.split(b" at ", 1)[1].split(b"\n", 1)[0].decode()
    return proc, url


# ------------------------------------------------------------------ manifests


def test_bitfield_round_trip_and_refusals() -> None:
    bf = Bitfield(11)
    for i in (0, 3, 10):
        bf.set(i)
    assert bf.count() == 3 and bf.missing() == [1, 2, 4, 5, 6, 7, 8, 9]
    assert Bitfield.from_hex(bf.to_hex(), 11).data == bf.data
    assert Bitfield.full(11).count() == 11 and Bitfield.full(11).complete()
    with pytest.raises(SwarmError, match="past its last piece"):
        Bitfield.from_hex("ffff", 11)
    with pytest.raises(SwarmError, match="bytes for"):
        Bitfield.from_hex("ff", 11)


def test_manifest_written_and_refusals(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(random.Random(1).randbytes(PS * 3 + 100))
    res = CliRunner().invoke(main, ["swarm", "manifest", str(f), "--piece-size", "256KiB", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    m = load_manifest(manifest_path(f))
    assert (info["pieces"], m.count, m.size, m.piece_size) == (4, 4, PS * 3 + 100, PS)
    assert m.span(3) == (3 * PS, 100)
    import hashlib
    assert m.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert m.pieces[1] == hashlib.sha256(f.read_bytes()[PS:2 * PS]).hexdigest()

    bad = tmp_path / "bad.json"
    cases = {
        b"{not json": "not valid JSON",
        json.dumps({"format": "tightwad-moe-routing", "version": 1}).encode(): "not a swarm manifest",
        json.dumps({**json.loads(manifest_path(f).read_text()), "version": 2}).encode(): "version 2",
        json.dumps({**json.loads(manifest_path(f).read_text()), "size": PS * 9}).encode():
            "4 piece hashes for",
        json.dumps({**json.loads(manifest_path(f).read_text()), "name": "../x"}).encode():
            "bad file name",
        json.dumps({**json.loads(manifest_path(f).read_text()), "name": "a\nb.gguf"}).encode():
            "bad file name",
        json.dumps({**json.loads(manifest_path(f).read_text()), "name": "a\x1b[2Jb"}).encode():
            "bad file name",
        json.dumps({**json.loads(manifest_path(f).read_text()), "name": "a\x7fb"}).encode():
            "bad file name",
        json.dumps({**json.loads(manifest_path(f).read_text()), "name": ".hidden"}).encode():
            "bad file name",
        json.dumps({**json.loads(manifest_path(f).read_text()), "sha256": "zz"}).encode(): "hex",
        json.dumps({**json.loads(manifest_path(f).read_text()), "piece_size": "big"}).encode():
            "not a valid swarm manifest",
    }
    for data, words in cases.items():
        bad.write_bytes(data)
        with pytest.raises(SwarmError, match=words) as err:
            load_manifest(bad)
        assert "\n" not in str(err.value)
    res = CliRunner().invoke(main, ["swarm", "manifest", str(tmp_path / "missing")])
    assert res.exit_code == 2 and res.output.startswith("error: cannot read") and res.output.count("\n") == 1
    res = CliRunner().invoke(main, ["swarm", "manifest", str(f), "--piece-size", "1KiB"])
    assert res.exit_code == 2 and "outside" in res.output


# ------------------------------------------------------------------ pulls


async def test_pull_from_three_seeds(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    src = make_file(tmp_path / "a" / "model.bin", 24 << 20)
    out = tmp_path / "out"
    out.mkdir()
    async with servers() as nursery:
        urls = [(await start_seed(nursery, src, rate=15e6))[0] for _ in range(3)]
        result = await pull("model.bin", [PeerSource(u) for u in urls], out)
    assert same(src, out / "model.bin")
    assert result.sha256 == load_manifest(manifest_path(src)).sha256
    pieces = [result.per_peer[u].pieces for u in urls]
    assert sum(pieces) == 96 and min(pieces) >= 10, pieces  # every seed did its share
    assert all(result.per_peer[u].dropped is None for u in urls)
    assert result.bytes_transferred >= 24 << 20 and result.bytes_reused == 0
    assert result.bytes_transferred - result.bytes_wasted == 24 << 20  # the rest: duplicates
    assert load_manifest(manifest_path(out / "model.bin")).sha256 == result.sha256
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial or state left


async def test_seed_killed_mid_transfer(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    src = make_file(tmp_path / "s" / "model.bin", 16 << 20)
    procs = []
    try:
        async def start() -> None:
            procs.append(await seed_process(src, "--rate", "5MB"))

        async with trio.open_nursery() as starting:
            for _ in range(3):
                starting.start_soon(start)
        victim = procs[0]
        urls = [u for _, u in procs]

        def progress(p: object) -> None:
            stats = getattr(p, "peers", {}).get(victim[1])
            if stats is not None and stats.bytes > 1 << 20 and victim[0].returncode is None:
                victim[0].send_signal(signal.SIGKILL)

        result = await pull("model.bin", [PeerSource(u) for u in urls], tmp_path, progress=progress)
    finally:
        for proc, _ in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    assert victim[0].returncode == -signal.SIGKILL
    assert same(src, tmp_path / "model.bin")
    assert result.per_peer[victim[1]].dropped is not None
    assert result.per_peer[victim[1]].pieces < 64
    assert all(result.per_peer[u].dropped is None for u in urls[1:])


async def test_corrupt_and_oversized_seeds_dropped(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    src = make_file(tmp_path / "s" / "model.bin", 16 << 20)

    def corrupt(data: bytes) -> bytes:  # the fault: one flipped byte in every piece
        out = bytearray(data)
        out[len(out) // 2] ^= 0xFF
        return bytes(out)

    async with servers() as nursery:
        good, _ = await start_seed(nursery, src, rate=10e6)
        bad = await evil_seed(nursery, src, corrupt)
        big = await evil_seed(nursery, src, lambda data: data + b"x" * 1000)
        result = await pull("model.bin", [PeerSource(u) for u in (bad, good, big)], tmp_path)
    assert same(src, tmp_path / "model.bin")
    assert "corrupt piece" in (result.per_peer[bad].dropped or "")
    assert "bytes" in (result.per_peer[big].dropped or "")
    assert result.per_peer[good].dropped is None
    assert result.per_peer[bad].pieces == 0 and result.per_peer[big].pieces == 0
    # the corrupt piece came over the wire, counted there, and as of no use
    assert result.per_peer[bad].bytes >= PS
    assert result.bytes_wasted >= result.per_peer[bad].bytes
    assert result.bytes_transferred - result.bytes_wasted == 16 << 20


async def test_killed_pull_resumes(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    src = make_file(tmp_path / "s" / "model.bin", 16 << 20)
    out = tmp_path / "out"
    out.mkdir()
    sha = load_manifest(manifest_path(src)).sha256
    state = partial_name(out / "model.bin", sha, "swarm-state.json")
    async with servers() as nursery:
        urls = [(await start_seed(nursery, src, rate=3e6))[0] for _ in range(2)]
        argv = [EXE, "swarm", "pull", "model.bin", "--out", str(out), "--json"]
        for u in urls:
            argv += ["--peer", u]
        serve = f"127.0.0.1:{free_port()}"
        proc = await trio.lowlevel.open_process([*argv, "--serve", serve], stdout=subprocess.DEVNULL)
        with trio.fail_after(30):
            while True:
                await trio.sleep(0.05)
                try:
                    held = Bitfield.from_hex(json.loads(state.read_text())["have"], 64).count()
                except (OSError, ValueError, KeyError):
                    continue
                if held >= 16:
                    break
        async with httpx.AsyncClient() as client:  # the pull serves what it has verified
            served = (await client.get(f"http://{serve}/v1/swarm/files/model.bin/bitfield")).json()
        assert served["count"] >= held
        proc.kill()
        await proc.wait()
        assert not (out / "model.bin").exists() and partial_name(out / "model.bin", sha).exists()
        done = await trio.run_process(argv, capture_stdout=True)
    result = json.loads(done.stdout)
    assert same(src, out / "model.bin")
    assert result["bytes_resumed"] >= 16 * PS
    # only what was missing came over (and a few end-game duplicates)
    assert result["bytes_transferred"] <= (16 << 20) - result["bytes_resumed"] + 4 * PS
    assert result["bytes_transferred"] - result["bytes_wasted"] == (16 << 20) - result["bytes_resumed"]
    assert not state.exists()


@pytest.mark.parametrize("with_manifest", [True, False])
async def test_delta_pull_reuses_shared_pieces(tmp_path: Path, with_manifest: bool) -> None:
    old_dir, seed_dir, out = tmp_path / "old", tmp_path / "seed", tmp_path / "out"
    for d in (old_dir, seed_dir, out):
        d.mkdir()
    old = make_file(old_dir / "model-v1.bin", 16 << 20, seed=3)
    if not with_manifest:
        manifest_path(old).unlink()  # found by hashing a file of a similar size instead
    data = bytearray(old.read_bytes())
    changed = random.Random(4).sample(range(64), 16)
    for i in changed:
        data[i * PS + 7] ^= 0x5A
    new = seed_dir / "model-v2.bin"
    new.write_bytes(data)
    write_manifest(make_manifest(new, PS), manifest_path(new))
    async with servers() as nursery:
        url, _ = await start_seed(nursery, new)
        result = await pull("model-v2.bin", [PeerSource(url)], out, reuse_dirs=[old_dir])
    assert same(new, out / "model-v2.bin")
    assert result.bytes_reused == 48 * PS
    assert 0.22 * (16 << 20) <= result.bytes_transferred <= 0.32 * (16 << 20)
    assert result.per_peer[url].pieces == 16


async def test_two_pullers_help_each_other(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    src = make_file(tmp_path / "s" / "model.bin", 12 << 20)
    outs = [tmp_path / "a", tmp_path / "b"]
    for d in outs:
        d.mkdir()
    async with servers() as nursery:
        seed, _ = await start_seed(nursery, src, rate=4e6)
        stores = [SeedStore(), SeedStore()]
        me = [await start_seed(nursery, store=s) for s in stores]
        results: list = [None, None]

        async def one(k: int) -> None:
            peers = [PeerSource(seed), PeerSource(me[1 - k][0])]
            results[k] = await pull("model.bin", peers, outs[k], store=stores[k], refresh=0.3)

        async with trio.open_nursery() as pulls:
            pulls.start_soon(one, 0)
            pulls.start_soon(one, 1)
    for k in (0, 1):
        assert same(src, outs[k] / "model.bin")
        assert results[k].per_peer[me[1 - k][0]].pieces >= 6, results[k].per_peer
    from_seed = sum(r.per_peer[seed].bytes for r in results)
    assert from_seed < 1.6 * (12 << 20)  # without each other, the seed sends two copies


async def test_peers_offering_another_file_are_dropped(tmp_path: Path) -> None:
    for d in ("s1", "s2", "out"):
        (tmp_path / d).mkdir()
    src = make_file(tmp_path / "s1" / "model.bin", 2 << 20, seed=1)
    other = make_file(tmp_path / "s2" / "model.bin", 2 << 20, seed=2)
    async with servers() as nursery:
        a, _ = await start_seed(nursery, src)
        b, _ = await start_seed(nursery, src)
        c, _ = await start_seed(nursery, other)
        result = await pull("model.bin", [PeerSource(c), PeerSource(a), PeerSource(b)],
                            tmp_path / "out")
        assert "another file" in (result.per_peer[c].dropped or "")
        assert same(src, tmp_path / "out" / "model.bin")
        sha = load_manifest(manifest_path(other)).sha256
        result = await pull(sha, [PeerSource(a), PeerSource(c)], tmp_path / "out" / "other.bin")
        assert same(other, tmp_path / "out" / "other.bin") and result.per_peer[a].dropped


def test_pull_that_cannot_finish_names_each_peer(tmp_path: Path) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner().invoke(main, ["swarm", "pull", "model.bin", "--out", str(tmp_path),
                                    "--peer", f"http://127.0.0.1:{port}"])
    assert res.exit_code == 1, res.output
    assert "connection refused" in res.output and str(port) in res.output
    assert res.output.count("\n") == 1
    res = CliRunner().invoke(main, ["swarm", "pull", "m", "--peer", "10.0.0.1:9191"])
    assert res.exit_code == 2 and "expected a URL" in res.output


# ------------------------------------------------------------------ the routes' refusals


async def test_path_like_names_are_404(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    src = make_file(tmp_path / "s" / "model.bin", 1 << 20)
    (tmp_path / "secret").write_bytes(b"do not serve")
    (tmp_path / "s" / "unlisted.bin").write_bytes(b"x" * 1000)
    async with servers() as nursery:
        url, _ = await start_seed(nursery, src)
        async with httpx.AsyncClient() as client:
            ok = await client.get(f"{url}/v1/swarm/files/model.bin/pieces/0")
            assert ok.status_code == 200 and len(ok.content) == PS
            for raw in ("..%2Fsecret/manifest", "%2E%2E/manifest", "..%2F..%2Fsecret/pieces/0",
                        "unlisted.bin/manifest", "model.bin.manifest.json/manifest",
                        "%2Fetc%2Fpasswd/bitfield", "model.bin/pieces/4", "model.bin/pieces/-1",
                        "model.bin/pieces/..%2F..%2Fsecret"):
                resp = await client.get(httpx.URL(url, raw_path=f"/v1/swarm/files/{raw}".encode()))
                assert resp.status_code == 404, (raw, resp.status_code)
                assert b"do not serve" not in resp.content and b"root:" not in resp.content


async def test_token_protected_seed_refuses_without_it(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    src = make_file(tmp_path / "s" / "model.bin", 1 << 20)
    routes = ["/v1/swarm/files", "/v1/swarm/files/model.bin/manifest",
              "/v1/swarm/files/model.bin/bitfield", "/v1/swarm/files/model.bin/pieces/0",
              "/v1/swarm/files/nope/manifest"]
    async with servers() as nursery:
        url, _ = await start_seed(nursery, src, token="s3cret")
        async with httpx.AsyncClient() as client:
            for path in routes:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                    resp = await client.get(url + path, headers=headers)
                    assert resp.status_code == 401, (path, headers)
            good = {"Authorization": "Bearer s3cret"}
            listing = (await client.get(url + routes[0], headers=good)).json()
            assert listing["files"][0]["name"] == "model.bin" and listing["files"][0]["have"] == 4
        with pytest.raises(PullFailed, match="401"):
            await pull("model.bin", [PeerSource(url, "wrong")], tmp_path)
        result = await pull("model.bin", [PeerSource(url, "s3cret")], tmp_path)
        assert same(src, Path(result.path))
    with pytest.raises(SwarmError, match="without a token"):
        piece_app(SeedStore(), token=None, host="0.0.0.0")
    res = CliRunner().invoke(main, ["swarm", "seed", str(src), "--listen", "0.0.0.0:0"])
    assert res.exit_code == 2 and "beyond loopback" in res.output
    res = CliRunner(env={"EMPTY_TOKEN": ""}).invoke(
        main, ["swarm", "seed", str(src), "--token-env", "EMPTY_TOKEN"])
    assert res.exit_code == 2 and "not set" in res.output


def test_manifest_struct_is_the_contract() -> None:
    m = Manifest(name="a.bin", size=0, piece_size=PS, pieces=[], sha256="0" * 64)
    assert (m.format, m.version, m.count) == ("tightwad-swarm-manifest", 1, 0)
    assert os.path.basename(str(manifest_path(Path("/x/a.bin")))) == "a.bin.manifest.json"


# ------------------------------------------------------------------ bounds and stale entries


async def test_piece_reads_are_streamed_and_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    src = tmp_path / "big.bin"
    src.write_bytes(random.Random(5).randbytes(8 << 20))
    write_manifest(make_manifest(src, 1 << 20), manifest_path(src))
    honest = routes.read_exact
    lock, now, seen = threading.Lock(), [0], {"most": 0, "largest": 0}

    def slow_read(fd: int, length: int, offset: int) -> bytes:
        with lock:
            now[0] += 1
            seen["most"] = max(seen["most"], now[0])
            seen["largest"] = max(seen["largest"], length)
        time.sleep(0.01)
        try:
            return honest(fd, length, offset)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(routes, "read_exact", slow_read)
    data = src.read_bytes()
    async with servers() as nursery:
        url, _ = await start_seed(nursery, src)
        async with httpx.AsyncClient(timeout=30) as client:
            async def get(i: int) -> None:
                resp = await client.get(f"{url}/v1/swarm/files/big.bin/pieces/{i % 8}")
                assert resp.status_code == 200 and resp.content == data[(i % 8) << 20:][:1 << 20]

            async with trio.open_nursery() as gets:
                for i in range(24):
                    gets.start_soon(get, i)
    assert 2 <= seen["most"] <= routes.MAX_READS, seen
    assert seen["largest"] <= routes.READ_CHUNK < 1 << 20  # never a whole piece at once


async def test_unreadable_piece_is_a_clean_503(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    src = make_file(tmp_path / "s" / "model.bin", 1 << 20)
    async with servers() as nursery:
        url, _ = await start_seed(nursery, src)
        async with httpx.AsyncClient() as client:
            base = f"{url}/v1/swarm/files/model.bin/pieces"
            with open(src, "r+b") as f:
                f.truncate(PS + 10)  # cut short under the seed
            assert (await client.get(f"{base}/0")).status_code == 200
            for path in (f"{base}/3", f"{base}/1"):
                resp = await client.get(path)
                assert resp.status_code == 503, resp.text
                assert "shorter than its manifest" in resp.json()["error"]["message"]
            src.unlink()
            resp = await client.get(f"{base}/0")
            assert resp.status_code == 503 and "cannot be read here" in resp.json()["error"]["message"]
            assert "\n" not in resp.json()["error"]["message"]


def test_store_keys_by_sha_and_follows_a_moved_file(tmp_path: Path) -> None:
    a = make_file(tmp_path / "a.bin", PS * 2, seed=1)
    (tmp_path / "d").mkdir()
    b = make_file(tmp_path / "d" / "a.bin", PS * 2, seed=2)
    ma, mb = load_manifest(manifest_path(a)), load_manifest(manifest_path(b))
    store = SeedStore()
    first = store.add(a, ma)
    store.add(b, mb)
    assert store.get(ma.sha256) is first and store.get("a.bin").path == b  # type: ignore[union-attr]
    assert store.names() == ["a.bin", "a.bin"]
    moved = tmp_path / "moved.bin"
    os.replace(a, moved)
    store.add(moved, ma)  # a finished pull's rename: same bytes, new path
    entry, fd = store.open_piece(first, 1)  # the old entry still in a request's hands
    os.close(fd)
    assert entry.path == moved and entry.read_piece(1) == moved.read_bytes()[PS:]
    store.add(moved, mb)  # another file written over that path: the old entry is gone
    assert store.get(ma.sha256) is None and store.get(mb.sha256).path == moved  # type: ignore[union-attr]
    store.remove(mb.sha256, b)
    assert store.get(mb.sha256) is not None
    store.remove(mb.sha256)
    assert store.names() == []


async def test_pull_keeps_other_files_of_its_name_served(tmp_path: Path) -> None:
    for d in ("s1", "s2", "out"):
        (tmp_path / d).mkdir()
    a = make_file(tmp_path / "s1" / "model.bin", 2 << 20, seed=1)
    b = make_file(tmp_path / "s2" / "model.bin", 2 << 20, seed=2)
    c = make_file(tmp_path / "out" / "model.bin", 1 << 20, seed=3)  # replaced by the pull
    sha_a, sha_b, sha_c = (load_manifest(manifest_path(f)).sha256 for f in (a, b, c))
    async with servers() as nursery:
        remote, _ = await start_seed(nursery, b)
        mine, store = await start_seed(nursery, a, c)
        await pull(sha_b, [PeerSource(remote)], tmp_path / "out", store=store)
        async with httpx.AsyncClient() as client:
            resp = await client.get(f"{mine}/v1/swarm/files/{sha_a}/pieces/1")
            assert resp.content == a.read_bytes()[PS:2 * PS]
            listing = (await client.get(f"{mine}/v1/swarm/files")).json()["files"]
    assert sorted(f["sha256"] for f in listing) == sorted([sha_a, sha_b])
    assert store.get(sha_c) is None  # its file was replaced
    assert store.get("model.bin").path == tmp_path / "out" / "model.bin"  # type: ignore[union-attr]


async def test_pull_that_fails_is_no_longer_served_and_exits_1(tmp_path: Path) -> None:
    for d in ("s", "out", "out2"):
        (tmp_path / d).mkdir()
    src = make_file(tmp_path / "s" / "model.bin", 1 << 20)
    liar = msgspec.structs.replace(load_manifest(manifest_path(src)), sha256="0" * 64)
    store = SeedStore()
    async with servers() as nursery:
        lying = SeedStore()
        lying.add(src, liar)  # every piece right, the whole file's hash wrong
        url, _ = await start_seed(nursery, store=lying)
        with pytest.raises(PullFailed, match="whole file's SHA-256"):
            await pull("model.bin", [PeerSource(url)], tmp_path / "out", store=store)
        assert store.names() == []  # its partial file is gone, so is the entry
        argv = [EXE, "swarm", "pull", "model.bin", "--peer", url, "--out"]
        done = await trio.run_process([*argv, str(tmp_path / "out")], capture_stdout=True,
                                      capture_stderr=True, check=False)
        assert done.returncode == 1 and b"whole file's SHA-256" in done.stderr, done.stderr
        partial_name(tmp_path / "out2" / "model.bin", liar.sha256).mkdir()  # cannot be written
        done = await trio.run_process([*argv, str(tmp_path / "out2")], capture_stdout=True,
                                      capture_stderr=True, check=False)
        assert done.returncode == 1 and b"cannot write" in done.stderr, done.stderr
        assert done.stderr.count(b"\n") == 1
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


async def test_same_name_pulls_keep_their_partial_files_apart(tmp_path: Path) -> None:
    for d in ("s1", "s2", "out"):
        (tmp_path / d).mkdir()
    a = make_file(tmp_path / "s1" / "model.bin", 3 << 20, seed=1)
    b = make_file(tmp_path / "s2" / "model.bin", 3 << 20, seed=2)
    shas = [load_manifest(manifest_path(f)).sha256 for f in (a, b)]
    results: dict[str, object] = {}
    async with servers() as nursery:
        urls = [(await start_seed(nursery, f, rate=6e6))[0] for f in (a, b)]

        async def one(url: str, sha: str) -> None:
            results[sha] = await pull(sha, [PeerSource(url)], tmp_path / "out")

        async with trio.open_nursery() as pulls:
            for url, sha in zip(urls, shas):
                pulls.start_soon(one, url, sha)
    assert set(results) == set(shas)  # both finished, each checked whole
    assert (tmp_path / "out" / "model.bin").read_bytes() in (a.read_bytes(), b.read_bytes())
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


async def test_a_slow_big_piece_is_not_a_stall(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    src = make_file(tmp_path / "s" / "model.bin", PS)  # one piece, 1.3 s at this rate
    async with servers() as nursery:
        url, _ = await start_seed(nursery, src, rate=200e3)
        result = await pull("model.bin", [PeerSource(url)], tmp_path, stall_timeout=0.5)
        assert same(src, Path(result.path)) and result.transfer_seconds > 0.8
        (tmp_path / "model.bin").unlink()
        (tmp_path / "model.bin.manifest.json").unlink()
        stuck, stuck_store = await start_seed(nursery, src)
        entry = stuck_store.get("model.bin")
        assert entry is not None
        entry.have.set(0, False)  # holds nothing, bytes never come
        with pytest.raises(PullFailed, match="nothing arrived for"):
            await pull("model.bin", [PeerSource(stuck)], tmp_path, stall_timeout=0.5)

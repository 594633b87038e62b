"""Tree verification on the worker: several greedy branches checked in one
decode pick the right branch, leave the session's cache holding exactly the
accepted path, lend free sequences and give them back, refuse bad trees,
leave other sessions alone; and the worker verifier sends trees and trusted
tokens."""

from __future__ import annotations

import math
import random
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import msgspec
import pytest
import trio

from tightwad_core.spec.interfaces import Proposal, SamplingParams
from tightwad_plugins.verifiers.worker import WorkerVerifier
from tightwad_plugins.worker.cli import RunningWorker, serve_worker
from tightwad_plugins.worker.protocol import VerifyRequest
from tightwad_plugins.worker.tree import TreeJob, accept_tree, build_trie

pytestmark = pytest.mark.usefixtures("llama_cpp_installed")


async def start(nursery: trio.Nursery, model: Path, **kw: Any) -> RunningWorker:
    kw.setdefault("ctx", 512)
    kw.setdefault("threads", 1)
    kw.setdefault("slots", 4)
    return await nursery.start(partial(serve_worker, model, "127.0.0.1", 0, **kw))


async def verify(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post("/v1/tightwad/verify", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def tokenize(client: httpx.AsyncClient, text: str) -> list[int]:
    r = await client.post("/tokenize", json={"content": text, "add_special": True})
    return r.json()["tokens"]  # type: ignore[no-any-return]


async def greedy(client: httpx.AsyncClient, context: list[int], n: int,
                 gaps: list[float] | None = None) -> list[int]:
    """The target's own greedy continuation, one token per chain round (and
    its top-2 gap at each position into ``gaps``)."""
    out = await verify(client, tokens=context)
    sid, past, cont = out["session"], out["n_past"], [out["token"]]
    seen = list(out["gaps"])
    while len(cont) < n:
        out = await verify(client, session=sid, past=past, tokens=[cont[-1]])
        past, cont = out["n_past"], cont + [out["token"]]
        seen += out["gaps"]
    assert (await client.delete(f"/v1/tightwad/sessions/{sid}")).status_code == 204
    if gaps is not None:
        gaps[:] = seen
    return cont


def same_up_to_a_near_tie(got: list[int], ref: list[int], gaps: list[float]) -> None:
    """``got`` is ``ref``, or leaves it only where the target nearly tied: a
    decode batched with other sessions' tokens may round a near-tie the
    other way (llama.cpp is not batch-invariant)."""
    at = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), None)
    if at is None:
        assert len(got) <= len(ref)
        return
    assert gaps[at] < 1.0, (at, gaps[at], got, ref)


def wrong(tok: int, n_vocab: int, by: int = 1) -> int:
    return (tok + by) % n_vocab


def test_trie_merges_prefixes_and_orders_by_depth() -> None:
    import numpy as np

    trie = build_trie([[1, 2, 3], [1, 2, 4], [5], []])
    assert trie.tokens == [1, 5, 2, 3, 4] and trie.depth == [0, 0, 1, 2, 2]
    assert trie.branches == [[0, 1], [2], [0, 1], [0], [1]]
    eye = np.eye(8, dtype=np.float32)
    # the target says 1, 2, 4, 7: branch 1 wins with 3 accepted, 7 is its token
    path, token, gaps = accept_tree(eye[1], [eye[2], eye[0], eye[4], eye[0], eye[7]], trie)
    assert (path, token, len(gaps)) == ([0, 2, 4], 7, 4)


async def test_tree_picks_the_branch_a_chain_would_accept(nursery: trio.Nursery,
                                                          tiny_model: Path) -> None:
    w = await start(nursery, tiny_model)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        n_vocab = (await client.get("/v1/tightwad/info")).json()["n_vocab"]
        prompt = await tokenize(client, "The quick brown fox jumps over")
        cont = await greedy(client, prompt, 30)
        good = cont[1:7]  # what the target says after prompt + cont[0]
        bad = [wrong(t, n_vocab) for t in good]
        half = good[:3] + bad[3:]
        cases = [  # (branches, winning branch, accepted)
            ([good, bad, half], 0, 6),
            ([bad, half, good], 2, 6),  # the winner is not branch 0: its path is copied over
            ([bad, half], 1, 3),
            ([bad, half, good[:3] + [wrong(good[3], n_vocab, 2)]], 1, 3),  # lowest through the deepest
            ([bad, [wrong(t, n_vocab, 3) for t in good]], 0, 0),
        ]
        for branches, branch, accepted in cases:
            first = await verify(client, tokens=prompt)
            sid, past = first["session"], first["n_past"]
            before = w.engine.context.tree_decodes
            out = await verify(client, session=sid, past=past, tokens=[cont[0]],
                               branches=branches)
            assert (out["branch"], out["accepted"]) == (branch, accepted), (branches, out)
            assert out["token"] == cont[1 + accepted]
            assert out["branches_verified"] == len(branches)
            assert out["tree_nodes"] == len(build_trie(branches))
            assert len(out["gaps"]) == accepted + 1
            assert w.engine.context.tree_decodes == before + 1  # one decode for the whole tree
            # the cache holds exactly the accepted path, nothing rejected
            assert out["n_past"] == past + 1 + accepted
            seq = w.engine.table.by_id[sid].slot.seq
            assert seq.tokens == prompt + cont[:1 + accepted]
            # a chain verify of the winning branch on a fresh session agrees
            chain = await verify(client, tokens=prompt + [cont[0]] + branches[branch],
                                 draft=len(branches[branch]))
            assert (chain["accepted"], chain["token"]) == (accepted, out["token"])
            # and the session goes on as the target alone does
            nxt = await verify(client, session=sid, past=out["n_past"], draft=3,
                               tokens=[out["token"], *cont[2 + accepted:5 + accepted]])
            assert (nxt["accepted"], nxt["token"]) == (3, cont[5 + accepted])
            assert w.engine.table.borrowed() == 0
            for s in (sid, first["session"]):
                await client.delete(f"/v1/tightwad/sessions/{s}")
            await client.delete(f"/v1/tightwad/sessions/{chain['session']}")
        info = (await client.get("/v1/tightwad/info")).json()
        assert info["slots_in_use"] == 0 and info["capabilities"]["tree"] is True


async def test_random_trees_emit_the_targets_own_output(nursery: trio.Nursery,
                                                        tiny_model: Path) -> None:
    """Many rounds of random branch sets (correct prefixes of random lengths,
    then wrong tokens, shared prefixes, duplicates): every round's verdict is
    the longest correct prefix, and the output is the target's alone."""
    w = await start(nursery, tiny_model, slots=8)  # every branch gets a sequence
    rng = random.Random(7)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        n_vocab = (await client.get("/v1/tightwad/info")).json()["n_vocab"]
        prompt = await tokenize(client, "once upon a time there was")
        n = 120
        cont = await greedy(client, prompt, n + 20)
        out = await verify(client, tokens=prompt)
        sid, past, emitted = out["session"], out["n_past"], [out["token"]]
        non_zero = 0
        while len(emitted) < n:
            truth = cont[len(emitted):len(emitted) + 8]
            branches = []
            for _ in range(rng.randint(1, 5)):
                ok = rng.randint(0, 6)
                tail = [rng.randrange(n_vocab) for _ in range(rng.randint(0, 3))]
                br = truth[:ok] + ([wrong(truth[ok], n_vocab, rng.randint(1, 9))] if ok < 8 else [])
                branches.append((br + tail)[:8])
            if rng.random() < 0.2:
                branches.append(list(branches[0]))
            best = [max(i for i in range(len(br) + 1) if br[:i] == truth[:i]) for br in branches]
            want_acc = max(best)
            want_branch = best.index(want_acc) if want_acc else 0
            r = await verify(client, session=sid, past=past, tokens=[emitted[-1]],
                             branches=branches)
            assert (r["accepted"], r["branch"]) == (want_acc, want_branch), (branches, truth, r)
            assert r["branches_verified"] == len(branches)
            emitted += branches[r["branch"]][:r["accepted"]] + [r["token"]]
            past = r["n_past"]
            assert past == len(prompt) + len(emitted) - 1
            non_zero += r["branch"] != 0
        assert emitted == cont[:len(emitted)]
        assert non_zero > 0
        assert w.engine.table.borrowed() == 0


async def test_more_branches_than_free_sequences(nursery: trio.Nursery, tiny_model: Path) -> None:
    w = await start(nursery, tiny_model, slots=3)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        n_vocab = (await client.get("/v1/tightwad/info")).json()["n_vocab"]
        prompt = await tokenize(client, "hello there friend")
        cont = await greedy(client, prompt, 8)
        bad = [wrong(t, n_vocab) for t in cont[1:5]]
        branches = [bad, cont[1:3] + bad[2:], bad[:1] + cont[2:5], cont[1:5]]
        other = await verify(client, tokens=prompt)  # holds one of the three sequences
        mine = await verify(client, tokens=prompt)
        # one sequence is free: branches 0 and 1 are checked, the correct branch 3 is not
        out = await verify(client, session=mine["session"], past=mine["n_past"],
                           tokens=[cont[0]], branches=branches)
        assert out["branches_verified"] == 2
        assert (out["branch"], out["accepted"], out["token"]) == (1, 2, cont[3])
        assert out["tree_nodes"] == len(build_trie(branches[:2]))
        # with every sequence held, only branch 0 is checked (a chain)
        third = await verify(client, tokens=prompt)
        out2 = await verify(client, session=mine["session"], past=out["n_past"],
                            tokens=[out["token"]], branches=[cont[4:7], bad])
        assert (out2["branches_verified"], out2["accepted"], out2["token"]) == (1, 3, cont[7])
        info = (await client.get("/v1/tightwad/info")).json()
        assert info["slots_in_use"] == 3 and w.engine.table.borrowed() == 0
        # the idle sessions' caches were never lent
        for s in (other, third):
            assert w.engine.table.by_id[s["session"]].slot.seq.tokens == prompt


async def test_split_cache_checks_branch_zero_only(nursery: trio.Nursery,
                                                  tiny_model: Path) -> None:
    """Without shared cells (``--no-kv-unified``) a tree is checked as a chain."""
    w = await start(nursery, tiny_model, kv_unified=False)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        n_vocab = (await client.get("/v1/tightwad/info")).json()["n_vocab"]
        prompt = await tokenize(client, "hello there friend")
        cont = await greedy(client, prompt, 6)
        first = await verify(client, tokens=prompt)
        out = await verify(client, session=first["session"], past=first["n_past"],
                           tokens=[cont[0]], branches=[cont[1:3], cont[1:5]])
        assert (out["branches_verified"], out["branch"], out["accepted"]) == (1, 0, 2)
        bad = [wrong(t, n_vocab) for t in cont[4:6]]  # branch 1 is right, and not checked
        out = await verify(client, session=first["session"], past=out["n_past"],
                           tokens=[out["token"]], branches=[bad, cont[4:6]])
        assert (out["accepted"], out["token"]) == (0, cont[4])
        info = (await client.get("/v1/tightwad/info")).json()
        assert info["capabilities"]["tree"] is False and w.engine.table.borrowed() == 0


async def test_bad_tree_requests_are_400(nursery: trio.Nursery, tiny_model: Path) -> None:
    w = await start(nursery, tiny_model)
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        first = await verify(client, tokens=[1, 2, 3])
        base = {"session": first["session"], "past": 3, "tokens": [first["token"]]}
        cases = [
            ({"branches": [[4]], "sampling": {"temperature": 0.8}}, "branches"),
            ({"tokens": [first["token"], 4], "draft": 1, "branches": [[4]]}, "draft"),
            ({"branches": [[i] for i in range(9)]}, "branches"),
            ({"branches": []}, "branches"),
            ({"branches": [[1] * 65]}, "branches"),
            ({"branches": [[10**6]]}, "branches"),
            ({"branches": [[-1]]}, "branches"),
            ({"branches": [[b * 64 + i for i in range(64)] for b in range(3)]}, "branches"),
            ({"tokens": [], "branches": [[4]]}, "tokens"),
            ({"branches": [[1] * 60], "past": 3, "tokens": [1] * 460}, "messages"),
        ]
        for extra, param in cases:
            r = await client.post("/v1/tightwad/verify", json={**base, **extra})
            assert r.status_code == 400, (extra, r.text)
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param", "code"}
            assert err["param"] == param, (extra, err)
        # a refused tree changed nothing: the session continues, no sequence is lent
        out = await verify(client, **base, branches=[[4, 5]])
        assert out["n_past"] == 4 + out["accepted"]
        assert w.engine.table.borrowed() == 0


async def test_other_sessions_are_undisturbed(nursery: trio.Nursery, tiny_model: Path) -> None:
    w = await start(nursery, tiny_model, slots=6)
    async with httpx.AsyncClient(base_url=w.url, timeout=60) as client:
        n_vocab = (await client.get("/v1/tightwad/info")).json()["n_vocab"]
        prompts = [await tokenize(client, t) for t in ("the cat sat on", "a b c d", "why is")]
        gaps: list[list[float]] = [[], [], []]
        alone = [await greedy(client, p, 50, gaps[i]) for i, p in enumerate(prompts)]
        got: dict[int, list[int]] = {}

        async def chain(i: int) -> None:
            got[i] = await greedy(client, prompts[i], 50)

        async def trees(i: int) -> None:
            rng = random.Random(i)
            out = await verify(client, tokens=prompts[i])
            sid, past, emitted = out["session"], out["n_past"], [out["token"]]
            while len(emitted) < 40:
                truth = alone[i][len(emitted):len(emitted) + 4]
                branches = [[wrong(t, n_vocab) for t in truth], truth[:rng.randint(0, 4)],
                            [rng.randrange(n_vocab) for _ in range(3)]]
                r = await verify(client, session=sid, past=past, tokens=[emitted[-1]],
                                 branches=branches)
                emitted += branches[r["branch"]][:r["accepted"]] + [r["token"]]
                past = r["n_past"]
            got[10 + i] = emitted

        async with trio.open_nursery() as inner:
            inner.start_soon(chain, 0)
            inner.start_soon(chain, 1)
            inner.start_soon(trees, 2)
            inner.start_soon(trees, 0)
        for key, i in ((0, 0), (1, 1), (12, 2), (10, 0)):
            same_up_to_a_near_tie(got[key], alone[i], gaps[i])
        assert len(got[0]) == len(got[1]) == 50
        assert w.engine.context.tree_decodes > 0 and w.engine.table.borrowed() == 0


async def test_cancelled_tree_gives_its_sequences_back(nursery: trio.Nursery,
                                                       tiny_model: Path) -> None:
    w = await start(nursery, tiny_model)
    eng = w.engine
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        prompt = await tokenize(client, "hello world")
        cont = await greedy(client, prompt, 6)
        first = await verify(client, tokens=prompt)
        sid, past = first["session"], first["n_past"]
        body = {"session": sid, "past": past, "tokens": [cont[0]],
                "branches": [[1, 2], cont[1:4], [3]]}
        req = msgspec.convert(body, VerifyRequest)

        def tree_waiting() -> bool:
            return any(isinstance(j, TreeJob) for j in eng.scheduler.pending)

        async def run(done: trio.Event) -> None:
            try:
                await eng.verify(req)
            except Exception:  # noqa: BLE001 (a shutdown refuses it)
                pass
            finally:
                done.set()

        seen = 0
        for _ in range(6):  # cancelled while the tree waits for (or runs in) its step
            done = trio.Event()
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    inner.start_soon(run, done)
                    while not (tree_waiting() or done.is_set()):
                        await trio.sleep(0)
                    seen += tree_waiting()
                    scope.cancel()
            assert eng.table.borrowed() == 0
            seq = eng.table.by_id[sid].slot.seq
            assert seq.tokens == prompt + cont[:len(seq.tokens) - len(prompt)]
        assert seen > 0
        out = await verify(client, **body)
        assert (out["branch"], out["accepted"], out["token"]) == (1, 3, cont[4])

        # shutting down with a tree in flight leaves no sequence lent either
        done = trio.Event()
        nursery.start_soon(run, done)
        with trio.fail_after(10):
            while not (tree_waiting() or done.is_set()):
                await trio.sleep(0)
        w.shutdown.set()
        with trio.fail_after(20):
            await done.wait()
        assert eng.table.borrowed() == 0


class _Backend(SimpleNamespace):
    client: httpx.AsyncClient
    where: str


async def test_verifier_sends_trees_and_trusted_tokens(nursery: trio.Nursery,
                                                       tiny_model: Path) -> None:
    w = await start(nursery, tiny_model)
    verifier = WorkerVerifier(None)
    assert verifier.tree and verifier.trusts
    async with httpx.AsyncClient(base_url=w.url, timeout=30) as client:
        n_vocab = (await client.get("/v1/tightwad/info")).json()["n_vocab"]
        prompt = await tokenize(client, "The quick brown fox jumps over")
        cont = await greedy(client, prompt, 30)
        verifier.backend = _Backend(client=client, where=w.url)
        sess = await verifier.open(prompt, SamplingParams())
        # trusted tokens are taken as they are, then the rest is checked
        v = await sess.verify(Proposal(tokens=cont[:5], trusted=2))
        assert (v.accepted, v.token, v.branch) == (5, cont[5], 0)
        emitted = cont[:5] + [v.token]
        # wrong trusted tokens are kept too: the target continues after them
        junk = [wrong(cont[6], n_vocab), wrong(cont[7], n_vocab)]
        v = await sess.verify(Proposal(tokens=junk + [1, 2], trusted=2))
        assert v.accepted >= 2 and v.gaps is not None and len(v.gaps) == v.accepted + 1
        assert all(math.isnan(g) for g in v.gaps[:2])
        emitted += (junk + [1, 2])[:v.accepted] + [v.token]
        after = await greedy(client, prompt + emitted, 12)
        # a tree: the right branch is the last one
        bad = [wrong(t, n_vocab) for t in after[:4]]
        v = await sess.verify(Proposal(tokens=bad, branches=[bad, after[:2] + bad[2:], after[:4]]))
        assert (v.branch, v.accepted, v.token) == (2, 4, after[4])
        emitted += after[:5]
        # trusted and branches together: branches that do not start with the trusted
        # tokens check nothing
        more = after[5:]
        v = await sess.verify(Proposal(tokens=more[:2] + bad[:2], trusted=1,
                                       branches=[more[:2] + bad[:2], bad, more[:4]]))
        assert (v.branch, v.accepted, v.token) == (2, 4, more[4])
        emitted += more[:5]
        v = await sess.verify(Proposal(tokens=[]))
        assert v.token == after[10]
        assert sess.accepted == prompt + emitted + [v.token]  # type: ignore[attr-defined]
        await sess.aclose()
        assert w.engine.table.borrowed() == 0

"""Multi-drafter consensus: the three rules as pure functions, verified
consensus on a worker target with real llama-server drafters of different
quality (greedy output is the target's own in every rule; seeded sampling
stays inside the target's support), drafters that are down or slow never
stall a round, approximate consensus is labelled and its divergence from the
target measured, and the configurations it refuses."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import trio
from conftest import start_proxy

from tightwad_core.config.profiles import BackendConfig, ConfigError, Profile, SpeculationConfig
from tightwad_core.runtime.procs import free_port
from tightwad_core.spec.consensus import (
    ConsensusDrafter,
    agreed,
    branches_of,
    majority_path,
    metrics,
    outcomes,
    snapshot,
    strict_prefix,
)
from tightwad_core.spec.interfaces import Proposal, SamplingParams, Verdict
from tightwad_core.testing.tinymodels import tiny_pair
from tightwad_plugins.verifiers.worker import WorkerVerifier, fit_nodes
from tightwad_plugins.worker.protocol import MAX_TREE_NODES

# crafted so every rule gives a different chain
CHAINS = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 7, 8]]
PROMPTS = ("the cat sat on", "once upon a time", "hello world")
GREEDY = SamplingParams(temperature=0.0)


def test_rules_differ_on_a_crafted_case() -> None:
    assert strict_prefix(CHAINS) == 2 and agreed("strict", CHAINS) == [1, 2]
    assert majority_path(CHAINS) == [1, 2, 3]  # 3 is proposed by 2 of 3; then 4 and 5 by one each
    assert agreed("any_disagree", CHAINS) == [1, 2]
    assert branches_of(CHAINS, lead=2) == [[1, 2, 7, 8], [1, 2, 3, 4], [1, 2, 3, 5]]
    assert branches_of([[1, 2], [1, 2, 3], [1, 2]], lead=0) == [[1, 2, 3]]  # a prefix adds nothing
    assert majority_path([[1, 2], [3, 4]]) == []  # one of two is no majority
    assert strict_prefix([[5, 6, 7]]) == 3 and majority_path([[5, 6, 7]]) == [5, 6, 7]


class _Scripted:
    """Proposes a fixed chain (the input of the engine-free combination)."""

    def __init__(self, name: str, chain: list[int]) -> None:
        self.name, self.chain = name, chain

    async def propose(self, context: list[int], k: int, sampling: SamplingParams) -> Proposal:
        return Proposal(tokens=self.chain[:k], q=[{t: 1.0} for t in self.chain[:k]])


def _fleet(rule: str, **kw: object) -> ConsensusDrafter:
    return ConsensusDrafter([_Scripted(str(i), c) for i, c in enumerate(CHAINS)], rule=rule, **kw)  # type: ignore[arg-type]


async def test_each_rule_proposes_something_different() -> None:
    got = {rule: await _fleet(rule).propose([0], 4, GREEDY) for rule in ("strict", "majority")}
    assert got["strict"].tokens == [1, 2] and got["majority"].tokens == [1, 2, 3]
    tree = await _fleet("any_disagree", tree=True).propose([0], 4, GREEDY)
    assert tree.branches is not None and len(tree.branches) == 3 and tree.tokens == tree.branches[0]
    plain = await _fleet("any_disagree").propose([0], 4, GREEDY)
    assert plain.branches is None and plain.tokens == CHAINS[0]  # no tree: the lead's chain
    # sampling: the lead's own sample, cut one past the first failing position, with its q
    s = await _fleet("strict").propose([0], 4, SamplingParams(temperature=1.0))
    assert s.tokens == [1, 2, 3] and s.q is not None and len(s.q) == 3
    m = await _fleet("majority").propose([0], 4, SamplingParams(temperature=1.0))
    assert m.tokens == [1, 2, 3, 4]  # the lead (drafter 0) is in the majority for 3 positions
    # approximate: agreed tokens are trusted, the rest of the lead's chain verified
    a = await _fleet("strict", approximate=True).propose([0], 4, GREEDY)
    assert a.tokens == CHAINS[0] and a.trusted == 2
    ad = await _fleet("any_disagree", approximate=True).propose([0], 4, GREEDY)
    assert ad.trusted == 0  # any disagreement sends the whole round to the target


class _Timed:
    """Fault injection: answers ``chain`` after ``delay`` seconds (an empty
    chain proposes nothing), or fails."""

    def __init__(self, name: str, chain: list[int], delay: float = 0.0, fail: bool = False) -> None:
        self.name, self.chain, self.delay, self.fail = name, chain, delay, fail

    async def propose(self, context: list[int], k: int, sampling: SamplingParams) -> Proposal:
        await trio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("injected drafter fault")
        return Proposal(tokens=self.chain[:k], q=[{t: 1.0} for t in self.chain[:k]])


SAMPLED = SamplingParams(temperature=1.0)


async def test_an_empty_answer_starts_no_clock(autojump_clock) -> None:  # type: ignore[no-untyped-def]
    fleet = ConsensusDrafter([_Timed("empty", []), _Timed("late", [1, 2, 3], delay=1.0),
                              _Timed("later", [1, 2, 4], delay=1.1)], rule="strict", wait=0.5)
    p = await fleet.propose([0], 3, GREEDY)
    assert p.tokens == [1, 2]  # both real chains made it: the empty answer started nothing
    m = fleet.totals.members
    assert [x.answered for x in m] == [1, 1, 1] and fleet.totals.agreed == 2


async def test_sampling_waits_for_the_lead_chosen_before_the_round(autojump_clock) -> None:  # type: ignore[no-untyped-def]
    # drafter 0 leads (ties go to profile order) though it answers last, long after the wait
    fleet = ConsensusDrafter([_Timed("slow lead", [1, 2, 3, 4], delay=2.0),
                              _Timed("fast", [1, 2, 7, 8])], rule="strict", wait=0.1)
    p = await fleet.propose([0], 4, SAMPLED)
    assert p.tokens == [1, 2, 3]  # the lead's own sample, cut one past the first failing position
    assert fleet.totals.members[1].dropped == 0 and fleet.totals.members[0].answered == 1
    # a lead that fails (or proposes nothing) gives an empty proposal, whoever else answered
    for lead in (_Timed("down", [1, 2], fail=True), _Timed("empty", [])):
        fleet = ConsensusDrafter([lead, _Timed("fine", [1, 2, 3])], rule="strict")
        p = await fleet.propose([0], 3, SAMPLED)
        assert p.tokens == [] and outcomes(fleet.totals)["nobody"] == 1
    # greedy does not wait for anyone past the wait: the fast chain alone
    fleet = ConsensusDrafter([_Timed("slow", [1, 2, 3, 4], delay=2.0), _Timed("fast", [1, 2, 7, 8])],
                             rule="strict", wait=0.1)
    assert (await fleet.propose([0], 4, GREEDY)).tokens == [1, 2, 7, 8]
    assert fleet.totals.members[0].dropped == 1 and outcomes(fleet.totals)["single"] == 1


async def test_rounds_are_counted_by_outcome() -> None:
    def fleet(*chains: list[int], **kw: object) -> ConsensusDrafter:
        return ConsensusDrafter([_Timed(str(i), c) for i, c in enumerate(chains)], **kw)  # type: ignore[arg-type]

    single = fleet([1, 2, 3], [], rule="strict")  # one usable answer: nothing agreed
    assert (await single.propose([0], 3, GREEDY)).tokens == [1, 2, 3]
    assert single.totals.agreed == 0 and outcomes(single.totals)["single"] == 1
    down = ConsensusDrafter([_Timed("a", [1, 2]), _Timed("b", [1, 2], fail=True)], rule="strict")
    await down.propose([0], 2, GREEDY)
    assert down.totals.agreed == 0 and outcomes(down.totals)["single"] == 1
    await down.propose([0], 2, GREEDY)  # b is in its cooldown: skipped, counted as failed
    assert down.totals.members[1].failed == 2
    none = fleet([1, 2], [3, 4], rule="strict")
    assert (await none.propose([0], 2, GREEDY)).tokens == [1, 2]  # the lead's chain
    assert outcomes(none.totals)["no_agreement"] == 1
    tree = fleet([1, 2, 3], [1, 2, 4], rule="any_disagree", tree=True)
    await tree.propose([0], 3, GREEDY)
    assert outcomes(tree.totals) == {"agreed": 0, "single": 0, "tree": 1, "no_agreement": 0,
                                     "nobody": 0}
    ok = fleet([1, 2, 3], [1, 2, 4], rule="strict")
    await ok.propose([0], 3, GREEDY)
    assert outcomes(ok.totals)["agreed"] == 1 and ok.totals.agreed == 2
    fams = {f["name"]: f for f in metrics(ok)}
    assert dict((s[0][0], s[1]) for s in fams["tightwad_consensus_rounds"]["samples"]) == \
        {"agreed": 1, "single": 0, "tree": 0, "no_agreement": 0, "nobody": 0}
    # the tree flag is read each round: a verifier may learn only later that it has none
    can = [True]
    late = fleet([1, 2, 3], [1, 2, 4], rule="any_disagree", tree=lambda: can[0])
    assert (await late.propose([0], 3, GREEDY)).branches is not None
    can[0] = False
    assert (await late.propose([0], 3, GREEDY)).branches is None and snapshot(late)["tree"] is False


async def test_agreement_judges_every_drafter_on_the_same_tokens() -> None:
    fleet = ConsensusDrafter([_Timed("long", [1, 2, 3, 4]), _Timed("short", [1, 9])], rule="strict")
    view = fleet.request()
    p = await view.propose([0], 4, GREEDY)
    view.observe(p, Verdict(accepted=1, token=5), [1, 5])  # the round emitted two tokens
    long_, short = view.stats.members
    assert (long_.judged, long_.matched, short.judged, short.matched) == (2, 1, 2, 1)
    assert long_.agreement() == short.agreement() == 0.5
    # the lead follows the request's own rounds (totals come only at its end)
    view.observe(await view.propose([0], 4, GREEDY), Verdict(accepted=1, token=9), [1, 9])
    assert fleet.lead([0, 1], view.stats) == 1 and fleet.lead([0, 1]) == 0
    assert (await view.propose([0], 4, SAMPLED)).tokens == [1, 9]  # short leads now
    view.finish()
    assert fleet.totals.members[1].agreement() == 0.75


# ---- real drafters on a worker target -----------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """One target and three same-vocabulary drafts of falling quality."""
    root = tmp_path_factory.mktemp("consensus")
    drafts = []
    for i, noise in enumerate((0.05, 0.15, 0.4)):
        draft, target = tiny_pair(root / str(i), seed=2, noise=noise)
        drafts.append(draft)
    return target, drafts


def _drafter(path: Path) -> BackendConfig:
    return BackendConfig(backend="llama-server", model_path=str(path), ctx_size=512, parallel=1,
                         threads=1)


def profile(models: tuple[Path, list[Path]], mode: str = "consensus", rule: str = "strict",
            drafters: list[BackendConfig] | None = None, **spec: object) -> Profile:
    target, drafts = models
    return Profile(mode=mode, listen="127.0.0.1:0", max_tokens_limit=256,
                   target=BackendConfig(backend="worker", model_path=str(target), ctx_size=512,
                                        parallel=2, threads=1),
                   drafters=drafters if drafters is not None else [_drafter(d) for d in drafts],
                   speculation=SpeculationConfig(max_draft_tokens=4, verifier="worker",
                                                 consensus=rule, **spec))  # type: ignore[arg-type]


async def _own(c: httpx.AsyncClient, url: str, prompt: str, n: int) -> str:
    r = await c.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0})
    return str(r.json()["choices"][0]["text"])


@pytest.mark.parametrize("rule", ["strict", "majority", "any_disagree"])
async def test_verified_greedy_is_the_targets_own(nursery, tmp_path, models, rule):  # type: ignore[no-untyped-def]
    running = await start_proxy(nursery, profile(models, rule=rule), tmp_path)
    target = running.state.backends["target"]
    async with httpx.AsyncClient(timeout=120) as c:
        for prompt in PROMPTS:
            ref = await _own(c, target.base_url, prompt, 32)
            assert await _own(c, running.url, prompt, 32) == ref, (rule, prompt)
        metrics = (await c.get(running.url + "/metrics")).text
    st = running.state.mode.status()
    cons = st["consensus"]
    assert st["verifier"]["exact"] is True and cons["rule"] == rule and cons["rounds"] > 0
    assert all(d["answered"] > 0 and d["proposed"] > 0 for d in cons["drafters"])
    assert cons["agreed"] > 0 and st["accepted"] > 0
    if rule == "any_disagree":  # the worker verifier checks branches as one tree
        assert cons["tree"] is True
        assert cons["tree_rounds"] > 0 and cons["branches"] >= 2 * cons["tree_rounds"]
    assert "tightwad_consensus_drafter_agreement" in metrics
    assert 'tightwad_consensus_drafter_rounds_total{drafter=' in metrics
    running.shutdown.set()


async def _first_two_support(c: httpx.AsyncClient, url: str, ids: list[int], top_k: int) -> set[tuple[int, int]]:
    """Every pair of first two tokens the target can sample under top_k."""
    async def top(ctx: list[int]) -> list[int]:
        r = await c.post(url + "/v1/completions", json={
            "prompt": ctx, "max_tokens": 1, "temperature": 0, "logprobs": top_k,
            "return_tokens_as_token_ids": True})
        row = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        return [int(k.split(":")[1]) for k, v in row.items() if math.isfinite(v)]
    return {(a, b) for a in await top(ids) for b in await top(ids + [a])}


@pytest.mark.parametrize("rule", ["strict", "majority"])
async def test_seeded_sampling_stays_in_the_targets_support(nursery, tmp_path, models, rule):  # type: ignore[no-untyped-def]
    running = await start_proxy(nursery, profile(models, rule=rule), tmp_path)
    url = running.state.backends["target"].base_url
    text = running.state.mode.text
    async with httpx.AsyncClient(timeout=120) as c:
        ids = (await c.post(url + "/tokenize", json={"content": "the", "add_special": True})).json()["tokens"]
        support = await _first_two_support(c, url, ids, 4)
        pieces = {(text.piece(a) + text.piece(b)).decode("utf-8", "replace") for a, b in support}
        seen = set()
        for i in range(24):
            r = await c.post(running.url + "/v1/completions", json={
                "prompt": ids, "max_tokens": 2, "temperature": 1.0, "top_k": 4, "seed": 500 + i})
            assert r.status_code == 200, r.text
            seen.add(r.json()["choices"][0]["text"])
        assert seen <= pieces, f"outside the target's support: {seen - pieces}"
        body = {"prompt": "once upon a time", "max_tokens": 24, "temperature": 0.9, "seed": 77}
        a = (await c.post(running.url + "/v1/completions", json=body)).json()["choices"][0]["text"]
        b = (await c.post(running.url + "/v1/completions", json=body)).json()["choices"][0]["text"]
        assert a == b  # a seed reproduces through the whole fleet
    st = running.state.mode.status()
    assert st["drafted"] > 0 and st["consensus"]["rounds"] > 0
    running.shutdown.set()


class _Slow:
    """Fault injection: a real drafter that answers only after a long stall."""

    def __init__(self, inner: object) -> None:
        self.inner, self.name = inner, "slow " + getattr(inner, "name", "?")

    async def propose(self, context: list[int], k: int, sampling: SamplingParams) -> Proposal:
        await trio.sleep(30)
        return await self.inner.propose(context, k, sampling)  # type: ignore[attr-defined]


async def test_down_and_slow_drafters_never_stall_a_round(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    _, drafts = models
    nobody = BackendConfig(backend="llama-server", url=f"http://127.0.0.1:{free_port()}")
    fleet = [_drafter(drafts[0]), _drafter(drafts[1]), nobody]
    running = await start_proxy(nursery, profile(models, drafters=fleet, consensus_wait=0.2,
                                                 draft_timeout=5.0), tmp_path)
    cons = running.state.mode.consensus
    cons.drafters[1] = _Slow(cons.drafters[1])
    target = running.state.backends["target"]
    async with httpx.AsyncClient(timeout=120) as c:
        with trio.fail_after(60):  # a stalled round would wait 30 s per round
            for prompt in PROMPTS[:2]:
                assert await _own(c, running.url, prompt, 24) == await _own(c, target.base_url, prompt, 24)
    st = running.state.mode.status()["consensus"]
    fast, slow, down = st["drafters"]
    assert fast["answered"] > 0 and slow["answered"] == 0 and slow["dropped"] > 0
    assert down["answered"] == 0 and down["failed"] > 0 and down["last_error"]
    assert st["rounds"] > 0
    running.shutdown.set()


def _first_trusted(mode: object) -> list[dict[str, int | None]]:
    """Per request, the answer position of its first trusted token (None: none)."""
    cons = mode.consensus  # type: ignore[attr-defined]
    seen: list[dict[str, int | None]] = []
    make = cons.request

    def request():  # type: ignore[no-untyped-def]
        view = make()
        rec: dict[str, int | None] = {"at": 0, "first": None}
        inner = view.observe

        def observe(p: Proposal, v: Verdict, emitted: list[int]) -> None:
            if rec["first"] is None and min(p.trusted, v.accepted) > 0:
                rec["first"] = rec["at"]
            rec["at"] = (rec["at"] or 0) + len(emitted)
            inner(p, v, emitted)

        view.observe = observe
        seen.append(rec)
        return view

    cons.request = request
    return seen


def _diverge(got: list[int], ref: list[int]) -> int | None:
    at = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), None)
    return at if at is not None or len(got) == len(ref) else min(len(got), len(ref))


async def test_approximate_is_labelled_and_its_divergence_measured(nursery, tmp_path, models):  # type: ignore[no-untyped-def]
    target_file, _ = models
    # drafters that are the target itself: every trusted token is the target's own
    same = await start_proxy(nursery, profile(models, mode="consensus-approximate",
                                              drafters=[_drafter(target_file)] * 2), tmp_path)
    target = same.state.backends["target"]
    async with httpx.AsyncClient(timeout=120) as c:
        for prompt in PROMPTS:
            assert await _own(c, same.url, prompt, 32) == await _own(c, target.base_url, prompt, 32)
    assert same.state.mode.status()["trusted"] > 0
    same.shutdown.set()
    # drafters of falling quality: the answer may differ, but only from a trusted token on
    running = await start_proxy(nursery, profile(models, mode="consensus-approximate"), tmp_path,
                                name="noisy")
    mode = running.state.mode
    firsts = _first_trusted(mode)
    target = running.state.backends["target"]
    differ = 0
    async with httpx.AsyncClient(timeout=120) as c:
        for prompt in PROMPTS:
            ids = (await c.post(target.base_url + "/tokenize",
                                json={"content": prompt, "add_special": True})).json()["tokens"]
            ref = (await target.complete_ids(ids, 32, gaps=True)).tokens or []
            assert ref, "the target returned no token ids"
            r = await c.post(running.url + "/v1/completions",
                             json={"prompt": ids, "max_tokens": 32, "temperature": 0})
            assert r.status_code == 200, r.text
            got = mode.last_tokens() or []
            at, first = _diverge(got, ref[:len(got)] if len(ref) > len(got) else ref), \
                firsts[-1]["first"]
            if at is not None:
                differ += 1
                assert first is not None and first <= at, (prompt, at, first, got[:8], ref[:8])
        model = (await c.get(running.url + "/v1/models")).json()["data"][0]
    st = mode.status()
    assert len(firsts) == len(PROMPTS)
    assert st["mode"] == "consensus-approximate" and st["approximate"] is True
    assert st["verifier"]["exact"] is False and "APPROXIMATE" in st["verifier"]["label"]
    assert model["meta"]["verifier"]["exact"] is False
    assert "APPROXIMATE" in model["meta"]["verifier"]["label"]
    assert st["consensus"]["approximate"] is True and st["trusted"] == st["consensus"]["trusted"] > 0
    assert st["draft_length"]["ks_measured"] and st["drafted"] > 0  # the K controller still observes
    print(f"approximate divergence: {differ}/{len(PROMPTS)} prompts differ from the target")
    running.shutdown.set()


def test_trees_are_cut_to_the_workers_node_limit() -> None:
    from tightwad_plugins.worker.tree import count_nodes

    three = [[b * 1000 + i for i in range(50)] for b in range(3)]  # disjoint: 150 positions
    kept = fit_nodes(three, MAX_TREE_NODES)
    assert [len(b) for b in kept] == [50, 50, 28] and count_nodes(kept) == MAX_TREE_NODES
    shared = [[1] * 40 + [b] * 30 for b in range(5)]  # 40 shared, then 30 each
    kept = fit_nodes(shared, 100)
    assert [len(b) for b in kept] == [70, 70, 40] and count_nodes(kept) <= 100
    assert fit_nodes(three, 20) == [three[0][:20]]


@pytest.mark.parametrize("unified", [True, False])
async def test_worker_verifier_big_trees_split_caches_and_trusted_gaps(  # type: ignore[no-untyped-def]
        nursery, tiny_model, llama_cpp_installed, unified):
    from tightwad_plugins.worker.cli import serve_worker

    w = await nursery.start(partial(serve_worker, tiny_model, "127.0.0.1", 0, ctx=512, threads=1,
                                    slots=4, kv_unified=unified))
    async with httpx.AsyncClient(base_url=w.url, timeout=60) as client:
        verifier = WorkerVerifier(SimpleNamespace(client=client, where=w.url))
        prompt = (await client.post("/tokenize", json={"content": "The quick brown fox",
                                                      "add_special": True})).json()["tokens"]
        r = await client.post("/v1/completions", json={
            "prompt": prompt, "max_tokens": 60, "temperature": 0, "logprobs": 1,
            "return_tokens_as_token_ids": True})
        cont = [int(t.rpartition(":")[2]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]
        n_vocab = (await client.get("/v1/tightwad/info")).json()["n_vocab"]
        sess = await verifier.open(prompt, SamplingParams())
        assert verifier.tree is unified  # read from the worker's capabilities
        # three disjoint 50-token branches (150 positions, over the worker's 128): the
        # target's own continuation is the last, so it is the one that loses its tail
        branches = [[(cont[0] + 1 + b) % n_vocab] * 50 for b in range(2)] + [cont[:50]]
        v = await sess.verify(Proposal(tokens=branches[0], branches=branches))
        if unified:
            assert v.branch == 2 and 1 <= v.accepted <= 28 and v.token == cont[v.accepted]
        else:  # a split cache checks branch 0 alone: sent as a chain, said so
            assert (v.branch, v.accepted, v.token) == (0, 0, cont[0])
        done = v.accepted + 1
        # trusted tokens: the verified positions keep their gaps, after NaN for the trusted ones
        v = await sess.verify(Proposal(tokens=cont[done:done + 5], trusted=2))
        assert v.accepted >= 2 and v.gaps is not None and len(v.gaps) == v.accepted + 1
        assert all(math.isnan(g) for g in v.gaps[:2]) and all(math.isfinite(g) for g in v.gaps[2:])
        await sess.aclose()
    w.shutdown.set()


async def _refused(profile_: Profile, tmp_path: Path) -> str:
    """The one-line ConfigError a profile is refused with at start."""
    try:
        async with trio.open_nursery() as nursery:
            running = await start_proxy(nursery, profile_, tmp_path)
            running.shutdown.set()
    except BaseException as exc:  # noqa: BLE001 - dig the ConfigError out of the groups
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        assert isinstance(exc, ConfigError), repr(exc)
        assert "\n" not in str(exc)
        return str(exc)
    raise AssertionError("the profile was accepted")


async def test_approximate_needs_a_fleet_and_a_trusting_verifier(tmp_path, models):  # type: ignore[no-untyped-def]
    target, drafts = models
    assert "drafters" in await _refused(profile(models, mode="consensus-approximate", drafters=[]),
                                        tmp_path)
    assert "at least two drafters" in await _refused(
        profile(models, mode="consensus-approximate", drafters=[_drafter(drafts[0])]), tmp_path)
    plain = profile(models, mode="consensus-approximate")
    plain = Profile(mode=plain.mode, listen=plain.listen, drafters=plain.drafters,
                    target=BackendConfig(backend="llama-server", model_path=str(target), ctx_size=512,
                                         parallel=1, threads=1),
                    speculation=SpeculationConfig(verifier="prefix-batch"))
    msg = await _refused(plain, tmp_path)
    assert "trusts = True" in msg and 'verifier = "worker"' in msg

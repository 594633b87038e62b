"""Pure logic of speculation: the emitter, acceptance rules, the K controller."""

from __future__ import annotations

import numpy as np
import pytest

from tightwad_core.spec.accept import accept_greedy, accept_sampled
from tightwad_core.spec.draftlen import DraftLength, expected_tokens
from tightwad_core.spec.emitter import Emitter

# token i stands for these bytes; 9 and 10 split one UTF-8 character (é = c3 a9)
PIECES = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"!", 6: b"\n", 7: b"EN", 8: b"D",
          9: b"\xc3", 10: b"\xa9", 11: b"x", 12: b"D\xc3"}
EOS = frozenset({0})


def run(rounds: list[list[int]], stop: tuple[str, ...] = (), max_tokens: int = 100) -> tuple[list[str], Emitter]:
    e = Emitter(lambda t: PIECES[t], EOS, stop, max_tokens)
    return [e.feed(r) for r in rounds], e


@pytest.mark.parametrize("rounds,stop,max_tokens,text,finish,n", [
    ([[1, 2], [3, 4, 5]], (), 100, "Hello world!", None, 5),
    ([[1, 2, 0, 3]], (), 100, "Hello", "stop", 3),                 # EOS ends it, counted as the engine does
    ([[1, 2, 3, 4]], (), 3, "Hello wor", "length", 3),             # exact max_tokens
    ([[1, 2], [3], [4, 5]], ("world",), 100, "Hello ", "stop", 4),  # stop across rounds
    ([[1, 2, 6, 7], [8, 11]], ("\nEND",), 100, "Hello", "stop", 5),
    ([[1, 2, 7], [11]], ("ENDX",), 100, "HelloENx", None, 4),      # held back, then released
    ([[11, 9], [10, 11]], (), 100, "xéx", None, 4),                 # UTF-8 never split
    ([[1, 2, 7, 12]], ("END",), 100, "Hello", "stop", 4),           # the stop's last token ends
    ([[1, 2, 7], [12, 10]], ("END",), 100, "Hello", "stop", 4),     # inside a character
    ([[1, 2], [0]], (), 3, "Hello", "stop", 3),                     # EOS as the last allowed token
])
def test_emitter(rounds, stop, max_tokens, text, finish, n):
    out, e = run(rounds, stop, max_tokens)
    assert "".join(out) == text
    assert e.finish == finish and e.n == n
    for piece in out:
        assert "\ufffd" not in piece


def test_split_character_is_held_until_complete():
    out, _ = run([[11, 9], [10]])
    assert out == ["x", "é"]


def test_stop_prefix_released_at_eos():
    out, e = run([[1, 2, 7], [0]], stop=("ENDX",))
    assert "".join(out) == "HelloEN" and e.finish == "stop"


@pytest.mark.parametrize("argmax,draft,expected", [
    ([5, 6, 7, 8], [5, 6, 7], (3, 8)),  # perfect match: bonus token
    ([5, 9, 7, 8], [5, 6, 7], (1, 9)),  # early mismatch: correction
    ([4, 6, 7, 8], [5, 6, 7], (0, 4)),
    ([3], [], (0, 3)),                  # no draft: the target's own token
])
def test_accept_greedy(argmax, draft, expected):
    assert accept_greedy(argmax, draft) == expected


def test_accept_sampled_matches_target_distribution():
    """One position: draft q, target p; emitted token must follow p (chi-square, alpha 0.001)."""
    p = {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.05}
    q = {0: 0.1, 1: 0.6, 2: 0.1, 3: 0.2}
    rng = np.random.default_rng(7)
    n = 20_000
    counts = np.zeros(4)
    for _ in range(n):
        x = int(rng.choice(4, p=list(q.values())))
        acc, tok = accept_sampled([p, {0: 1.0}], [q], [x], rng)
        counts[x if acc == 1 else tok] += 1
    expected = n * np.array(list(p.values()))
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (chi2, counts)  # chi-square 0.999 quantile, 3 degrees of freedom


def test_accept_sampled_one_hot_draft_and_seed():
    p = {0: 0.7, 1: 0.3}
    a = [accept_sampled([p, p], None, [1], np.random.default_rng(3)) for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same result


@pytest.mark.parametrize("a,k,expected", [(0.0, 4, 1.0), (0.5, 1, 1.5), (0.8, 0, 1.0)])
def test_expected_tokens(a, k, expected):
    assert expected_tokens(a, k) == pytest.approx(expected)


def test_auto_k_relays_when_verify_is_expensive():
    dl = DraftLength(pinned=None, k_max=8)
    # a CPU target: relay 25 ms/token; verify grows 15 ms per token; draft 12 ms/token
    dl.observe_relay(100, 2.5)
    for k in (2, 4, 8, 4, 2, 8):
        dl.observe_round(k, int(0.6 * k), 0.012 * k, 0.025 + 0.015 * k)
    assert dl.best_k() == 0


def test_auto_k_speculates_when_round_trips_dominate():
    dl = DraftLength(pinned=None, k_max=8)
    # a target behind a slow link: 200 ms per token alone, a verify round ~210 ms whatever K
    dl.observe_relay(20, 4.0)
    for k in (2, 4, 8, 4, 2, 8):
        dl.observe_round(k, int(0.8 * k), 0.01 * k, 0.2 + 0.002 * k)
    assert dl.best_k() >= 4
    assert dl.speculate_this_request()


def test_pinned_k():
    dl = DraftLength(pinned=3)
    assert dl.k() == 3 and dl.speculate_this_request()
    assert not DraftLength(pinned=0).speculate_this_request()


class _Target:
    """Only what rung selection reads: a backend's kind and capabilities."""

    def __init__(self, kind: str, capabilities: set[str]) -> None:
        self.kind = kind
        self.capabilities = frozenset(capabilities)


WORKER_CAPS = {"tokens", "tightwad-verify", "prompt-logprobs"}
LLAMA_CAPS = {"tokens", "llama-completion"}


@pytest.mark.parametrize("name, kind, caps, expected", [
    ("auto", "worker", WORKER_CAPS, "worker"),
    ("auto", "llama-server", LLAMA_CAPS, "prefix-batch"),
    ("auto", "openai", set(), None),  # no rung fits: relay, correct and no speed-up
    ("auto", "ollama", set(), None),
    ("prompt-logprobs", "worker", WORKER_CAPS, "prompt-logprobs"),
    ("prompt-logprobs", "openai", set(), "prompt-logprobs"),  # pinnable: vLLM cannot announce it
    ("generate-compare", "llama-server", LLAMA_CAPS, "generate-compare"),
    ("generate-compare", "openai", set(), None),
    ("prefix-batch", "llama-server", LLAMA_CAPS, "prefix-batch"),
])
def test_rung_selection(name: str, kind: str, caps: set[str], expected: str | None) -> None:
    from tightwad_core.plugins import load_registry
    from tightwad_plugins.modes.speculative import pick_rung

    rung = pick_rung(name, _Target(kind, caps), load_registry().verifiers())
    assert (None if rung is None else rung.rung) == expected


@pytest.mark.parametrize("name, kind, caps, fragment", [
    ("worker", "llama-server", LLAMA_CAPS, "'tightwad-verify'"),
    ("prefix-batch", "openai", set(), "'llama-completion'"),
    ("prefix-btach", "llama-server", LLAMA_CAPS, "known: auto, generate-compare, prefix-batch"),
])
def test_rung_refused(name: str, kind: str, caps: set[str], fragment: str) -> None:
    from tightwad_core.config.profiles import ConfigError
    from tightwad_core.plugins import load_registry
    from tightwad_plugins.modes.speculative import pick_rung

    with pytest.raises(ConfigError, match="verifier") as err:
        pick_rung(name, _Target(kind, caps), load_registry().verifiers())
    assert fragment in str(err.value)


def test_dense_and_sparse_rows_accept_alike() -> None:
    """One rule for both row forms: the same draws give the same verdicts."""
    sparse = [{0: 0.5, 1: 0.3, 2: 0.2}, {1: 0.6, 3: 0.4}, {2: 1.0}]
    dense = []
    for row in sparse:
        d = np.zeros(5)
        for t, p in row.items():
            d[t] = p
        dense.append(d)
    q = [{0: 0.2, 1: 0.8}, {3: 1.0}]
    for seed in range(300):
        for draft in ([1, 3], [0, 3], [2, 1]):
            a = accept_sampled(sparse, q, draft, np.random.default_rng(seed))
            b = accept_sampled(dense, q, draft, np.random.default_rng(seed))
            assert a == b, (seed, draft)


def test_auto_k_explores_and_keeps_prefill_out():
    dl = DraftLength(pinned=None, k_max=8)
    dl.observe_relay(20, 4.0)
    seen = []
    for i in range(40):  # verify ~200 ms whatever K, draft 10 ms per token
        k = dl.k()
        seen.append(k)
        dl.observe_round(k, max(0, k - 1), 0.01 * k, 0.2 + 0.002 * k, prefill=i % 10 == 0)
    assert len(set(seen[:5])) == 5  # the first rounds try a spread of K on purpose
    settled = dl.best_k()
    assert set(seen[10:]) - {settled} and all(abs(k - settled) <= 1 for k in seen[20:])
    assert len(set(dl.snapshot()["ks_measured"])) >= 2  # type: ignore[arg-type]
    # a round that carries the prompt's prefill does not move the costs
    before = (dl.draft_s_per_token, list(dl._rounds))
    dl.observe_round(4, 3, 5.0, 9.0, prefill=True)
    assert (dl.draft_s_per_token, list(dl._rounds)) == before


def test_auto_k_with_overlap_counts_the_longer_of_draft_and_verify():
    plain, hidden = DraftLength(pinned=None, k_max=8), DraftLength(pinned=None, k_max=8, overlap=True)
    for dl in (plain, hidden):
        dl.observe_relay(10, 5.0)  # 0.5 s a token alone
        for k in (2, 4, 6, 8, 3, 5):
            dl.observe_round(k, k - 1, 0.05 * k, 0.5)  # verify 0.5 s whatever K; draft 50 ms/token
    assert hidden.rate(4) == pytest.approx(expected_tokens(hidden.acceptance, 4) / 0.5)
    assert plain.rate(4) == pytest.approx(expected_tokens(plain.acceptance, 4) / 0.7)
    # a proposal drafted ahead has no cost of its own: the estimate stays where it was
    before = hidden.draft_s_per_token
    hidden.observe_round(4, 3, None, 0.5)
    assert hidden.draft_s_per_token == before


def test_auto_k_needs_no_relay_to_start():
    dl = DraftLength(pinned=None, k_max=8)
    assert dl.speculate_this_request()  # nothing measured: speculate, do not relay first
    for k in (2, 5, 3, 7, 4):  # a CPU target: each verify token costs as much as a step
        dl.observe_round(k, int(0.5 * k), 0.012 * k, 0.05 + 0.05 * k)
    assert dl.relay_s_per_token is None and dl.best_k() == 0  # v(0) stands for the relay
    assert not dl.speculate_this_request()

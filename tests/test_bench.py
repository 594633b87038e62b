"""`tightwad bench` on the tiny generated pair over real llama-server: the
report's shape and figures, the link emulator in both paths, prompt files,
and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from tightwad_core.bench.link import LinkSpec
from tightwad_core.bench.prompts import PROMPTS_FILE, BenchError, load_prompts
from tightwad_core.bench.report import (
    DirectRun,
    Divergence,
    ProxyRun,
    build_report,
    divergence_index,
    make_row,
)
from tightwad_core.bench.run import run_bench
from tightwad_core.cli.bench import bench
from tightwad_core.config.profiles import BackendConfig, Profile, SpeculationConfig
from tightwad_core.testing.tinymodels import tiny_pair
from tightwad_plugins.backends.llama_wire import align_gaps

PROMPTS = ["the cat sat on", "hello world", "once upon a time there", "a b c d e f"]
MAX_TOKENS = 24
PROMPT_KEYS = {"prompt", "tokens", "proxy_s", "direct_s", "identical", "first_divergence",
               "divergence_gap", "acceptance", "tokens_per_round"}
TOTAL_KEYS = {"speedup", "proxy_tok_s", "direct_tok_s", "acceptance", "tokens_per_round",
              "identical_rate", "near_tie_rate"}
CONFIG_KEYS = {"max_tokens", "draft_tokens", "link_delay_ms", "link_bandwidth", "verifier", "target",
               "draft"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_pair(tmp_path_factory.mktemp("bench-pair"), seed=0)


def tiny_profile(pair: tuple[Path, Path]) -> Profile:
    draft, target = pair
    be = dict(backend="llama-server", ctx_size=512, threads=1)
    return Profile(mode="speculative", listen="127.0.0.1:0",
                   target=BackendConfig(model_path=str(target), parallel=5, **be),  # type: ignore[arg-type]
                   draft=BackendConfig(model_path=str(draft), parallel=1, **be),  # type: ignore[arg-type]
                   speculation=SpeculationConfig(max_draft_tokens=4, verifier="prefix-batch"))


def write_config(tmp_path: Path, pair: tuple[Path, Path]) -> Path:
    draft, target = pair
    backend = 'backend = "llama-server"\nctx_size = 512\nthreads = 1\n'
    path = tmp_path / "tightwad.toml"
    path.write_text(
        'default_profile = "tiny"\n'
        '[profiles.tiny]\nmode = "speculative"\n'
        f'[profiles.tiny.target]\n{backend}parallel = 5\nmodel_path = "{target}"\n'
        f'[profiles.tiny.draft]\n{backend}parallel = 1\nmodel_path = "{draft}"\n'
        '[profiles.tiny.speculation]\nmax_draft_tokens = 4\nverifier = "prefix-batch"\n'
        f'[profiles.plain]\n[profiles.plain.target]\n{backend}model_path = "{target}"\n')
    return path


def check_shape(report: dict, n: int) -> None:  # type: ignore[type-arg]
    assert {"profile", "config", "prompts", "totals"} <= set(report)
    assert CONFIG_KEYS <= set(report["config"])
    assert TOTAL_KEYS <= set(report["totals"])
    assert len(report["prompts"]) == n
    for row in report["prompts"]:
        assert PROMPT_KEYS <= set(row), sorted(PROMPT_KEYS - set(row))


# --------------------------------------------------------------------------- run_bench


async def test_run_bench_report(pair: tuple[Path, Path], tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    report = await run_bench("tiny", tiny_profile(pair), config_dir=tmp_path, prompts=PROMPTS,
                             max_tokens=MAX_TOKENS, run_dir=tmp_path,
                             progress=lambda done, total, _r: seen.append((done, total)))
    check_shape(report, len(PROMPTS))
    assert seen == [(i, len(PROMPTS)) for i in range(len(PROMPTS) + 1)]
    cfg = report["config"]
    assert cfg["max_tokens"] == MAX_TOKENS and cfg["draft_tokens"] == 4
    assert cfg["verifier"] == "prefix-batch" and cfg["link_delay_ms"] is None
    for row, prompt in zip(report["prompts"], PROMPTS):
        assert row["prompt"] == prompt
        assert row["identical"] is True and row["first_divergence"] is None
        assert row["tokens"] == row["proxy_tokens"] == MAX_TOKENS  # the tiny models never stop early
        assert row["proxy_s"] > 0 and row["direct_s"] > 0
        assert 0.0 <= row["acceptance"] <= 1.0
        assert row["emitted"] == MAX_TOKENS and row["rounds"] > 0
    t = report["totals"]
    assert t["identical_rate"] == 1.0 and t["near_tie_rate"] == 1.0
    assert t["speedup"] > 0 and t["proxy_tok_s"] > 0 and t["direct_tok_s"] > 0
    assert 0.0 < t["acceptance"] <= 1.0 and t["tokens_per_round"] >= 1.0
    assert t["tokens"] == MAX_TOKENS * len(PROMPTS)


async def test_link_is_in_both_paths(pair: tuple[Path, Path], tmp_path: Path) -> None:
    delay = 0.02
    report = await run_bench("tiny", tiny_profile(pair), config_dir=tmp_path, prompts=PROMPTS[:3],
                             max_tokens=MAX_TOKENS, link=LinkSpec(delay), run_dir=tmp_path)
    check_shape(report, 3)
    assert report["config"]["link_delay_ms"] == pytest.approx(20.0)
    for row in report["prompts"]:
        assert row["identical"]
        assert row["direct_s"] >= 2 * delay, row  # one request: the link both ways
        assert row["rounds"] > 1
        assert row["proxy_s"] >= 2 * delay * row["rounds"], row  # one round trip per round


async def test_baseline_llama_server_beside_a_worker_target(pair: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    """A worker target: the report has both ratios, and the baseline (a stock
    llama-server on the same GGUF) crosses the link like the direct side."""
    draft, target = pair
    prof = msgspec.structs.replace(
        tiny_profile(pair),
        target=BackendConfig(backend="worker", model_path=str(target), ctx_size=512, parallel=2,
                             threads=1),
        speculation=SpeculationConfig(max_draft_tokens=4, verifier="worker"))
    delay = 0.01
    report = await run_bench("tiny", prof, config_dir=tmp_path, prompts=PROMPTS[:2],
                             max_tokens=MAX_TOKENS, link=LinkSpec(delay), run_dir=tmp_path,
                             baseline="llama-server")
    check_shape(report, 2)
    assert report["config"]["baseline"] == f"llama-server {target}"
    for row in report["prompts"]:
        assert row["identical"], row
        assert row["baseline_tokens"] == MAX_TOKENS and row["baseline_s"] >= 2 * delay
        assert row["speedup_vs_baseline"] == pytest.approx(row["baseline_s"] / row["proxy_s"],
                                                           rel=1e-3)
    t = report["totals"]
    assert t["baseline_tok_s"] > 0 and t["speedup_vs_baseline"] > 0
    # a llama-server target already is the baseline: no third server, the same ratio twice
    same = await run_bench("tiny", tiny_profile(pair), config_dir=tmp_path, prompts=PROMPTS[:1],
                           max_tokens=8, run_dir=tmp_path, baseline="llama-server")
    assert same["config"]["baseline"] == "llama-server (the direct side)"
    assert same["prompts"][0]["speedup_vs_baseline"] == pytest.approx(same["prompts"][0]["speedup"],
                                                                      rel=1e-3)
    with pytest.raises(BenchError, match="no-such"):
        await run_bench("tiny", prof, config_dir=tmp_path, prompts=PROMPTS[:1], max_tokens=4,
                        baseline="no-such")
    with pytest.raises(BenchError, match="model_path"):
        await run_bench("tiny", msgspec.structs.replace(
            prof, target=BackendConfig(backend="worker", url="http://127.0.0.1:9")),
            config_dir=tmp_path, prompts=PROMPTS[:1], max_tokens=4, baseline="llama-server")


async def test_a_divergence_is_located(pair: tuple[Path, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy answer that differs from the target's: where, and how close the call was."""
    from tightwad_core.bench import run as bench_mod

    real = bench_mod._Sides.proxy

    async def mangled(self, ids, n):  # type: ignore[no-untyped-def]
        run = await real(self, ids, n)
        if n == MAX_TOKENS:  # the timed runs; the warm-up stays as it is
            run.text, run.ids = "", []  # nothing in common: the answers part at the first token
        return run

    monkeypatch.setattr(bench_mod._Sides, "proxy", mangled)
    report = await run_bench("tiny", tiny_profile(pair), config_dir=tmp_path, prompts=PROMPTS[:2],
                             max_tokens=MAX_TOKENS, run_dir=tmp_path)
    gaps = [row["divergence_gap"] for row in report["prompts"]]
    for row in report["prompts"]:
        assert row["identical"] is False and row["first_divergence"] == 0
    # a gap is missing only where llama-server reports no probabilities (inside a character)
    assert any(isinstance(g, float) for g in gaps) and all(g is None or g >= 0 for g in gaps)
    t = report["totals"]
    assert t["identical_rate"] == 0.0
    assert t["near_tie_rate"] == sum(g is not None and g < 1.0 for g in gaps) / 2


async def test_run_bench_refuses_a_direct_profile(pair: tuple[Path, Path], tmp_path: Path) -> None:
    prof = Profile(mode="direct", target=tiny_profile(pair).target)
    with pytest.raises(BenchError, match="speculative"):
        await run_bench("plain", prof, config_dir=tmp_path, prompts=PROMPTS, max_tokens=4)


# --------------------------------------------------------------------------- prompts


def test_prompt_files(tmp_path: Path) -> None:
    shipped = load_prompts()
    assert len(shipped) >= 20 and all(p["category"] and p["prompt"] for p in shipped)
    assert {p["category"] for p in shipped} >= {"code", "reasoning", "factual", "list", "creative"}
    assert len(load_prompts(PROMPTS_FILE, limit=3)) == 3
    strings = tmp_path / "p.json"
    strings.write_text(json.dumps(["one", "two", {"category": "x", "prompt": "three"}]))
    assert [p["prompt"] for p in load_prompts(strings)] == ["one", "two", "three"]
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n   \nsecond [prompt]\n")
    assert [p["prompt"] for p in load_prompts(text)] == ["first prompt", "second [prompt]"]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.json", b'["unterminated', "not valid JSON"),
    ("obj.json", b'{"prompt": "x"}', "expected a JSON list"),
    ("nums.json", b'["ok", 3]', "item 1"),
    ("empty.txt", b"\n\n", "holds no prompts"),
    ("binary.txt", b"\xff\xfe\x00bad", "not UTF-8"),
    ("missing.txt", None, "cannot read"),
])
def test_bad_prompt_files(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BenchError, match=message):
        load_prompts(path)
    # the command says so in one line, before starting anything
    config = tmp_path / "tightwad.toml"
    config.write_text('[profiles.s]\nmode = "speculative"\n[profiles.s.target]\nbackend = "llama-server"\n'
                      'url = "http://127.0.0.1:9"\n[profiles.s.draft]\nbackend = "llama-server"\n'
                      'url = "http://127.0.0.1:9"\n')
    result = CliRunner().invoke(bench, ["--config", str(config), "--prompts", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


# --------------------------------------------------------------------------- the command


def test_cli_writes_the_json_report(pair: tuple[Path, Path], tmp_path: Path) -> None:
    config = write_config(tmp_path, pair)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on\n\nhello world\n")
    out = tmp_path / "out" / "bench.json"
    result = CliRunner().invoke(bench, ["--config", str(config), "--prompts", str(prompts), "--max-tokens",
                                        "16", "--draft-tokens", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    assert str(out) in result.stdout.replace("\n", "")
    assert "identical" in result.stdout
    report = json.loads(out.read_text())
    check_shape(report, 2)
    assert report["profile"] == "tiny"
    assert report["config"]["draft_tokens"] == 3 and report["config"]["max_tokens"] == 16
    assert [r["prompt"] for r in report["prompts"]] == ["the cat sat on", "hello world"]
    assert all(r["tokens"] == 16 for r in report["prompts"])


def test_cli_json_prompts_and_link(pair: tuple[Path, Path], tmp_path: Path) -> None:
    config = write_config(tmp_path, pair)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a b c d e f", {"category": "x", "prompt": "question answer"}, "extra"]))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench, ["--config", str(config), "--prompts", str(prompts), "--limit", "2",
                                        "--max-tokens", "8", "--link-delay", "5ms", "--link-bandwidth",
                                        "100mbit", "--json", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(out.read_text())
    check_shape(report, 2)
    assert report["config"]["link_delay_ms"] == pytest.approx(5.0)
    assert report["config"]["link_bandwidth"] == pytest.approx(100e6 / 8)
    assert report["prompts"][1]["category"] == "x"


def test_cli_refuses_a_direct_profile(pair: tuple[Path, Path], tmp_path: Path) -> None:
    config = write_config(tmp_path, pair)
    result = CliRunner().invoke(bench, ["--config", str(config), "--profile", "plain"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "speculative" in result.stderr


# --------------------------------------------------------------------------- figures


async def test_divergence_is_found_by_token_not_by_text() -> None:
    """The target says " " then "1" (a near-tie at the first token), the proxy
    " ten": by text the answers share " ", so the point would land on "1" and
    report that token's clear margin; by token id it is the first token, with
    its own small gap."""
    from tightwad_core.bench.report import DirectRun, ProxyRun, first_difference
    from tightwad_core.bench.run import _Sides
    from tightwad_core.records import TokenRun
    from tightwad_core.vocab import Vocab

    pieces = (b" ", b"1", b" ten", b"0")
    vocab = Vocab(pieces=pieces, eos=frozenset(), bos=None, fingerprint="x")

    class Target:  # the target alone's greedy answer with its top-2 gaps
        async def complete_ids(self, ids, n, *, gaps=False):  # type: ignore[no-untyped-def]
            return TokenRun(text=" 10", count=3, tokens=[0, 1, 3], gaps=[0.085, 11.4, 3.0])

    sides = _Sides(Target(), vocab, None, None)  # type: ignore[arg-type]
    direct = DirectRun(1.0, " 10", 3, [0, 1, 3])
    proxy = ProxyRun(1.0, " ten", 1, {}, [2])
    assert divergence_index([0, 1, 3], proxy.text, vocab.piece) == 1  # what text alone says
    assert first_difference([0, 1, 3], [2]) == 0
    found = await sides.divergence([9], 3, direct, proxy)
    assert found is not None and found.index == 0 and found.gap == pytest.approx(0.085)
    assert first_difference([0, 1], [0, 1]) is None and first_difference([0, 1], [0]) == 1


def test_divergence_index() -> None:
    def piece(t: int) -> bytes:
        return {1: b"ab", 2: b"c", 3: "é".encode()[:1], 4: "é".encode()[1:], 5: b"x"}[t]

    assert divergence_index([1, 2, 5], "abcx", piece) == 3  # no difference within the direct tokens
    assert divergence_index([1, 2, 5], "abc?", piece) == 2
    assert divergence_index([1, 5, 2], "abc", piece) == 1
    assert divergence_index([1, 3, 4, 5], "abéx", piece) == 4
    assert divergence_index([1, 3, 4, 5], "abéy", piece) == 3
    assert divergence_index([1, 3, 4], "ab", piece) == 1  # the token that starts "é"
    assert divergence_index([1, 3], "ab", piece) == 1  # an incomplete character at the end


def test_gaps_align_with_tokens() -> None:
    """llama-server leaves out the probabilities of tokens that end inside a UTF-8
    character (a real answer of a tiny model, byte tokens are their own byte)."""
    tokens = [152, 271, 179, 251, 231, 51, 59, 35, 221, 241, 224, 224, 221, 0, 148, 110, 207, 217,
              153, 157, 151, 136, 160, 245]
    kept = [152, 271, 179, 251, 59, 35, 0, 148, 110, 153, 157, 151, 136, 160]
    steps = [{"id": t, "top_logprobs": [{"logprob": -0.5}, {"logprob": -0.5 - t / 100}]} for t in kept]

    def piece(t: int) -> bytes:
        return bytes([t]) if t < 256 else b" f"

    gaps = align_gaps(tokens, steps, piece)
    assert [t for t, g in zip(tokens, gaps) if g is not None] == kept
    assert gaps[6] == pytest.approx(0.59) and gaps[4] is None
    assert align_gaps(tokens, steps[1:], piece) == [None] * len(tokens)  # misaligned: trust none


def test_totals_and_near_ties() -> None:
    counters = {"rounds": 2, "drafted": 8, "accepted": 6, "emitted": 8, "relayed": 0}

    def row(direct_s: float, proxy_s: float, div: Divergence | None) -> dict:  # type: ignore[type-arg]
        return make_row("p", None, [DirectRun(direct_s, "t", 8)], [ProxyRun(proxy_s, "t", 8, counters)], div)

    rows = [row(2.0, 1.0, None), row(2.0, 1.0, Divergence(3, 0.25)), row(1.0, 1.0, Divergence(5, 4.0)),
            row(1.0, 1.0, Divergence(6, None))]
    t = build_report("x", {}, rows)["totals"]
    assert t["speedup"] == pytest.approx(6.0 / 4.0)
    assert t["identical_rate"] == 0.25 and t["near_tie_rate"] == 0.5
    assert t["acceptance"] == 0.75 and t["tokens_per_round"] == 4.0
    assert t["proxy_tok_s"] == 8.0 and t["direct_tok_s"] == pytest.approx(32 / 6, abs=0.01)
    assert rows[1]["first_divergence"] == 3 and rows[1]["divergence_gap"] == 0.25

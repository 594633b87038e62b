"""Figures of `tightwad bench`: per-prompt rows from timed runs, totals, the
JSON object and the rich table.

A row is what one prompt measured over its repeats: the median wall times of
the proxy and the direct runs, the speculation counters summed over the
repeats, and whether the proxy's answer was the target's own.
"""

from __future__ import annotations

import codecs
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: A divergence where the target's top two choices were closer than this
#: (in natural-log units) is a near tie: a rounding-level difference between
#: two ways of computing the same logits, not a wrong answer.
NEAR_TIE_GAP = 1.0

COUNTERS = ("rounds", "drafted", "accepted", "emitted", "relayed", "ahead_hits", "draft_s",
            "verify_s")


@dataclass
class DirectRun:
    """One request straight to the target (through the link, if any)."""

    seconds: float
    text: str
    tokens: int
    ids: list[int] | None = None  # the generated token ids, where the target reports them


@dataclass
class ProxyRun:
    """One request through the proxy, with the mode's counters for it."""

    seconds: float
    text: str
    tokens: int
    counters: dict[str, float]  # rounds, drafted, ... and draft_s / verify_s (seconds)
    ids: list[int] | None = None  # the answer's token ids, when the mode reports them


@dataclass
class Divergence:
    """Where the proxy's answer first left the target's."""

    index: int | None  # token index in the direct answer
    gap: float | None  # the direct run's top-2 log-probability gap there


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def divergence_index(direct_ids: list[int], proxy_text: str, piece: Callable[[int], bytes]) -> int:
    """Index of the first direct token whose text the proxy's answer does not share.

    The direct tokens are decoded the way the proxy's emitter decodes its own
    (incremental UTF-8, errors replaced), so equal token prefixes give equal text."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = ""
    held_from: int | None = None  # first token whose bytes the decoder still holds
    for i, tok in enumerate(direct_ids):
        origin = i if held_from is None else held_from
        out = decoder.decode(piece(tok))
        text += out
        if not proxy_text.startswith(text):
            return origin
        if not decoder.getstate()[0]:
            held_from = None
        elif out or held_from is None:
            held_from = i
    text += decoder.decode(b"", final=True)
    if held_from is not None and not proxy_text.startswith(text):
        return held_from
    return len(direct_ids)


def first_difference(direct_ids: list[int], proxy_ids: list[int]) -> int | None:
    """Index of the first position where the two answers hold different tokens
    (None when one is a prefix of the other and they are the same length)."""
    for i, (a, b) in enumerate(zip(direct_ids, proxy_ids)):
        if a != b:
            return i
    return None if len(direct_ids) == len(proxy_ids) else min(len(direct_ids), len(proxy_ids))


def _sum(values: Any) -> float:
    """Counts stay integers; seconds are rounded to the microsecond."""
    vals = list(values)
    total = sum(vals)
    return total if all(isinstance(v, int) for v in vals) else round(total, 6)


def make_row(prompt: str, category: str | None, directs: list[DirectRun], proxies: list[ProxyRun],
             divergence: Divergence | None,
             baselines: list[DirectRun] | None = None) -> dict[str, Any]:
    """One prompt's figures; ``divergence`` is None when every repeat was identical;
    ``baselines``: the runs of the baseline server (`--baseline`), if any."""
    proxy_s = statistics.median(r.seconds for r in proxies)
    direct_s = statistics.median(r.seconds for r in directs)
    sums = {k: _sum(r.counters.get(k, 0) for r in proxies) for k in COUNTERS}
    base: dict[str, Any] = {}
    if baselines:
        base_s = statistics.median(r.seconds for r in baselines)
        base = {"baseline_s": round(base_s, 6), "baseline_tokens": baselines[0].tokens,
                "speedup_vs_baseline": round(base_s / proxy_s, 4) if proxy_s > 0 else None,
                "baseline_identical": baselines[-1].text == proxies[-1].text}
    return {
        "prompt": prompt,
        "category": category,
        "tokens": directs[0].tokens,
        "proxy_tokens": proxies[0].tokens,
        "proxy_s": round(proxy_s, 6),
        "direct_s": round(direct_s, 6),
        "speedup": round(direct_s / proxy_s, 4) if proxy_s > 0 else None,
        "identical": divergence is None,
        "first_divergence": None if divergence is None else divergence.index,
        "divergence_gap": None if divergence is None or divergence.gap is None
        else round(divergence.gap, 6),
        "acceptance": _ratio(sums["accepted"], sums["drafted"]),
        "tokens_per_round": _ratio(sums["emitted"], sums["rounds"]),
        "runs": len(proxies),
        **base,
        **sums,
    }


def near_tie(row: dict[str, Any]) -> bool:
    if row["identical"]:
        return True
    gap = row.get("divergence_gap")
    return gap is not None and gap < NEAR_TIE_GAP


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the measured prompts (null where nothing was measured)."""
    n = len(rows)
    proxy_s = sum(r["proxy_s"] for r in rows)
    direct_s = sum(r["direct_s"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    proxy_tokens = sum(r["proxy_tokens"] for r in rows)
    sums = {k: _sum(r.get(k, 0) for r in rows) for k in COUNTERS}

    def rounded(value: float | None, digits: int = 4) -> float | None:
        return None if value is None else round(value, digits)

    return {
        "prompts": n,
        "tokens": tokens,
        "proxy_tokens": proxy_tokens,
        "proxy_s": round(proxy_s, 6),
        "direct_s": round(direct_s, 6),
        "speedup": rounded(_ratio(direct_s, proxy_s)),
        "proxy_tok_s": rounded(_ratio(proxy_tokens, proxy_s), 2),
        "direct_tok_s": rounded(_ratio(tokens, direct_s), 2),
        # the same as a ratio of rates: honest when answers parted at a near tie
        # and ended at different lengths
        "speedup_tok_s": rounded(_ratio(_ratio(proxy_tokens, proxy_s), _ratio(tokens, direct_s))),
        "acceptance": rounded(_ratio(sums["accepted"], sums["drafted"])),
        "tokens_per_round": rounded(_ratio(sums["emitted"], sums["rounds"])),
        "identical_rate": rounded(_ratio(sum(1 for r in rows if r["identical"]), n)),
        "near_tie_rate": rounded(_ratio(sum(1 for r in rows if near_tie(r)), n)),
        **_baseline_totals(rows, proxy_s),
        **sums,
    }


def _baseline_totals(rows: list[dict[str, Any]], proxy_s: float) -> dict[str, Any]:
    if not rows or any("baseline_s" not in r for r in rows):
        return {}
    base_s = sum(r["baseline_s"] for r in rows)
    tokens = sum(r["baseline_tokens"] for r in rows)
    ratio = _ratio(base_s, proxy_s)
    rate = _ratio(tokens, base_s)
    same = _ratio(sum(1 for r in rows if r.get("baseline_identical")), len(rows))
    proxy_rate = _ratio(sum(r["proxy_tokens"] for r in rows), proxy_s)
    rate_ratio = _ratio(proxy_rate, rate)
    return {"baseline_s": round(base_s, 6),
            "baseline_tok_s": None if rate is None else round(rate, 2),
            "speedup_vs_baseline": None if ratio is None else round(ratio, 4),
            "speedup_vs_baseline_tok_s": None if rate_ratio is None else round(rate_ratio, 4),
            "baseline_identical_rate": None if same is None else round(same, 4)}


def build_report(profile_name: str, config: dict[str, Any], rows: list[dict[str, Any]],
                 *, complete: bool = True) -> dict[str, Any]:
    """The JSON object of a bench run."""
    return {"profile": profile_name, "config": dict(config), "prompts": list(rows),
            "totals": totals(rows), "complete": complete}


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- the table


def excerpt(text: str, width: int = 42) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _verdict(row: dict[str, Any]) -> str:
    if row["identical"]:
        return "identical"
    where = row["first_divergence"]
    gap = row["divergence_gap"]
    text = f"diverged@{where}" if where is not None else "diverged"
    return text + (f" gap {gap:.2f}" if gap is not None else "")


def render(report: dict[str, Any], console: Any, *, title: str | None = None) -> None:
    """Print the per-prompt table and the totals on a rich console."""
    from rich.table import Table
    from rich.text import Text

    cfg = report["config"]
    link = cfg.get("link") or "no link emulation"
    table = Table(title=title or (f"profile {report['profile']!r}: {cfg.get('verifier')} verifier, "
                                  f"K {cfg.get('draft_tokens')}, {link}"),
                  show_edge=False, collapse_padding=True)
    table.add_column("#", justify="right", no_wrap=True)
    verdicts = [_verdict(r) for r in report["prompts"]]
    out_w = max([9, 11, *map(len, verdicts)])
    room = max(8, min(40, int(getattr(console, "width", 80)) - 58 - out_w))
    table.add_column("prompt", no_wrap=True, overflow="ellipsis", max_width=room)
    with_base = "baseline_s" in report["totals"]
    names = ["tokens", "proxy\ns", "direct\ns", "speed\nup"]
    names += ["base\ns", "vs\nbase"] if with_base else []
    for name in names + ["accept", "tok/\nround"]:
        table.add_column(name, justify="right", no_wrap=True, min_width=max(map(len, name.split("\n"))))
    table.add_column("output", no_wrap=True, overflow="ellipsis", min_width=9)
    def figures(row: dict[str, Any]) -> list[str]:
        out = [str(row["tokens"]), f"{row['proxy_s']:.3f}", f"{row['direct_s']:.3f}",
               _num(row["speedup"], ".2f") + "x"]
        if with_base:
            out += [_num(row.get("baseline_s"), ".3f"), _num(row.get("speedup_vs_baseline"), ".2f") + "x"]
        return out + [_num(row["acceptance"], ".1%"), _num(row["tokens_per_round"], ".2f")]

    for i, row in enumerate(report["prompts"], 1):
        table.add_row(str(i), Text(excerpt(row["prompt"], room)), *figures(row), verdicts[i - 1])
    t = report["totals"]
    table.add_section()
    table.add_row("", Text(excerpt(f"total, {t['prompts']} prompts", room)), *figures(t),
                  f"{_num(t['identical_rate'], '.0%')} ident.")
    console.print(table)
    console.print(f"proxy {_num(t['proxy_tok_s'], '.1f')} tok/s, direct "
                  f"{_num(t['direct_tok_s'], '.1f')} tok/s: speed-up {_num(t['speedup'], '.2f')}x",
                  highlight=False)
    if with_base:
        console.print(f"baseline ({cfg.get('baseline')}) {_num(t['baseline_tok_s'], '.1f')} tok/s: "
                      f"proxy speed-up against it {_num(t['speedup_vs_baseline'], '.2f')}x by "
                      f"time, {_num(t.get('speedup_vs_baseline_tok_s'), '.2f')}x by tok/s",
                      highlight=False)
    console.print(f"identical {_num(t['identical_rate'], '.0%')}; identical or a near tie "
                  f"(gap < {NEAR_TIE_GAP:g}) {_num(t['near_tie_rate'], '.0%')}", highlight=False)
    m = report.get("model")
    if m:
        console.print(f"model (Leviathan) from this run: a = {m['acceptance_per_token']:.3f} at K "
                      f"{m['k']}, verify {m['verify_s_per_round']:.3f} s/round, draft "
                      f"{1000 * m['draft_s_per_token']:.1f} ms/token, baseline "
                      f"{m['baseline_s_per_token']:.3f} s/token: predicts "
                      f"{m['predicted_speedup']:.2f}x (drafting hidden), "
                      f"{m['predicted_speedup_without_overlap']:.2f}x (not hidden)", highlight=False)
    sides = {"proxy": "proxy", "target": "target alone", "baseline": "pool alone"}
    for side, n in (report.get("network") or {}).items():
        console.print(f"pool traffic, {sides.get(side, side)}: "
                      f"{_num(n['round_trips_per_token'], '.2f')} round trips and "
                      f"{_num(None if n['bytes_per_token'] is None else n['bytes_per_token'] / 1024, '.1f')}"
                      " KiB per token", highlight=False)


def leviathan(report: dict[str, Any]) -> dict[str, Any] | None:
    """What the speculative-decoding model (Leviathan et al. 2023) predicts
    from this run's own measurements, beside the measured speed-up against
    the baseline: per-token acceptance a (solved from the measured tokens
    per round at the run's K), draft seconds per token d, verify seconds per
    round v and the baseline's seconds per token t. A round yields
    (1 - a^(K+1)) / (1 - a) tokens and costs v + K d, or about max(v, K d)
    when the next round is drafted during the verify."""
    t = report.get("totals") or {}
    k = report.get("config", {}).get("draft_tokens")
    rounds, tpr = t.get("rounds") or 0, t.get("tokens_per_round")
    if not isinstance(k, int) or k < 1 or not rounds or not tpr or not t.get("baseline_tok_s"):
        return None
    lo, hi = 0.0, 0.999999  # E(a) rises with a: bisect for the a that gives the measured mean
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 - mid ** (k + 1)) / (1 - mid) < tpr else (lo, mid)
    a = (lo + hi) / 2
    tokens = (1 - a ** (k + 1)) / (1 - a)
    drafted_rounds = max(rounds - (t.get("ahead_hits") or 0), 1)
    d = (t.get("draft_s") or 0.0) / (drafted_rounds * k)
    v = (t.get("verify_s") or 0.0) / rounds
    base = 1.0 / t["baseline_tok_s"]
    return {"k": k, "acceptance_per_token": round(a, 4), "tokens_per_round": round(tokens, 3),
            "draft_s_per_token": round(d, 5), "verify_s_per_round": round(v, 4),
            "baseline_s_per_token": round(base, 4),
            "predicted_speedup": round(tokens * base / max(v, k * d), 3),
            "predicted_speedup_without_overlap": round(tokens * base / (v + k * d), 3),
            "measured_speedup": t.get("speedup_vs_baseline_tok_s")}

"""Routing profiles: how often a Mixture-of-Experts model's router picked each
expert of each layer (`tightwad moe profile`, `tightwad moe summary`).

The file (JSON, ``"format": "tightwad-moe-routing"``, version 1) holds the
model's file name and architecture, ``expert_count`` E, ``expert_used_count``
K, ``tokens`` N (tokens whose routing was recorded), ``batches`` (ubatches
recorded) and per MoE layer, in order, ``{"layer": i, "counts": [c_0 ..
c_{E-1}]}`` where c_e is how many tokens had expert e among their top K; so
every layer's counts add up to N x K and none exceeds N.

Skew, per layer, over the shares s_e = c_e / (N K) (they add up to 1):

- ``hot_ratio``: E x max s_e, the hottest expert against a uniform router
  (1 = uniform; at most E / K, when every token picks it);
- ``entropy``: -sum s_e ln s_e / ln E, normalized (1 = uniform; ln K / ln E
  when the router always picks the same K);
- ``cv``: the coefficient of variation of the counts, std / mean (0 = uniform);
- ``top_share``: the share of routings that go to the layer's N hottest experts.

Overall figures are the means over the layers (and the largest hot ratio).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from tightwad_core.runtime.atomic import write_text

FORMAT = "tightwad-moe-routing"
VERSION = 1
BLOCKS = " ▁▂▃▄▅▆▇█"


class ProfileError(Exception):
    """A routing profile that cannot be read or is inconsistent; one line."""


@dataclass(frozen=True)
class LayerCounts:
    layer: int  # the layer's index in the model (blk.N)
    counts: tuple[int, ...]  # per expert: tokens that had it among their top K


@dataclass(frozen=True)
class RoutingProfile:
    model: str  # the GGUF's file name
    architecture: str  # general.architecture
    expert_count: int  # E
    expert_used_count: int  # K: experts per token
    tokens: int  # N: tokens whose routing was recorded
    batches: int  # ubatches (graph evaluations) recorded
    layers: tuple[LayerCounts, ...]  # the MoE layers, in order

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": self.model,
                "architecture": self.architecture, "expert_count": self.expert_count,
                "expert_used_count": self.expert_used_count, "tokens": self.tokens,
                "batches": self.batches,
                "layers": [{"layer": x.layer, "counts": list(x.counts)} for x in self.layers]}


def _int(raw: dict[str, Any], key: str, where: str, low: int) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ProfileError(f"{where}: {key!r} must be an integer of at least {low}, "
                           f"not {value!r}")
    return value


def parse_profile(raw: Any, where: str) -> RoutingProfile:
    """Check ``raw`` (decoded JSON) against the format; `ProfileError` names
    the first thing wrong."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ProfileError(f"{where} is not a routing profile (\"format\": \"{FORMAT}\")")
    if raw.get("version") != VERSION or isinstance(raw.get("version"), bool):
        raise ProfileError(f"{where} is routing profile version {raw.get('version')!r}; "
                           f"this tightwad reads version {VERSION}")
    for key in ("model", "architecture"):
        if not isinstance(raw.get(key), str):
            raise ProfileError(f"{where}: {key!r} must be a string")
    n_exp = _int(raw, "expert_count", where, 1)
    k = _int(raw, "expert_used_count", where, 1)
    if k > n_exp:
        raise ProfileError(f"{where}: {k} experts used per token of {n_exp}")
    tokens, batches = _int(raw, "tokens", where, 0), _int(raw, "batches", where, 0)
    if tokens == 0:
        raise ProfileError(f"{where} recorded no tokens")
    if not 0 < batches <= tokens:
        raise ProfileError(f"{where}: {batches} batches for {tokens} tokens")
    items = raw.get("layers")
    if not isinstance(items, list) or not items:
        raise ProfileError(f"{where}: 'layers' must be a non-empty list")
    layers: list[LayerCounts] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ProfileError(f"{where}: layers[{i}] is not an object")
        index = _int(item, "layer", f"{where}: layers[{i}]", 0)
        if layers and index <= layers[-1].layer:
            raise ProfileError(f"{where}: layer {index} comes after layer {layers[-1].layer}")
        counts = item.get("counts")
        if not (isinstance(counts, list) and len(counts) == n_exp and all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= tokens
                for c in counts)):
            raise ProfileError(f"{where}: layer {index} needs {n_exp} counts from 0 to {tokens}")
        if sum(counts) != tokens * k:
            raise ProfileError(f"{where}: layer {index}'s counts add up to {sum(counts)}, not "
                               f"{tokens} tokens x {k} experts = {tokens * k}")
        layers.append(LayerCounts(index, tuple(counts)))
    return RoutingProfile(raw["model"], raw["architecture"], n_exp, k, tokens, batches,
                          tuple(layers))


def load_profile(path: Path) -> RoutingProfile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ProfileError(f"{path} is not JSON: {exc}") from None
    return parse_profile(raw, str(path))


def write_profile(path: Path, profile: RoutingProfile) -> None:
    """Write ``profile`` atomically (a reader sees the old file or the whole new one)."""
    write_text(path, json.dumps(profile.to_json(), indent=1) + "\n")


# --------------------------------------------------------------------------- skew


@dataclass(frozen=True)
class LayerSkew:
    layer: int
    hottest: tuple[tuple[int, float], ...]  # (expert, share), hottest first
    hot_ratio: float  # E x the hottest share
    entropy: float  # normalized entropy of the shares
    cv: float  # coefficient of variation of the counts
    top_share: float  # share of the routings the listed hottest take


def layer_skew(layer: LayerCounts, top: int) -> LayerSkew:
    counts = layer.counts
    total = sum(counts)
    n = len(counts)
    shares = [c / total for c in counts]
    order = sorted(range(n), key=lambda e: (-counts[e], e))[:max(1, top)]
    entropy = -sum(s * math.log(s) for s in shares if s > 0)
    mean = total / n
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / n)
    return LayerSkew(layer.layer, tuple((e, shares[e]) for e in order),
                     hot_ratio=n * max(shares), entropy=entropy / math.log(n) if n > 1 else 1.0,
                     cv=std / mean, top_share=sum(shares[e] for e in order))


def histogram(counts: tuple[int, ...]) -> str:
    """One block character per expert, its height the count against the layer's largest."""
    peak = max(counts) or 1
    steps = len(BLOCKS) - 1
    return "".join(BLOCKS[math.ceil(c * steps / peak)] for c in counts)


def summarize(profile: RoutingProfile, top: int) -> dict[str, Any]:
    """The summary `tightwad moe summary --json` prints."""
    skews = [layer_skew(x, top) for x in profile.layers]

    def mean(name: str) -> float:
        return sum(float(getattr(s, name)) for s in skews) / len(skews)

    return {
        "model": profile.model, "architecture": profile.architecture,
        "expert_count": profile.expert_count, "expert_used_count": profile.expert_used_count,
        "tokens": profile.tokens, "batches": profile.batches, "top": top,
        "layers": [{"layer": s.layer, "hottest": [{"expert": e, "share": round(v, 6)}
                                                  for e, v in s.hottest],
                    "hot_ratio": round(s.hot_ratio, 4), "entropy": round(s.entropy, 4),
                    "cv": round(s.cv, 4), "top_share": round(s.top_share, 4),
                    "histogram": histogram(x.counts)}
                   for s, x in zip(skews, profile.layers, strict=True)],
        "overall": {"hot_ratio": round(mean("hot_ratio"), 4),
                    "max_hot_ratio": round(max(s.hot_ratio for s in skews), 4),
                    "entropy": round(mean("entropy"), 4), "cv": round(mean("cv"), 4),
                    "top_share": round(mean("top_share"), 4)},
    }


# --------------------------------------------------------------------------- picture

_LOW, _HIGH = (247, 251, 255), (8, 48, 107)  # the colour of share 0 and of the largest share


def _colour(t: float) -> str:
    r, g, b = (round(lo + (hi - lo) * t) for lo, hi in zip(_LOW, _HIGH, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def _every(n: int, room: float) -> int:
    """Label every k-th tick so that labels stay ``room`` pixels or more apart."""
    for k in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100):
        if k * room >= 14:
            return k
    return max(1, n // 8)


def heatmap_svg(profile: RoutingProfile) -> str:
    """Layers (rows) x experts (columns), each cell shaded by the expert's
    share of its layer's routings, with axis labels and a colour legend."""
    n_exp, rows = profile.expert_count, profile.layers
    cw = max(3.0, min(24.0, 720.0 / n_exp))
    ch = max(3.0, min(24.0, 480.0 / len(rows)))
    left, top = 64.0, 48.0
    width_map, height_map = cw * n_exp, ch * len(rows)
    legend_x = left + width_map + 28
    lh = max(60.0, min(height_map, 240.0))  # the legend's height
    title = (f"{profile.model}: routing share per expert ({profile.tokens} tokens, "
             f"{profile.expert_used_count} of {n_exp} experts each)")
    width = max(legend_x + 110, left + 7.0 * len(title) + 16)  # ~7 px a character at 13 px
    height = top + max(height_map, lh) + 56
    peak = max(c for x in rows for c in x.counts) / (profile.tokens * profile.expert_used_count)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
           f'<text x="{left:.0f}" y="20" font-size="13">{escape(title)}</text>']
    for i, x in enumerate(rows):
        total = sum(x.counts)
        for e, c in enumerate(x.counts):
            share = c / total
            out.append(f'<rect class="cell" x="{left + e * cw:.2f}" y="{top + i * ch:.2f}" '
                       f'width="{cw:.2f}" height="{ch:.2f}" fill="{_colour(share / peak)}">'
                       f'<title>layer {x.layer}, expert {e}: {c} ({share:.1%})</title></rect>')
    step = _every(len(rows), ch)
    for i in range(0, len(rows), step):
        out.append(f'<text x="{left - 6:.0f}" y="{top + (i + 0.5) * ch + 4:.2f}" '
                   f'text-anchor="end">{rows[i].layer}</text>')
    step = _every(n_exp, cw)
    for e in range(0, n_exp, step):
        out.append(f'<text x="{left + (e + 0.5) * cw:.2f}" y="{top + height_map + 14:.0f}" '
                   f'text-anchor="middle">{e}</text>')
    out.append(f'<text x="{left + width_map / 2:.0f}" y="{top + height_map + 34:.0f}" '
               'text-anchor="middle">expert</text>')
    out.append(f'<text transform="translate(18 {top + height_map / 2:.0f}) rotate(-90)" '
               'text-anchor="middle">layer</text>')
    # legend: a vertical gradient from the largest share (top) to 0 (bottom)
    out.append('<defs><linearGradient id="scale" x1="0" y1="1" x2="0" y2="0">'
               f'<stop offset="0" stop-color="{_colour(0)}"/>'
               f'<stop offset="1" stop-color="{_colour(1)}"/></linearGradient></defs>')
    out.append(f'<rect x="{legend_x:.0f}" y="{top:.0f}" width="14" height="{lh:.0f}" '
               'fill="url(#scale)" stroke="#888"/>')
    out.append(f'<text x="{legend_x + 20:.0f}" y="{top + 9:.0f}">{peak:.1%}</text>')
    uniform = 1 / n_exp
    if uniform < peak:
        y = top + lh * (1 - uniform / peak)
        out.append(f'<line x1="{legend_x - 3:.0f}" x2="{legend_x + 17:.0f}" y1="{y:.1f}" '
                   f'y2="{y:.1f}" stroke="#c00"/>')
        out.append(f'<text x="{legend_x + 20:.0f}" y="{y + 4:.1f}" fill="#c00">uniform</text>')
    out.append(f'<text x="{legend_x + 20:.0f}" y="{top + lh:.0f}">0%</text>')
    out.append(f'<text x="{legend_x:.0f}" y="{top + lh + 18:.0f}">share of the</text>')
    out.append(f'<text x="{legend_x:.0f}" y="{top + lh + 31:.0f}">layer\'s routings</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"

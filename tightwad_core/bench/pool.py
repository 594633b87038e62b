"""`tightwad benchmark`: the pool itself, without speculation.

Starts a ``[cluster]`` profile's pool and its target, then streams each
prompt (as token ids, greedy) from the target's ``/v1/completions`` and
times it as a client sees it: the time to the first token (prompt prefill
plus one step) and the steady generation rate after it. The relays count
what each worker exchanged in each phase, so the report gives round trips
and bytes per generated token and per prompt token, and each worker's share
of the traffic and of the layers.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from tightwad_core.bench.link import LinkSpec
from tightwad_core.bench.prompts import BenchError
from tightwad_core.bench.run import bench_cluster
from tightwad_core.cluster.pool import RpcPool
from tightwad_core.config.profiles import ConfigError, Profile
from tightwad_core.plugins import Registry, load_registry
from tightwad_core.roles import BackendContext, TokenBackend


def _traffic(pool: RpcPool) -> dict[str, tuple[int, int]]:
    return {m.name: (m.stats.bytes_up + m.stats.bytes_down, m.stats.round_trips)
            for m in pool.members}


def _delta(a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {k: (b[k][0] - a[k][0], b[k][1] - a[k][1]) for k in a}


async def _stream(client: httpx.AsyncClient, ids: list[int], n: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds from it to the last, tokens)."""
    body = {"prompt": ids, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    count = 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise BenchError(f"the target answered {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if (data.get("usage") or {}).get("completion_tokens"):
                count = int(data["usage"]["completion_tokens"])
            if any(c.get("text") for c in data.get("choices") or []):
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
    if first is None or last is None:
        raise BenchError("the target streamed no tokens")
    return first - t0, last - first, count


async def run_pool_benchmark(
    name: str, profile: Profile, *, config_dir: Path, prompts: Sequence[dict[str, str]],
    max_tokens: int, link: LinkSpec | None = None, registry: Registry | None = None,
    run_dir: Path | None = None, progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    registry = registry or load_registry()
    if profile.cluster is None or profile.target is None:
        raise BenchError(f"profile {name!r} has no [cluster] pool: `tightwad benchmark` times a "
                         "pool (use `tightwad bench` for a speculative profile)")
    if max_tokens < 2:
        raise BenchError("--max-tokens must be at least 2 (one token for the prefill, more for the rate)")
    cluster = bench_cluster(profile.cluster, link)
    own_dir = run_dir is None
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="tightwad-benchmark-"))
    try:
        factory = registry.backend(profile.target.backend)
    except KeyError as exc:
        raise ConfigError(f"profile {name!r}: field 'target.backend': {exc.args[0]}") from None
    pool = RpcPool.from_registry(cluster, registry, run_dir)
    target = factory(profile.target, BackendContext(role="target", config_dir=config_dir,
                                                    run_dir=run_dir, pool=pool))
    if not isinstance(target, TokenBackend) or "tokens" not in target.capabilities:
        raise BenchError(f"the {profile.target.backend!r} backend cannot take token ids")
    rows: list[dict[str, Any]] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve)
            await nursery.start(target.serve)
            url = (await target.health()).url or ""
            async with httpx.AsyncClient(base_url=url, timeout=profile.target.request_timeout) as c:
                async def ids_of(text: str) -> list[int]:
                    templated = await target.apply_template([{"role": "user", "content": text}])
                    return [int(t) for t in await target.tokenize(templated, add_special=True)]

                await _stream(c, await ids_of("warm up"), 4)  # untimed
                if progress is not None:
                    progress(0, len(prompts))
                for i, item in enumerate(prompts):
                    ids = await ids_of(item["prompt"])
                    before = _traffic(pool)
                    ttft, gen_s, count = await _stream(c, ids, max_tokens)
                    after = _traffic(pool)
                    rows.append({"prompt": item["prompt"], "prompt_tokens": len(ids),
                                 "tokens": count, "ttft_s": round(ttft, 4), "gen_s": round(gen_s, 4),
                                 "traffic": _delta(before, after)})
                    if progress is not None:
                        progress(i + 1, len(prompts))
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await target.aclose()
    if own_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return pool_report(name, profile, pool, rows, max_tokens)


def pool_report(name: str, profile: Profile, pool: RpcPool, rows: list[dict[str, Any]],
                max_tokens: int) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in rows)
    gen_tokens = sum(max(r["tokens"] - 1, 0) for r in rows)
    gen_s = sum(r["gen_s"] for r in rows)
    bytes_total = sum(b for r in rows for b, _ in r["traffic"].values())
    trips_total = sum(t for r in rows for _, t in r["traffic"].values())
    workers = []
    status = {w["name"]: w for w in pool.status()["workers"]}
    for m in pool.members:
        b = sum(r["traffic"][m.name][0] for r in rows)
        t = sum(r["traffic"][m.name][1] for r in rows)
        workers.append({"name": m.name, "transport": m.transport.describe(),
                        "layers": status[m.name]["layers"], "backend": status[m.name]["backend"],
                        "bytes_share": round(b / bytes_total, 4) if bytes_total else None,
                        "round_trip_share": round(t / trips_total, 4) if trips_total else None,
                        "bytes_per_token": round(b / tokens, 1) if tokens else None,
                        "round_trips_per_token": round(t / tokens, 3) if tokens else None})
    prompt_rates = [r["prompt_tokens"] / r["ttft_s"] for r in rows if r["ttft_s"] > 0]
    return {
        "profile": name, "target": f"{profile.target.backend} {profile.target.model_path}"
        if profile.target else None, "max_tokens": max_tokens,
        "placement": pool.placement.name, "output_local": pool.cluster.output_local,
        "totals": {
            "prompts": len(rows), "tokens": tokens,
            "prompt_tok_s_median": round(statistics.median(prompt_rates), 2) if prompt_rates else None,
            "ttft_s_median": round(statistics.median(r["ttft_s"] for r in rows), 4) if rows else None,
            "gen_tok_s": round(gen_tokens / gen_s, 3) if gen_s > 0 else None,
            "ms_per_token": round(1000 * gen_s / gen_tokens, 1) if gen_tokens else None,
            "round_trips_per_token": round(trips_total / tokens, 3) if tokens else None,
            "bytes_per_token": round(bytes_total / tokens, 1) if tokens else None,
        },
        "workers": workers,
        "prompts": [{**{k: v for k, v in r.items() if k != "traffic"},
                     "bytes": sum(b for b, _ in r["traffic"].values()),
                     "round_trips": sum(t for _, t in r["traffic"].values())} for r in rows],
    }

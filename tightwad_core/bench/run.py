"""`tightwad bench`: the same prompts through the speculative proxy and straight
to the target, side by side.

The target is started once, on its own; the proxy reaches it by URL, so the
direct requests and the proxy's verify requests hit the same server. With a
link (`LinkSpec`), both reach it through the link emulator: a direct request
crosses the link once, the proxy once per speculation round. Each prompt is
tokenized once with the target's chat template, and both sides get the same
token ids, greedy. Runs alternate direct/proxy and which of the two goes
first, so drift on the machine hits both alike.

With ``baseline`` (a backend name, such as ``"llama-server"``) that server
is launched on the target's own GGUF (one slot, the target's context and threads, behind its
own link when there is one) and timed as a third side in the same rotation:
the thing a user would run instead. Every side caches prompts the same way
(each keeps the previous request's KV cache and re-evaluates only what
changed), and each gets the same untimed warm-up.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import trio

from tightwad_core.bench.link import LinkSpec, serve_link
from tightwad_core.bench.prompts import BenchError
from tightwad_core.bench.report import (
    DirectRun,
    Divergence,
    ProxyRun,
    build_report,
    divergence_index,
    first_difference,
    leviathan,
    make_row,
)
from tightwad_core.cluster.pool import RpcPool
from tightwad_core.config.profiles import BackendConfig, ConfigError, Profile, secret
from tightwad_core.config.schema import ClusterConfig
from tightwad_core.http.server import Running, serve_profile
from tightwad_core.plugins import Registry, load_registry
from tightwad_core.roles import BackendContext, TokenBackend
from tightwad_core.vocab import Vocab

WARMUP_TOKENS = 16
POOL_ALONE = "llama-server"  # the stock coordinator a cluster profile is measured against

#: ``progress(done, total, report)``: after start-up (done 0) and after each prompt;
#: ``report`` is the JSON object of what has been measured so far.
ProgressFn = Callable[[int, int, dict[str, Any]], None]


def check_profile(name: str, profile: Profile, registry: Registry | None = None) -> None:
    """The bench compares a speculating proxy (a mode that drafts: it needs a
    target and a draft) with its own target."""
    registry = registry or load_registry()
    try:
        roles = registry.mode(profile.mode).roles
    except KeyError as exc:
        raise BenchError(f"profile {name!r}: field 'mode': {exc.args[0]}") from None
    if "draft" not in roles:
        raise BenchError(f"profile {name!r} is in {profile.mode!r} mode, which does not draft: the "
                         "bench needs a speculative profile (with a target and a draft)")
    if profile.target is None or profile.draft is None:
        missing = "target" if profile.target is None else "draft"
        raise BenchError(f"profile {name!r} has no [{missing}] table: the bench needs a target and a draft")


class _Sides:
    """The target as the proxy sees it and as a direct client sees it (one
    backend each, both through the link), and a client for the proxy."""

    def __init__(self, direct: TokenBackend, vocab: Vocab, running: Running,
                 proxy: httpx.AsyncClient, baseline: TokenBackend | None = None) -> None:
        self.target = direct
        self.vocab = vocab
        self.running = running
        self.proxy_client = proxy
        self.baseline = baseline
        self.baseline_is_direct = False  # the target is the baseline server itself
        self.pools: dict[str, RpcPool] = {}  # side -> the rpc-server pool it runs on
        self.net: dict[str, list[int]] = {}  # side -> [bytes, round trips, tokens] so far

    async def timed_net(self, side: str, run: Any) -> Any:
        """Run one side's request, adding the pool traffic it caused to ``net``."""
        pool = self.pools.get(side)
        before = _traffic(pool)
        result = await run
        after = _traffic(pool)
        acc = self.net.setdefault(side, [0, 0, 0])
        acc[0] += after[0] - before[0]
        acc[1] += after[1] - before[1]
        acc[2] += result.tokens
        return result

    async def prompt_ids(self, prompt: str) -> list[int]:
        templated = await self.target.apply_template([{"role": "user", "content": prompt}])
        return [int(t) for t in await self.target.tokenize(templated, add_special=True)]

    def decode(self, ids: list[int]) -> str:
        return self.vocab.decode(ids).decode("utf-8", "replace")

    async def direct(self, ids: list[int], n: int, *, baseline: bool = False) -> DirectRun:
        """The target alone (or the baseline server), greedy; timed on the client side."""
        backend = self.baseline if baseline and self.baseline is not None else self.target
        t0 = time.perf_counter()
        run = await backend.complete_ids(ids, n)
        seconds = time.perf_counter() - t0
        text = self.decode(run.tokens) if run.tokens is not None else run.text
        return DirectRun(seconds, text, run.count, run.tokens)

    async def probe(self, ids: list[int], n: int) -> tuple[list[int], list[float | None]]:
        """Untimed: the target's greedy tokens with the top-2 gap at each position."""
        run = await self.target.complete_ids(ids, n, gaps=True)
        return run.tokens or [], list(run.gaps or [])

    async def proxy(self, ids: list[int], n: int) -> ProxyRun:
        mode = self.running.state.mode
        before = mode.status()
        body = {"prompt": ids, "max_tokens": n, "temperature": 0}
        t0 = time.perf_counter()
        resp = await self.proxy_client.post("/v1/completions", json=body)
        seconds = time.perf_counter() - t0
        if resp.status_code != 200:
            raise BenchError(f"the proxy answered {resp.status_code}: {resp.text[:300]}")
        data = resp.json()
        after = mode.status()
        counters: dict[str, float] = {k: int(after.get(k) or 0) - int(before.get(k) or 0)
                                      for k in ("rounds", "drafted", "accepted", "emitted",
                                                "relayed", "ahead_hits")}
        for k in ("draft", "verify"):  # seconds the mode spent drafting and verifying
            counters[f"{k}_s"] = round(float((after.get("time_s") or {}).get(k) or 0.0)
                                       - float((before.get("time_s") or {}).get(k) or 0.0), 6)
        last = getattr(mode, "last_tokens", None)  # a mode that reports its answer's ids
        answer = last() if callable(last) and counters["rounds"] > 0 else None
        return ProxyRun(seconds, str(data["choices"][0]["text"]),
                        int(data["usage"]["completion_tokens"]), counters, answer)

    async def divergence(self, ids: list[int], n: int, direct: DirectRun,
                         proxy: ProxyRun) -> Divergence | None:
        """Where the answers part (untimed); None if they agree after all.
        Token ids are compared where both sides have them: a proxy token that
        merely starts with the target's text (" ten" against " " then "1")
        is found at its own position, not at the next token."""
        probe_ids, gaps = await self.probe(ids, n)
        ref = direct.ids if direct.ids is not None else probe_ids
        if direct.ids is None and self.decode(ref) == proxy.text:
            return None  # a target that sends text decodes it its own way; the tokens agree
        found = first_difference(ref, proxy.ids) if proxy.ids is not None else None
        if proxy.ids is not None and found is None:
            return None
        index = found if found is not None else divergence_index(ref, proxy.text, self.vocab.piece)
        gap = None
        if index < len(ref) and index < len(gaps) and probe_ids[:index] == ref[:index]:
            gap = gaps[index]  # same context as the direct run, so the same distribution
        return Divergence(index, gap)


async def _measure(sides: _Sides, item: dict[str, str], n: int, repeat: int, turn: int) -> dict[str, Any]:
    ids = await sides.prompt_ids(item["prompt"])
    directs: list[DirectRun] = []
    proxies: list[ProxyRun] = []
    bases: list[DirectRun] = []
    diverged: Divergence | None = None
    async def run_direct() -> None:
        directs.append(await sides.timed_net("target", sides.direct(ids, n)))

    async def run_proxy() -> None:
        proxies.append(await sides.timed_net("proxy", sides.proxy(ids, n)))

    async def run_base() -> None:
        bases.append(await sides.timed_net("baseline", sides.direct(ids, n, baseline=True)))

    order = [run_direct, run_proxy] + ([run_base] if sides.baseline is not None else [])
    for r in range(repeat):
        shift = (turn + r) % len(order)  # which side goes first rotates
        for run_side in order[shift:] + order[:shift]:
            await run_side()
        if diverged is None and proxies[-1].text != directs[-1].text:
            diverged = await sides.divergence(ids, n, directs[-1], proxies[-1])
    if sides.baseline_is_direct:
        bases = directs
    return make_row(item["prompt"], item.get("category") or None, directs, proxies, diverged,
                    bases or None)


def _traffic(pool: RpcPool | None) -> tuple[int, int]:
    if pool is None:
        return 0, 0
    return (sum(m.stats.bytes_up + m.stats.bytes_down for m in pool.members),
            sum(m.stats.round_trips for m in pool.members))


def _network(net: dict[str, list[int]]) -> dict[str, Any]:
    """Per side: bytes and round trips to the pool per generated token."""
    return {side: {"bytes": b, "round_trips": rt, "tokens": tok,
                   "bytes_per_token": round(b / tok, 1) if tok else None,
                   "round_trips_per_token": round(rt / tok, 3) if tok else None}
            for side, (b, rt, tok) in net.items()}


def bench_cluster(cluster: ClusterConfig, link: LinkSpec | None) -> ClusterConfig:
    """The profile's pool with ``--link-delay``/``--link-bandwidth`` given to
    its emulated workers (the network of a cluster lies inside the pool)."""
    if link is None:
        return cluster
    workers = [msgspec.structs.replace(
        w, delay=f"{link.delay * 1000:g}ms",
        bandwidth=None if link.bandwidth is None else f"{link.bandwidth:g}")
        if w.transport == "emulated" else w for w in cluster.workers]
    return msgspec.structs.replace(cluster, workers=workers)


def pool_alone(cluster: ClusterConfig) -> ClusterConfig:
    """The same kind of workers for the pool-alone side (rpc-server serves one
    client at a time, so it needs its own), with the output layer on the pool
    as a stock `llama-server -ngl 99` puts it."""
    if not all(w.launch for w in cluster.workers):
        names = ", ".join(w.name for w in cluster.workers if not w.launch)
        raise BenchError(f"the pool-alone side needs rpc-servers of its own, but {names} "
                         "are not launched here (launch = true): bench a one-machine test bed such "
                         "as combined-demo, or time the pool with `tightwad bench` on a "
                         "profile without [cluster]")
    from tightwad_core.runtime.procs import free_port

    workers = [msgspec.structs.replace(w, name=f"{w.name}-alone", port=free_port())
               for w in cluster.workers]
    return msgspec.structs.replace(cluster, workers=workers, output_local=False)


def _normalise(prompts: Sequence[str | dict[str, str]]) -> list[dict[str, str]]:
    return [{"category": "", "prompt": p} if isinstance(p, str) else dict(p) for p in prompts]


def _describe(cfg: Any) -> str:
    where = cfg.model_path if cfg.model_path is not None else cfg.url
    return f"{cfg.backend} {where}" + (f" ({cfg.model})" if cfg.model else "")


# --------------------------------------------------------------------------- the run


async def run_bench(
    profile_name: str,
    profile: Profile,
    *,
    config_dir: Path,
    prompts: Sequence[str | dict[str, str]],
    max_tokens: int,
    draft_tokens: int | None = None,
    link: LinkSpec | None = None,
    repeat: int = 1,
    progress: ProgressFn | None = None,
    run_dir: Path | None = None,
    registry: Registry | None = None,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Start the target, the link (if any) and the proxy, measure every prompt,
    shut everything down, and return the report (see docs/benchmarks.md)."""
    registry = registry or load_registry()
    check_profile(profile_name, profile, registry)
    items = _normalise(prompts)
    if not items:
        raise BenchError("no prompts to run")
    if max_tokens < 1 or repeat < 1:
        raise BenchError("max_tokens and repeat must be at least 1")
    if draft_tokens is not None and not 0 <= draft_tokens <= 64:
        raise BenchError(f"draft tokens must be from 0 to 64, not {draft_tokens}")
    assert profile.target is not None and profile.draft is not None
    if baseline is not None:
        try:
            registry.backend(baseline)
        except KeyError as exc:
            raise BenchError(f"--baseline: {exc.args[0]}") from None
        if profile.target.model_path is None:
            raise BenchError(f"--baseline {baseline} starts it on the target's GGUF, but profile "
                             f"{profile_name!r} reaches its target by URL: give the target a "
                             "model_path")
    own_dir = run_dir is None  # removed again after a clean run; kept (with the logs) after a failure
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="tightwad-bench-"))
    tcfg = profile.target
    try:
        factory = registry.backend(tcfg.backend)
    except KeyError as exc:
        raise ConfigError(f"profile {profile_name!r}: field 'target.backend': {exc.args[0]}") from None
    cluster = None if profile.cluster is None else bench_cluster(profile.cluster, link)
    alone_cluster = cluster
    if cluster is not None:
        link = None  # the delay is the pool's, not between the target and its callers
        baseline = baseline or POOL_ALONE  # what a user of the pool runs without speculation
        alone_cluster = pool_alone(cluster)
    pool = None if cluster is None else RpcPool.from_registry(cluster, registry, run_dir)
    target = factory(tcfg, BackendContext(role="target", config_dir=config_dir, run_dir=run_dir,
                                          pool=pool))
    if not isinstance(target, TokenBackend) or "tokens" not in target.capabilities:
        raise BenchError(f"profile {profile_name!r}: the bench calls the target directly too, with "
                         f"token ids, which the {tcfg.backend!r} backend cannot take")
    rows: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    net: dict[str, list[int]] = {}
    try:
        async with trio.open_nursery() as nursery:
            if pool is not None:
                await nursery.start(pool.serve)
            await nursery.start(target.serve)
            health = await target.health()
            url = health.url or ""
            if link is not None and (link.delay > 0 or link.bandwidth is not None):
                parts = urlsplit(url)
                host = parts.hostname or "127.0.0.1"
                port = parts.port or (443 if parts.scheme == "https" else 80)
                handle = await nursery.start(partial(serve_link, "127.0.0.1", 0, host, port, link))
                url = f"{parts.scheme}://127.0.0.1:{handle.port}"
            spec = profile.speculation
            if draft_tokens is not None:
                spec = msgspec.structs.replace(spec, max_draft_tokens=draft_tokens)
            # both sides reach the started target at `url` (through the link, if any)
            reached = msgspec.structs.replace(tcfg, url=url)
            proxied = msgspec.structs.replace(
                profile, listen="127.0.0.1:0", speculation=spec,
                max_tokens_limit=max(profile.max_tokens_limit, max_tokens), target=reached,
                cluster=None)
            running: Running = await nursery.start(partial(
                serve_profile, profile_name, proxied, config_dir=config_dir, registry=registry,
                listen="127.0.0.1:0", run_dir=run_dir))
            status = running.state.mode.status()
            verifier = status.get("verifier") or {}
            if not verifier.get("speedup"):
                raise BenchError("the proxy is relaying only (no token-level verifier): nothing to compare")
            direct = factory(reached, BackendContext(role="target", config_dir=config_dir, run_dir=run_dir))
            assert isinstance(direct, TokenBackend)
            await nursery.start(direct.serve)
            base: TokenBackend | None = None
            extra: list[TokenBackend] = []  # closed at the end
            base_pool = None
            if baseline is not None and tcfg.backend == baseline and cluster is None:
                base = direct  # the direct side already is the baseline
            elif baseline is not None:
                if alone_cluster is not None:  # the pool alone: its own rpc-servers, same links
                    base_pool = RpcPool.from_registry(alone_cluster, registry, run_dir)
                    await nursery.start(base_pool.serve)
                bcfg = BackendConfig(backend=baseline, model_path=tcfg.model_path,
                                     ctx_size=tcfg.ctx_size, parallel=1, threads=tcfg.threads,
                                     request_timeout=tcfg.request_timeout,
                                     startup_timeout=tcfg.startup_timeout)
                launched = registry.backend(baseline)(bcfg, BackendContext(
                    role="baseline", config_dir=config_dir, run_dir=run_dir, pool=base_pool))
                if not isinstance(launched, TokenBackend) or "tokens" not in launched.capabilities:
                    raise BenchError(f"--baseline {baseline}: the bench sends it token ids, which "
                                     "that backend cannot take")
                await nursery.start(launched.serve)
                base = launched
                extra.append(launched)
                if link is not None and (link.delay > 0 or link.bandwidth is not None):
                    parts = urlsplit((await launched.health()).url or "")
                    handle = await nursery.start(partial(
                        serve_link, "127.0.0.1", 0, parts.hostname or "127.0.0.1",
                        parts.port or 80, link))
                    linked = registry.backend(baseline)(
                        msgspec.structs.replace(bcfg, model_path=None,
                                                url=f"http://127.0.0.1:{handle.port}"),
                        BackendContext(role="baseline", config_dir=config_dir, run_dir=run_dir))
                    assert isinstance(linked, TokenBackend)
                    await nursery.start(linked.serve)
                    base = linked
                    extra.append(base)
            vocab = await target.vocab()
            if vocab is None:
                raise BenchError(f"profile {profile_name!r}: the bench needs the target's vocabulary "
                                 "(launch it from model_path, or use a worker target)")
            key = secret(profile.api_key, profile.api_key_env)
            timeout = httpx.Timeout(tcfg.request_timeout, connect=10.0)
            config = {
                "max_tokens": max_tokens,
                "draft_tokens": spec.max_draft_tokens,
                "repeat": repeat,
                "link_delay_ms": None if link is None else round(link.delay * 1000, 6),
                "link_bandwidth": None if link is None else link.bandwidth,
                "link": None if link is None else link.describe(),
                "verifier": verifier.get("rung"),
                "verifier_label": verifier.get("label"),
                "target": _describe(tcfg),
                "draft": _describe(profile.draft),
                "baseline": None if baseline is None else (
                    f"{baseline} (the direct side)" if base is direct
                    else f"{baseline} {tcfg.model_path}" + (
                        f" on its own pool of {len(alone_cluster.workers)} rpc-servers (output "
                        "layer on the pool)" if alone_cluster is not None else "")),
                "pool": None if pool is None else [
                    {"name": m.name, "transport": m.transport.describe()} for m in pool.members],
            }
            headers = {"authorization": f"Bearer {key}"} if key else {}
            async with httpx.AsyncClient(base_url=running.url, timeout=timeout, headers=headers) as pc:
                sides = _Sides(direct, vocab, running, pc,
                               None if base is None or base is direct else base)
                sides.baseline_is_direct = base is direct
                if pool is not None:
                    sides.pools = {"target": pool, "proxy": pool}
                    if base_pool is not None:
                        sides.pools["baseline"] = base_pool
                net = sides.net
                ids = await sides.prompt_ids(items[0]["prompt"])
                await sides.direct(ids, min(max_tokens, WARMUP_TOKENS))  # untimed warm-up, each way
                await sides.proxy(ids, min(max_tokens, WARMUP_TOKENS))
                if sides.baseline is not None:
                    await sides.direct(ids, min(max_tokens, WARMUP_TOKENS), baseline=True)
                if progress is not None:
                    progress(0, len(items), build_report(profile_name, config, rows, complete=False))
                for i, item in enumerate(items):
                    rows.append(await _measure(sides, item, max_tokens, repeat, turn=i))
                    if progress is not None:
                        progress(i + 1, len(items), build_report(
                            profile_name, config, rows, complete=i + 1 == len(items)))
            await direct.aclose()
            for b in reversed(extra):
                await b.aclose()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await target.aclose()
    if own_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    report = build_report(profile_name, config, rows)
    if cluster is not None:
        report["network"] = _network(net)
        report["model"] = leviathan(report)
    return report


__all__ = ["ProgressFn", "check_profile", "run_bench"]

"""`tightwad bench`: the same prompts through the speculative proxy and straight
to the target, side by side.

The target is started once, on its own; the proxy reaches it by URL, so the
direct requests and the proxy's verify requests hit the same server. With a
link (`LinkSpec`), both reach it through the link emulator: a direct request
crosses the link once, the proxy once per speculation round. Each prompt is
tokenized once with the target's chat template, and both sides get the same
token ids, greedy. Runs alternate direct/proxy and which of the two goes
first, so drift on the machine hits both alike.
"""

from __future__ import annotations

import json
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

from tightwad_core.bench.report import (DirectRun, Divergence, ProxyRun, align_gaps, build_report, divergence_index,
                           gap_of, make_row)
from tightwad_core.bench.link import LinkSpec, serve_link
from tightwad_core.plugins import Registry, load_registry
from tightwad_core.config.profiles import ConfigError, Profile, secret
from tightwad_core.config.shipped import data_file
from tightwad_core.roles import BackendContext
from tightwad_core.http.server import Running, serve_profile

#: Targets the bench can also call directly (it needs their token routes).
DIRECT_KINDS = ("llama-server", "worker")
PROMPTS_FILE = data_file("prompts.json")
WARMUP_TOKENS = 16

#: ``progress(done, total, report)``: after start-up (done 0) and after each prompt;
#: ``report`` is the JSON object of what has been measured so far.
ProgressFn = Callable[[int, int, dict[str, Any]], None]


class BenchError(Exception):
    """A bench that cannot run or a request that failed; the message is one line."""


# --------------------------------------------------------------------------- inputs


def check_profile(name: str, profile: Profile) -> None:
    """The bench compares a speculative proxy with its own target."""
    if profile.mode != "speculative":
        raise BenchError(f"profile {name!r} is in {profile.mode!r} mode: the bench needs a "
                         "'speculative' profile (with a target and a draft)")
    if profile.target is None or profile.draft is None:
        missing = "target" if profile.target is None else "draft"
        raise BenchError(f"profile {name!r} has no [{missing}] table: the bench needs a target and a draft")
    if profile.target.backend not in DIRECT_KINDS:
        raise BenchError(f"profile {name!r}: the bench calls the target directly too, which needs a "
                         f"{' or '.join(DIRECT_KINDS)} target, not {profile.target.backend!r}")


def _items(data: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(data, list):
        raise BenchError(f"{where}: expected a JSON list of prompts (strings or "
                         '{"category", "prompt"} objects)')
    out: list[dict[str, str]] = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append({"category": "", "prompt": item})
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            out.append({"category": str(item.get("category") or ""), "prompt": item["prompt"]})
        else:
            raise BenchError(f"{where}: item {i} is neither a string nor an object with a "
                             '"prompt" string')
    return [p for p in out if p["prompt"].strip()]


def load_prompts(path: Path | None = None, limit: int | None = None) -> list[dict[str, str]]:
    """Prompts from a JSON list (strings or ``{"category", "prompt"}`` objects) or a
    text file with one prompt per line (blank lines skipped); default: the shipped set."""
    path = path or PROMPTS_FILE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BenchError(f"{path}: cannot read the prompts file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BenchError(f"{path}: the prompts file is not UTF-8 text") from None
    strict = path.suffix.lower() == ".json"
    try:
        data = json.loads(text)
    except ValueError as exc:
        if strict:
            raise BenchError(f"{path}: not valid JSON: {exc}") from None
        data = None
    if strict or isinstance(data, list):
        prompts = _items(data, str(path))
    else:  # plain text: one prompt per line
        prompts = [{"category": "", "prompt": line.strip()} for line in text.splitlines() if line.strip()]
    if not prompts:
        raise BenchError(f"{path}: holds no prompts")
    return prompts[:limit] if limit else prompts


# --------------------------------------------------------------------------- helpers


def _post_ok(resp: httpx.Response, where: str) -> Any:
    if resp.status_code != 200:
        raise BenchError(f"{where} answered {resp.status_code}: {resp.text[:300]}")
    return resp.json()


class _Sides:
    """The started target, the proxy and one HTTP client for each side."""

    def __init__(self, target: Any, running: Running, direct: httpx.AsyncClient,
                 proxy: httpx.AsyncClient) -> None:
        self.target = target
        self.running = running
        self.direct_client = direct
        self.proxy_client = proxy
        self.kind = target.kind
        text = running.state.mode.text  # type: ignore[attr-defined]
        if text is None:
            raise BenchError("the proxy is relaying only (no token-level verifier): nothing to compare")
        self.piece: Callable[[int], bytes] = text.piece
        self.eos: frozenset[int] = text.eos

    async def prompt_ids(self, prompt: str) -> list[int]:
        templated = await self.target.apply_template([{"role": "user", "content": prompt}])
        return [int(t) for t in await self.target.tokenize(templated, add_special=True)]

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.piece(t) for t in ids).decode("utf-8", "replace")

    async def direct(self, ids: list[int], n: int) -> DirectRun:
        """The target alone, greedy; timed on the client side."""
        if self.kind == "worker":
            body: dict[str, Any] = {"prompt": ids, "max_tokens": n, "temperature": 0}
            t0 = time.perf_counter()
            resp = await self.direct_client.post("/v1/completions", json=body)
            seconds = time.perf_counter() - t0
            data = _post_ok(resp, "the target (direct)")
            return DirectRun(seconds, str(data["choices"][0]["text"]),
                             int(data["usage"]["completion_tokens"]))
        body = {"prompt": ids, "n_predict": n, "temperature": 0, "return_tokens": True,
                "cache_prompt": True}
        t0 = time.perf_counter()
        resp = await self.direct_client.post("/completion", json=body)
        seconds = time.perf_counter() - t0
        data = _post_ok(resp, "the target (direct)")
        out = [int(t) for t in data.get("tokens") or ()]
        while out and out[-1] in self.eos:
            out.pop()
        return DirectRun(seconds, self.decode(out), len(out), out)

    async def probe(self, ids: list[int], n: int) -> tuple[list[int], list[float | None]]:
        """Untimed: the target's greedy tokens with the top-2 gap at each position."""
        if self.kind == "worker":
            body: dict[str, Any] = {"prompt": ids, "max_tokens": n, "temperature": 0, "logprobs": 2,
                                    "return_tokens_as_token_ids": True}
            data = _post_ok(await self.direct_client.post("/v1/completions", json=body),
                            "the target (probe)")
            lp = data["choices"][0].get("logprobs") or {}
            toks = [int(str(t).rpartition(":")[2]) for t in lp.get("tokens") or ()]
            gaps = [gap_of(list((d or {}).values())) for d in lp.get("top_logprobs") or ()]
            return toks, gaps
        body = {"prompt": ids, "n_predict": n, "temperature": 0, "n_probs": 2, "return_tokens": True,
                "cache_prompt": False}
        data = _post_ok(await self.direct_client.post("/completion", json=body), "the target (probe)")
        toks = [int(t) for t in data.get("tokens") or ()]
        return toks, align_gaps(toks, data.get("completion_probabilities") or [], self.piece)

    async def proxy(self, ids: list[int], n: int) -> ProxyRun:
        mode = self.running.state.mode
        before = mode.status()
        body = {"prompt": ids, "max_tokens": n, "temperature": 0}
        t0 = time.perf_counter()
        resp = await self.proxy_client.post("/v1/completions", json=body)
        seconds = time.perf_counter() - t0
        data = _post_ok(resp, "the proxy")
        after = mode.status()
        counters = {k: int(after.get(k) or 0) - int(before.get(k) or 0)
                    for k in ("rounds", "drafted", "accepted", "emitted", "relayed")}
        return ProxyRun(seconds, str(data["choices"][0]["text"]),
                        int(data["usage"]["completion_tokens"]), counters)

    async def divergence(self, ids: list[int], n: int, direct: DirectRun,
                         proxy_text: str) -> Divergence | None:
        """Where the answers part (untimed); None if they agree after all."""
        probe_ids, gaps = await self.probe(ids, n)
        ref = direct.ids if direct.ids is not None else probe_ids
        if direct.ids is None and self.decode(ref) == proxy_text:
            return None  # a target that sends text decodes it its own way; the tokens agree
        index = divergence_index(ref, proxy_text, self.piece)
        gap = None
        if index < len(ref) and index < len(gaps) and probe_ids[:index] == ref[:index]:
            gap = gaps[index]  # same context as the direct run, so the same distribution
        return Divergence(index, gap)


async def _measure(sides: _Sides, item: dict[str, str], n: int, repeat: int, turn: int) -> dict[str, Any]:
    ids = await sides.prompt_ids(item["prompt"])
    directs: list[DirectRun] = []
    proxies: list[ProxyRun] = []
    diverged: Divergence | None = None
    for r in range(repeat):
        if (turn + r) % 2 == 0:
            directs.append(await sides.direct(ids, n))
            proxies.append(await sides.proxy(ids, n))
        else:
            proxies.append(await sides.proxy(ids, n))
            directs.append(await sides.direct(ids, n))
        if diverged is None and proxies[-1].text != directs[-1].text:
            diverged = await sides.divergence(ids, n, directs[-1], proxies[-1].text)
    return make_row(item["prompt"], item.get("category") or None, directs, proxies, diverged)


def _normalise(prompts: Sequence[str | dict[str, str]]) -> list[dict[str, str]]:
    return [{"category": "", "prompt": p} if isinstance(p, str) else dict(p) for p in prompts]


def _bearer(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


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
) -> dict[str, Any]:
    """Start the target, the link (if any) and the proxy, measure every prompt,
    shut everything down, and return the report (see docs/benchmarks.md)."""
    check_profile(profile_name, profile)
    items = _normalise(prompts)
    if not items:
        raise BenchError("no prompts to run")
    if max_tokens < 1 or repeat < 1:
        raise BenchError("max_tokens and repeat must be at least 1")
    if draft_tokens is not None and not 0 <= draft_tokens <= 64:
        raise BenchError(f"draft tokens must be from 0 to 64, not {draft_tokens}")
    assert profile.target is not None and profile.draft is not None
    registry = registry or load_registry()
    own_dir = run_dir is None  # removed again after a clean run; kept (with the logs) after a failure
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="tightwad-bench-"))
    tcfg = profile.target
    try:
        factory = registry.get("backends", tcfg.backend)
    except KeyError as exc:
        raise ConfigError(f"profile {profile_name!r}: field 'target.backend': {exc.args[0]}") from None
    target = factory(tcfg, BackendContext(role="target", config_dir=config_dir, run_dir=run_dir))
    rows: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(target.serve)
            url = target.base_url
            if link is not None and (link.delay > 0 or link.bandwidth is not None):
                parts = urlsplit(url)
                host = parts.hostname or "127.0.0.1"
                port = parts.port or (443 if parts.scheme == "https" else 80)
                handle = await nursery.start(partial(serve_link, "127.0.0.1", 0, host, port, link))
                url = f"{parts.scheme}://127.0.0.1:{handle.port}"
            spec = profile.speculation
            if draft_tokens is not None:
                spec = msgspec.structs.replace(spec, max_draft_tokens=draft_tokens)
            proxied = msgspec.structs.replace(
                profile, listen="127.0.0.1:0", speculation=spec,
                max_tokens_limit=max(profile.max_tokens_limit, max_tokens),
                target=msgspec.structs.replace(tcfg, url=url, model_path=None))
            running: Running = await nursery.start(partial(
                serve_profile, profile_name, proxied, config_dir=config_dir, registry=registry,
                listen="127.0.0.1:0", run_dir=run_dir))
            key = secret(profile.api_key, profile.api_key_env)
            target_key = secret(tcfg.api_key, tcfg.api_key_env)
            timeout = httpx.Timeout(tcfg.request_timeout, connect=10.0)
            mode: Any = running.state.mode
            config = {
                "max_tokens": max_tokens,
                "draft_tokens": spec.max_draft_tokens,
                "repeat": repeat,
                "link_delay_ms": None if link is None else round(link.delay * 1000, 6),
                "link_bandwidth": None if link is None else link.bandwidth,
                "link": None if link is None else link.describe(),
                "verifier": mode.rung,
                "verifier_label": mode.status()["verifier"]["label"],
                "target": _describe(tcfg),
                "draft": _describe(profile.draft),
            }
            async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                         headers=_bearer(target_key)) as dc, \
                    httpx.AsyncClient(base_url=running.url, timeout=timeout, headers=_bearer(key)) as pc:
                sides = _Sides(target, running, dc, pc)
                ids = await sides.prompt_ids(items[0]["prompt"])
                await sides.direct(ids, min(max_tokens, WARMUP_TOKENS))  # untimed warm-up, each way
                await sides.proxy(ids, min(max_tokens, WARMUP_TOKENS))
                if progress is not None:
                    progress(0, len(items), build_report(profile_name, config, rows, complete=False))
                for i, item in enumerate(items):
                    rows.append(await _measure(sides, item, max_tokens, repeat, turn=i))
                    if progress is not None:
                        progress(i + 1, len(items), build_report(
                            profile_name, config, rows, complete=i + 1 == len(items)))
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await target.aclose()
    if own_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return build_report(profile_name, config, rows)


__all__ = ["BenchError", "LinkSpec", "ProgressFn", "check_profile", "divergence_index", "load_prompts",
           "run_bench"]

"""`tightwad moe profile` and `tightwad moe summary`: record which experts a
MoE model's router picks (on our worker, started with ``--record-routing``)
and show how skewed the choice is (see tightwad_core.moe.profile)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from tightwad_core.cli.main import _fail, _leaf
from tightwad_core.cli.moe import moe

#: The backend capability of our worker's own protocol: the backend that has it
#: launches `tightwad worker`, which records routing with --record-routing.
WORKER_CAPABILITY = "tightwad-verify"
ROUTING_PATH = "/v1/tightwad/routing"
SLOTS = 2  # sequences of the launched worker; as many requests run at once
MAX_PROFILE = 64 << 20  # the most of a routing profile answer that is read
MAX_ANSWER = 1 << 20  # ... of a chat answer
MAX_ERROR = 64 << 10  # ... of an error answer


class TrafficError(Exception):
    """The worker could not be started or asked; the message is one line."""


def _error_text(status: int, body: bytes) -> str:
    text = " ".join(body[:200].decode("utf-8", "replace").split())
    try:
        err = json.loads(body).get("error") or {}
        return " ".join(str(err.get("message") or text).split())[:200]
    except (ValueError, AttributeError):
        return text or f"status {status}"


async def _call(client: Any, method: str, path: str, where: str, limit: int,
                **kw: Any) -> Any:
    """The decoded JSON answer of a request, at most ``limit`` bytes of it;
    `TrafficError` (one line) for anything else."""
    import httpx

    from tightwad_core.http.upstream import read_at_most

    try:
        async with client.stream(method, path, **kw) as resp:
            status = resp.status_code
            body, more = await read_at_most(resp, limit if status == 200 else MAX_ERROR)
    except httpx.HTTPError as exc:
        raise TrafficError(f"cannot reach {where}: {exc.__class__.__name__}: "
                           f"{(str(exc).splitlines() or [''])[0]}") from None
    if status == 401:
        raise TrafficError(f"{where} wants a bearer token: put it in an environment variable "
                           "and name it with --token-env")
    if status != 200:
        raise TrafficError(f"{where} answered {status} at {path}: {_error_text(status, body)}")
    if more:
        raise TrafficError(f"{where} answered more than {limit >> 20} MiB at {path}")
    try:
        data = json.loads(body)
    except ValueError:
        raise TrafficError(f"{where} did not answer JSON at {path}") from None
    if not isinstance(data, dict):
        raise TrafficError(f"{where} did not answer a JSON object at {path}")
    return data


async def _get_routing(client: Any, where: str) -> dict[str, Any]:
    data: dict[str, Any] = await _call(client, "GET", ROUTING_PATH, where, MAX_PROFILE)
    return data


def _worker_backend() -> tuple[str, Any]:
    """The registered backend that launches our worker (found by capability)."""
    from tightwad_core.plugins import load_registry

    registry = load_registry()
    for name in registry.names("backends"):
        factory = registry.backend(name)
        if WORKER_CAPABILITY in getattr(factory, "capabilities", ()):
            return name, factory
    raise TrafficError(f"no installed backend launches a worker with the {WORKER_CAPABILITY!r} "
                       "protocol (`tightwad plugins` lists them)")


async def _record(model: Path, prompts: list[dict[str, str]], max_tokens: int,
                  threads: int | None, run_dir: Path, progress: Any) -> tuple[dict[str, Any], int]:
    """Start the worker on ``model`` with --record-routing, send every prompt as
    a chat request (SLOTS at a time), and return its counts and the completion
    tokens it generated."""
    import httpx
    import trio

    from tightwad_core.config.profiles import BackendConfig
    from tightwad_core.roles import BackendContext

    name, factory = _worker_backend()
    cfg = BackendConfig(backend=name, model_path=str(model.resolve()), parallel=SLOTS,
                        threads=threads, extra_args=["--record-routing"], restart=False,
                        startup_timeout=900.0)  # a large model takes a while to load
    backend = factory(cfg, BackendContext(role="target", config_dir=Path.cwd(), run_dir=run_dir))
    task = progress.add_task(f"starting the worker on {model.name}", total=len(prompts))
    generated = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        url = (await backend.health()).url
        where = f"the worker at {url}"
        progress.update(task, description=f"{len(prompts)} prompts through {model.name}")
        limiter = trio.Semaphore(SLOTS)
        async with httpx.AsyncClient(base_url=url or "", timeout=httpx.Timeout(600.0)) as client:

            async def one(prompt: str) -> None:
                nonlocal generated
                async with limiter:
                    body = {"messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": 0}
                    answer = await _call(client, "POST", "/v1/chat/completions", where,
                                         MAX_ANSWER, json=body)
                usage = answer.get("usage")
                n = usage.get("completion_tokens") if isinstance(usage, dict) else None
                generated += n if isinstance(n, int) else 0
                progress.advance(task)

            async with trio.open_nursery() as requests:
                for p in prompts:
                    requests.start_soon(one, p["prompt"])
            data = await _get_routing(client, where)
        await backend.aclose()
        nursery.cancel_scope.cancel()
    return data, generated


async def _read_worker(url: str, token: str | None) -> dict[str, Any]:
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30.0) as client:
        return await _get_routing(client, f"the worker at {url}")


def _fail_with(exc: BaseException, run_dir: Path | None) -> None:
    """One line for a failed run: exit 130 after Ctrl-C, else 1; a started
    worker's run folder is kept and named (its logs say what went wrong)."""
    from tightwad_core.runtime.procs import StartupError

    leaf = _leaf(exc)
    if not isinstance(leaf, (Exception, KeyboardInterrupt)):
        raise exc
    logs = f" (logs in {run_dir})" if run_dir is not None else ""
    if isinstance(leaf, KeyboardInterrupt):
        _fail(f"interrupted{logs}", 130)
    first = (str(leaf).splitlines() or [""])[0]
    if not isinstance(leaf, (TrafficError, StartupError)):
        first = f"{type(leaf).__name__}: {first}" if first else type(leaf).__name__
    _fail(first + logs, 1)


def _dense_check(model: Path) -> None:
    from tightwad_core.moe.inspect import MoeError, inspect_file

    try:
        info = inspect_file(model)
    except MoeError as exc:
        _fail(str(exc))
        return
    if not info["moe"] and not info["expert_count"]:  # (a split GGUF's first file may hold none)
        _fail(f"{model} is a dense model (no experts): there is no routing to profile")


@moe.command("profile")
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the routing profile (JSON; replaced atomically).")
@click.option("--worker", "worker_url", default=None, metavar="URL",
              help="Read the counts of a running `tightwad worker --record-routing` (real "
                   "traffic from its users) instead of starting one on MODEL.")
@click.option("--token-env", default=None, metavar="VAR",
              help="With --worker: the environment variable that holds its bearer token "
                   "(without it no token is sent).")
@click.option("--prompts", "prompts_path", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Prompts to send: a JSON list of strings or {\"prompt\": ...} objects, or a "
                   "text file with one per line. Default: the bench's shipped prompts.")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1),
              help="Tokens to generate per prompt (greedy).")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="CPU threads of the worker started on MODEL.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def moe_profile(model: Path | None, out: Path, worker_url: str | None, token_env: str | None,
                prompts_path: Path | None, max_tokens: int, threads: int | None,
                as_json: bool) -> None:
    """Record which experts MODEL's router picks, per layer, and write the
    counts to a routing profile (read it with `tightwad moe summary`, plan
    with it with `tightwad moe plan --routing`).

    With MODEL, a worker is started on it with --record-routing and the
    prompts go through its chat API (two at a time); every token it
    evaluates (prompt and generated) is counted. With --worker URL the
    counts a running worker has gathered so far are read instead.

    Exit status 2 for bad input, 1 when the worker fails to start or answer
    (the line names the started worker's logs), 130 after Ctrl-C.
    """
    import trio
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tightwad_core.bench.prompts import BenchError, load_prompts
    from tightwad_core.moe.profile import ProfileError, parse_profile, write_profile

    if (model is None) == (worker_url is None):
        _fail("give either MODEL (a GGUF to start a worker on) or --worker URL, not both"
              if model else "give MODEL (a GGUF to start a worker on) or --worker URL")
    if not out.parent.is_dir():
        _fail(f"--out: folder {out.parent} does not exist")
    prompts_count = generated = 0
    if worker_url is not None:
        given = click.get_current_context().get_parameter_source("max_tokens")
        for flag, value in (("--prompts", prompts_path), ("--threads", threads),
                            ("--max-tokens", None if given is ParameterSource.DEFAULT else max_tokens)):
            if value is not None:
                _fail(f"{flag} is for a worker started on MODEL; --worker reads a running one")
        token = None
        if token_env:  # only when asked: a token is never sent to a URL unbidden
            token = os.environ.get(token_env)
            if not token:
                _fail(f"--token-env: environment variable {token_env} is not set")
        url = worker_url.rstrip("/").removesuffix("/v1")
        source = url
        try:
            data = trio.run(_read_worker, url, token)
        except BaseException as exc:  # noqa: BLE001 - mapped to one line
            _fail_with(exc, None)
            return
    else:
        assert model is not None
        if token_env:
            _fail("--token-env goes with --worker")
        _dense_check(model)
        try:
            prompts = load_prompts(prompts_path)
        except BenchError as exc:
            _fail(str(exc))
            return
        prompts_count, source = len(prompts), str(model)
        run_dir = Path(tempfile.mkdtemp(prefix="tightwad-profile-"))
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        try:
            with progress:
                data, generated = trio.run(partial(_record, model, prompts, max_tokens, threads,
                                                   run_dir, progress))
        except BaseException as exc:  # noqa: BLE001 - mapped to one line
            _fail_with(exc, run_dir)
            return
        shutil.rmtree(run_dir, ignore_errors=True)
    try:
        profile = parse_profile(data, f"the routing counts from {source}")
        write_profile(out, profile)
    except ProfileError as exc:
        _fail(str(exc), 1)
        return
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}")
        return
    facts = {"out": str(out), "source": source, "model": profile.model,
             "tokens": profile.tokens, "batches": profile.batches,
             "moe_layers": len(profile.layers), "expert_count": profile.expert_count,
             "expert_used_count": profile.expert_used_count}
    if model is not None:
        facts.update(prompts=prompts_count, completion_tokens=generated)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    sent = f" from {prompts_count} prompts ({generated} tokens generated)" if model else ""
    click.echo(f"wrote {out}: {profile.tokens} tokens in {profile.batches} batches{sent}; "
               f"{len(profile.layers)} MoE layers of {profile.expert_count} experts, "
               f"{profile.expert_used_count} per token")


@moe.command("summary")
@click.argument("profile_path", metavar="PROFILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--top", default=4, show_default=True, type=click.IntRange(1),
              help="Hottest experts to list per layer.")
@click.option("--svg", "svg", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a heatmap (layers x experts, shaded by share) as an SVG picture.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def moe_summary(profile_path: Path, top: int, svg: Path | None, as_json: bool) -> None:
    """Per layer of a routing profile: the hottest experts and their share of
    the layer's routings, a histogram (one block per expert, scaled to the
    layer's hottest), and the skew: hot ratio (hottest share x experts; 1 is
    uniform), normalized entropy (1 is uniform) and the coefficient of
    variation of the counts (0 is uniform). docs/moe.md defines them."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from tightwad_core.moe.profile import (
        ProfileError,
        heatmap_svg,
        load_profile,
        summarize,
    )
    from tightwad_core.runtime.atomic import write_text

    try:
        profile = load_profile(profile_path)
    except ProfileError as exc:
        _fail(str(exc))
        return
    top = min(top, profile.expert_count)
    info = summarize(profile, top)
    if svg is not None:
        try:
            write_text(svg, heatmap_svg(profile))
        except OSError as exc:
            _fail(f"cannot write {svg}: {exc.strerror or exc}")
        info["svg"] = str(svg)
    if as_json:
        click.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    console = Console()
    console.print(f"{escape(profile.model)} ({escape(profile.architecture)}): {profile.tokens} "
                  f"tokens in {profile.batches} batches, {profile.expert_count} experts, "
                  f"{profile.expert_used_count} per token", highlight=False)
    table = Table()
    table.add_column("layer", justify="right")
    table.add_column("hottest: share", no_wrap=True)
    for col in (f"top {top}", "hot ratio", "entropy", "CV"):
        table.add_column(col, justify="right", no_wrap=True)
    bars = Table(title="routing per expert (height: count against the layer's hottest)",
                 title_justify="left")
    bars.add_column("layer", justify="right")
    bars.add_column(f"experts 0-{profile.expert_count - 1}", overflow="fold")
    for x in info["layers"]:
        hottest = " ".join(f"{h['expert']}:{h['share']:.1%}" for h in x["hottest"]
                           if h["share"] > 0)
        table.add_row(str(x["layer"]), hottest, f"{x['top_share']:.1%}", f"{x['hot_ratio']:.2f}",
                      f"{x['entropy']:.3f}", f"{x['cv']:.3f}")
        bars.add_row(str(x["layer"]), x["histogram"])
    console.print(table)
    console.print(bars)
    o = info["overall"]
    console.print(f"overall (mean of the layers): top {top} {o['top_share']:.1%}, hot ratio "
                  f"{o['hot_ratio']:.2f} (largest {o['max_hot_ratio']:.2f}), entropy "
                  f"{o['entropy']:.3f}, CV {o['cv']:.3f}; uniform routing would give "
                  f"{top / profile.expert_count:.1%}, 1.00, 1.000, 0.000", highlight=False)
    if svg is not None:
        console.print(f"wrote {escape(str(svg))}", highlight=False)

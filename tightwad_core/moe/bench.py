"""`tightwad moe bench`: stream chat completions from any OpenAI-compatible
server (llama-server, Ollama, vLLM, a Tightwad proxy) and time each request
as a client sees it.

Every request is one ``POST /v1/chat/completions`` with ``stream: true`` and
``stream_options.include_usage``. Per request the bench records when it was
sent, when the first generated text arrived (time to first token), when the
last did, and how many tokens came: the server's own ``usage`` count when
its stream reports one, else the number of content chunks. A request whose
stream breaks, answers an error status or carries an error event is
failed; the others go on.

A Tightwad proxy is recognised by its ``GET /v1/tightwad/status``; when its
mode speculates (the status has ``drafted`` and ``accepted`` totals) the run's
acceptance is the difference of those counters before and after, and with
one request at a time also per request (other clients of the same proxy
would be counted too).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from math import ceil
from typing import Any

import httpx
import trio

from tightwad_core.bench.prompts import BenchError
from tightwad_core.http.upstream import read_at_most

#: How long the bench waits for a proxy's counters to include a finished request.
SETTLE_S = 2.0
#: The most the bench holds of one stream line, of an error body, of a small JSON answer.
MAX_LINE = 1 << 20
MAX_ERROR_BODY = 64 << 10
MAX_ANSWER = 1 << 20


class TargetDown(BenchError):
    """The target cannot be reached at all; the message names the URL."""


@dataclass(frozen=True)
class BenchConfig:
    url: str  # the server's base URL, without /v1
    prompts: tuple[str, ...]  # user messages, used in turn
    requests: int = 8  # requests in all
    concurrency: int = 1  # requests in flight at once
    max_tokens: int = 128  # max_tokens of each request
    model: str | None = None  # the model field; None: the first of /v1/models
    token: str | None = None  # bearer token, if the server wants one
    temperature: float = 0.0  # sampling temperature of each request


@dataclass
class Row:
    """One request, updated as its stream arrives."""

    index: int  # 0-based, in the order the requests were made
    prompt: str  # the user message
    state: str = "waiting"  # waiting, streaming, done, failed or cancelled
    sent: float | None = None  # perf_counter when the request went out
    first: float | None = None  # ... when the first generated text arrived
    last: float | None = None  # ... when the last did
    end: float | None = None  # ... when the stream ended (or failed)
    chunks: int = 0  # chunks that carried generated text
    usage_tokens: int | None = None  # completion_tokens, when the server reported them
    error: str | None = None  # one line, for a failed request
    accepted: int | None = None  # draft tokens the proxy accepted (one request at a time only)
    drafted: int | None = None  # draft tokens the proxy proposed (likewise)

    def tokens(self, usage: bool = True) -> int:
        """The server's count (when it gave one and ``usage``), else the chunks."""
        return self.usage_tokens if usage and self.usage_tokens is not None else self.chunks

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None or self.sent is None else self.first - self.sent

    def tok_s(self, usage: bool = True) -> float | None:
        """Generation rate after the first token: (tokens - 1) over first-to-last."""
        n = self.tokens(usage)
        if self.first is None or self.last is None or self.last <= self.first or n < 2:
            return None
        return (n - 1) / (self.last - self.first)

    def seconds(self, now: float) -> float | None:
        if self.sent is None:
            return None
        return (self.end if self.end is not None else now) - self.sent


@dataclass(frozen=True)
class Counters:
    """A speculative proxy's totals, from its status."""

    served: int  # requests it has finished (speculated or relayed)
    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens the target accepted


def counters_of(status: dict[str, Any] | None) -> Counters | None:
    ms = (status or {}).get("mode_status") or {}
    if not all(isinstance(ms.get(k), int) for k in ("drafted", "accepted", "requests")):
        return None
    return Counters(served=ms["requests"] + int(ms.get("relayed") or 0),
                    drafted=ms["drafted"], accepted=ms["accepted"])


@dataclass
class BenchRun:
    """A run's configuration, what the target is, and its rows as they fill in."""

    cfg: BenchConfig
    rows: list[Row] = field(default_factory=list)
    model: str = ""  # the model field sent
    proxy: dict[str, Any] | None = None  # a Tightwad proxy's status before the run; None: not one
    before: Counters | None = None  # a speculative proxy's counters before the run
    after: Counters | None = None  # ... and after it
    started: float | None = None  # perf_counter when the first request went out
    finished: float | None = None  # ... when the last one ended
    settle_s: float = 0.0  # time between requests spent reading the proxy's counters (not timed)

    def __post_init__(self) -> None:
        if not self.rows:
            n = len(self.cfg.prompts)
            self.rows = [Row(i, self.cfg.prompts[i % n]) for i in range(self.cfg.requests)]


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return _one_line(body.decode("utf-8", "replace"))
    if isinstance(err, dict):
        return _one_line(str(err.get("message") or err))
    return _one_line(str(err))


async def _get_small(client: httpx.AsyncClient, path: str) -> tuple[int, bytes]:
    """(status, body) of a GET whose answer is at most MAX_ANSWER; `BenchError`
    for a larger one."""
    async with client.stream("GET", path) as resp:
        body, more = await read_at_most(resp, MAX_ANSWER)
    if more:
        raise BenchError(f"{path} answered more than {MAX_ANSWER >> 20} MiB")
    return resp.status_code, body


def _headers(cfg: BenchConfig) -> dict[str, str]:
    return {"authorization": f"Bearer {cfg.token}"} if cfg.token else {}


async def _status(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """A Tightwad proxy's status, or None for any other server (one whose
    answer is not a status, or larger than any status is)."""
    try:
        status, body = await _get_small(client, "/v1/tightwad/status")
        data = json.loads(body) if status == 200 else None
    except (BenchError, ValueError):
        return None
    return data if isinstance(data, dict) and "mode_status" in data else None


async def _model(client: httpx.AsyncClient, url: str) -> str:
    try:
        status, body = await _get_small(client, "/v1/models")
    except BenchError as exc:
        raise BenchError(f"{url}{exc}: name the model with --model") from None
    if status in (401, 403):
        raise BenchError(f"{url}/v1/models answered {status}: {_error_message(body)} "
                         "(give the bearer token with --token-env)")
    try:
        return str(json.loads(body)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"{url}/v1/models lists no model (HTTP {status}): "
                         "name one with --model") from None


async def _settled(client: httpx.AsyncClient, served: int) -> Counters | None:
    """The proxy's counters once they count ``served`` requests (or after SETTLE_S)."""
    got: Counters | None = None
    with trio.move_on_after(SETTLE_S):
        while True:
            got = counters_of(await _status(client))
            if got is None or got.served >= served:
                return got
            await trio.sleep(0.05)
    return got


def _texts(delta: Any) -> bool:
    """Whether a chat delta carries generated text (content or reasoning)."""
    return isinstance(delta, dict) and any(isinstance(delta.get(k), str) and delta[k]
               for k in ("content", "reasoning_content", "reasoning"))


async def _lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines, split at line feeds only: generated text may hold
    characters (U+2028, U+0085) that str.splitlines and so httpx's aiter_lines
    would split a JSON event at. Only the unfinished line is held, at most
    MAX_LINE bytes of it (`BenchError` beyond)."""
    tail = bytearray()
    too_long = f"a stream line is longer than {MAX_LINE >> 20} MiB"
    async for data in resp.aiter_bytes():
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            tail += data[start:end]
            if len(tail) > MAX_LINE:
                raise BenchError(too_long)
            line = tail.rstrip(b"\r").decode("utf-8", "replace")
            tail.clear()
            start = end + 1
            yield line
        tail += data[start:]
        if len(tail) > MAX_LINE:
            raise BenchError(too_long)
    if tail:
        yield tail.rstrip(b"\r").decode("utf-8", "replace")


async def _stream(client: httpx.AsyncClient, run: BenchRun, row: Row) -> None:
    cfg = run.cfg
    body = {"model": run.model, "messages": [{"role": "user", "content": row.prompt}],
            "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    row.state, row.sent = "streaming", time.perf_counter()
    finished = False
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            answer, _ = await read_at_most(resp, MAX_ERROR_BODY)
            raise BenchError(f"HTTP {resp.status_code}: {_error_message(answer)}")
        async for line in _lines(resp):
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                finished = True
                break
            try:
                event = json.loads(data)
            except ValueError:
                raise BenchError(f"not a JSON event: {_one_line(data, 80)}") from None
            if not isinstance(event, dict):
                continue
            if event.get("error"):
                raise BenchError(_error_message(data.encode()))
            usage = event.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                row.usage_tokens = usage["completion_tokens"]
            choices = event.get("choices")
            for choice in choices if isinstance(choices, list) else []:
                if not isinstance(choice, dict):
                    continue
                if _texts(choice.get("delta")):
                    now = time.perf_counter()
                    row.first = row.first if row.first is not None else now
                    row.last = now
                    row.chunks += 1
                if choice.get("finish_reason"):
                    finished = True  # a usage event may still follow
    if not finished:
        raise BenchError("the stream ended before the answer finished")


async def _request(client: httpx.AsyncClient, run: BenchRun, row: Row,
                   on_update: Callable[[], None]) -> None:
    try:
        await _stream(client, run, row)
        row.state = "done"
    except (BenchError, httpx.HTTPError) as exc:
        row.state = "failed"
        kind = "" if isinstance(exc, BenchError) else type(exc).__name__
        row.error = _one_line(f"{kind}: {exc}" if kind and str(exc) else kind or str(exc))
    finally:
        row.end = time.perf_counter()
        if row.state == "streaming":
            row.state = "cancelled"
        run.finished = row.end
        on_update()
    if run.before is not None and run.cfg.concurrency == 1:
        # one request at a time: the counters' step is this request's
        start = run.after or run.before
        t0 = time.perf_counter()
        try:
            now = await _settled(client, start.served + 1)
        except httpx.HTTPError:
            now = None  # the proxy went away: this row has no figures, the next request says why
        finally:
            run.settle_s += time.perf_counter() - t0
        if now is not None:
            row.drafted, row.accepted = now.drafted - start.drafted, now.accepted - start.accepted
            run.after = now
        on_update()


def client_for(cfg: BenchConfig) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=cfg.url, headers=_headers(cfg),
                             timeout=httpx.Timeout(600.0, connect=10.0))


async def run_bench(run: BenchRun, on_update: Callable[[], None] = lambda: None) -> BenchRun:
    """Fill in ``run``'s rows; a cancelled run keeps what it measured (its rows say
    which requests were cut off). Raises TargetDown when nothing answers at the URL."""
    cfg = run.cfg
    async with client_for(cfg) as client:
        try:
            run.proxy = await _status(client)
            run.model = cfg.model or await _model(client, cfg.url)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise TargetDown(f"cannot reach {cfg.url}: {_one_line(str(exc)) or 'connection refused'}") from None
        except httpx.HTTPError as exc:
            raise TargetDown(f"{cfg.url} does not answer: {type(exc).__name__}: {_one_line(str(exc))}") from None
        run.before = counters_of(run.proxy)
        queue = iter(run.rows)  # shared by the workers: requests go out in order

        async def worker() -> None:
            for row in queue:
                await _request(client, run, row, on_update)

        run.started = time.perf_counter()
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(cfg.concurrency, len(run.rows))):
                    nursery.start_soon(worker)
        finally:
            if run.before is not None and cfg.concurrency > 1:
                with trio.CancelScope(shield=True), trio.move_on_after(SETTLE_S + 1):
                    sent = sum(r.state in ("done", "failed", "cancelled") for r in run.rows)
                    try:
                        run.after = await _settled(client, run.before.served + sent)
                    except httpx.HTTPError:
                        pass
            on_update()
    return run


# --------------------------------------------------------------------------- the report


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(ceil(q / 100 * len(ordered)) - 1, 0)]


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def summary(run: BenchRun, now: float | None = None, usage: bool = True) -> dict[str, Any]:
    """Medians and p90 over the finished requests; the aggregate rate is every
    token received over the run's wall time (first request sent to last ended,
    less the pauses for reading a proxy's counters between requests)."""
    now = time.perf_counter() if now is None else now
    done = [r for r in run.rows if r.state == "done"]
    ttfts = [t for r in done if (t := r.ttft_s) is not None]
    rates = [t for r in done if (t := r.tok_s(usage)) is not None]
    tokens = sum(r.tokens(usage) for r in run.rows)  # every token received, failed requests' too
    end = now if any(r.state == "streaming" for r in run.rows) else (run.finished or now)
    wall = end - run.started - run.settle_s if run.started is not None else None
    return {"done": len(done), "failed": sum(r.state == "failed" for r in run.rows),
            "cancelled": sum(r.state == "cancelled" for r in run.rows),
            "not_sent": sum(r.state == "waiting" for r in run.rows),
            "tokens": tokens, "wall_s": _r(wall),
            "ttft_median_s": _r(statistics.median(ttfts)) if ttfts else None,
            "ttft_p90_s": _r(percentile(ttfts, 90)),
            "tok_s_median": _r(statistics.median(rates), 2) if rates else None,
            "tok_s_aggregate": _r(tokens / wall, 2) if wall and tokens else None}


def acceptance(run: BenchRun) -> dict[str, Any] | None:
    if run.before is None or run.after is None:
        return None
    drafted = run.after.drafted - run.before.drafted
    accepted = run.after.accepted - run.before.accepted
    return {"accepted": accepted, "drafted": drafted,
            "rate": round(accepted / drafted, 4) if drafted else None}


def token_count(run: BenchRun) -> str:
    """"usage" when every finished request's tokens are the server's own count."""
    ended = [r for r in run.rows if r.state == "done"]
    return "usage" if ended and all(r.usage_tokens is not None for r in ended) else "chunks"


def report(run: BenchRun, interrupted: bool = False) -> dict[str, Any]:
    """The JSON document `tightwad moe bench --json` prints."""
    counting = token_count(run)
    now = time.perf_counter()
    results = []
    usage = counting == "usage"  # one way of counting for the whole run
    for r in run.rows:
        item: dict[str, Any] = {
            "index": r.index, "prompt": r.prompt, "state": r.state, "ttft_s": _r(r.ttft_s),
            "tokens": r.tokens(usage), "seconds": _r(r.seconds(now)), "tok_s": _r(r.tok_s(usage), 2),
            "error": r.error}
        if run.before is not None:
            item["accepted"], item["drafted"] = r.accepted, r.drafted
        results.append(item)
    target: dict[str, Any] = {"url": run.cfg.url, "model": run.model, "tightwad": run.proxy is not None}
    if run.proxy is not None:
        target["mode"] = run.proxy.get("mode")
        target["verifier"] = (run.proxy.get("mode_status") or {}).get("verifier")
    return {"target": target, "requests": run.cfg.requests, "concurrency": run.cfg.concurrency,
            "max_tokens": run.cfg.max_tokens, "temperature": run.cfg.temperature,
            "token_count": counting, "complete": not interrupted and all(
                r.state in ("done", "failed") for r in run.rows),
            "summary": summary(run, now, usage), "acceptance": acceptance(run), "results": results}

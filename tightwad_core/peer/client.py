"""Asking an agent from elsewhere: the coordinator's `tightwad status` and
`tightwad peer status` use it."""

from __future__ import annotations

import os
from typing import Any

import httpx


def headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def agent_report(url: str, token: str | None, timeout: float = 5.0,
                 ours: str | None = None) -> dict[str, Any]:
    """How the agent at ``url`` is, in a word (``state``: ok, mismatch,
    unreachable, refused, error) and a line (``detail``), with its version
    and, when the token is accepted, its info; ``ours``: the version to
    compare with (default: this install's)."""
    from tightwad_core.peer.app import version

    ours = ours or version()
    out: dict[str, Any] = {"url": url, "state": "error", "version": None, "detail": "", "info": None}
    base = url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout) as c:
            health = c.get(base + "/v1/peer/health")
            data = health.json() if health.status_code == 200 else None
            if not isinstance(data, dict) or "version" not in data:
                out["detail"] = f"{url} is not a tightwad agent (HTTP {health.status_code})"
                return out
            out["version"] = str(data["version"])
            info = c.get(base + "/v1/peer/info", headers=headers(token))
    except httpx.TimeoutException:
        out.update(state="unreachable", detail=f"agent unreachable: {url} timed out (a firewall? "
                   "open its TCP port)")
        return out
    except httpx.HTTPError as exc:
        out.update(state="unreachable", detail=f"agent unreachable: {url}: {exc or type(exc).__name__}")
        return out
    except ValueError:
        out["detail"] = f"{url} is not a tightwad agent (its answer is not JSON)"
        return out
    if info.status_code in (401, 403):
        out.update(state="refused", detail=f"the agent refuses us (HTTP {info.status_code}): "
                   + ("set its token in agent_token_env" if not token else "wrong token or address"))
    elif info.status_code == 200:
        try:
            data = info.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            out["detail"] = f"{url} answered /v1/peer/info with something other than a JSON object"
            return out
        out["info"] = data
        out["state"] = "ok"
    else:
        out["detail"] = f"the agent answered HTTP {info.status_code}"
    if out["version"] != ours and out["state"] in ("ok", "refused"):
        out["state"] = "mismatch"
        out["detail"] = f"version mismatch: the agent runs tightwad {out['version']}, this is {ours}"
    elif out["state"] == "ok":
        out["detail"] = f"tightwad {out['version']}"
    return out


def annotate_workers(workers: list[dict[str, Any]], timeout: float = 3.0) -> None:
    """Add each cluster worker's ``agent_report`` (for those whose profile
    names an ``agent``), the token read from ``agent_token_env``; the agents
    are asked at once, so a slow one costs ``timeout`` once, not per worker."""
    import trio

    asked = [w for w in workers if w.get("agent")]
    if not asked:
        return

    async def report(w: dict[str, Any]) -> None:
        env = w.get("agent_token_env")
        w["agent_report"] = await trio.to_thread.run_sync(
            agent_report, w["agent"], os.environ.get(env) if env else None, timeout)

    async def every() -> None:
        async with trio.open_nursery() as nursery:
            for w in asked:
                nursery.start_soon(report, w)

    trio.run(every)

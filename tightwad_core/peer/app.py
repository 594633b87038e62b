"""The agent's HTTP routes.

Every request passes, in order: the CIDR allowlist (403; this machine's own
loopback clients always pass it), the bearer token
(401; only `/v1/peer/health` is open; an agent without a token listens on
loopback only and serves loopback clients only), the body limit (413) and
JSON bodies only. Nothing a request sends is used as a path or a program:
models are looked up by the names the listing gives them, the rpc-worker's
executable comes from the config and its port from the configured range.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio

from tightwad_core.errors import BadRequest, Forbidden, NotFound, TightwadError, Unauthorized
from tightwad_core.http.common import decode_body
from tightwad_core.http.serving import BrowserPolicy, guard, json_response
from tightwad_core.peer import host
from tightwad_core.peer.worker import Refused

if TYPE_CHECKING:
    from tightwad_core.peer.agent import AgentState

HEALTH = "/v1/peer/health"
MAX_LOG_LINES = 1000


def version() -> str:
    from tightwad_core import __version__

    return __version__


class StartRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The only fields a start may send; anything else (a binary, a path) is a 400."""

    port: int
    threads: int | None = None


def _render(exc: TightwadError) -> Response:
    return json_response(exc.body(), exc.status)


def _client_ip() -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    addr = request.remote_addr or ""
    try:
        ip = ipaddress.ip_address(addr.strip("[]").split("%")[0])
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def create_peer_app(state: AgentState) -> QuartTrio:
    settings = state.settings
    app = QuartTrio("tightwad-peer")

    @app.before_request
    async def _allowlist() -> None:  # registered first: runs before the token check
        ip = _client_ip()
        local = ip is not None and ip.is_loopback  # this machine's own tools (peer start/status)
        if settings.allow and not local and (ip is None or not any(ip in net for net in settings.allow)):
            raise Forbidden(f"this agent does not serve {request.remote_addr} (not in its `allow` "
                            "list)", code="address_not_allowed")
        if settings.token is None and (ip is None or not ip.is_loopback):
            raise Unauthorized("this agent has no token, so it serves this machine only")

    guard(app, api_key=settings.token, max_body_bytes=settings.cfg.max_body_bytes, render=_render,
          browser=BrowserPolicy(bind_host=settings.host), open_paths=frozenset({HEALTH}))

    @app.get(HEALTH)
    async def health() -> Response:
        return json_response({"ok": True, "version": version()})

    @app.get("/v1/peer/info")
    async def info() -> Response:
        return json_response(await trio.to_thread.run_sync(_info, state))

    @app.get("/v1/peer/models")
    async def models() -> Response:
        found = await trio.to_thread.run_sync(host.list_models, settings.model_dirs)
        return json_response({"models": [m.public() for m in found],
                              "folders": [str(d) for d in settings.model_dirs]})

    @app.get("/v1/peer/models/<path:name>")
    async def model(name: str) -> Response:
        found = await trio.to_thread.run_sync(host.find_model, settings.model_dirs, name)
        if found is None:
            raise NotFound(f"no model named {name[:200]!r} in this agent's model_dirs")
        return json_response(found.public())

    @app.get("/v1/peer/rpc-worker")
    async def rpc_worker() -> Response:
        return json_response(state.rpc.state())

    @app.post("/v1/peer/rpc-worker/start")
    async def rpc_worker_start() -> Response:
        body = decode_body(await request.get_data(cache=False), StartRequest)
        try:
            return json_response(await state.rpc.start(body.port, body.threads))
        except Refused as exc:
            err = BadRequest(str(exc), param="port" if "port" in str(exc) else None)
            err.status = exc.status
            raise err from None

    @app.post("/v1/peer/rpc-worker/stop")
    async def rpc_worker_stop() -> Response:
        return json_response(await state.rpc.stop())

    @app.get("/v1/peer/logs")
    async def logs() -> Response:
        service = request.args.get("service", "agent")
        rings = {"agent": state.agent_log, "rpc-worker": state.rpc_log}
        if service not in rings:
            raise BadRequest(f"no service named {service[:100]!r} (services: agent, rpc-worker)",
                             param="service")
        raw = request.args.get("lines", "100")
        if not raw.isdigit() or not 0 < int(raw) <= MAX_LOG_LINES:
            raise BadRequest(f"lines must be a number from 1 to {MAX_LOG_LINES}", param="lines")
        return json_response({"service": service, "lines": rings[service].tail(int(raw))})

    return app


def _info(state: AgentState) -> dict[str, Any]:
    """Blocking: the vendor tools run here."""
    from tightwad_core.runtime.engine import installed_backend
    from tightwad_core.runtime.procs import usable_cores
    from tightwad_core.runtime.rpc import engine_version

    protocol = engine_version()
    return {"version": version(), "hostname": socket.gethostname(),
            "engine_protocol": str(protocol) if protocol else None,
            "engine_backend": installed_backend(), "gpus": host.gpus(),
            "cpu": {"count": os.cpu_count(), "usable": usable_cores()},
            "memory": host.memory(), "url": state.url,
            "model_dirs": [str(d) for d in state.settings.model_dirs],
            "peers": list(state.settings.cfg.peers), "discovery": state.settings.cfg.discovery,
            "discovered": state.book.urls() if state.book is not None else [],
            "rpc_worker": state.rpc.state()["state"], "seeding": len(state.store.names()),
            "started": state.started}

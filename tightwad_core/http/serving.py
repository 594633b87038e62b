"""What every Tightwad HTTP server shares (the proxy and the worker): the
bearer check, the browser checks (Host, Origin, JSON content type), the body
limit, OpenAI-shaped error bodies, and hypercorn on trio with a graceful
shutdown."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hyper_serve
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tightwad_core.errors import (
    Forbidden,
    PayloadTooLarge,
    TightwadError,
    Unauthorized,
    UnsupportedMediaType,
)

log = logging.getLogger("tightwad.http")
_enc = msgspec.json.Encoder()
OPEN_PATHS = frozenset({"/health"})


def json_response(obj: object, status: int = 200) -> Response:
    return Response(_enc.encode(obj), status=status, content_type="application/json")


def check_bearer(expected: str | None, header: str | None) -> None:
    """Raise `Unauthorized` unless ``header`` carries ``Bearer <expected>``
    (compared in constant time); no token configured means open."""
    if not expected:
        return
    token = ""
    if header and header[:7].lower() == "bearer ":
        token = header[7:].strip()
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("missing or wrong bearer token (send `Authorization: Bearer <key>`)")


def _loopback_name(host: str) -> bool:
    if host in ("localhost", "localhost.") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostname(value: str) -> str:
    """The host part of a Host header (``[::1]:8088`` -> ``::1``), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class BrowserPolicy:
    """What a web page in the user's browser may do with a server on their
    machine. Without a bearer token, only requests naming this machine in
    ``Host`` (loopback names, the bound address, ``allowed_hosts``) are served:
    a DNS-rebinding page names its own host. A request with an ``Origin``
    (browsers send it on cross-site requests) is served only for an origin in
    ``allowed_origins`` (``"*"``: any), which then also gets its CORS preflight
    answered. JSON bodies must say so: a page can send ``text/plain`` across
    sites without a preflight, never ``application/json``."""

    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def check_host(self, header: str | None, token_required: bool) -> None:
        if token_required or "*" in self.allowed_hosts:
            return  # the token is what keeps pages out; Host names vary on a LAN
        host = _hostname(header or "")
        if (_loopback_name(host) or host == _hostname(self.bind_host)
                or host in {h.lower() for h in self.allowed_hosts}):
            return
        raise Forbidden(f"Host {header!r} is not this server's: requests must name it as "
                        "localhost or 127.0.0.1 (add other names to allowed_hosts)",
                        code="host_not_allowed")

    def origin_allowed(self, origin: str) -> bool:
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        host = request.headers.get("host", "")
        parts = urlsplit(origin)
        return parts.netloc.lower() == host.lower()  # same origin: a page of this server

    def check_origin(self, origin: str | None) -> None:
        if origin is not None and not self.origin_allowed(origin):
            raise Forbidden(f"requests from the web page at {origin} are not allowed: add it to "
                            "allowed_origins to let that page call this server",
                            code="origin_not_allowed")


def _check_json(method: str) -> None:
    """A body must be sent as JSON. Command-line clients that send none or
    curl's ``-d`` default (form-urlencoded) are let through when no browser
    is involved (no ``Origin``, no ``Sec-Fetch-Site``); ``text/plain`` and
    multipart bodies never are, and a browser's request must say JSON."""
    if method not in ("POST", "PUT", "PATCH") or not (request.content_length or 0):
        return
    kind = (request.mimetype or "").lower()
    if kind == "application/json" or kind.endswith("+json"):
        return
    browser = "origin" in request.headers or "sec-fetch-site" in request.headers
    if not browser and kind in ("", "application/x-www-form-urlencoded"):
        return
    raise UnsupportedMediaType(f"a request body must be JSON sent as Content-Type: "
                               f"application/json, not {kind or 'no content type'} "
                               "(with curl: -H 'Content-Type: application/json')")


def guard(app: QuartTrio, *, api_key: str | None, max_body_bytes: int,
          render: Callable[[TightwadError], Response],
          browser: BrowserPolicy | None = None,
          open_paths: frozenset[str] = OPEN_PATHS) -> None:
    """Install auth, the browser checks, the body limit and the error handlers
    on ``app``. ``render`` turns an error into the response body clients expect;
    ``open_paths`` are served without the bearer token."""
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # streams may run long
    app.config["BODY_TIMEOUT"] = 60
    policy = browser or BrowserPolicy()

    @app.before_request
    async def _guard() -> Response | None:
        policy.check_host(request.headers.get("host"), bool(api_key))
        origin = request.headers.get("origin")
        policy.check_origin(origin)
        if request.method == "OPTIONS" and origin is not None:  # an allowed page's preflight
            return Response(b"", status=204, headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "access-control-request-headers", "authorization, content-type"),
                "Access-Control-Max-Age": "600", "Vary": "Origin"})
        if request.path not in open_paths:
            check_bearer(api_key, request.headers.get("authorization"))
        length = request.content_length
        if length is not None and length > max_body_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes is over the limit of "
                                  f"{max_body_bytes}")
        _check_json(request.method)
        return None

    @app.after_request
    async def _cors(resp: Response) -> Response:
        origin = request.headers.get("origin")
        if origin is not None and policy.origin_allowed(origin):
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Vary"] = "Origin"
        return resp

    @app.errorhandler(TightwadError)
    async def _ours(exc: TightwadError) -> Response:
        resp = render(exc)
        resp.headers.update(exc.headers())
        return resp

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:  # the rest of the body is never read: the connection must end
            resp = render(PayloadTooLarge(f"request body is over the limit of {max_body_bytes} bytes"))
            resp.headers["Connection"] = "close"
            return resp
        err = TightwadError(exc.description or exc.name)
        err.status = status
        err.type = "not_found_error" if status == 404 else "invalid_request_error"
        return render(err)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.path)
        return render(TightwadError(f"internal error: {exc.__class__.__name__}"))


async def serve_app(app: QuartTrio, host: str, port: int, shutdown: trio.Event, *,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until ``shutdown`` is set (open requests get 3 s to finish);
    ``task_status.started`` receives the bound URLs."""
    hc = HyperConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.keep_alive_max_requests = 1_000_000  # hypercorn's 1000 would drop busy clients
    hc.graceful_timeout = 3.0
    await hyper_serve(app, hc, shutdown_trigger=shutdown.wait, task_status=task_status)

"""What every Tightwad HTTP server shares (the proxy and the worker): the
bearer check, the body limit, OpenAI-shaped error bodies, and hypercorn on
trio with a graceful shutdown."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

import msgspec
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hyper_serve
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tightwad_core.errors import PayloadTooLarge, TightwadError, Unauthorized

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


def guard(app: QuartTrio, *, api_key: str | None, max_body_bytes: int,
          render: Callable[[TightwadError], Response]) -> None:
    """Install auth, the body limit and the error handlers on ``app``.
    ``render`` turns an error into the response body clients expect."""
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # streams may run long
    app.config["BODY_TIMEOUT"] = 60

    @app.before_request
    async def _guard() -> None:
        if request.path not in OPEN_PATHS:
            check_bearer(api_key, request.headers.get("authorization"))
        length = request.content_length
        if length is not None and length > max_body_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes is over the limit of "
                                  f"{max_body_bytes}")

    @app.errorhandler(TightwadError)
    async def _ours(exc: TightwadError) -> Response:
        resp = render(exc)
        resp.headers.update(exc.headers())
        return resp

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            return render(PayloadTooLarge(f"request body is over the limit of {max_body_bytes} bytes"))
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

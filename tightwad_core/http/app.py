"""The QuartTrio application: routes, auth, limits and error bodies."""

from __future__ import annotations

import logging
import time

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tightwad_core.http.common import ServerState
from tightwad_core.errors import PayloadTooLarge, TightwadError
from tightwad_core.http.metrics import Metrics

_enc = msgspec.json.Encoder()
OPEN_PATHS = frozenset({"/health"})


def _json(obj: object, status: int = 200) -> Response:
    return Response(_enc.encode(obj), status=status, content_type="application/json")


def _is_ollama() -> bool:
    return request.path.startswith("/api/")


def error_response(exc: TightwadError) -> Response:
    if _is_ollama():
        return _json({"error": exc.message}, exc.status)
    return _json(exc.body(), exc.status)


def create_app(st: ServerState) -> QuartTrio:
    from tightwad_core.http import ollama as api_ollama
    from tightwad_core.http import openai as api_openai

    app = QuartTrio("tightwad")
    app.config["TIGHTWAD_STATE"] = st
    app.config["MAX_CONTENT_LENGTH"] = st.profile.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    app.logger.setLevel(logging.INFO)
    app.register_blueprint(api_openai.bp)
    app.register_blueprint(api_ollama.bp)

    metrics = Metrics(st)
    app.config["TIGHTWAD_METRICS"] = metrics

    @app.before_request
    async def _auth() -> None:
        request.tightwad_t0 = time.perf_counter()  # type: ignore[attr-defined]
        if request.path not in OPEN_PATHS:
            st.check_auth(request.headers.get("authorization"))
        length = request.content_length
        if length is not None and length > st.profile.max_body_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes is over the limit of "
                                  f"{st.profile.max_body_bytes}")

    @app.after_request
    async def _count(response: Response) -> Response:
        t0 = getattr(request, "tightwad_t0", None)
        if t0 is not None and request.url_rule is not None:
            metrics.observe(request.url_rule.rule, response.status_code, time.perf_counter() - t0)
        return response

    @app.errorhandler(TightwadError)
    async def _ours(exc: TightwadError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            return error_response(PayloadTooLarge(
                f"request body is over the limit of {st.profile.max_body_bytes} bytes"))
        err = TightwadError(exc.description or exc.name)
        err.status = status
        err.type = "not_found_error" if status == 404 else "invalid_request_error"
        return error_response(err)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        app.logger.exception("unexpected error on %s", request.path)
        return error_response(TightwadError(f"internal error: {exc.__class__.__name__}"))

    @app.get("/health")
    async def health() -> Response:
        checks = {}
        with trio.move_on_after(5):
            for role, backend in st.backends.items():
                h = await backend.health()
                checks[role] = {"ok": h.ok, "detail": h.detail, "backend": backend.kind}
        ok = bool(checks) and all(c["ok"] for c in checks.values())
        return _json({"status": "ok" if ok else "degraded", "profile": st.profile_name,
                      "mode": st.mode.name, "backends": checks}, 200 if ok else 503)

    @app.get("/v1/tightwad/status")
    async def status() -> Response:
        checks = {}
        with trio.move_on_after(5):
            for role, backend in st.backends.items():
                h = await backend.health()
                checks[role] = {"ok": h.ok, "detail": h.detail, "backend": backend.kind, "url": h.url}
        return _json({"profile": st.profile_name, "mode": st.mode.name,
                      "uptime_s": round(time.time() - st.started, 1),
                      "served_model": await st.served_model(), "backends": checks,
                      "mode_status": st.mode.status()})

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def root() -> Response:
        return Response("Tightwad is running", content_type="text/plain")

    return app

"""The QuartTrio application: routes, auth, limits and error bodies."""

from __future__ import annotations

import logging
import time

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, current_app, request
from quart_trio import QuartTrio

from tightwad_core.errors import TightwadError
from tightwad_core.http.common import ServerState
from tightwad_core.http.metrics import Metrics
from tightwad_core.http.serving import BrowserPolicy, guard, json_response

log = logging.getLogger("tightwad.http")


def _is_ollama() -> bool:
    return request.path.startswith("/api/")


def error_response(exc: TightwadError) -> Response:
    st = current_app.config.get("TIGHTWAD_STATE")
    if st is not None:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        exc = st.public(exc)
    if _is_ollama():
        return json_response({"error": exc.message}, exc.status)
    return json_response(exc.body(), exc.status)


def create_app(st: ServerState, bind_host: str = "127.0.0.1") -> QuartTrio:
    from tightwad_core.http import ollama as api_ollama
    from tightwad_core.http import ollama_models  # noqa: F401  (its routes join the Ollama blueprint)
    from tightwad_core.http import openai as api_openai

    app = QuartTrio("tightwad")
    app.config["TIGHTWAD_STATE"] = st
    app.logger.setLevel(logging.INFO)
    app.register_blueprint(api_openai.bp)
    app.register_blueprint(api_ollama.bp)

    metrics = Metrics(st)
    app.config["TIGHTWAD_METRICS"] = metrics

    @app.before_request
    async def _clock() -> None:  # first, so refused requests are counted too
        request.tightwad_t0 = time.perf_counter()  # type: ignore[attr-defined]

    browser = BrowserPolicy(bind_host=bind_host, allowed_hosts=tuple(st.profile.allowed_hosts),
                            allowed_origins=tuple(st.profile.allowed_origins))
    guard(app, api_key=st.api_key, max_body_bytes=st.profile.max_body_bytes, render=error_response,
          browser=browser)

    @app.after_request
    async def _count(response: Response) -> Response:
        t0 = getattr(request, "tightwad_t0", None)
        if t0 is not None and request.url_rule is not None:
            metrics.observe(request.url_rule.rule, response.status_code, time.perf_counter() - t0)
        return response

    @app.get("/health")
    async def health() -> Response:
        checks = {}
        with trio.move_on_after(5):
            for role, backend in st.backends.items():
                h = await backend.health()
                checks[role] = {"ok": h.ok, "detail": st.scrub(h.detail or "") or h.detail,
                                "backend": backend.kind}
        ok = bool(checks) and all(c["ok"] for c in checks.values())
        return json_response({"status": "ok" if ok else "degraded", "profile": st.profile_name,
                      "mode": st.mode.name, "backends": checks}, 200 if ok else 503)

    @app.get("/v1/tightwad/status")
    async def status() -> Response:
        checks = {}
        with trio.move_on_after(5):
            for role, backend in st.backends.items():
                h = await backend.health()
                checks[role] = {"ok": h.ok, "detail": h.detail, "backend": backend.kind, "url": h.url}
        return json_response({"profile": st.profile_name, "mode": st.mode.name,
                      "uptime_s": round(time.time() - st.started, 1),
                      "served_model": await st.served_model(), "backends": checks,
                      "mode_status": st.mode.status(),
                      "cluster": st.pool.status() if st.pool is not None else None})

    @app.post("/v1/tightwad/swap")
    async def swap() -> Response:
        from tightwad_core.http.swap import swap as do_swap

        return json_response(await do_swap(st, await request.get_data()))

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def root() -> Response:
        return Response("Tightwad is running", content_type="text/plain")

    return app

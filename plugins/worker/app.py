"""The worker's HTTP app: the speculation routes under ``/v1/tightwad/``, the
llama-server-shaped helper routes, and the plain OpenAI routes (see
``api_plain``). Errors are OpenAI-shaped JSON bodies."""

from __future__ import annotations

import logging
from typing import Any

from quart import Response, current_app, request
from quart_trio import QuartTrio

from tightwad_core.errors import BadRequest, TightwadError
from tightwad_core.http.common import decode_body
from tightwad_core.http.serving import BrowserPolicy, guard, json_response
from tightwad_plugins.worker.engine import Engine
from tightwad_plugins.worker.protocol import (
    DetokenizeBody,
    DraftRequest,
    TemplateBody,
    TokenizeBody,
    VerifyRequest,
    check_tokens,
)
from tightwad_plugins.worker.routing import NoExperts, RoutingNotRecorded, RoutingRecorder

log = logging.getLogger("tightwad.worker")


def engine() -> Engine:
    eng: Engine = current_app.config["WORKER_ENGINE"]
    return eng


def recorder(eng: Engine) -> RoutingRecorder:
    """The routing recorder, or the error that says why there is none."""
    rec = eng.context.routing
    if not eng.context.record_routing:
        raise RoutingNotRecorded("this worker does not record routing: start it with "
                                 "--record-routing")
    if rec is None:
        raise NoExperts(f"{eng.model.path.name} has no experts: there is no routing to record")
    if rec.error is not None:
        raise TightwadError(rec.error)
    return rec


def routing_info(eng: Engine) -> dict[str, Any]:
    """What /v1/tightwad/info says about routing recording."""
    rec = eng.context.routing
    return {"record_routing": eng.context.record_routing,
            "routing": None if rec is None else {
                "moe_layers": len(rec.layers), "expert_count": rec.n_expert,
                "expert_used_count": rec.n_used, "tokens": rec.tokens, "error": rec.error}}


def create_worker_app(eng: Engine, api_key: str | None = None, max_body_bytes: int = 8 << 20,
                      max_tokens_limit: int = 4096, bind_host: str = "127.0.0.1") -> QuartTrio:
    from tightwad_plugins.worker import api_plain

    app = QuartTrio("tightwad-worker")
    app.config["WORKER_ENGINE"] = eng
    app.config["WORKER_MAX_TOKENS"] = max_tokens_limit
    app.register_blueprint(api_plain.bp)
    guard(app, api_key=api_key, max_body_bytes=max_body_bytes,
          render=lambda exc: json_response(exc.body(), exc.status),
          browser=BrowserPolicy(bind_host=bind_host))

    # ------------------------------------------------------------ speculation

    @app.post("/v1/tightwad/verify")
    async def verify() -> Response:
        body = decode_body(await request.get_data(cache=False), VerifyRequest)
        return json_response(await eng.verify(body))

    @app.post("/v1/tightwad/draft")
    async def draft() -> Response:
        body = decode_body(await request.get_data(cache=False), DraftRequest)
        return json_response(await eng.draft(body))

    @app.delete("/v1/tightwad/sessions/<sid>")
    async def delete_session(sid: str) -> Response:
        eng.delete(sid)
        return Response(b"", status=204)

    @app.get("/v1/tightwad/vocab")
    async def vocab() -> Response:
        return Response(eng.vocab_body, content_type="application/json")

    @app.get("/v1/tightwad/info")
    async def info() -> Response:
        return json_response({**eng.info(), **routing_info(eng)})

    @app.get("/v1/tightwad/routing")
    async def routing() -> Response:
        return json_response(recorder(eng).profile())

    @app.post("/v1/tightwad/routing/reset")
    async def routing_reset() -> Response:
        return json_response(recorder(eng).profile(reset=True))

    # ------------------------------------------------------------ llama-server shapes

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok"})

    @app.post("/tokenize")
    async def tokenize() -> Response:
        body = decode_body(await request.get_data(cache=False), TokenizeBody)
        return json_response({"tokens": await eng.tokenize(body.content, body.add_special)})

    @app.post("/detokenize")
    async def detokenize() -> Response:
        body = decode_body(await request.get_data(cache=False), DetokenizeBody)
        check_tokens(body.tokens, eng.vocab.n_vocab)
        text = eng.vocab.decode(body.tokens).decode("utf-8", "replace")
        return json_response({"content": text})

    @app.post("/apply-template")
    async def apply_template() -> Response:
        body = decode_body(await request.get_data(cache=False), TemplateBody)
        if not body.messages:
            raise BadRequest("messages must not be empty", param="messages")
        return json_response({"prompt": api_plain.apply_template(eng, body.messages, body.tools)})

    @app.get("/")
    async def root() -> Response:
        return Response("tightwad worker is running", content_type="text/plain")

    return app

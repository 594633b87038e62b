"""The worker's HTTP app: the speculation routes under ``/v1/tightwad/``, the
llama-server-shaped helper routes, and the plain OpenAI routes (see
``api_plain``). Errors are OpenAI-shaped JSON bodies."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import msgspec
from quart import Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tightwad_core.http.common import decode_body
from tightwad_core.errors import BadRequest, PayloadTooLarge, TightwadError, Unauthorized

from tightwad_plugins.worker.engine import Engine
from tightwad_plugins.worker.protocol import (DetokenizeBody, DraftRequest, TemplateBody, TokenizeBody, VerifyRequest,
                       check_tokens)

log = logging.getLogger("tightwad.worker")
_enc = msgspec.json.Encoder()
OPEN_PATHS = frozenset({"/health"})


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(_enc.encode(obj), status=status, content_type="application/json")


def engine() -> Engine:
    return current_app.config["WORKER_ENGINE"]  # type: ignore[no-any-return]


def _check_auth(api_key: str | None, header: str | None) -> None:
    if not api_key:
        return
    token = ""
    if header and header[:7].lower() == "bearer ":
        token = header[7:].strip()
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        raise Unauthorized("missing or wrong bearer token (send `Authorization: Bearer <key>`)")


def create_worker_app(eng: Engine, api_key: str | None = None, max_body_bytes: int = 8 << 20,
                      max_tokens_limit: int = 4096) -> QuartTrio:
    from tightwad_plugins.worker import api_plain

    app = QuartTrio("tightwad-worker")
    app.config["WORKER_ENGINE"] = eng
    app.config["WORKER_MAX_TOKENS"] = max_tokens_limit
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    app.register_blueprint(api_plain.bp)

    @app.before_request
    async def _guard() -> None:
        if request.path not in OPEN_PATHS:
            _check_auth(api_key, request.headers.get("authorization"))
        length = request.content_length
        if length is not None and length > max_body_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes is over the limit of "
                                  f"{max_body_bytes}")

    @app.errorhandler(TightwadError)
    async def _ours(exc: TightwadError) -> Response:
        return json_response(exc.body(), exc.status)

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            err: TightwadError = PayloadTooLarge(
                f"request body is over the limit of {max_body_bytes} bytes")
        else:
            err = TightwadError(exc.description or exc.name)
            err.status = status
            err.type = "not_found_error" if status == 404 else "invalid_request_error"
        return json_response(err.body(), err.status)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.path)
        err = TightwadError(f"internal error: {exc.__class__.__name__}")
        return json_response(err.body(), err.status)

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
        return json_response(eng.info())

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
        return json_response({"prompt": api_plain.apply_template(eng, body.messages)})

    @app.get("/")
    async def root() -> Response:
        return Response("tightwad worker is running", content_type="text/plain")

    return app

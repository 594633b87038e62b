"""Errors the API layer turns into OpenAI-shaped JSON.

Hierarchy::

    TightwadError              500 server_error
    ├── BadRequest             400 invalid_request_error
    │   └── UnsupportedParam   400 invalid_request_error (param named)
    ├── Unauthorized           401 authentication_error
    ├── NotFound               404 not_found_error (unknown model or route)
    ├── PayloadTooLarge        413 invalid_request_error
    └── BackendError           502 backend_error (upstream answered badly)
        └── BackendUnavailable 503 backend_unavailable (upstream down)
"""

from __future__ import annotations

from typing import Any


class TightwadError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(TightwadError):
    status = 400
    type = "invalid_request_error"


class UnsupportedParam(BadRequest):
    code = "unsupported_parameter"


class Unauthorized(TightwadError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(TightwadError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(TightwadError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class BackendError(TightwadError):
    status = 502
    type = "backend_error"


class BackendUnavailable(BackendError):
    status = 503
    type = "backend_unavailable"

"""Errors the API layer turns into OpenAI-shaped JSON.

Hierarchy::

    TightwadError              500 server_error
    ├── BadRequest             400 invalid_request_error
    │   ├── UnsupportedParam   400 invalid_request_error (param named)
    │   └── ContextOverflow    400 invalid_request_error, code context_length_exceeded
    ├── Unauthorized           401 authentication_error
    ├── Forbidden              403 permission_error (a Host or Origin not allowed)
    ├── NotFound               404 not_found_error (unknown model or route)
    ├── PayloadTooLarge        413 invalid_request_error
    ├── UnsupportedMediaType   415 invalid_request_error (a body that is not JSON)
    └── BackendError           502 backend_error (upstream answered badly)
        └── BackendUnavailable 503 backend_unavailable (upstream down)
"""

from __future__ import annotations

from typing import Any


class TightwadError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    upstream_code: str | None = None  # the code an upstream server's error carried, if any

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """Response headers that go with the error (``Retry-After`` on a 503)."""
        return {}


class BadRequest(TightwadError):
    status = 400
    type = "invalid_request_error"


class UnsupportedParam(BadRequest):
    code = "unsupported_parameter"


class ContextOverflow(BadRequest):
    """A request that does not fit the context its model server gives each
    request. Says how much it needed, how much there is and what to raise."""

    code = "context_length_exceeded"

    def __init__(self, needed: int, allowed: int, setting: str = "target.ctx_size") -> None:
        self.needed = needed  # tokens the request needs (its prompt, as the server counted it)
        self.allowed = allowed  # tokens of context one request may use
        self.setting = setting  # the setting that raises `allowed`
        super().__init__(
            f"this request needs {needed} tokens of context, more than the {allowed} allowed per "
            f"request: raise `{setting}` (each token of context costs KV-cache memory), or send a "
            "shorter conversation", param="messages")

    def body(self) -> dict[str, Any]:
        out = super().body()
        out["error"].update(n_prompt_tokens=self.needed, n_ctx=self.allowed)
        return out


class Unauthorized(TightwadError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(TightwadError):
    status = 403
    type = "permission_error"


class UnsupportedMediaType(TightwadError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


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

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after  # seconds a client should wait before retrying

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}

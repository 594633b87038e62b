"""Shared base for backends that speak HTTP to an OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import trio

from tightwad_core.errors import BackendUnavailable, UnsupportedParam
from tightwad_core.http.wire import parse_result, post_json, request_body, stream_sse
from tightwad_core.config.profiles import BackendConfig, secret
from tightwad_core.records import Delta, GenRequest, Health, Result
from tightwad_core.roles import BackendContext


class OpenAIHTTPBackend:
    """Generation through ``/v1/chat/completions`` and ``/v1/completions``."""

    kind = "openai"
    passthrough: frozenset[str] | None = None  # any OpenAI parameter goes through
    supports_top_k = False

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        self.config = config
        self.role = context.role
        self.context = context
        url = (config.url or "").rstrip("/")
        self.base_url = url[:-3] if url.endswith("/v1") else url  # we add /v1/... ourselves
        self._client: httpx.AsyncClient | None = None
        self._ready = trio.Event()

    # ---- lifecycle ------------------------------------------------------- #

    def _headers(self) -> dict[str, str]:
        token = secret(self.config.api_key, self.config.api_key_env)
        return {"authorization": f"Bearer {token}"} if token else {}

    def _open_client(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        timeout = httpx.Timeout(self.config.request_timeout, connect=10.0)
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers(),
                                         limits=limits, timeout=timeout)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise BackendUnavailable(f"{self.role} backend is not started")
        return self._client

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._open_client(self.base_url)
        task_status.started()
        await trio.sleep_forever()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def where(self) -> str:
        return f"{self.role} ({self.kind} at {self.base_url})"

    async def health(self) -> Health:
        try:
            with trio.fail_after(5):
                resp = await self.client.get(self.health_path)
        except (httpx.HTTPError, trio.TooSlowError, BackendUnavailable) as exc:
            return Health(ok=False, detail=f"unreachable: {exc.__class__.__name__}", url=self.base_url)
        if resp.status_code != 200:
            return Health(ok=False, detail=f"status {resp.status_code}", url=self.base_url)
        return Health(ok=True, detail="ok", url=self.base_url)

    health_path = "/v1/models"

    # ---- models ---------------------------------------------------------- #

    async def model_name(self) -> str:
        if self.config.model:
            return self.config.model
        data = await self.get_json("/v1/models")
        try:
            return str(data["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            return self.role

    async def model_info(self) -> dict[str, Any]:
        return {"name": await self.model_name()}

    async def get_json(self, path: str) -> Any:
        try:
            resp = await self.client.get(path)
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"{self.where} is unreachable: {exc}") from exc
        from tightwad_core.http.wire import raise_for_status

        raise_for_status(resp, resp.content, self.where)
        return resp.json()

    # ---- generation ------------------------------------------------------ #

    def check(self, req: GenRequest) -> None:
        if req.top_k is not None and not self.supports_top_k:
            raise UnsupportedParam(f"top_k is not supported by the {self.kind} backend", param="top_k")
        if self.passthrough is not None:
            for name in req.extra:
                if name not in self.passthrough:
                    raise UnsupportedParam(f"{name} is not supported by the {self.kind} backend", param=name)

    def _path(self, req: GenRequest) -> str:
        return "/v1/chat/completions" if req.kind == "chat" else "/v1/completions"

    async def generate(self, req: GenRequest) -> Result:
        body = request_body(req, self.config.model, stream=False, top_k=self.supports_top_k)
        data = await post_json(self.client, self._path(req), body, self.where)
        return parse_result(req.kind, data)

    async def stream(self, req: GenRequest) -> AsyncIterator[Delta]:
        body = request_body(req, self.config.model, stream=True, top_k=self.supports_top_k)
        async for delta in stream_sse(self.client, self._path(req), body, req.kind, self.where):
            yield delta

"""Shared bases for backends that speak HTTP: the client lifecycle
(`HTTPBackend`) and OpenAI-compatible generation (`OpenAIHTTPBackend`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import trio

from tightwad_core.config.profiles import BackendConfig, secret
from tightwad_core.errors import BackendUnavailable, UnsupportedParam
from tightwad_core.http.wire import (
    parse_result,
    post_json,
    raise_for_status,
    request_body,
    stream_sse,
)
from tightwad_core.records import Delta, GenRequest, Health, Result
from tightwad_core.roles import BackendContext


class HTTPBackend:
    """A model server reached over HTTP: one pooled client with the upstream's
    bearer token, opened by ``serve`` and closed by ``aclose``. Subclasses set
    ``kind`` and ``health_path`` and add generation."""

    kind = "http"
    passthrough: frozenset[str] | None = None  # any OpenAI parameter goes through
    capabilities: frozenset[str] = frozenset()
    health_path = "/"

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        self.config = config
        self.role = context.role
        self.context = context
        self.base_url = (config.url or "").rstrip("/")
        self._client: httpx.AsyncClient | None = None
        self._busy: dict[int, int] = {}  # id(client) -> requests in flight on it

    @contextlib.contextmanager
    def using(self) -> Iterator[httpx.AsyncClient]:
        """The current client, counted as in use until the block ends (a swap
        waits for the old one's requests before stopping its server)."""
        client = self.client
        key = id(client)
        self._busy[key] = self._busy.get(key, 0) + 1
        try:
            yield client
        finally:
            self._busy[key] -= 1
            if not self._busy[key]:
                del self._busy[key]

    def in_flight(self, client: httpx.AsyncClient | None = None) -> int:
        """Requests in flight on ``client`` (default: the current one)."""
        return self._busy.get(id(client if client is not None else self._client), 0)

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

    async def _get(self, path: str) -> httpx.Response:
        with trio.fail_after(5):
            return await self.client.get(path)

    async def health(self) -> Health:
        try:
            resp = await self._get(self.health_path)
        except (httpx.HTTPError, trio.TooSlowError, BackendUnavailable) as exc:
            return Health(ok=False, detail=f"unreachable: {exc.__class__.__name__}", url=self.base_url)
        if resp.status_code != 200:
            return Health(ok=False, detail=f"status {resp.status_code}", url=self.base_url)
        return Health(ok=True, detail=self.health_detail(resp), url=self.base_url)

    def health_detail(self, resp: httpx.Response) -> str:
        return "ok"

    async def get_json(self, path: str) -> Any:
        try:
            with self.using() as client:
                resp = await client.get(path)
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"{self.where} is unreachable: {exc}") from exc
        raise_for_status(resp, resp.content, self.where, self.role)
        return resp.json()

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        with self.using() as client:
            return await post_json(client, path, body, self.where, self.role)


class OpenAIHTTPBackend(HTTPBackend):
    """Generation through ``/v1/chat/completions`` and ``/v1/completions``."""

    supports_top_k = False
    health_path = "/v1/models"

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        super().__init__(config, context)
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]  # we add /v1/... ourselves

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

    def body(self, req: GenRequest, stream: bool) -> dict[str, Any]:
        """The upstream request body for ``req``."""
        return request_body(req, self.config.model, stream=stream, top_k=self.supports_top_k)

    async def generate(self, req: GenRequest) -> Result:
        with self.using() as client:
            data = await post_json(client, self._path(req), self.body(req, False), self.where,
                                   self.role)
        return parse_result(req.kind, data)

    async def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        body = self.body(req, True)
        with self.using() as client:
            async for delta in stream_sse(client, self._path(req), body, req.kind, self.where,
                                          self.role):
                yield delta


async def read_at_most(resp: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of a streamed response's (decoded) body, and
    whether it held more; the rest is never read."""
    buf = bytearray()
    async for data in resp.aiter_bytes():
        buf += data
        if len(buf) > limit:
            return bytes(buf[:limit]), True
    return bytes(buf), False

"""The ``ollama`` backend: an Ollama server at ``url`` serving ``model``.

Ollama has no token-id input and no prompt logprobs, so it can only be a
plain target (or a text drafter); see docs/backends.md for what was checked
against Ollama's published API."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx
import msgspec

from tightwad_core.chat.tools import openai_from_ollama
from tightwad_core.config.profiles import BackendConfig, ConfigError
from tightwad_core.errors import BackendError, BadRequest, UnsupportedParam
from tightwad_core.hookspecs import hookimpl
from tightwad_core.http.upstream import HTTPBackend
from tightwad_core.http.wire import raise_for_status, stream_errors
from tightwad_core.records import Delta, GenRequest, Result, Usage
from tightwad_core.roles import BackendContext, BackendFactory

_json = msgspec.json.Decoder()

#: OpenAI/llama.cpp request fields -> Ollama option names.
OPTION_FIELDS = {
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}


class OllamaBackend(HTTPBackend):
    kind = "ollama"
    passthrough = frozenset(OPTION_FIELDS) | {"response_format"}

    health_path = "/api/version"

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        if config.url is None:
            raise ConfigError(f"{context.role}: the ollama backend needs `url` (it cannot launch models)")
        if not config.model:
            raise ConfigError(f"{context.role}: the ollama backend needs `model` (the Ollama model name)")
        super().__init__(config, context)
        self.model = config.model

    def health_detail(self, resp: httpx.Response) -> str:
        return f"ollama {resp.json().get('version', '?')}"

    async def model_name(self) -> str:
        return self.model

    async def model_info(self) -> dict[str, Any]:
        data = await self.post_json("/api/show", {"model": self.model})
        details = data.get("details") or {}
        info = data.get("model_info") or {}
        arch = info.get("general.architecture", "")
        return {"name": self.model, "chat_template": data.get("template", ""),
                "context_length": info.get(f"{arch}.context_length"),
                "parameters": info.get("general.parameter_count"),
                "family": details.get("family"), "quantization": details.get("quantization_level")}

    # ---- requests ------------------------------------------------------- #

    def check(self, req: GenRequest) -> None:
        for name in req.extra:
            if name not in self.passthrough:
                raise UnsupportedParam(f"{name} is not supported by the ollama backend", param=name)
        if req.kind == "completion" and not isinstance(req.prompt, str):
            raise UnsupportedParam("the ollama backend takes text prompts only, not token ids",
                                   param="prompt")

    def _body(self, req: GenRequest, stream: bool) -> tuple[str, dict[str, Any]]:
        options: dict[str, Any] = {"num_predict": req.max_tokens}
        for name in ("temperature", "top_p", "top_k", "seed"):
            value = getattr(req, name)
            if value is not None:
                options[name] = value
        if req.stop:
            options["stop"] = list(req.stop)
        body: dict[str, Any] = {"model": self.model, "stream": stream, "options": options}
        if req.tools:
            body["tools"] = req.tools
        for name, value in req.extra.items():
            if name in OPTION_FIELDS:
                options[OPTION_FIELDS[name]] = value
            elif name == "response_format":
                kind = (value or {}).get("type")
                if kind == "json_object":
                    body["format"] = "json"
                elif kind == "json_schema":
                    body["format"] = ((value.get("json_schema") or {}).get("schema")) or "json"
                elif kind not in (None, "text"):
                    raise BadRequest(f"response_format type {kind!r} is not supported",
                                     param="response_format")
        if req.kind == "chat":
            body["messages"] = req.messages
            return "/api/chat", body
        body["prompt"] = req.prompt
        body["raw"] = True
        return "/api/generate", body

    @staticmethod
    def _text(kind: str, data: dict[str, Any]) -> str:
        if kind == "chat":
            return str((data.get("message") or {}).get("content") or "")
        return str(data.get("response") or "")

    @staticmethod
    def _usage(data: dict[str, Any]) -> Usage:
        return Usage(int(data.get("prompt_eval_count") or 0), int(data.get("eval_count") or 0))

    async def generate(self, req: GenRequest) -> Result:
        path, body = self._body(req, stream=False)
        data = await self.post_json(path, body)
        extra = None
        if req.kind == "chat" and (data.get("message") or {}).get("tool_calls"):
            extra = {"tool_calls": openai_from_ollama(data["message"]["tool_calls"])}
        return Result(text=self._text(req.kind, data), finish_reason=data.get("done_reason") or "stop",
                      usage=self._usage(data), extra=extra)

    async def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        path, body = self._body(req, stream=True)
        done: dict[str, Any] | None = None
        with stream_errors(self.where):
            async with self.client.stream("POST", path, content=msgspec.json.encode(body),
                                          headers={"content-type": "application/json"}) as resp:
                if resp.status_code >= 400:
                    raise_for_status(resp, await resp.aread(), self.where, self.role)
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        data = _json.decode(line)
                    except msgspec.DecodeError as exc:
                        raise BackendError(f"{self.where} sent a malformed stream line") from exc
                    if "error" in data:
                        raise BackendError(f"{self.where} stream error: {data['error']}")
                    text = self._text(req.kind, data)
                    if text:
                        yield Delta(text=text)
                    calls = (data.get("message") or {}).get("tool_calls") if req.kind == "chat" else None
                    if calls:
                        yield Delta(extra={"tool_calls": openai_from_ollama(calls)})
                    if data.get("done"):
                        done = data
                        break
        if done is None:
            raise BackendError(f"{self.where} ended the stream without finishing")
        yield Delta(finish_reason=done.get("done_reason") or "stop", usage=self._usage(done))


@hookimpl
def register_backends(register: Callable[[str, BackendFactory], None]) -> None:
    register("ollama", OllamaBackend)

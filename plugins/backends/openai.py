"""The ``openai`` backend: any OpenAI-compatible server at ``url`` (vLLM,
llama-server's /v1 routes, hosted APIs). Set ``model`` to the upstream model
name when the server hosts several."""

from __future__ import annotations

from collections.abc import Callable

from tightwad_core.config.profiles import BackendConfig, ConfigError
from tightwad_core.hookspecs import hookimpl
from tightwad_core.http.upstream import OpenAIHTTPBackend
from tightwad_core.roles import BackendContext, BackendFactory


class OpenAIBackend(OpenAIHTTPBackend):
    kind = "openai"

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        if config.url is None:
            raise ConfigError(f"{context.role}: the openai backend needs `url` (it cannot launch models)")
        super().__init__(config, context)


@hookimpl
def register_backends(register: Callable[[str, BackendFactory], None]) -> None:
    register("openai", OpenAIBackend)

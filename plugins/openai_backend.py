"""The ``openai`` backend: any OpenAI-compatible server at ``url`` (vLLM,
llama-server's /v1 routes, hosted APIs). Set ``model`` to the upstream model
name when the server hosts several."""

from __future__ import annotations

from tightwad_core.hookspecs import hookimpl
from tightwad_core.http_backend import OpenAIHTTPBackend


class OpenAIBackend(OpenAIHTTPBackend):
    kind = "openai"


@hookimpl
def register_backends(register):  # type: ignore[no-untyped-def]
    register("openai", OpenAIBackend)

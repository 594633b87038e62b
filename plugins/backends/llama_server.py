"""The ``llama-server`` backend: reach a running llama.cpp server at ``url``,
or launch and supervise one for ``model_path``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from tightwad_core.runtime.catalog import resolve_model
from tightwad_core.hookspecs import hookimpl
from tightwad_core.http.upstream import OpenAIHTTPBackend
from tightwad_core.runtime.procs import Supervised, find_engine, free_port
from tightwad_core.config.profiles import BackendConfig
from tightwad_core.records import Health
from tightwad_core.roles import BackendContext


class LlamaServerBackend(OpenAIHTTPBackend):
    kind = "llama-server"
    supports_top_k = True
    health_path = "/health"

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        super().__init__(config, context)
        self.process: Supervised | None = None
        self._props: dict[str, Any] | None = None
        if config.model_path is not None:
            self.model_file: Path | None = resolve_model(config.model_path, context.config_dir)
        else:
            self.model_file = None

    def launch_argv(self, port: int) -> list[str]:
        assert self.model_file is not None
        cfg = self.config
        argv = [
            str(find_engine("llama-server")),
            "--model", str(self.model_file),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--ctx-size", str(cfg.ctx_size * cfg.parallel),
            "--parallel", str(cfg.parallel),
            "--alias", self.model_file.stem,
            "--jinja",
            "--no-webui",
        ]
        if cfg.threads:
            argv += ["--threads", str(cfg.threads)]
        return argv + list(cfg.extra_args)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.model_file is None:
            await super().serve(task_status=task_status)
            return
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        self.process = Supervised(
            f"{self.kind} ({self.role})",
            self.launch_argv(port),
            self.context.run_dir / f"llama-server-{self.role}.log",
            url + "/health",
            startup_timeout=self.config.startup_timeout,
            restart=self.config.restart,
        )
        self._open_client(url)
        await self.process.serve(task_status=task_status)

    async def health(self) -> Health:
        h = await super().health()
        if self.process is not None and not self.process.healthy:
            return Health(ok=False, detail=f"restarting (restarts: {self.process.restarts})", url=self.base_url)
        return h

    async def props(self) -> dict[str, Any]:
        if self._props is None:
            self._props = await self.get_json("/props")
        return self._props

    async def model_name(self) -> str:
        if self.config.model:
            return self.config.model
        if self.model_file is not None:
            return self.model_file.stem
        return await super().model_name()

    async def model_info(self) -> dict[str, Any]:
        props = await self.props()
        data = await self.get_json("/v1/models")
        meta = {}
        try:
            meta = data["data"][0].get("meta") or {}
        except (KeyError, IndexError, TypeError):
            pass
        settings = props.get("default_generation_settings") or {}
        return {
            "name": await self.model_name(),
            "chat_template": props.get("chat_template", ""),
            "context_length": settings.get("n_ctx") or meta.get("n_ctx_train"),
            "parameters": meta.get("n_params"),
            "size": meta.get("size"),
            "vocab_size": meta.get("n_vocab"),
            "path": props.get("model_path") or (str(self.model_file) if self.model_file else None),
        }

    # llama-server's own token routes (used by speculative modes)
    async def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        from tightwad_core.http.wire import post_json

        data = await post_json(self.client, "/tokenize",
                               {"content": text, "add_special": add_special}, self.where)
        return [int(t) for t in data["tokens"]]

    async def detokenize(self, tokens: list[int]) -> str:
        from tightwad_core.http.wire import post_json

        data = await post_json(self.client, "/detokenize", {"tokens": tokens}, self.where)
        return str(data["content"])

    async def apply_template(self, messages: list[dict[str, Any]]) -> str:
        from tightwad_core.http.wire import post_json

        data = await post_json(self.client, "/apply-template", {"messages": messages}, self.where)
        return str(data["prompt"])


@hookimpl
def register_backends(register):  # type: ignore[no-untyped-def]
    register("llama-server", LlamaServerBackend)

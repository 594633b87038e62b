"""The ``llama-server`` backend: reach a running llama.cpp server at ``url``,
or launch and supervise one for ``model_path``. (Built in code with both, as
the bench does, it connects to ``url`` and takes ``model_path`` as the GGUF
that server runs, for its vocabulary.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tightwad_core.config.profiles import BackendConfig
from tightwad_core.config.schema import ConfigError
from tightwad_core.hookspecs import hookimpl
from tightwad_core.http.upstream import OpenAIHTTPBackend
from tightwad_core.records import GenRequest, Health, TokenRun
from tightwad_core.roles import POOL_CAPABILITY, BackendContext, BackendFactory
from tightwad_core.runtime.catalog import resolve_model
from tightwad_core.runtime.procs import Supervised, find_engine, free_port
from tightwad_core.spec.interfaces import SamplingParams
from tightwad_core.vocab import Vocab, load_vocab
from tightwad_plugins.backends.llama_wire import align_gaps, sampler_fields


class LlamaServerBackend(OpenAIHTTPBackend):
    kind = "llama-server"
    capabilities = frozenset({"tokens", "llama-completion", POOL_CAPABILITY})
    pool_devices_flag = True  # llama-server needs --device RPC0,... or the layers stay local
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
        if context.pool is not None and self.model_file is None:
            raise ConfigError(f"{context.role}: a target on a [cluster] pool is launched here: "
                              "give `model_path`, not `url`")

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
        if self.config.url is not None or self.model_file is None:  # connect, never launch
            await super().serve(task_status=task_status)
            return
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = self.launch_argv(port)
        pool = self.context.pool
        if pool is not None:  # the layers go to the cluster's rpc-servers
            argv += (await pool.plan(self.model_file)).args(devices=self.pool_devices_flag)
        self.process = Supervised(
            f"{self.kind} ({self.role})",
            argv,
            self.context.run_dir / f"{self.kind}-{self.role}.log",
            url + "/health",
            startup_timeout=self.config.startup_timeout,
            restart=self.config.restart,
            before_start=pool.wait_ready if pool is not None else None,
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
        meta: dict[str, Any] = {}
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

    def body(self, req: GenRequest, stream: bool) -> dict[str, Any]:
        body = super().body(req, stream)
        if req.exact_sampler and req.temperature:  # our sampler only, none of the server's extras
            s = SamplingParams(temperature=req.temperature, top_p=1.0 if req.top_p is None else req.top_p,
                               top_k=req.top_k or 0, seed=req.seed)
            fields = sampler_fields(s, 0)
            fields.pop("n_probs")
            fields.pop("post_sampling_probs")
            body.update(fields)
        return body

    # ---- llama-server's own token routes (the "tokens" capability) ------ #

    async def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        data = await self.post_json("/tokenize", {"content": text, "add_special": add_special})
        return [int(t) for t in data["tokens"]]

    async def detokenize(self, tokens: list[int]) -> str:
        data = await self.post_json("/detokenize", {"tokens": tokens})
        return str(data["content"])

    async def apply_template(self, messages: list[dict[str, Any]],
                             tools: list[dict[str, Any]] | None = None) -> str:
        body: dict[str, Any] = {"messages": messages}
        if tools:
            body["tools"] = tools
        data = await self.post_json("/apply-template", body)
        return str(data["prompt"])

    async def vocab(self) -> Vocab | None:
        """From the GGUF when this backend launched it (a server at a URL does not say)."""
        if self.model_file is None or not self.model_file.exists():
            return None
        return await trio.to_thread.run_sync(load_vocab, self.model_file)

    async def complete_ids(self, prompt: list[int], max_tokens: int, *, gaps: bool = False) -> TokenRun:
        body: dict[str, Any] = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0,
                                "return_tokens": True, "cache_prompt": not gaps}
        if gaps:
            body["n_probs"] = 2
        data = await self.post_json("/completion", body)
        vocab = await self.vocab()
        out = [int(t) for t in data.get("tokens") or ()]
        eos = vocab.eos if vocab is not None else frozenset()
        while out and out[-1] in eos:
            out.pop()
        text = vocab.decode(out).decode("utf-8", "replace") if vocab is not None else str(data.get("content", ""))
        found = (align_gaps(out, data.get("completion_probabilities") or [], vocab.piece)
                 if gaps and vocab is not None else None)
        # the server's own count (end-of-generation included), as a client of it sees
        count = int(data.get("tokens_predicted") or len(out))
        return TokenRun(text=text, count=count, tokens=out, gaps=found)


@hookimpl
def register_backends(register: Callable[[str, BackendFactory], None]) -> None:
    register("llama-server", LlamaServerBackend)

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
from tightwad_core.errors import BackendError
from tightwad_core.hookspecs import hookimpl
from tightwad_core.http.upstream import OpenAIHTTPBackend
from tightwad_core.records import GenRequest, Health, TokenRun
from tightwad_core.roles import POOL_CAPABILITY, BackendContext, BackendFactory
from tightwad_core.runtime.catalog import resolve_model
from tightwad_core.runtime.procs import StartupError, Supervised, find_engine, free_port
from tightwad_core.spec.interfaces import SamplingParams
from tightwad_core.vocab import Vocab, load_vocab
from tightwad_plugins.backends.llama_wire import align_gaps, sampler_fields


class _Launched:
    """One supervised server running in its own cancel scope."""

    def __init__(self, proc: Supervised) -> None:
        self.proc = proc
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                await self.proc.serve(task_status=task_status)
        finally:
            self.done.set()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


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
        self._nursery: trio.Nursery | None = None
        self._running: _Launched | None = None
        self._swap_lock = trio.Lock()
        self.swapping = ""  # what a swap on a pool is doing (the backend is down meanwhile)
        if config.model_path is not None:
            self.model_file: Path | None = resolve_model(config.model_path, context.config_dir)
        else:
            self.model_file = None
        if context.pool is not None and self.model_file is None:
            raise ConfigError(f"{context.role}: a target on a [cluster] pool is launched here: "
                              "give `model_path`, not `url`")

    def launch_argv(self, port: int, model_file: Path | None = None) -> list[str]:
        model_file = model_file or self.model_file
        assert model_file is not None
        cfg = self.config
        argv = [
            str(find_engine("llama-server")),
            "--model", str(model_file),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--ctx-size", str(cfg.ctx_size * cfg.parallel),
            "--parallel", str(cfg.parallel),
            "--alias", model_file.stem,
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
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._running, url = await self._launch(self.model_file)
            self._open_client(url)
            task_status.started()
            await trio.sleep_forever()

    async def _launch(self, model_file: Path) -> tuple[_Launched, str]:
        """Start a supervised server for ``model_file`` in this backend's nursery
        and wait until it is healthy (StartupError otherwise)."""
        assert self._nursery is not None
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = self.launch_argv(port, model_file)
        pool = self.context.pool
        if pool is not None:  # the layers go to the cluster's rpc-servers
            argv += (await pool.plan(model_file)).args(devices=self.pool_devices_flag)
        proc = Supervised(
            f"{self.kind} ({self.role})",
            argv,
            self.context.run_dir / f"{self.kind}-{self.role}.log",
            url + "/health",
            startup_timeout=self.config.startup_timeout,
            restart=self.config.restart,
            before_start=pool.wait_ready if pool is not None else None,
        )
        launched = _Launched(proc)
        self.process = proc
        await self._nursery.start(launched.run)
        return launched, url

    async def health(self) -> Health:
        if self.swapping:
            return Health(ok=False, detail=self.swapping, url=self.base_url)
        h = await super().health()
        if self.process is not None and not self.process.healthy:
            return Health(ok=False, detail=f"restarting (restarts: {self.process.restarts})", url=self.base_url)
        return h

    async def swap(self, model_file: Path, say: Callable[[str], None]) -> None:
        """Serve ``model_file`` instead, saying each step. On one machine the
        new server loads beside the old one, which keeps serving until the new
        one is healthy; then new requests go to the new one and the old one
        stops once its in-flight requests have finished. A pool serves one
        coordinator at a time: in-flight requests finish, the old server
        stops, the new one loads on the same workers (503 meanwhile)."""
        if self._nursery is None or self._running is None or self.model_file is None:
            raise BackendError(f"the {self.role} backend was not launched here: nothing to swap")
        async with self._swap_lock:
            old, old_file, old_client = self._running, self.model_file, self._client
            if self.context.pool is None:
                say(f"loading {model_file.name} beside {old_file.name} (which keeps serving)")
                self._running, url = await self._launch(model_file)
                self._switch(model_file, url)
                say(f"{model_file.name} is healthy: new requests go to it")
                await self._drain(old_client, say)
                await old.stop()
                say(f"{old_file.name} stopped")
            else:
                self.swapping = f"swapping to {model_file.name}"
                try:
                    say("the pool serves one coordinator at a time: finishing in-flight requests, "
                        "then loading the new model on the same workers")
                    await self._drain(old_client, say)
                    await old.stop()
                    say(f"{old_file.name} stopped; loading {model_file.name} on the pool")
                    try:
                        self._running, url = await self._launch(model_file)
                    except StartupError:
                        say(f"{model_file.name} failed to start: going back to {old_file.name}")
                        self._running, url = await self._launch(old_file)
                        self._switch(old_file, url)
                        raise
                    self._switch(model_file, url)
                finally:
                    self.swapping = ""
            if old_client is not None:
                await old_client.aclose()
            say(f"now serving {model_file.name}")

    def _switch(self, model_file: Path, url: str) -> None:
        self.model_file = model_file
        self._props = None
        self._open_client(url)

    async def _drain(self, client: Any, say: Callable[[str], None]) -> None:
        busy = self.in_flight(client)
        if busy:
            say(f"waiting for {busy} in-flight request(s) on the old model")
        with trio.move_on_after(self.config.request_timeout):
            while self.in_flight(client):
                await trio.sleep(0.1)

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

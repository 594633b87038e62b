"""The ``worker`` backend: a Tightwad worker (`tightwad worker`) reached at
``url``, or launched and supervised for ``model_path``. It serves the plain
OpenAI routes, llama-server's token routes, and the one-request-per-round
verify protocol that the `worker` verifier uses."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tightwad_core.config.profiles import BackendConfig
from tightwad_core.errors import BackendError
from tightwad_core.hookspecs import hookimpl
from tightwad_core.http.upstream import OpenAIHTTPBackend
from tightwad_core.records import GenRequest, TokenRun
from tightwad_core.roles import POOL_CAPABILITY, BackendContext, BackendFactory
from tightwad_core.vocab import Vocab, from_pieces
from tightwad_plugins.backends.llama_server import LlamaServerBackend
from tightwad_plugins.backends.llama_wire import gap_of


class WorkerBackend(LlamaServerBackend):
    kind = "worker"
    capabilities = frozenset({"tokens", "tightwad-verify", "prompt-logprobs", POOL_CAPABILITY})
    pool_devices_flag = False  # `tightwad worker --rpc` offloads to the rpc-servers by itself

    def __init__(self, config: BackendConfig, context: BackendContext) -> None:
        super().__init__(config, context)
        self._vocab: Vocab | None = None

    def launch_argv(self, port: int, model_file: Path | None = None) -> list[str]:
        model_file = model_file or self.model_file
        assert model_file is not None
        cfg = self.config
        exe = Path(sys.executable).parent / "tightwad"
        argv = [str(exe), "worker", "--model", str(model_file), "--host", "127.0.0.1",
                "--port", str(port), "--slots", str(cfg.parallel), "--ctx-size", str(cfg.ctx_size)]
        if cfg.threads:
            argv += ["--threads", str(cfg.threads)]
        return argv + list(cfg.extra_args)

    def _switch(self, model_file: Path, url: str) -> None:
        super()._switch(model_file, url)
        self._vocab = None

    async def model_info(self) -> dict[str, Any]:
        info = await self.get_json("/v1/tightwad/info")
        return {"name": await self.model_name(), "context_length": info.get("n_ctx"),
                "path": info.get("model"), "chat_template": info.get("chat_template") or ""}

    def check(self, req: GenRequest) -> None:
        return None

    def body(self, req: GenRequest, stream: bool) -> dict[str, Any]:
        # the worker samples with temperature/top_k/top_p alone: exact already
        return OpenAIHTTPBackend.body(self, req, stream)

    async def vocab(self) -> Vocab:
        """The worker's own vocabulary, over HTTP (computed once at its start-up)."""
        if self._vocab is None:
            data = await self.get_json("/v1/tightwad/vocab")
            try:
                self._vocab = from_pieces([bytes.fromhex(p) for p in data["pieces"]], data["eos"],
                                          data.get("bos"), data["fingerprint"],
                                          [bytes.fromhex(p) for p in data.get("specials") or ()])
            except (KeyError, ValueError, TypeError) as exc:
                raise BackendError(f"{self.where} sent a malformed vocabulary") from exc
        return self._vocab

    async def complete_ids(self, prompt: list[int], max_tokens: int, *, gaps: bool = False) -> TokenRun:
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        if gaps:
            body.update(logprobs=2, return_tokens_as_token_ids=True)
        data = await self.post_json("/v1/completions", body)
        try:
            choice = data["choices"][0]
            count = int(data["usage"]["completion_tokens"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise BackendError(f"{self.where} sent a malformed completion") from exc
        if not gaps:
            return TokenRun(text=str(choice["text"]), count=count)
        lp = choice.get("logprobs") or {}
        tokens = [int(str(t).rpartition(":")[2]) for t in lp.get("tokens") or ()]
        found = [gap_of(list((d or {}).values())) for d in lp.get("top_logprobs") or ()]
        return TokenRun(text=str(choice["text"]), count=count, tokens=tokens, gaps=found)


@hookimpl
def register_backends(register: Callable[[str, BackendFactory], None]) -> None:
    register("worker", WorkerBackend)

"""The ``worker`` backend: a Tightwad worker (`tightwad worker`) reached at
``url``, or launched and supervised for ``model_path``. It serves the plain
OpenAI routes, llama-server's token routes, and the one-request-per-round
verify protocol that the `worker` verifier uses."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tightwad_core.hookspecs import hookimpl

from tightwad_plugins.backends.llama_server import LlamaServerBackend


class WorkerBackend(LlamaServerBackend):
    kind = "worker"

    def launch_argv(self, port: int) -> list[str]:
        assert self.model_file is not None
        cfg = self.config
        exe = Path(sys.executable).parent / "tightwad"
        argv = [str(exe), "worker", "--model", str(self.model_file), "--host", "127.0.0.1",
                "--port", str(port), "--slots", str(cfg.parallel), "--ctx-size", str(cfg.ctx_size)]
        if cfg.threads:
            argv += ["--threads", str(cfg.threads)]
        return argv + list(cfg.extra_args)

    async def model_info(self) -> dict[str, Any]:
        info = await self.get_json("/v1/tightwad/info")
        return {"name": await self.model_name(), "context_length": info.get("n_ctx"),
                "path": info.get("model")}

    def check(self, req: Any) -> None:
        return None


@hookimpl
def register_backends(register):  # type: ignore[no-untyped-def]
    register("worker", WorkerBackend)

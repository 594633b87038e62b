"""The roles plugins fill, as Protocols. The core only ever talks to these."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Protocol, runtime_checkable

import trio

from tightwad_core.config.profiles import BackendConfig, Profile
from tightwad_core.records import Delta, GenRequest, Health, Result


@dataclass(frozen=True)
class BackendContext:
    """What a backend factory gets besides its own config."""

    role: str  # "target" or "draft"
    config_dir: Path  # folder of the config file (relative model paths start here)
    run_dir: Path  # where a launched server may write logs
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A model server: launched and supervised by us, or reached at a URL."""

    kind: str  # the plugin name, e.g. "llama-server"
    role: str  # "target" or "draft"
    #: Parameters beyond the common ones that this backend can pass on
    #: (``None`` means any OpenAI parameter is passed on unchanged).
    passthrough: frozenset[str] | None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run for the proxy's lifetime: launch/supervise or watch the server.
        Calls ``task_status.started()`` once requests may be sent."""

    async def health(self) -> Health: ...

    async def model_name(self) -> str:
        """The model's name as the upstream server reports it."""

    async def model_info(self) -> dict[str, Any]:
        """Facts for `/api/show` and `/api/tags`; any of these keys may be present:
        ``name``, ``chat_template``, ``context_length``, ``parameters``, ``size``."""

    async def generate(self, req: GenRequest) -> Result: ...

    def stream(self, req: GenRequest) -> AsyncIterator[Delta]:
        """An async generator of deltas; close it (``aclosing``) to cancel upstream."""

    async def aclose(self) -> None: ...


class Mode(Protocol):
    """Turns API requests into backend calls."""

    name: str

    def check(self, req: GenRequest) -> None:
        """Raise `UnsupportedParam` for parameters this mode cannot honour."""

    async def generate(self, req: GenRequest) -> Result: ...

    def stream(self, req: GenRequest) -> AsyncIterator[Delta]: ...

    def status(self) -> dict[str, Any]: ...


BackendFactory = Any  # (BackendConfig, BackendContext) -> Backend
ModeFactory = Any  # (Profile, dict[str, Backend]) -> Mode

__all__ = ["Backend", "BackendConfig", "BackendContext", "Mode", "Profile"]

"""The ``direct`` mode: relay every request to the target, unchanged."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, ClassVar

from tightwad_core.config.profiles import Profile
from tightwad_core.hookspecs import hookimpl
from tightwad_core.records import Delta, GenRequest, Result
from tightwad_core.roles import Backend, ModeContext, ModeFactory


class DirectMode:
    name = "direct"
    roles: ClassVar[tuple[str, ...]] = ("target",)  # backends this mode needs started

    def __init__(self, profile: Profile, backends: Mapping[str, Backend], context: ModeContext) -> None:
        self.target = backends["target"]
        self.requests = 0

    async def start(self) -> None:
        return None

    def check(self, req: GenRequest) -> None:
        self.target.check(req)

    async def generate(self, req: GenRequest) -> Result:
        self.requests += 1
        return await self.target.generate(req)

    async def stream(self, req: GenRequest) -> AsyncGenerator[Delta, None]:
        self.requests += 1
        async for delta in self.target.stream(req):
            yield delta

    def status(self) -> dict[str, Any]:
        return {"mode": self.name, "requests": self.requests, "speculation": None}


@hookimpl
def register_modes(register: Callable[[str, ModeFactory], None]) -> None:
    register("direct", DirectMode)

"""The ``direct`` mode: relay every request to the target, unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from tightwad_core.hookspecs import hookimpl
from tightwad_core.config.profiles import Profile
from tightwad_core.records import Delta, GenRequest, Result
from tightwad_core.roles import Backend


class DirectMode:
    name = "direct"
    roles = ("target",)  # backends this mode needs started

    def __init__(self, profile: Profile, backends: dict[str, Backend]) -> None:
        self.target = backends["target"]
        self.requests = 0

    def check(self, req: GenRequest) -> None:
        checker = getattr(self.target, "check", None)
        if checker is not None:
            checker(req)

    async def generate(self, req: GenRequest) -> Result:
        self.requests += 1
        return await self.target.generate(req)

    async def stream(self, req: GenRequest) -> AsyncIterator[Delta]:
        self.requests += 1
        async for delta in self.target.stream(req):
            yield delta

    def status(self) -> dict[str, Any]:
        return {"mode": self.name, "requests": self.requests, "speculation": None}


def make(profile: Profile, backends: dict[str, Backend]) -> DirectMode:
    return DirectMode(profile, backends)


make.roles = DirectMode.roles  # type: ignore[attr-defined]


@hookimpl
def register_modes(register):  # type: ignore[no-untyped-def]
    register("direct", make)

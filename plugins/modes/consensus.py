"""Consensus modes over a fleet of drafters (docs/speculation.md#multi-drafter-consensus).

``consensus``: verified consensus, exact. The fleet's agreed tokens (or its
candidate branches, checked as one tree where the verifier can) are what the
target verifies; the output is the target's own, as in ``speculative``.

``consensus-approximate``: APPROXIMATE, off unless a profile names it.
Tokens every drafter agrees on (per the ``consensus`` rule) are emitted
without the target's check; the target is consulted only where the drafters
disagree. It needs a verifier that takes trusted tokens (``trusts = True``)
and says it is approximate in its status, /v1/models and the start-up log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from tightwad_core.config.profiles import ConfigError, Profile
from tightwad_core.hookspecs import hookimpl
from tightwad_core.roles import FLEET, Backend, ModeContext, ModeFactory
from tightwad_plugins.modes.speculative import SpeculativeMode

log = logging.getLogger("tightwad.spec")

APPROXIMATE_LABEL = ("APPROXIMATE: tokens all drafters agree on are not checked by the target; "
                     "only where they disagree does the target decide")


class ConsensusMode(SpeculativeMode):
    """Verified consensus: the ``speculative`` mode over the profile's fleet."""

    name = "consensus"
    roles: ClassVar[tuple[str, ...]] = ("target", "draft", FLEET)

    def __init__(self, profile: Profile, backends: Mapping[str, Backend], context: ModeContext) -> None:
        super().__init__(profile, backends, context)
        if len(self.members) < 2:
            raise ConfigError(f"mode {self.name!r} needs at least two drafters ([[drafters]] "
                              f"tables, a [draft] table counting as one); the profile has "
                              f"{len(self.members)}")


class ApproximateConsensusMode(ConsensusMode):
    """Approximate consensus: agreed tokens skip the target's check."""

    name = "consensus-approximate"
    approximate: ClassVar[bool] = True

    def __init__(self, profile: Profile, backends: Mapping[str, Backend], context: ModeContext) -> None:
        super().__init__(profile, backends, context)
        if self.relay_only or not getattr(self.factory, "trusts", False):
            raise ConfigError(
                f"mode {self.name!r} needs a verifier that takes trusted tokens (trusts = True): "
                f"use verifier = \"worker\" with a worker target; {self.rung!r} does not")

    async def start(self) -> None:
        await super().start()
        log.warning("mode %s: %s", self.name, APPROXIMATE_LABEL)

    def status(self) -> dict[str, Any]:
        out = super().status()
        verifier = dict(out["verifier"])
        verifier["exact"] = False
        verifier["label"] = f"{APPROXIMATE_LABEL} ({verifier['label']})"
        out["verifier"] = verifier
        out["approximate"] = True
        return out


@hookimpl
def register_modes(register: Callable[[str, ModeFactory], None]) -> None:
    register("consensus", ConsensusMode)
    register("consensus-approximate", ApproximateConsensusMode)


__all__ = ["APPROXIMATE_LABEL", "ApproximateConsensusMode", "ConsensusMode"]

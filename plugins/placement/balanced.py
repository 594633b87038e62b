"""``balanced``: a MoE model's expert tensors spread over the devices in
proportion to memory x speed, never beyond a device's memory.

Layers go in order, as runs (device after device, in the order given), and a
layer's projections stay together unless no device has room for all of them.
llama.cpp places whole fused tensors, so a layer's projection is the unit.
"""

from __future__ import annotations

from collections.abc import Callable

from tightwad_core.hookspecs import hookimpl
from tightwad_core.moe.plan import ExpertProblem, pack
from tightwad_core.roles import PlacementFactory


class Balanced:
    name = "balanced"
    rank = 1  # what "auto" takes without a routing profile
    needs_profile = False

    def place_experts(self, problem: ExpertProblem) -> dict[str, str]:
        return pack(problem, problem.model.layers, range(len(problem.devices)))


@hookimpl
def register_placement_strategies(register: Callable[[str, PlacementFactory], None]) -> None:
    register(Balanced.name, Balanced)

"""``profile-guided``: the byte shares of ``balanced`` (memory x speed, never
beyond a device's memory), with the layers that read the most expert bytes
per ubatch on the fastest devices.

For one token every layer reads K of its E experts, so at the fused
granularity what tells layers apart is how many distinct experts a ubatch of
B tokens touches: a layer whose routing is spread thin reads more of its
experts than one that keeps choosing the same few. The routing profile gives
each expert's frequency, hence that expectation (see
`tightwad_core.moe.plan.expected_distinct`). Layers are ranked by expected
bytes read per byte they hold (then by index), devices by speed (then as
given), and the ranked layers fill the devices in that order. For those byte
shares this gives the least expected time reading expert weights per ubatch
(the sum over layers of bytes read / speed: llama.cpp runs the layers one
after another).
"""

from __future__ import annotations

from collections.abc import Callable

from tightwad_core.hookspecs import hookimpl
from tightwad_core.moe.plan import ExpertProblem, PlanError, layer_reads, pack
from tightwad_core.roles import PlacementFactory


class ProfileGuided:
    name = "profile-guided"
    rank = 0  # what "auto" takes when there is a routing profile
    needs_profile = True

    def place_experts(self, problem: ExpertProblem) -> dict[str, str]:
        if problem.profile is None:
            raise PlanError(f"{self.name} needs a routing profile")
        reads = layer_reads(problem)
        # bytes read per byte held: what a byte of fast memory buys (the same
        # order as bytes read when the layers are the same size)
        layers = sorted(problem.model.layers,
                        key=lambda layer: (-reads[layer.index] / max(layer.bytes, 1), layer.index))
        devices = sorted(range(len(problem.devices)), key=lambda i: (-problem.devices[i].speed, i))
        return pack(problem, layers, devices)


@hookimpl
def register_placement_strategies(register: Callable[[str, PlacementFactory], None]) -> None:
    register(ProfileGuided.name, ProfileGuided)

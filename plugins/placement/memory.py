"""``memory-proportional``: each device gets a run of consecutive layers whose
bytes are proportional to the memory it offers, never more than it offers.

Consecutive runs keep one network hop per device per forward pass (the
hidden state goes from one worker to the next once), whatever the split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from tightwad_core.cluster.sizes import human
from tightwad_core.hookspecs import hookimpl
from tightwad_core.roles import PlacementFactory


class MemoryProportional:
    name = "memory-proportional"

    def assign(self, tensors: Mapping[str, int], devices: Mapping[str, int]) -> dict[str, str]:
        if not devices:
            raise ValueError("the pool has no devices")
        names = list(devices)
        memory = [max(0, devices[d]) for d in names]
        need = sum(tensors.values())
        if sum(memory) < need:
            raise ValueError(f"the layers need {human(need)} but the pool offers "
                             f"{human(sum(memory))} ({', '.join(f'{d} {human(m)}' for d, m in zip(names, memory))})")
        total_mem = sum(memory) or 1
        # cumulative byte targets: device i ends where its share of the memory ends
        bounds, acc = [], 0.0
        for m in memory:
            acc += m / total_mem * need
            bounds.append(acc)
        plan: dict[str, str] = {}
        used = [0] * len(names)
        done, dev = 0, 0
        for tensor, size in tensors.items():
            middle = done + size / 2  # a layer goes where most of it falls
            while dev < len(names) - 1 and (middle > bounds[dev] or used[dev] + size > memory[dev]):
                dev += 1
            if used[dev] + size > memory[dev]:
                raise ValueError(f"{tensor} ({human(size)}) does not fit on {names[dev]} "
                                 f"({human(memory[dev] - used[dev])} left) or any device after it")
            plan[tensor] = names[dev]
            used[dev] += size
            done += size
        return plan


@hookimpl
def register_placement_strategies(register: Callable[[str, PlacementFactory], None]) -> None:
    register(MemoryProportional.name, MemoryProportional)

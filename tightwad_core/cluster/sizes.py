"""Memory sizes as people write them: ``"10GiB"``, ``"512MB"``, ``"8G"``."""

from __future__ import annotations

import math
import re

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """Bytes. ``KiB/MiB/GiB/TiB`` (and bare ``K/M/G/T``) are powers of 1024,
    ``kB/MB/GB/TB`` powers of 1000; a bare number is bytes."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"bad memory size {text!r}: expected a number and a unit such as "
                         "'512MiB', '10GiB' or '16GB'")
    number, prefix, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    bare = not binary and not text.strip().upper().endswith("B")
    base = 1024 if binary or (prefix and bare) else 1000
    value = number * base ** _POWERS[prefix]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"bad memory size {text!r}: must be more than zero")
    return int(value)


def human(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

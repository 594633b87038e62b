"""Recent log lines of the agent's services, kept in memory (bounded)."""

from __future__ import annotations

import logging
import time
from collections import deque

MAX_LINES = 2000  # kept per service
MAX_LINE = 2000  # characters of one line kept


class Ring:
    """The last ``size`` lines, each with the time it came."""

    def __init__(self, size: int = MAX_LINES) -> None:
        self._lines: deque[tuple[float, str]] = deque(maxlen=size)

    def add(self, line: str) -> None:
        self._lines.append((time.time(), line[:MAX_LINE]))

    def tail(self, n: int) -> list[dict[str, object]]:
        items = list(self._lines)[-n:] if n > 0 else []
        return [{"time": t, "line": line} for t, line in items]

    def lines(self) -> list[str]:
        return [line for _, line in self._lines]


class RingHandler(logging.Handler):
    """A logging handler that writes into a `Ring`."""

    def __init__(self, ring: Ring) -> None:
        super().__init__(logging.INFO)
        self.ring = ring
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ring.add(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the agent
            self.handleError(record)

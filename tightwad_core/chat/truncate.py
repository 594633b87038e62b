"""Fitting a conversation into a context the way Ollama does: the oldest turns
go first, the system prompt and the newest message stay."""

from __future__ import annotations

from typing import Any


def drop_oldest(messages: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """``messages`` without their oldest turn (after any leading system
    messages); a tool call goes together with the tool results that answer
    it. None when nothing is left to drop but the newest message."""
    if not messages:
        return None
    keep = 0
    while keep < len(messages) and messages[keep].get("role") == "system":
        keep += 1
    rest = messages[keep:]
    if len(rest) <= 1:
        return None
    cut = 1
    while cut < len(rest) - 1 and rest[cut].get("role") == "tool":
        cut += 1  # the results of the dropped call would answer nothing
    return messages[:keep] + rest[cut:]

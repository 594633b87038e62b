"""The bench's prompts: the shipped set or a file of the user's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tightwad_core.config.shipped import data_file

PROMPTS_FILE = data_file("prompts.json")


class BenchError(Exception):
    """A bench that cannot run or a request that failed; the message is one line."""


def _items(data: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(data, list):
        raise BenchError(f"{where}: expected a JSON list of prompts (strings or "
                         '{"category", "prompt"} objects)')
    out: list[dict[str, str]] = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append({"category": "", "prompt": item})
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            out.append({"category": str(item.get("category") or ""), "prompt": item["prompt"]})
        else:
            raise BenchError(f"{where}: item {i} is neither a string nor an object with a "
                             '"prompt" string')
    return [p for p in out if p["prompt"].strip()]


def load_prompts(path: Path | None = None, limit: int | None = None) -> list[dict[str, str]]:
    """Prompts from a JSON list (strings or ``{"category", "prompt"}`` objects) or a
    text file with one prompt per line (blank lines skipped); default: the shipped set."""
    path = path or PROMPTS_FILE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BenchError(f"{path}: cannot read the prompts file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BenchError(f"{path}: the prompts file is not UTF-8 text") from None
    strict = path.suffix.lower() == ".json"
    try:
        data = json.loads(text)
    except ValueError as exc:
        if strict:
            raise BenchError(f"{path}: not valid JSON: {exc}") from None
        data = None
    if strict or isinstance(data, list):
        prompts = _items(data, str(path))
    else:  # plain text: one prompt per line
        prompts = [{"category": "", "prompt": line.strip()} for line in text.splitlines() if line.strip()]
    if not prompts:
        raise BenchError(f"{path}: holds no prompts")
    return prompts[:limit] if limit else prompts


# --------------------------------------------------------------------------- helpers

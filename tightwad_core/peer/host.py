"""What the agent says about its machine: devices (GPUs through the vendor
tools where present), CPU and memory, and the model files in its folders.

Model files are found by walking the configured folders only; a file (or a
folder) whose real path leaves its folder, through a symlink, is left out,
and a request names a model by the name the listing gives it, which is
looked up, never joined to a path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_FILES = 10_000  # per listing: a huge folder must not stall the agent
MAX_DEPTH = 4
SIDECARS = (".manifest.json", ".sha256", ".tightwad-partial", ".part")


def memory() -> dict[str, int | None]:
    """Total and available memory in bytes, from /proc/meminfo (None elsewhere)."""
    out: dict[str, int | None] = {"total": None, "available": None}
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return out
    for key, name in (("MemTotal", "total"), ("MemAvailable", "available")):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        if m:
            out[name] = int(m.group(1)) * 1024
    return out


def _run(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def gpus() -> list[dict[str, Any]]:
    """The GPUs the vendor tools see (nvidia-smi, rocm-smi); blocking."""
    found: list[dict[str, Any]] = []
    if shutil.which("nvidia-smi"):
        text = _run(["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free",
                     "--format=csv,noheader,nounits"]) or ""
        for line in text.strip().splitlines():
            cells = [c.strip() for c in line.split(",")]
            if len(cells) == 4 and cells[2].isdigit() and cells[3].isdigit():
                found.append({"vendor": "nvidia", "index": int(cells[0]), "name": cells[1],
                              "total": int(cells[2]) << 20, "free": int(cells[3]) << 20})
    if shutil.which("rocm-smi"):
        text = _run(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json"]) or "{}"
        try:
            cards = json.loads(text)
        except ValueError:
            cards = {}
        for key, card in sorted(cards.items()) if isinstance(cards, dict) else ():
            if not (isinstance(card, dict) and key.startswith("card")):
                continue
            total = int(card.get("VRAM Total Memory (B)", 0) or 0)
            used = int(card.get("VRAM Total Used Memory (B)", 0) or 0)
            found.append({"vendor": "amd", "index": int(key[4:]) if key[4:].isdigit() else key,
                          "name": card.get("Card series") or card.get("Card SKU") or "AMD GPU",
                          "total": total, "free": max(0, total - used)})
    return found


@dataclass(frozen=True)
class ModelFile:
    name: str  # the path below its folder, with "/" between parts
    path: Path  # the real path (inside the folder)
    size: int
    sha256: str | None  # from a swarm manifest or a .sha256 sidecar beside it
    folder: str

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "folder": self.folder}


def known_sha256(path: Path, size: int) -> str | None:
    """The hash a manifest (of the same size) or a ``.sha256`` sidecar says."""
    try:
        data = json.loads(Path(f"{path}.manifest.json").read_text())
        if (isinstance(data, dict) and data.get("format") == "tightwad-swarm-manifest"
                and data.get("size") == size and re.fullmatch(r"[0-9a-f]{64}", str(data.get("sha256")))):
            return str(data["sha256"])
    except (OSError, ValueError):
        pass
    try:
        word = Path(f"{path}.sha256").read_text().split()[0].lower()
    except (OSError, IndexError):
        return None
    return word if re.fullmatch(r"[0-9a-f]{64}", word) else None


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.is_relative_to(root)
    except ValueError:
        return False


def list_models(dirs: tuple[Path, ...] | list[Path]) -> list[ModelFile]:
    """The files in ``dirs`` (a few folders deep), sidecars and hidden files
    left out; anything whose real path leaves its folder is left out too."""
    out: list[ModelFile] = []
    seen: set[str] = set()
    for folder in dirs:
        try:
            root = folder.resolve(strict=True)
        except OSError:
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)
            depth = len(here.relative_to(root).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < MAX_DEPTH)
            for fname in sorted(filenames):
                if fname.startswith(".") or fname.endswith(SIDECARS):
                    continue
                try:
                    real = (here / fname).resolve(strict=True)
                    if not _inside(real, root) or not real.is_file():
                        continue  # a symlink out of the folder, or not a file
                    size = real.stat().st_size
                except OSError:
                    continue
                name = (here / fname).relative_to(root).as_posix()
                if name in seen:
                    continue  # the first folder that has a name wins
                seen.add(name)
                out.append(ModelFile(name, real, size, known_sha256(real, size), str(folder)))
                if len(out) >= MAX_FILES:
                    return out
    return out


def find_model(dirs: tuple[Path, ...] | list[Path], name: str) -> ModelFile | None:
    """The listed model called ``name`` (looked up in the listing, never joined)."""
    return next((m for m in list_models(dirs) if m.name == name), None)

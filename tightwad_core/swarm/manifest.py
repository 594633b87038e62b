"""Manifests: a file's size, its piece size, the SHA-256 of every piece and of
the whole file. Written beside the file as ``FILE.manifest.json``; pieces are
checked against it before they are written into place."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import msgspec

from tightwad_core.runtime import atomic

FORMAT = "tightwad-swarm-manifest"
VERSION = 1
DEFAULT_PIECE_SIZE = 4 << 20
MIN_PIECE_SIZE = 16 << 10
MAX_PIECE_SIZE = 64 << 20
MAX_MANIFEST_BYTES = 16 << 20
_HEX = re.compile(r"[0-9a-f]{64}")


class SwarmError(Exception):
    """Bad input to a swarm command or a pull that cannot go on, in one line."""


class Manifest(msgspec.Struct, kw_only=True):
    format: str = FORMAT
    version: int = VERSION
    name: str
    size: int
    piece_size: int
    pieces: list[str]
    sha256: str

    @property
    def count(self) -> int:
        return len(self.pieces)

    def span(self, index: int) -> tuple[int, int]:
        """Offset and length of piece ``index`` (the last one may be short)."""
        offset = index * self.piece_size
        return offset, min(self.piece_size, self.size - offset)

    def same_content(self, other: Manifest) -> bool:
        """Whether ``other`` describes the same bytes cut the same way (names may differ)."""
        return (self.sha256, self.size, self.piece_size, self.pieces) == (
            other.sha256, other.size, other.piece_size, other.pieces)


def check_name(name: str) -> str:
    """A file name as manifests carry it: no folders, nothing hidden, no
    control characters (a name is printed to terminals and logs)."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name
            or any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name)
            or name.startswith(".") or len(name) > 255):
        raise SwarmError(f"bad file name {name!r} in manifest: expected a plain file name")
    return name


def validate(m: Manifest, where: str) -> Manifest:
    """Refuse a manifest that is of another format or inconsistent, in one line."""
    if m.format != FORMAT:
        raise SwarmError(f"{where} is not a swarm manifest (format {m.format!r}, expected {FORMAT!r})")
    if m.version != VERSION:
        raise SwarmError(f"{where} is swarm manifest version {m.version}; this tightwad reads "
                         f"version {VERSION}")
    try:
        check_name(m.name)
    except SwarmError as exc:
        raise SwarmError(f"{where}: {exc}") from None
    if not MIN_PIECE_SIZE <= m.piece_size <= MAX_PIECE_SIZE:
        raise SwarmError(f"{where}: piece size {m.piece_size} is outside "
                         f"{MIN_PIECE_SIZE}..{MAX_PIECE_SIZE} bytes")
    if m.size < 0:
        raise SwarmError(f"{where}: negative file size {m.size}")
    expected = -(-m.size // m.piece_size)
    if len(m.pieces) != expected:
        raise SwarmError(f"{where}: {len(m.pieces)} piece hashes for {m.size} bytes in pieces "
                         f"of {m.piece_size} (expected {expected})")
    bad = next((h for h in [m.sha256, *m.pieces] if not _HEX.fullmatch(h)), None)
    if bad is not None:
        raise SwarmError(f"{where}: {bad[:80]!r} is not a lower-case hex SHA-256")
    return m


def decode_manifest(data: bytes, where: str) -> Manifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise SwarmError(f"{where} is over {MAX_MANIFEST_BYTES} bytes: not a swarm manifest")
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise SwarmError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        kind = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise SwarmError(f"{where} is not a swarm manifest (format {kind!r}, expected {FORMAT!r})")
    try:
        m = msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as exc:
        raise SwarmError(f"{where} is not a valid swarm manifest: {exc}") from None
    return validate(m, where)


def encode_manifest(m: Manifest) -> bytes:
    return msgspec.json.format(msgspec.json.encode(m), indent=1) + b"\n"


def manifest_path(file: Path) -> Path:
    """Where ``file``'s manifest lives: ``FILE.manifest.json`` beside it."""
    file = Path(file)
    return file.with_name(file.name + ".manifest.json")


def load_manifest(path: Path) -> Manifest:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise SwarmError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    return decode_manifest(data, f"manifest {path}")


def write_manifest(m: Manifest, path: Path) -> None:
    atomic.write_bytes(Path(path), encode_manifest(m))


def make_manifest(path: Path, piece_size: int = DEFAULT_PIECE_SIZE,
                  progress: Callable[[int, int], None] | None = None) -> Manifest:
    """Hash ``path`` piece by piece; ``progress(done, total)`` after each piece."""
    path = Path(path)
    if not MIN_PIECE_SIZE <= piece_size <= MAX_PIECE_SIZE:
        raise SwarmError(f"piece size {piece_size} is outside {MIN_PIECE_SIZE}..{MAX_PIECE_SIZE} bytes")
    name = check_name(path.name)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise SwarmError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        whole = hashlib.sha256()
        pieces = []
        done = 0
        while True:
            block = f.read(piece_size)
            if not block:
                break
            whole.update(block)
            pieces.append(hashlib.sha256(block).hexdigest())
            done += len(block)
            if progress is not None:
                progress(done, size)
    if done != size:
        raise SwarmError(f"{path} changed while it was hashed ({size} bytes, then {done})")
    return Manifest(name=name, size=size, piece_size=piece_size, pieces=pieces,
                    sha256=whole.hexdigest())


def manifest_for(path: Path, piece_size: int = DEFAULT_PIECE_SIZE,
                 progress: Callable[[int, int], None] | None = None) -> Manifest:
    """``path``'s manifest from beside it when it still fits the file (same
    name and size, not older than the file), else a new one, written there."""
    path = Path(path)
    mpath = manifest_path(path)
    try:
        st, mst = path.stat(), mpath.stat()
        if mst.st_mtime >= st.st_mtime:
            m = load_manifest(mpath)
            if m.size == st.st_size and m.name == path.name:
                return m
    except (OSError, SwarmError):
        pass
    m = make_manifest(path, piece_size, progress)
    try:
        write_manifest(m, mpath)
    except OSError:
        pass  # a read-only folder: serve without writing it down
    return m

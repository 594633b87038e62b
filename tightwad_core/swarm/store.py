"""The files a node serves to its peers: each with its manifest and the
bitfield of the pieces it holds (all of them for a finished file, a growing
set for one being pulled). Names are looked up here, never joined to a path."""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tightwad_core.swarm.manifest import Manifest, SwarmError


class Bitfield:
    """One bit per piece, most significant bit first in each byte."""

    def __init__(self, n: int, data: bytes | bytearray | None = None) -> None:
        self.n = n
        size = (n + 7) // 8
        self.data = bytearray(data) if data is not None else bytearray(size)
        if len(self.data) != size:
            raise SwarmError(f"bitfield of {len(self.data)} bytes for {n} pieces "
                             f"(expected {size})")

    @classmethod
    def full(cls, n: int) -> Bitfield:
        bf = cls(n, b"\xff" * ((n + 7) // 8))
        if n % 8:
            bf.data[-1] = (0xFF << (8 - n % 8)) & 0xFF
        return bf

    @classmethod
    def from_hex(cls, text: str, n: int) -> Bitfield:
        try:
            data = bytes.fromhex(text)
        except ValueError:
            raise SwarmError("bitfield is not hex") from None
        bf = cls(n, data)
        if n % 8 and bf.data[-1] & (0xFF >> (n % 8)):
            raise SwarmError("bitfield has bits set past its last piece")
        return bf

    def to_hex(self) -> str:
        return self.data.hex()

    def __getitem__(self, i: int) -> bool:
        return bool(self.data[i >> 3] & (0x80 >> (i & 7)))

    def set(self, i: int, value: bool = True) -> None:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if value:
            self.data[i >> 3] |= 0x80 >> (i & 7)
        else:
            self.data[i >> 3] &= ~(0x80 >> (i & 7)) & 0xFF

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.data)

    def complete(self) -> bool:
        return self.count() == self.n

    def copy(self) -> Bitfield:
        return Bitfield(self.n, self.data)

    def missing(self) -> list[int]:
        return [i for i in range(self.n) if not self[i]]


def read_exact(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes of ``fd`` at ``offset``: fewer only at its end."""
    parts = []
    while length:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def _short(path: Path) -> OSError:
    return OSError(errno.EIO, f"{path} is shorter than its manifest says")


@dataclass
class Seeded:
    """One served file. ``have`` is only changed through `SeedStore.mark`."""

    path: Path
    manifest: Manifest
    have: Bitfield
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def holds(self, index: int) -> bool:
        with self._lock:
            return 0 <= index < self.have.n and self.have[index]

    def have_hex(self) -> tuple[str, int]:
        with self._lock:
            return self.have.to_hex(), self.have.count()

    def open_piece(self, index: int) -> int:
        """A read-only descriptor of the file, checked to be long enough to
        hold piece ``index`` (blocking; the caller closes it). OSError if not."""
        offset, length = self.manifest.span(index)
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            if os.fstat(fd).st_size < offset + length:
                raise _short(self.path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_piece(self, index: int) -> bytes:
        """Piece ``index``'s bytes (blocking: call it from a worker thread)."""
        offset, length = self.manifest.span(index)
        fd = self.open_piece(index)
        try:
            data = read_exact(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise _short(self.path)
        return data


class SeedStore:
    """Files served, keyed by their whole-file SHA-256 (so two files of one
    name but other bytes are both served); looked up by SHA-256, or by name
    (the one added last under that name). Safe to change from trio tasks and
    worker threads alike."""

    def __init__(self) -> None:
        self._files: dict[str, Seeded] = {}  # sha256 -> entry, in the order added
        self._lock = threading.Lock()

    def add(self, path: Path, manifest: Manifest, have: Bitfield | None = None) -> Seeded:
        """Serve ``path`` under ``manifest.name`` and its SHA-256; ``have`` None
        means complete. Replaces the entry of the same SHA-256, and any entry
        of ``path`` (a path holds one content)."""
        bits = Bitfield.full(manifest.count) if have is None else have.copy()
        if bits.n != manifest.count:
            raise SwarmError(f"bitfield of {bits.n} pieces for a manifest of {manifest.count}")
        entry = Seeded(Path(path), manifest, bits)
        with self._lock:
            for sha in [k for k, e in self._files.items() if e.path == entry.path]:
                del self._files[sha]
            self._files.pop(manifest.sha256, None)  # re-added: now the newest of its name
            self._files[manifest.sha256] = entry
        return entry

    def _find(self, key: str) -> Seeded | None:
        entry = self._files.get(key) if len(key) == 64 else None
        if entry is None:
            entry = next((e for e in reversed(self._files.values()) if e.manifest.name == key),
                         None)
        return entry

    def get(self, key: str) -> Seeded | None:
        """The entry of SHA-256 ``key``, else the one added last named ``key``."""
        with self._lock:
            return self._find(key)

    def remove(self, key: str, path: Path | None = None) -> None:
        """Stop serving ``key`` (a SHA-256 or name); with ``path``, only if it is that file."""
        with self._lock:
            entry = self._find(key)
            if entry is not None and (path is None or entry.path == Path(path)):
                del self._files[entry.manifest.sha256]

    def entries(self) -> list[Seeded]:
        with self._lock:
            return sorted(self._files.values(), key=lambda e: (e.manifest.name, e.manifest.sha256))

    def names(self) -> list[str]:
        """The names served (a name twice when two files of other bytes share it)."""
        return [e.manifest.name for e in self.entries()]

    def open_piece(self, entry: Seeded, index: int) -> tuple[Seeded, int]:
        """`Seeded.open_piece`, once more on the newer entry of the same
        SHA-256 when the file moved meanwhile (a finished pull's rename)."""
        try:
            return entry, entry.open_piece(index)
        except OSError:
            newer = self.get(entry.manifest.sha256)
            if newer is None or newer is entry or newer.path == entry.path:
                raise
            return newer, newer.open_piece(index)

    def mark(self, key: str, index: int) -> bool:
        """Record that piece ``index`` of ``key`` (SHA-256 or name) is now held
        (verified and written); False when nothing of that key is served."""
        entry = self.get(key)
        if entry is None:
            return False
        with entry._lock:
            entry.have.set(index)
        return True

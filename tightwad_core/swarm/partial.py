"""The file a pull writes: a hidden partial file beside the target, written
piece by piece (each verified first), a small state file naming the pieces
already in it (so a killed pull resumes), pieces copied from local files that
share them (delta updates), and the final check and atomic rename.

Everything here blocks: the puller calls it from worker threads."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import msgspec

from tightwad_core.runtime import atomic
from tightwad_core.swarm.manifest import Manifest, SwarmError, load_manifest, manifest_path
from tightwad_core.swarm.store import Bitfield, read_exact

STATE_FORMAT = "tightwad-swarm-partial"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
Progress = Callable[[str, int, int], None]  # (phase, done, total)


class PartialState(msgspec.Struct):
    format: str
    version: int
    sha256: str
    size: int
    piece_size: int
    have: str


class PullFailed(SwarmError):
    """The pull could not finish (exit status 1); the message says why."""


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class PartialFile:
    def __init__(self, out: Path, manifest: Manifest) -> None:
        self.out = Path(out)
        self.m = manifest
        # the content's SHA-256 in the names: pulls of other bytes to the same path keep apart
        stem = f".{self.out.name}.{manifest.sha256[:16]}"
        self.path = self.out.with_name(f"{stem}.swarm-partial")
        self.state_path = self.out.with_name(f"{stem}.swarm-state.json")
        self.have = Bitfield(manifest.count)
        self.fd = -1

    def held_bytes(self) -> int:
        return sum(self.m.span(i)[1] for i in range(self.m.count) if self.have[i])

    # ------------------------------------------------------------ open / resume

    def _claimed(self) -> Bitfield | None:
        """The pieces the state file says are in the partial file, if it is ours."""
        try:
            raw = self.state_path.read_bytes()
            st = msgspec.json.decode(raw[:1 << 20], type=PartialState)
            if (st.format, st.version, st.sha256, st.size, st.piece_size) != (
                    STATE_FORMAT, 1, self.m.sha256, self.m.size, self.m.piece_size):
                return None
            if self.path.is_symlink() or self.path.stat().st_size > self.m.size:
                return None
            return Bitfield.from_hex(st.have, self.m.count)
        except (OSError, msgspec.MsgspecError, SwarmError):
            return None

    def open(self, progress: Progress | None = None) -> int:
        """Open (or create) the partial file; return the bytes of a previous
        pull that were found in it and verified again."""
        claimed = self._claimed()
        flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW
        try:
            self.fd = os.open(self.path, flags if claimed else flags | os.O_TRUNC, 0o644)
            os.ftruncate(self.fd, self.m.size)
        except OSError as exc:
            self.close()
            raise PullFailed(f"cannot write {self.path}: {exc.strerror or exc}") from None
        resumed = 0
        if claimed is not None:
            todo = [i for i in range(self.m.count) if claimed[i]]
            for k, i in enumerate(todo):
                offset, length = self.m.span(i)
                if hashlib.sha256(read_exact(self.fd, length, offset)).hexdigest() == self.m.pieces[i]:
                    self.have.set(i)
                    resumed += length
                if progress is not None:
                    progress("resume", k + 1, len(todo))
        self.save_state()
        return resumed

    def save_state(self) -> None:
        st = PartialState(STATE_FORMAT, 1, self.m.sha256, self.m.size, self.m.piece_size,
                          self.have.to_hex())
        atomic.write_bytes(self.state_path, msgspec.json.encode(st))

    # ------------------------------------------------------------ pieces

    def write_piece(self, index: int, data: bytes) -> bool:
        """Write piece ``index`` if ``data`` is what the manifest says; False if not."""
        offset, length = self.m.span(index)
        if len(data) != length or hashlib.sha256(data).hexdigest() != self.m.pieces[index]:
            return False
        _write_all(self.fd, data, offset)
        return True

    def reuse(self, dirs: list[Path], progress: Progress | None = None) -> int:
        """Copy the missing pieces that local files already hold (found by
        their manifests, or by hashing files of a similar size); return the
        bytes copied."""
        need: dict[str, list[int]] = {}
        for i in range(self.m.count):
            if not self.have[i]:
                need.setdefault(self.m.pieces[i], []).append(i)
        reused = 0
        for k, cand in enumerate(self._candidates(dirs)):
            if not need:
                break
            reused += self._reuse_from(cand, need)
            if progress is not None:
                progress("reuse", k + 1, 0)
        return reused

    def _candidates(self, dirs: list[Path]) -> list[Path]:
        seen: set[Path] = set()
        out = []
        for folder in [*dirs, self.out.parent]:
            try:
                entries = sorted(Path(folder).iterdir())
            except OSError:
                continue
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name.endswith(".manifest.json"):
                    continue
                try:
                    if not entry.is_file():
                        continue
                    real = entry.resolve()
                except OSError:
                    continue
                if real not in seen:
                    seen.add(real)
                    out.append(entry)
        return out

    def _reuse_from(self, cand: Path, need: dict[str, list[int]]) -> int:
        try:
            fd = os.open(cand, os.O_RDONLY)
        except OSError:
            return 0
        try:
            size = os.fstat(fd).st_size
            hashes: list[str] | None = None
            ps = self.m.piece_size
            try:
                cm = load_manifest(manifest_path(cand))
                if cm.size == size and cm.piece_size == ps:
                    hashes = cm.pieces
            except SwarmError:
                pass
            if hashes is None and not (self.m.size / 2 <= size <= self.m.size * 2):
                return 0  # too different in size to be worth hashing
            copied = 0
            for j in range(-(-size // ps)):
                if not need:
                    break
                if hashes is not None and hashes[j] not in need:
                    continue
                data = read_exact(fd, ps, j * ps)
                digest = hashlib.sha256(data).hexdigest()
                for i in need.pop(digest, []):
                    if self.write_piece(i, data):
                        self.have.set(i)
                        copied += len(data)
            return copied
        finally:
            os.close(fd)

    # ------------------------------------------------------------ finish

    def finish(self, progress: Progress | None = None,
               moved: Callable[[], None] | None = None) -> None:
        """Check the whole file's SHA-256, flush it and move it into place;
        ``moved()`` right after the rename (to serve the file from its new path)."""
        whole = hashlib.sha256()
        step = 8 << 20
        for offset in range(0, self.m.size, step):
            whole.update(read_exact(self.fd, min(step, self.m.size - offset), offset))
            if progress is not None:
                progress("verify", min(offset + step, self.m.size), self.m.size)
        if whole.hexdigest() != self.m.sha256:
            self.close()
            self.path.unlink(missing_ok=True)
            self.state_path.unlink(missing_ok=True)
            raise PullFailed(f"every piece matched the manifest but the whole file's SHA-256 is "
                             f"{whole.hexdigest()}, not {self.m.sha256}: the peers' manifest is "
                             "inconsistent")
        os.fsync(self.fd)
        self.close()
        os.replace(self.path, self.out)
        if moved is not None:
            moved()
        atomic._sync_dir(self.out.parent)
        self.state_path.unlink(missing_ok=True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

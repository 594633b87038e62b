"""Files that appear whole or not at all.

The new content goes to a fresh hidden file beside the target (created with
``O_EXCL``, so a planted file or symlink is never followed and two writers
never share one), is flushed to disk, renamed over the target, and the
folder is flushed so the rename itself survives a power cut. On any error,
Ctrl-C included, the hidden file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

PARTIAL = ".tightwad-partial"


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[int]:
    """A raw file descriptor to write ``path``'s new content to; the file is
    put in place when the block ends without an exception."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL)
    try:
        try:
            os.fchmod(fd, mode)
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (see the module's docstring)."""
    with atomic_output(path, mode) as fd:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    write_bytes(path, text.encode("utf-8"), mode)

"""Writing files atomically, and private ones 0600 from the first byte (both planes).

A reader (an agent watching its bundle cache, `tctl status`) must never see a half-written
file, so every write goes to a temporary file in the same directory and is renamed over the
target. Private files (keys, password hashes) are created with mode 0600 and never exist
with wider permissions, not even for a moment.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644


def ensure_dir(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    return path


def write_atomic(path: Path, data: bytes, mode: int = PUBLIC) -> None:
    """Replace `path` with `data` in one step: readers see the old or the new file whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret: 0600 from creation, replaced atomically."""
    write_atomic(path, data, PRIVATE)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

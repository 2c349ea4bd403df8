"""Writing the agent's own files atomically; private ones 0600 from the first byte.

A copy of the two small helpers of `control/files.py`: the layer rules keep `dataplane` from
importing `control`, and these belong in `transport` for both planes (reported to the lead).
A reader (the bundle watcher, a restarted agent) must never see a half-written file, so
every write goes to a temporary file in the same directory and is renamed over the target.
This module never logs what it writes.
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
    """Replace `path` with `data` in one step: readers see the old or the new file whole.

    The temporary file is created 0600 by `mkstemp` and only then given `mode`, so a
    private file is never readable by others, not even for a moment.
    """
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
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret: 0600 from creation, replaced atomically."""
    write_atomic(path, data, PRIVATE)

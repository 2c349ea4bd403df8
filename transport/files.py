"""Writing files atomically, and private ones 0600 from the first byte (both planes).

A reader (an agent watching its bundle cache, `tctl status`) must never see a half-written
file, so every write goes to a temporary file in the same directory and is renamed over the
target. Private files (keys, password hashes) are created with mode 0600 and never exist
with wider permissions, not even for a moment.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644


def ensure_dir(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    return path


def write_atomic(path: Path, data: bytes, mode: int = PUBLIC, *, sync_dir: bool = True) -> None:
    """Replace `path` with `data` in one step: readers see the old or the new file whole.
    The content is synced before the rename; the directory after it unless `sync_dir` is
    False (a crash may then leave the previous file, never a torn one)."""
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
    if sync_dir:
        fsync_dir(path.parent)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret: 0600 from creation, replaced atomically."""
    write_atomic(path, data, PRIVATE)


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (files created, renamed, removed) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600) for the duration of the block;
    waits for another holder to finish."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, PRIVATE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class LockHeld(Exception):
    """Another process holds the lock: it is running on the same directory."""


def hold_lock(path: Path) -> int:
    """Take an exclusive flock on `path` for as long as this process runs (or until the
    returned fd is closed); raise LockHeld at once if another process has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, PRIVATE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockHeld(str(path)) from None
    return fd


def lock_is_held(path: Path) -> bool:
    """Whether some process holds `path`'s lock now (False when the file is absent)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)

"""The agent's audit spool: events the control plane has not taken yet, on local disk.

`<data_dir>/audit-spool/` holds numbered segments (`00000000000000000001.jsonl`, ...), each
a run of events as JSON lines in the order they were emitted, written with one fsync per
append. The oldest segment is read first; a segment is deleted once every event in it was
acknowledged. `rejected.jsonl` keeps events the control plane refused outright (so they are
not lost, and do not block the events behind them).

The spool is bounded: `fits(n)` says whether `n` more bytes stay within `max_bytes`. A line
cut by a killed agent (no final newline, or not JSON) is skipped when read, with a warning.

Synchronous and single-user: the shipper calls it from one worker thread at a time. It never
deletes a segment that still holds an event not acknowledged, and never logs event contents.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("teleport.audit.spool")

SEGMENT_BYTES = 1024 * 1024
REJECTED_FILE = "rejected.jsonl"
MAX_REJECTED_BYTES = 16 * 1024 * 1024
_SEGMENT = re.compile(r"^(\d{20})\.jsonl$")


@dataclass
class Segment:
    """One spool file read back: its complete event lines, and where sending has got to."""

    path: Path
    size: int
    lines: list[bytes] = field(default_factory=list)
    position: int = 0  # lines before this one were acknowledged

    @property
    def remaining(self) -> int:
        return len(self.lines) - self.position


def segment_path(directory: Path, number: int) -> Path:
    """The file of segment `number` in `directory` (the spool's, or the journal's)."""
    return directory / f"{number:020d}.jsonl"


def segment_numbers(directory: Path) -> list[int]:
    """The numbers of the segment files in `directory`, in order."""
    return sorted(
        int(m.group(1)) for name in os.listdir(directory)
        if (m := _SEGMENT.match(name)) is not None
    )  # fmt: skip


def complete_lines(path: Path, data: bytes) -> list[bytes]:
    """The lines of `data`, read from `path`, each with its newline; a last line without one
    (the process stopped while writing it) is left out, with a warning."""
    complete, _, tail = data.rpartition(b"\n")
    if tail:
        log.warning(
            "%s: %d byte(s) at the end are an unfinished line (the process stopped while "
            "writing it); skipped", path, len(tail),
        )
    return [line + b"\n" for line in complete.split(b"\n") if line]


class Spool:
    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = SEGMENT_BYTES):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._sizes: dict[int, int] = {}  # segment number -> bytes on disk
        self._next = 1
        self._open_number: int | None = None
        self._open_fd: int | None = None

    # -- state ---------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def empty(self) -> bool:
        return not self._sizes

    def fits(self, nbytes: int) -> bool:
        return self.bytes + nbytes <= self.max_bytes

    def open(self) -> int:
        """Find the segments an earlier run left; returns how many bytes they hold."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for number in segment_numbers(self.directory):
            path = self._path(number)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size == 0:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            self._sizes[number] = size
            self._next = max(self._next, number + 1)
        return self.bytes

    def _path(self, number: int) -> Path:
        return segment_path(self.directory, number)

    # -- writing -------------------------------------------------------------------------

    def append(self, lines: list[bytes]) -> None:
        """Write event lines (each ending in a newline) after everything spooled, durably."""
        if not lines:
            return
        data = b"".join(lines)
        if self._open_fd is None:
            number = self._next
            self._next += 1
            self._open_fd = os.open(
                self._path(number), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600
            )
            self._open_number = number
            self._sizes[number] = 0
        assert self._open_number is not None
        fd = self._open_fd
        start = self._sizes[self._open_number]
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
        self._sizes[self._open_number] = start + len(data)
        if self._sizes[self._open_number] >= self.segment_bytes:
            self._seal()

    def _seal(self) -> None:
        if self._open_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._open_fd)
        self._open_fd = None
        self._open_number = None

    def reject(self, line: bytes) -> bool:
        """Keep an event the control plane refused in rejected.jsonl; False when that file
        is at its bound (the event is then dropped, and the caller says so)."""
        path = self.directory / REJECTED_FILE
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size + len(line) > MAX_REJECTED_BYTES:
            return False
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return True

    # -- reading -------------------------------------------------------------------------

    def oldest(self) -> Segment | None:
        """The oldest segment's complete lines (sealing it if it is the one written to)."""
        while self._sizes:
            number = min(self._sizes)
            if number == self._open_number:
                self._seal()
            path = self._path(number)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                del self._sizes[number]
                continue
            return Segment(path, len(data), complete_lines(path, data))
        return None

    def done(self, segment: Segment) -> None:
        """Every event of `segment` was acknowledged: delete it."""
        m = _SEGMENT.match(segment.path.name)
        if m is not None:
            self._sizes.pop(int(m.group(1)), None)
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()

    def close(self) -> None:
        self._seal()

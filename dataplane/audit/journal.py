"""The shipper's journal: every audit event in a file from the moment it is emitted until it
is delivered or spooled, so that an agent killed outright (SIGKILL, the OOM killer) loses
none of the events it held in memory.

The shipper keeps events in memory for up to its batch interval before sending them. It
also appends each one here, with one write() and no fsync: what this guards against is the
process dying, and the kernel's page cache outlives the process (a crash of the machine
itself can still lose the last events; the spool's fsync covers the control plane being
away). The relay scans the server's bytes before it forwards them, so an event is in the
journal before the client sees the answer it records.

Events leave in the order they came: the shipper says how many of them, counted from the
first one appended, are delivered or spooled (`release(done)`), and every segment whose
events all are is deleted (the segment being written is too, once nothing is pending).

At start, `take_leftovers(store)` hands the complete lines that an earlier run left behind
to `store`, segment by segment, deleting each once stored (the shipper writes them to its
spool, from where they are sent first; the control plane drops by event id those it
already has).

Files: `<spool>/journal/<20 digits>.jsonl`, mode 0600, a new segment every `segment_bytes`.
A write that fails (disk full) turns the journal off with an error in the log: events are
still delivered from memory, and only a kill can then lose some.

Never: fsync or read on the data path, delete a segment holding an event not yet done, or
log event contents.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path

from dataplane.audit.spool import complete_lines, segment_numbers, segment_path

log = logging.getLogger("teleport.audit.journal")

JOURNAL_SEGMENT_BYTES = 4 * 1024 * 1024


class Journal:
    def __init__(self, directory: Path, segment_bytes: int = JOURNAL_SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.appended = 0  # events appended since this run opened the journal
        self.broken: str | None = None  # why the journal was turned off
        self._next = 1  # number of the next segment
        self._fd: int | None = None
        self._number = 0  # of the open segment
        self._size = 0  # of the open segment
        self._sealed: deque[tuple[int, int]] = deque()  # (number, `appended` at its end)

    # -- start ----------------------------------------------------------------------------

    def take_leftovers(self, store: Callable[[list[bytes]], None]) -> int:
        """Give the complete lines of each segment an earlier run left (oldest first, each
        line ending in a newline) to `store`, deleting the segment once it took them;
        returns how many lines. If `store` raises, that segment and the later ones stay
        (and the exception goes on)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        numbers = segment_numbers(self.directory)
        if numbers:
            self._next = numbers[-1] + 1
        taken = 0
        for number in numbers:
            path = segment_path(self.directory, number)
            lines = complete_lines(path, path.read_bytes())
            if lines:
                store(lines)
                taken += len(lines)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return taken

    # -- the data path ----------------------------------------------------------------------

    def append(self, item: bytes) -> None:
        """Write one event's JSON (without its newline) after the others."""
        self.appended += 1
        if self.broken is not None:
            return
        line = item + b"\n"
        try:
            fd = self._fd if self._fd is not None else self._open()
            written = os.write(fd, line)
            while written < len(line):  # a regular file takes it all, or fails
                written += os.write(fd, line[written:])
        except OSError as exc:
            self._turn_off(f"cannot write to {self.directory}: {exc.strerror or exc}")
            return
        self._size += len(line)
        if self._size >= self.segment_bytes:
            self._seal()

    def _open(self) -> int:
        self._number = self._next
        self._next += 1
        self._fd = os.open(
            segment_path(self.directory, self._number),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600,
        )
        self._size = 0
        return self._fd

    def _seal(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._sealed.append((self._number, self.appended))
            self._fd = None

    def _turn_off(self, why: str) -> None:
        self.broken = why
        log.error(
            "audit: the journal is off: %s. Events are still delivered from memory, but a "
            "kill of this process can now lose the ones it holds", why,
        )
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    # -- events done --------------------------------------------------------------------------

    def release(self, done: int) -> None:
        """The first `done` events appended are delivered or spooled: delete the segments
        that hold only such events (the open one too when all its events are done)."""
        if self._fd is not None and self.appended <= done:
            self._seal()
        sealed = self._sealed
        while sealed and sealed[0][1] <= done:
            number, _ = sealed.popleft()
            try:
                segment_path(self.directory, number).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("audit: cannot delete the journal segment %s: %s",
                            segment_path(self.directory, number), exc.strerror or exc)

    def close(self) -> None:
        """Stop writing; segments still holding events not done stay for the next start."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

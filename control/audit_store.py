"""The control plane's audit log: events from agents and proxies, deduplicated, hash-chained.

Layout, under `<data_dir>/audit/` (directory 0700, files 0600: queries can hold secrets):

    2024-05-01.jsonl   one record per line, in the order the control plane received them
    HEAD.json          {"seq", "hash", "file"} of the last record written (rewritten per batch,
                       through a temporary file)
    *.torn-<time>      bytes cut from the end of a file at start (a write a crash interrupted)
    RETENTION.json     where the log starts after `prune_log` removed the oldest day files

A record is one line of compact JSON, its keys always in this order:

    {"seq":n,"prev":"<hash of record n-1>","received":"<UTC time>","from":"<host id>",
     "event":{...},"hash":"<sha256 hex>"}

where `hash` is the SHA-256 of the line's own bytes up to (not including) `,"hash":`: the
sequence number, the link to the previous record, the arrival time, the authenticated sender
and the event, exactly as stored. So `verify` hashes each line as it is on disk and never
re-serializes anything: a changed byte anywhere (reformatting too) changes the hash. `event`
is the event as `schemas.audit.encode_event` serialized it once, after the control plane
validated what the agent sent (agents are authenticated, their input is still checked).
`seq` starts at 1 and the first `prev` is 64 zeros. The chain runs across day files: the
first record of a day links to the last record of the file before it. `from` is the host id
the sender's certificate proved (so an agent cannot pass its events off as another's).

Logs written before this format (format 1: the canonical JSON of the record, keys sorted, the
hash over the canonical JSON of the record without `hash`) still verify: `verify` tells a
format-1 line by its first key (`{"event":`) and checks it the way it was written, and a
store opened on such a log continues its chain in the current format.

Files are by *arrival* day (the control plane's UTC clock), not by event time: a file is
only ever appended to, in chain order, so an event an agent spooled for two days goes into
today's file. `search(since=T)` therefore reads the files from the day before T's day on
(arrival is never before the event, give or take clock skew) and filters on event time.

Duplicates are dropped by event id, within a batch and against every id received in the
last `dedupe_window` (7 days by default) of files: a batch re-sent after a control plane
restart (its acknowledgement lost) is recognised. Memory grows with the number of processes
that sent events in the window, not with the number of events: one process's ids are
consecutive numbers under one prefix, kept as ranges (`control.audit_ids.EventIdIndex`).

The index is checkpointed to INDEX.json (at close, and every `CHECKPOINT_SECONDS` while
writing): the index, and the file, offset, seq and hash of the last record it covers. At
start the store reads only what follows that record, if the checkpoint still describes the
log: the named file holds, ending at that offset, the record with that seq and hash (the
log is append-only, so the files before it are unchanged, or tampered with, which `verify`
reports). Otherwise (no checkpoint, unreadable, malformed, or the log cut or changed under
it) the store says why and rebuilds the index from the window's files, about 10 s per GB
here. INDEX.json is only a cache of what the files hold; deleting it is always safe. Like
the log, it is trusted storage: whoever can write the audit directory can already remove
records.

Durability: `append` returns only after the batch's lines are fsynced; concurrent callers
(threads, or coroutines through `asyncio.to_thread`) share one write and one fsync (group
commit). `append_encoded_async`, for the db agent in the control plane's own process, chains
its records on the event loop and leaves only the write and fsync to a worker thread. At
start a torn tail of the newest file (no final newline, or not JSON: a write the crash cut,
never acknowledged) is moved to a `.torn-<time>` file beside it and cut off, with
a warning; the chain never continues over it. If HEAD.json is ahead of the files (records
at the end were removed), the chain continues from HEAD's seq and hash, so that `verify`
keeps showing the gap.

`verify_log(directory)` re-reads everything and reports the first problems as
`file:line: what is wrong`: an altered or re-formatted line, a removed line, reordered lines,
a removed day file, records missing at the start (unless RETENTION.json accounts for them)
or at the end (against HEAD.json). It never repairs.

This module never rewrites or deletes a record, never logs event contents, and never
acknowledges a batch that is not on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic

from control.audit_ids import EventIdIndex, Key, key_of
from schemas.api import AuditAck, AuditBatch
from schemas.audit import AuditEvent, encode_event, parse_event
from schemas.bundle import canonical_json
from transport.files import PRIVATE, ensure_dir, fsync_dir, write_atomic
from transport.http import (
    ApiError,
    Handler,
    Request,
    Response,
    describe_validation_error,
    json_response,
)

log = logging.getLogger("teleport.control.audit")

GENESIS = "0" * 64
HEAD_FILE = "HEAD.json"
RETENTION_FILE = "RETENTION.json"
INDEX_FILE = "INDEX.json"
INDEX_FORMAT = 1
# While writing, the index is checkpointed at most this often (and always at close).
CHECKPOINT_SECONDS = 300.0
# The longest record line `_checkpoint_mismatch` reads back (an event is at most
# MAX_EVENT_BYTES of JSON; a format-1 record, re-serialized, a little more).
_MAX_RECORD_LINE = 1 << 20
DEFAULT_DEDUPE_WINDOW = timedelta(days=7)
# Events chained per step of the event loop by `append_encoded_async` (~3 us each).
BUILD_SLICE = 256
# Arrival may precede an event's own time by this much (agents' clocks run ahead).
CLOCK_SKEW = timedelta(days=1)
_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.jsonl$")
_RECORD_KEYS = frozenset({"seq", "prev", "received", "from", "event", "hash"})
# A record line (without its newline) ends in `,"hash":"<64 hex>"}`; the hash covers the
# bytes before that suffix. A format-1 line starts with `{"event":` instead of `{"seq":`.
_RECORD_START = b'{"seq":'
_HASH_KEY = b',"hash":"'
_HASH_SUFFIX = len(_HASH_KEY) + 64 + 2
_HEX64 = re.compile(rb"[0-9a-f]{64}")


class AuditStoreError(Exception):
    """The audit log cannot be written; the message says where and what to check."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def record_middle(received: str, sender: str) -> bytes:
    """The part of a record line between the previous hash and the event, the same for
    every record of one sender's batch: `received` is an ISO time (nothing JSON escapes)."""
    sender_json = json.dumps(sender).encode()
    return b'","received":"%s","from":%s,"event":' % (received.encode(), sender_json)


def encode_record(seq: int, prev: bytes, middle: bytes, event_json: bytes) -> tuple[bytes, bytes]:
    """One record's line (with its newline) and its hash (hex, ASCII). `prev` is the hash of
    the record before, `middle` from `record_middle`, `event_json` the event as
    `encode_event` gives it."""
    head = b'{"seq":%d,"prev":"%s%s%s' % (seq, prev, middle, event_json)
    digest = hashlib.sha256(head).hexdigest().encode()
    return head + _HASH_KEY + digest + b'"}\n', digest


def line_hash(line: bytes) -> str | None:
    """The hash a record line (without its newline) should state: SHA-256 of the bytes
    before its `,"hash":"..."}` suffix. None when the line does not end in that form."""
    if len(line) <= _HASH_SUFFIX or not line.endswith(b'"}'):
        return None
    if line[-_HASH_SUFFIX:-_HASH_SUFFIX + len(_HASH_KEY)] != _HASH_KEY:
        return None
    return hashlib.sha256(line[:-_HASH_SUFFIX]).hexdigest()


def legacy_record_hash(record: dict[str, Any]) -> str:
    """Format 1: SHA-256 (hex) of the canonical JSON of `record` without its `hash` key."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def day_file_name(day: date) -> str:
    return f"{day.isoformat()}.jsonl"


def day_files(directory: Path) -> list[tuple[date, Path]]:
    """The day files in `directory`, oldest first."""
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        m = _DAY_FILE.match(name)
        if m is None:
            continue
        try:
            found.append((date.fromisoformat(m.group(1)), directory / name))
        except ValueError:
            continue
    found.sort()
    return found


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str
    file: str


def read_head(directory: Path) -> Head | None:
    """HEAD.json, or None when there is none or it cannot be read as one."""
    try:
        data = json.loads((directory / HEAD_FILE).read_bytes())
        return Head(int(data["seq"]), str(data["hash"]), str(data["file"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_retention(directory: Path) -> tuple[int, str] | None:
    """(first seq, its prev) kept after the last `prune_log`, or None."""
    try:
        data = json.loads((directory / RETENTION_FILE).read_bytes())
        return int(data["first_seq"]), str(data["prev"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prunable(files: list[tuple[date, Path]], before: date) -> list[Path]:
    """Of `files` (`day_files`), those retention may delete: days before `before`, never the
    newest file."""
    return [path for day, path in files[:-1] if day < before]


def prune_log(directory: Path, before: date, dry_run: bool = False) -> list[Path]:
    """Retention: delete the day files older than `before` (never the newest one), and note
    in RETENTION.json where the log now starts, so that `verify_log` can tell this from a
    removal. Returns the files deleted (with `dry_run`: the files it would delete, and
    nothing is changed).

    Safe while the control plane runs: it only ever appends to the file of the current
    arrival day, which is the newest, and an older day file is never written again."""
    directory = Path(directory)
    files = day_files(directory)
    old = prunable(files, before)
    if not old:
        return []
    first = None
    for _day, path in files[len(old):]:
        first = _first_record(path)
        if first is not None:
            break
    if first is None:
        return []
    if dry_run:
        return old
    note = {"first_seq": first["seq"], "prev": first["prev"], "before": before.isoformat()}
    write_atomic(directory / RETENTION_FILE, json.dumps(note).encode(), PRIVATE)
    for path in old:
        path.unlink()
    fsync_dir(directory)
    log.info("audit retention: removed %d day file(s) before %s; the log starts at seq %d",
             len(old), before.isoformat(), first["seq"])
    return old


def _checkpoint_mismatch(directory: Path, position: _Position) -> str:
    """Why the log does not hold, ending at `position`, the record it names ("" if it does)."""
    path = directory / position.file
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < position.offset:
            return f"{position.file} is shorter than the {position.offset} bytes it covers"
        begin = max(0, position.offset - _MAX_RECORD_LINE)
        f.seek(begin)
        chunk = f.read(position.offset - begin)
    if not chunk.endswith(b"\n"):
        return f"{position.file} has no line ending at offset {position.offset}"
    cut = chunk.rfind(b"\n", 0, len(chunk) - 1)
    if cut < 0 and begin > 0:
        return f"the line ending at offset {position.offset} is too long to be a record"
    record = _parse_record(chunk[cut + 1 :])
    if record is None or (record["seq"], record["hash"]) != (position.seq, position.hash):
        return (f"the record ending at offset {position.offset} of {position.file} is not "
                f"seq {position.seq} with the hash it names")
    return ""


def _first_record(path: Path) -> dict[str, Any] | None:
    with path.open("rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                record = _parse_record(line)
                if record is not None:
                    return record
    return None


def _parse_record(line: bytes) -> dict[str, Any] | None:
    """A record's fields if `line` is a JSON object with every record key, else None."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not record.keys() >= _RECORD_KEYS:
        return None
    if not isinstance(record["seq"], int) or not isinstance(record["event"], dict):
        return None
    return record


# --- the store -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Position:
    """The end of the last record written: its file, the offset after its newline, how many
    lines the file holds up to there, and its seq and hash."""

    file: str
    offset: int
    lines: int
    seq: int
    hash: str


@dataclass(frozen=True)
class _Checkpoint:
    position: _Position
    received: str
    index: EventIdIndex

    @classmethod
    def from_json(cls, data: Any) -> _Checkpoint:
        """ValueError (naming what is wrong) unless `data` is what `_maybe_checkpoint` wrote."""
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise ValueError(f"not an index checkpoint of format {INDEX_FORMAT}")
        fields = {"file": str, "offset": int, "lines": int, "seq": int, "hash": str,
                  "received": str}  # fmt: skip
        for name, kind in fields.items():
            if type(data.get(name)) is not kind:
                raise ValueError(f"{name!r} is missing or not a {kind.__name__}")
        if _DAY_FILE.match(data["file"]) is None or data["offset"] <= 0 or data["lines"] <= 0:
            raise ValueError("file, offset or lines out of range")
        position = _Position(data["file"], data["offset"], data["lines"], data["seq"],
                             data["hash"])  # fmt: skip
        return cls(position, data["received"], EventIdIndex.from_json(data.get("index")))


@dataclass
class _Pending:
    """One caller's batch waiting for the group write."""

    entries: Sequence[tuple[str, bytes]]  # (event id, the event's `encode_event` JSON)
    sender: str
    done: bool = False
    accepted: int = 0
    duplicates: int = 0
    error: BaseException | None = None


@dataclass(frozen=True)
class _Built:
    """A group's records, chained and joined, not yet written."""

    now: datetime
    day: date
    seq: int  # of the last record
    digest: str  # its hash
    data: bytes
    keys: list[Key]  # of the events' ids, for the index


class _Chain:
    """New records being chained after the last one written, batch by batch (in slices, if
    wanted): CPU only, the store's state is left as it is until `_persist`."""

    def __init__(self, now: datetime, seq: int, prev: bytes, known: EventIdIndex) -> None:
        self.now = now
        self.day = now.date()
        self.received = now.isoformat(timespec="microseconds").replace("+00:00", "Z")
        self.seq = seq
        self.prev = prev
        self.known = known
        self.seen: set[str] = set()
        self.keys: list[Key] = []
        self.lines: list[bytes] = []

    def add(self, pending: _Pending, start: int, stop: int) -> None:
        """Chain `pending.entries[start:stop]`, skipping ids already stored or seen."""
        middle = record_middle(self.received, pending.sender)
        seq, prev, seen, lines = self.seq, self.prev, self.seen, self.lines
        has, keys = self.known.has, self.keys
        accepted = 0
        entries = pending.entries[start:stop]
        for event_id, event_json in entries:
            if event_id in seen:
                continue
            key = key_of(event_id)
            if not has(key):
                seen.add(event_id)
                keys.append(key)
                seq += 1
                line, prev = encode_record(seq, prev, middle, event_json)
                lines.append(line)
                accepted += 1
        self.seq, self.prev = seq, prev
        pending.accepted += accepted
        pending.duplicates += len(entries) - accepted

    def built(self) -> _Built | None:
        if not self.lines:
            return None
        return _Built(self.now, self.day, self.seq, self.prev.decode(), b"".join(self.lines),
                      self.keys)


@dataclass(frozen=True)
class Repair:
    """A torn tail cut from a file at start."""

    path: Path
    line: int
    nbytes: int
    saved_to: Path

    def __str__(self) -> str:
        return (
            f"{self.path}:{self.line}: {self.nbytes} byte(s) of an unfinished write were cut "
            f"(saved to {self.saved_to.name}); that batch was never acknowledged, its sender "
            "sends it again"
        )


class AuditStore:
    """The audit log in `directory` (`<data_dir>/audit`), open for appending.

    `append(events, sender)` -> (accepted, duplicates); `append_encoded` for events already
    serialized; `append_body` for a request body; `search(...)`; `verify()`; `close()`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        dedupe_window: timedelta = DEFAULT_DEDUPE_WINDOW,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.directory = Path(directory)
        self.dedupe_window = dedupe_window
        self.clock = clock
        self.repairs: list[Repair] = []
        self._seq = 0
        self._hash = GENESIS
        self._day: date | None = None
        self._last_received: datetime | None = None
        self._fd: int | None = None
        self._ids = EventIdIndex()
        self._position: _Position | None = None  # None: not known, no checkpoint written
        self._checkpointed = time.monotonic()
        self._write_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._closed = False
        self._broken: str | None = None
        # The thread of `append_encoded_async`'s writes: its own, so that a write never
        # waits behind the shared pool's threads, which may all be callers of `append`
        # blocked on the write lock that this write holds.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-write")
        try:
            ensure_dir(self.directory)
            self._open()
        except OSError as exc:
            raise AuditStoreError(
                f"cannot open the audit log in {self.directory}: {exc.strerror or exc}; check "
                "that the directory is writable by the control plane"
            ) from None

    # -- state -----------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def last_hash(self) -> str:
        return self._hash

    def known_ids(self) -> int:
        """How many event ids the duplicate index holds now."""
        return len(self._ids)

    def index_entries(self) -> int:
        """How many entries hold them (ranges of one process's ids, ids of other forms):
        what the index's memory grows with."""
        return self._ids.footprint()

    def _open(self) -> None:
        files = day_files(self.directory)
        today = self.clock().astimezone(UTC).date()
        oldest = today - timedelta(days=max(self.dedupe_window.days, 0))
        checkpoint = self._read_checkpoint(files)
        covered = ""  # the day files up to this one are in the checkpoint's index
        if checkpoint is not None:
            self._ids = checkpoint.index
            self._ids.forget_before(oldest)
            covered = checkpoint.position.file
        last: dict[str, Any] | None = None
        position: _Position | None = None
        for index, (day, path) in enumerate(files):
            newest = index == len(files) - 1
            in_window = day >= oldest
            if path.name < covered or not (newest or in_window or path.name == covered):
                continue
            start = checkpoint.position if checkpoint and path.name == covered else None
            scan = _scan_file(path, day, self._ids if in_window else None, start)
            for number in scan.bad_lines:
                log.error(
                    "%s:%d is not an audit record (altered or corrupted); run `tctl audit "
                    "verify`", path, number,
                )
            if newest and scan.good_bytes < scan.size:
                self._cut_torn_tail(path, scan.good_bytes, scan.good_lines + 1)
            if scan.last is not None:
                last = scan.last
                position = _Position(path.name, scan.good_bytes, scan.good_lines,
                                     last["seq"], str(last["hash"]))  # fmt: skip
        if last is None and checkpoint is not None:
            # Nothing was written after the checkpoint.
            position = checkpoint.position
            last = {"seq": position.seq, "hash": position.hash,
                    "received": checkpoint.received}  # fmt: skip
        last_path = position.file if position is not None else ""
        if last is None:
            # The newest file may be empty (a torn first write); look further back.
            for _day, path in reversed(files):
                last = _scan_file(path, _day, None).last
                if last is not None:
                    last_path = path.name
                    break
        if last is not None:
            self._seq, self._hash = last["seq"], str(last["hash"])
            with contextlib.suppress(TypeError, ValueError):
                self._last_received = datetime.fromisoformat(last["received"])
        head = read_head(self.directory)
        if head is not None and head.seq > self._seq:
            log.error(
                "the audit log ends at seq %d but %s says seq %d was written: records at the "
                "end were removed; continuing the chain from seq %d so that `tctl audit "
                "verify` shows the gap",
                self._seq, self.directory / HEAD_FILE, head.seq, head.seq,
            )
            self._seq, self._hash = head.seq, head.hash
        elif last is not None and (head is None or head.seq < self._seq):
            if head is None:
                log.warning(
                    "%s is missing: written again from the last record (seq %d); whether "
                    "records after it were removed can no longer be told",
                    self.directory / HEAD_FILE, self._seq,
                )
            self._write_head(self._seq, self._hash, last_path)
        self._position = position
        if files:
            log.info(
                "audit log %s: %d day file(s), last seq %d, %d event id(s) in the duplicate "
                "index (%d entries)%s", self.directory, len(files), self._seq, self.known_ids(),
                self.index_entries(), "; read from its checkpoint and what followed it"
                if checkpoint is not None else "",
            )

    def _read_checkpoint(self, files: list[tuple[date, Path]]) -> _Checkpoint | None:
        """INDEX.json if it still describes the log (see the module docstring), else None
        with a warning saying why the index is rebuilt from the files."""
        path = self.directory / INDEX_FILE
        try:
            raw = path.read_bytes()
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"not JSON: {exc}") from None
            checkpoint = _Checkpoint.from_json(data)
            names = {p.name for _, p in files}
            if checkpoint.position.file not in names:
                raise ValueError(f"its day file {checkpoint.position.file} is gone")
            problem = _checkpoint_mismatch(self.directory, checkpoint.position)
            if problem:
                raise ValueError(problem)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("%s is not used (%s); rebuilding the duplicate index from the day "
                        "files", path, getattr(exc, "strerror", None) or exc)
            with contextlib.suppress(OSError):
                path.unlink()  # only a cache: the next checkpoint replaces it
            return None
        return checkpoint

    def _maybe_checkpoint(self, force: bool = False) -> None:
        """Write INDEX.json (holding the write lock, so the index and the position agree)
        if `force` or it is `CHECKPOINT_SECONDS` old. A failure is logged: the checkpoint
        only saves time at the next start."""
        if self._position is None:
            return
        now = time.monotonic()
        if not force and now - self._checkpointed < CHECKPOINT_SECONDS:
            return
        self._checkpointed = now
        position = self._position
        received = self._last_received
        data = {
            "format": INDEX_FORMAT,
            "file": position.file, "offset": position.offset, "lines": position.lines,
            "seq": position.seq, "hash": position.hash,
            "received": received.isoformat() if received is not None else "",
            "index": self._ids.to_json(),
        }  # fmt: skip
        try:
            write_atomic(self.directory / INDEX_FILE, json.dumps(data).encode(), PRIVATE,
                         sync_dir=False)  # fmt: skip
        except OSError as exc:
            log.warning("cannot write %s (%s); the next start rebuilds the duplicate index "
                        "from the day files", self.directory / INDEX_FILE, exc.strerror or exc)

    def _cut_torn_tail(self, path: Path, keep: int, line: int) -> None:
        with path.open("rb") as f:
            f.seek(keep)
            torn = f.read()
        saved = path.with_name(f"{path.name}.torn-{time.time_ns()}")
        fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE)
        try:
            os.write(fd, torn)
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, keep)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.directory)
        repair = Repair(path, line, len(torn), saved)
        self.repairs.append(repair)
        log.warning("audit log repaired at start: %s", repair)

    # -- appending ---------------------------------------------------------------------------

    def append(self, events: Sequence[AuditEvent], sender: str = "") -> tuple[int, int]:
        """Store `events` in order, skipping ids already stored: (accepted, duplicates).

        Returns once the accepted events are on disk (fsynced). Thread-safe; concurrent
        calls are written together. Raises `AuditStoreError` when the log cannot be written
        (nothing of this batch is then acknowledged or kept), `ValueError` for an event that
        cannot be stored as UTF-8 JSON.
        """
        return self.append_encoded([(event.id, encode_event(event)) for event in events],
                                   sender)

    def append_body(self, body: bytes, sender: str = "") -> tuple[int, int]:
        """Validate `body`, the JSON of an `AuditBatch` as an agent sent it, in one
        pydantic-core call, then store its events as `append` does. Raises pydantic's
        `ValidationError` for a body that is not a valid batch (nothing is stored)."""
        batch = AuditBatch.model_validate_json(body)
        return self.append_encoded(
            [(event.id, encode_event(event)) for event in batch.events], sender
        )

    def append_encoded(
        self, entries: Sequence[tuple[str, bytes]], sender: str = ""
    ) -> tuple[int, int]:
        """`append` for events already serialized: `entries` are (event id, the event's
        JSON exactly as `schemas.audit.encode_event` gave it for a validated event)."""
        pending = _Pending(entries, sender)
        with self._queue_lock:
            self._queue.append(pending)
        with self._write_lock:
            if not pending.done:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._write_group(group)
        if pending.error is not None:
            raise pending.error
        return pending.accepted, pending.duplicates

    async def append_encoded_async(
        self, entries: Sequence[tuple[str, bytes]], sender: str = ""
    ) -> tuple[int, int]:
        """`append_encoded` for a caller on an event loop that runs a data path (the db agent
        inside the control plane's process). The records are chained on the caller's thread
        and only their write and fsync go to a worker thread: chaining a batch in a thread
        of its own took the GIL from the data path in slices (measured: 7.4 ms of wall time
        per 300-event batch for 1.9 ms of CPU, and a quarter of the all-in-one's throughput
        at 8 clients). Same guarantees: it returns once the records are on disk, and a
        cancelled caller leaves the write to finish in its thread (which then releases the
        lock), never half done."""
        if not self._write_lock.acquire(blocking=False):
            # Another caller (a batch over HTTP, in a worker thread) is writing: join the
            # group it writes next, as `append_encoded` does.
            return await asyncio.to_thread(self.append_encoded, entries, sender)
        pending = _Pending(entries, sender)
        with self._queue_lock:
            group, self._queue = [*self._queue, pending], []
        await asyncio.shield(asyncio.create_task(self._build_and_persist(group)))
        if pending.error is not None:
            raise pending.error
        return pending.accepted, pending.duplicates

    async def _build_and_persist(self, group: list[_Pending]) -> None:
        """`append_encoded_async`'s work, holding the write lock, never half done (a
        cancelled caller does not stop it): the chain is built on the event loop
        `BUILD_SLICE` events at a time, letting the data path run between slices (a
        2,000-event batch in one go held it ~6 ms), then written in a worker thread."""
        try:
            chain = self._chain()
            for pending in group:
                for start in range(0, len(pending.entries), BUILD_SLICE):
                    chain.add(pending, start, start + BUILD_SLICE)
                    await asyncio.sleep(0)
            built = chain.built()
        except BaseException as exc:
            self._fail(group, exc)
            self._finish(group)
            self._write_lock.release()
            return
        if built is None:
            self._finish(group)
            self._write_lock.release()
            return
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self._persist_and_release, group, built
        )

    def _persist_and_release(self, group: list[_Pending], built: _Built) -> None:
        try:
            self._persist(built)
        except BaseException as exc:
            self._fail(group, exc)
        finally:
            self._finish(group)
            self._write_lock.release()

    def _write_group(self, group: list[_Pending]) -> None:
        """Write every pending batch of `group` with one fsync (holding the write lock)."""
        try:
            built = self._build(group)
            if built is not None:
                self._persist(built)
        except BaseException as exc:
            self._fail(group, exc)
        finally:
            self._finish(group)

    def _fail(self, group: list[_Pending], exc: BaseException) -> None:
        error: BaseException = exc
        if isinstance(exc, OSError):
            error = AuditStoreError(
                f"cannot write the audit log in {self.directory}: {exc.strerror or exc}; "
                "check free space and permissions"
            )
        for pending in group:
            pending.accepted = pending.duplicates = 0
            pending.error = error

    @staticmethod
    def _finish(group: list[_Pending]) -> None:
        for pending in group:
            pending.done = True

    def _build(self, group: list[_Pending]) -> _Built | None:
        """The records of `group`, chained after the last one written (CPU only: nothing is
        written and the store's state is unchanged); None when every event is a duplicate."""
        chain = self._chain()
        for pending in group:
            chain.add(pending, 0, len(pending.entries))
        return chain.built()

    def _chain(self) -> _Chain:
        """A chain of new records after the last one written (see `_Chain`)."""
        if self._closed:
            raise AuditStoreError(f"the audit log in {self.directory} is closed")
        if self._broken is not None:
            raise AuditStoreError(self._broken)
        now = self.clock().astimezone(UTC)
        if self._last_received is not None and now < self._last_received:
            # The clock stepped back: arrival times (and so day files) never go backwards,
            # or a file already written to would be appended to out of chain order.
            now = self._last_received
        return _Chain(now, self._seq, self._hash.encode(), self._ids)

    def _persist(self, built: _Built) -> None:
        """Write and fsync what `_build` chained, then make it the store's state."""
        start = self._write_lines(built.day, built.data)
        name = day_file_name(built.day)
        before = self._position
        if start == 0:
            lines = 0
        elif before is not None and (before.file, before.offset) == (name, start):
            lines = before.lines
        else:
            lines = -1  # the file holds what this store did not write: no checkpoint
        self._position = None if lines < 0 else _Position(
            name, start + len(built.data), lines + built.seq - self._seq, built.seq,
            built.digest,
        )
        self._seq, self._hash = built.seq, built.digest
        self._last_received = built.now
        self._ids.add_keys(built.keys, built.day)
        self._forget_old(built.day)
        self._maybe_checkpoint()
        try:
            self._write_head(built.seq, built.digest, day_file_name(built.day))
        except OSError as exc:
            # The records are on disk and chained: acknowledge them. HEAD only lags (the
            # next batch rewrites it); verify then notes records after HEAD.
            log.error("cannot update %s: %s", self.directory / HEAD_FILE, exc)

    def _write_head(self, seq: int, digest: str, file: str) -> None:
        """Replace HEAD.json: the new content is synced before the rename, so HEAD is never
        torn. The directory is not synced (a sync per batch saved): after a crash HEAD may
        be the one before, which is only behind the records, as after a crash between the
        records' fsync and this; the store rewrites it from the records at start."""
        data = json.dumps({"seq": seq, "hash": digest, "file": file}).encode()
        write_atomic(self.directory / HEAD_FILE, data, PRIVATE, sync_dir=False)

    def _forget_old(self, today: date) -> None:
        oldest = today - timedelta(days=max(self.dedupe_window.days, 0))
        self._ids.forget_before(oldest)

    def _write_lines(self, day: date, data: bytes) -> int:
        """Append `data` (whole lines) to `day`'s file and fsync; on failure cut what was
        written. Returns the offset `data` was written at."""
        path = self.directory / day_file_name(day)
        if self._fd is None or self._day != day:
            self._close_fd()
            created = not path.exists()
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
            self._day = day
            if created:
                fsync_dir(self.directory)
        fd = self._fd
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fdatasync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError as exc:
                self._broken = (
                    f"the audit log {path} could not be written and the partial write could "
                    f"not be cut ({exc.strerror or exc}); restart the control plane: it "
                    "repairs the file at start"
                )
                log.critical("%s", self._broken)
            raise
        return start

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            self._day = None

    def close(self) -> None:
        """Wait for a write in progress, then close; later appends raise AuditStoreError."""
        with self._write_lock:
            if not self._closed and self._broken is None:
                self._maybe_checkpoint(force=True)
            self._closed = True
            self._close_fd()
        self._writer.shutdown(wait=False)

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------

    def search(
        self,
        type: str | None = None,
        user: str | None = None,
        db: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[AuditEvent]:
        return search_log(self.directory, type, user, db, since, until, limit)

    def verify(self) -> VerifyReport:
        return verify_log(self.directory)


@dataclass
class _Scan:
    size: int = 0
    good_bytes: int = 0  # the end of the last complete record line
    good_lines: int = 0
    last: dict[str, Any] | None = None
    bad_lines: list[int] = field(default_factory=list)  # not records, before the last good


def _scan_file(
    path: Path, day: date, ids: EventIdIndex | None, start: _Position | None = None
) -> _Scan:
    """Read `path` (the file of arrival `day`) line by line, from `start` on if given: the
    last record, where the good part ends; the event ids go to `ids`."""
    scan = _Scan()
    pending_bad: list[int] = []
    offset = first = 0
    if start is not None:
        offset, first = scan.good_bytes, scan.good_lines = start.offset, start.lines
    with path.open("rb") as f:
        f.seek(offset)
        for number, line in enumerate(f, first + 1):
            offset += len(line)
            record = _parse_record(line) if line.endswith(b"\n") else None
            if record is None:
                pending_bad.append(number)
                continue
            scan.bad_lines += pending_bad
            pending_bad = []
            scan.good_bytes, scan.good_lines, scan.last = offset, number, record
            if ids is not None:
                event_id = record["event"].get("id")
                if isinstance(event_id, str):
                    ids.add(event_id, day)
    scan.size = offset
    return scan


# --- verification --------------------------------------------------------------------------


@dataclass(frozen=True)
class LogProblem:
    """Where the log is not what was written, and why."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class VerifyReport:
    directory: Path
    files: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    problems: list[LogProblem] = field(default_factory=list)
    problem_count: int = 0
    notes: list[str] = field(default_factory=list)
    format1_records: int = 0  # records written in the format before the current one

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add(self, path: Path, line: int, message: str, limit: int) -> None:
        self.problem_count += 1
        if len(self.problems) < limit:
            self.problems.append(LogProblem(path, line, message))


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without its newline, whether it had one) for each line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.endswith(b"\n"):
                yield number, raw[:-1], True
            else:
                yield number, raw, False


def verify_log(directory: Path, max_problems: int = 100) -> VerifyReport:
    """Check every record of the log in `directory`: its form, its hash, its place in the
    chain, its file; and the end of the log against HEAD.json. Never modifies anything."""
    directory = Path(directory)
    report = VerifyReport(directory)
    head = read_head(directory)
    files = day_files(directory)
    report.files = len(files)
    expected_seq: int | None = None
    expected_prev: str | None = None
    previous: tuple[Path, int] | None = None  # file and line of the record before
    hash_at_head: str | None = None

    def problem(path: Path, line: int, message: str) -> None:
        report.add(path, line, message, max_problems)

    for file_index, (day, path) in enumerate(files):
        last_file = file_index == len(files) - 1
        try:
            for number, line, complete in _lines(path):
                if not complete:
                    if last_file and (head is None or (report.last_seq or 0) >= head.seq):
                        report.notes.append(
                            f"{path.name}:{number}: an unfinished line after the last "
                            "acknowledged record (a write in progress, or one a crash cut: "
                            "the control plane cuts it at its next start)"
                        )
                    else:
                        problem(path, number, "the line has no end (no newline): the file "
                                "was cut or the line altered")
                    break
                record = _parse_record(line)
                if record is None:
                    problem(path, number, "is not an audit record (not JSON, or fields are "
                            "missing): the line was altered or the file corrupted")
                    expected_seq = expected_prev = None
                    previous = (path, number)
                    continue
                seq, stated = record["seq"], record["hash"]
                report.records += 1
                if not line.startswith(_RECORD_START):
                    report.format1_records += 1
                if report.first_seq is None:
                    report.first_seq = seq
                    if seq == 1 and record["prev"] != GENESIS:
                        problem(path, number, "the first record (seq 1) does not start the "
                                "chain (its prev is not 64 zeros)")
                    elif seq > 1:
                        retention = read_retention(directory)
                        if retention == (seq, record["prev"]):
                            report.notes.append(
                                f"the log starts at seq {seq} in {path.name}: older day files "
                                f"were removed by retention ({RETENTION_FILE})"
                            )
                        else:
                            problem(path, number, f"the log starts at seq {seq}: the "
                                    f"{seq - 1} record(s) before it are missing and "
                                    f"{RETENTION_FILE} does not account for them: the oldest "
                                    "day file(s) were removed or emptied")
                report.last_seq = seq
                why = _record_problems(record, line, day, expected_seq, expected_prev,
                                       previous, number == 1 and file_index > 0)
                if why:
                    problem(path, number, "; ".join(why))
                if head is not None and seq == head.seq:
                    hash_at_head = stated
                expected_seq, expected_prev = seq + 1, stated
                previous = (path, number)
        except OSError as exc:
            problem(path, 0, f"cannot be read: {exc.strerror or exc}")
            expected_seq = expected_prev = None
    end = previous or (directory / HEAD_FILE, 1)
    if report.last_seq is None:
        if head is not None and head.seq > 0:
            problem(directory / HEAD_FILE, 1, f"{HEAD_FILE} records seq {head.seq} as written "
                    "but there are no records: the day files were removed")
    elif head is None:
        problem(end[0], end[1], f"{HEAD_FILE} is missing, so the end of the log cannot be "
                "checked: it was removed (the control plane writes it with every batch)")
    elif head.seq > report.last_seq:
        problem(end[0], end[1], f"the log ends at seq {report.last_seq} but {HEAD_FILE} "
                f"records seq {head.seq} as written: the last {head.seq - report.last_seq} "
                "record(s) were removed")
    elif hash_at_head is not None and hash_at_head != head.hash:
        problem(directory / HEAD_FILE, 1, f"the record with seq {head.seq} is not the one "
                f"{HEAD_FILE} says was written: it was replaced")
    elif head.seq < report.last_seq:
        report.notes.append(
            f"{report.last_seq - head.seq} record(s) after seq {head.seq}, the last one "
            f"{HEAD_FILE} confirms: a write in progress, or the control plane stopped before "
            "confirming it"
        )
    if report.format1_records:
        report.notes.append(
            f"{report.format1_records} record(s) are in the format of earlier versions "
            "(sorted keys, the hash over the parsed record) and were checked as such"
        )
    for torn in sorted(directory.glob("*.jsonl.torn-*")):
        report.notes.append(
            f"{torn.name}: bytes cut from the end of a day file at a start after a crash "
            "(a write that was never acknowledged)"
        )
    return report


def _form_problems(record: dict[str, Any], line: bytes) -> list[str]:
    """Whether `line` is a record as the control plane wrote it, and its hash its own."""
    edited = "the line is not in the form the control plane writes: it was edited"
    altered = "its hash does not match its content: the record was altered"
    stated = record["hash"]
    if line.startswith(_RECORD_START):
        expected = line_hash(line)
        written = line[-_HASH_SUFFIX + len(_HASH_KEY):-2]
        if expected is None or not _HEX64.fullmatch(written) or stated != written.decode():
            return [edited]
        return [] if expected == stated else [altered]
    # Format 1: canonical JSON, the hash over the parsed record.
    try:
        why = [] if canonical_json(record) == line else [edited]
        if legacy_record_hash(record) != stated:
            why.append(altered)
    except UnicodeEncodeError:  # a lone surrogate: never written by the control plane
        why = [edited]
    return why


def _record_problems(
    record: dict[str, Any],
    line: bytes,
    day: date,
    expected_seq: int | None,
    expected_prev: str | None,
    previous: tuple[Path, int] | None,
    starts_file: bool,
) -> list[str]:
    """What is wrong with one record in its place, in words."""
    why = _form_problems(record, line)
    seq = record["seq"]
    where = f"{previous[0].name}:{previous[1]}" if previous else "the line before"
    if expected_seq is not None and seq > expected_seq:
        missing = seq - expected_seq
        if starts_file:
            why.append(
                f"seq {seq} follows seq {expected_seq - 1} (the end of {where}): {missing} "
                "record(s) are missing: a day file between them was removed, or the end of "
                "the previous file was cut"
            )
        else:
            why.append(f"seq {seq} follows seq {expected_seq - 1} ({where}): {missing} "
                       "record(s) before this line were removed")
    elif expected_seq is not None and seq < expected_seq:
        why.append(f"seq {seq} where seq {expected_seq} was expected (after {where}): records "
                   "were reordered or copied")
    elif expected_prev is not None and record["prev"] != expected_prev:
        why.append(f"it does not link to the record before it ({where}): that record was "
                   "replaced")
    received = record["received"]
    if not (isinstance(received, str) and received.startswith(day.isoformat())):
        why.append(f"it was received on {str(received)[:10]} but is in the file of "
                   f"{day.isoformat()}: it was moved between files")
    return why


# --- search --------------------------------------------------------------------------------


def _event_time(event: dict[str, Any]) -> datetime | None:
    text = event.get("time")
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _aware(value: datetime | None) -> datetime | None:
    """A time without a zone is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def type_matches(pattern: str, event_type: str) -> bool:
    """`db.session.query` matches itself; `db.session.postgres` (a dotted prefix) matches
    every `db.session.postgres.*` type."""
    return event_type == pattern or event_type.startswith(pattern.rstrip(".") + ".")


def iter_events(
    directory: Path, since: datetime | None = None
) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, line, event as stored) for every record whose day file may hold events from
    `since` on; lines that are not records are skipped (verify reports them)."""
    first_day = (since - CLOCK_SKEW).astimezone(UTC).date() if since is not None else None
    for day, path in day_files(Path(directory)):
        if first_day is not None and day < first_day:
            continue
        try:
            with path.open("rb") as f:
                for number, line in enumerate(f, 1):
                    if not line.endswith(b"\n"):
                        break
                    record = _parse_record(line)
                    if record is not None:
                        yield path, number, record["event"]
        except FileNotFoundError:
            continue


def search_log(
    directory: Path,
    type: str | None = None,
    user: str | None = None,
    db: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> list[AuditEvent]:
    """Events in log order whose type matches `type` (exactly or as a dotted prefix), whose
    user is `user`, whose db service is `db`, and whose time is in [since, until]; at most
    `limit` of them (the first ones)."""
    found: list[AuditEvent] = []
    if limit is not None and limit <= 0:
        return found
    since = _aware(since)
    until = _aware(until)
    for path, number, event in iter_events(directory, since):
        if type is not None and not type_matches(type, str(event.get("type", ""))):
            continue
        if user is not None and event.get("user") != user:
            continue
        if db is not None and event.get("db_service") != db:
            continue
        if since is not None or until is not None:
            when = _event_time(event)
            if when is None:
                continue
            if since is not None and when < since:
                continue
            if until is not None and when > until:
                continue
        try:
            found.append(parse_event(event))
        except pydantic.ValidationError:
            log.warning("%s:%d holds an event this version cannot read; skipped", path, number)
            continue
        if limit is not None and len(found) >= limit:
            break
    return found


# --- the API endpoint ----------------------------------------------------------------------


def audit_events_handler(
    store: AuditStore, authenticate: Callable[[Request], str]
) -> Handler:
    """The handler of `POST /v1/audit/events` (AuditBatch -> AuditAck).

    `authenticate(request)` returns the calling host's id (proven by its certificate) or
    raises `ApiError` (401/403). The body is validated from its raw bytes in one
    pydantic-core call and stored (`AuditStore.append_body`, in a worker thread: it waits
    for the fsync) before the answer is sent; a store that cannot write answers 503, so that
    the sender keeps its events and retries.
    """

    async def handle(request: Request) -> Response:
        sender = authenticate(request)
        try:
            ack = await in_process_post(store, sender)(request.body)
        except AuditStoreError as exc:
            log.error("audit batch from %s not stored: %s", sender, exc)
            raise ApiError(
                503, "audit_store_unavailable",
                "the control plane cannot write its audit log now; keep the events and "
                "send them again later",
            ) from None
        return json_response(ack)

    return handle


def in_process_post(
    store: AuditStore, sender: str
) -> Callable[[bytes], Awaitable[AuditAck]]:
    """Store one batch body from `sender`: what `POST /v1/audit/events` does once the caller
    is authenticated, and all of it for a db agent in the control plane's own process
    (`teleport start --roles=auth,db`), which has no TLS leg to cross. A refused body raises
    ApiError 400 (the shipper keeps its events aside), a store that cannot write raises
    AuditStoreError (the endpoint answers 503; the shipper spools and retries)."""

    async def post(body: bytes) -> AuditAck:
        try:
            accepted, duplicates = await asyncio.to_thread(store.append_body, body, sender)
        except pydantic.ValidationError as exc:
            raise _refusal(exc) from None
        except ValueError as exc:
            raise ApiError(400, "invalid_event", str(exc)) from None
        return AuditAck(accepted=accepted, duplicates=duplicates)

    return post


def in_process_store(
    store: AuditStore, sender: str
) -> Callable[[list[tuple[str, bytes]]], Awaitable[AuditAck]]:
    """Store events a db agent of the control plane's own process built: (event id, the
    JSON `encode_event` gave for the validated model) pairs, not parsed again (they never
    crossed a trust boundary). A store that cannot write raises AuditStoreError."""

    async def post(entries: list[tuple[str, bytes]]) -> AuditAck:
        accepted, duplicates = await store.append_encoded_async(entries, sender)
        return AuditAck(accepted=accepted, duplicates=duplicates)

    return post


def _refusal(exc: pydantic.ValidationError) -> ApiError:
    """The 400 for a body that is not a valid `AuditBatch`, saying what is wrong and where
    (never the values sent: they may hold secrets)."""
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        detail = str(errors[0].get("ctx", {}).get("error", errors[0]["msg"]))
        if "surrogate" in detail:
            return ApiError(
                400, "invalid_event",
                f"the batch holds text that is not valid Unicode (a lone surrogate, {detail}); "
                "the sender must replace it before sending",
            )
        return ApiError(400, "malformed_json", f"the request body is not valid JSON: {detail}; "
                        "send an AuditBatch as UTF-8 JSON")
    return ApiError(400, "invalid_request", f"invalid request: {describe_validation_error(exc)}")

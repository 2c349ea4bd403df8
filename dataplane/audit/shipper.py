"""`AuditShipper`: the agent's `AuditSink`. Events go to the control plane in batches, and
to a disk spool while it cannot take them; nothing is dropped to keep the data path moving.

    shipper = AuditShipper(SendJson(post), data_dir / "audit-spool")
    await shipper.start()        # a spool left by an earlier run is sent first
    shipper.emit(event)          # from the data path: queue and return (a model, or an
                                 # EncodedEvent the session's EventWriter wrote)
    if not shipper.can_accept_sessions(): refuse, saying shipper.refusal_reason()
    await shipper.close()        # shutdown: what is in memory is delivered or spooled

`send` posts one batch to the control plane (`POST /v1/audit/events`; the host's API client
supplies it): `SendJson(post)`, where `post(body: bytes) -> AuditAck` posts `body` as it is.
Each event is serialized once: by the session's `EventWriter` on the data path, or by
`schemas.audit.encode_event` (pydantic-core) when a model is taken from memory; those bytes
are the spool's lines and, joined, the request body (`schemas.audit.encode_batch`). Spooled
lines are sent again without being parsed: the control plane validates every batch, and a
line it refuses is kept in `rejected.jsonl`.

Any exception means "not taken now, try again later", except a refusal of the batch itself
(`BatchRejected`, or an exception whose `status` is 400, 413 or 422): the batch is then
split to find the events refused, which go to `rejected.jsonl` in the spool with an error
log, and the rest is sent.

Order and delivery: events leave in the order they were emitted. A batch goes out when it
holds `batch_events` events or `batch_bytes` bytes of JSON, or when its oldest event has
waited `interval` seconds. When a send fails the shipper backs off (`retry_min` doubling to
`retry_max`), and meanwhile, and for as long as older events wait on disk, batches are
appended to the spool (fsynced) rather than sent; the spool is sent oldest first, and a
segment is deleted once all of it was acknowledged. Delivery is at least once: a batch
whose acknowledgement was lost is sent again, and the control plane drops the duplicates
by event id.

Killed outright: every event is also written to a journal as it is emitted (one write, no
fsync: `dataplane.audit.journal`), before the relay passes on the answer it records; what a
killed agent held in memory is moved from there to the spool at its next start.

Bounds: the spool holds at most `spool_max_bytes`. When it is full while the control plane
is unreachable, events wait in memory and `can_accept_sessions()` is False (the agent
refuses new sessions: no unaudited access) until delivery frees a tenth of the spool; while
a full spool drains to a control plane that is back, newer events simply wait in memory.
Memory holds at most `max_memory_events` before new sessions are refused too, and twice
that before events are dropped (counted in `stats.lost`, logged as errors; those were never
journaled). What the spool protects against is an unreachable control plane, the journal a
killed process; a crash of the machine itself can lose what the journal held only in the
page cache (about `interval` seconds' worth).

Size: an event whose JSON is over `max_event_bytes` (a Bind of many large parameters, a
query string of thousands of statements, a huge error message) is cut to fit by
`schemas.audit.fit_event`, its `shortened` field saying what was left out, rather than sent
to be refused by the control plane's body limit.

`emit` never raises and never waits for the network: its one system call is the journal's
write (to the page cache). Call it on the event loop's thread, or from another
thread (it then wakes the sender thread-safely). Never logs event contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dataplane.audit.journal import Journal
from dataplane.audit.spool import SEGMENT_BYTES, Segment, Spool
from schemas.api import AuditAck
from schemas.audit import (
    MAX_EVENT_BYTES,
    AuditEvent,
    EncodedEvent,
    encode_batch,
    encode_event,
    fit_event,
    parse_event,
)

log = logging.getLogger("teleport.audit.shipper")

Queued = AuditEvent | EncodedEvent  # what `emit` takes


@dataclass(frozen=True)
class SendJson:
    """`send` in its cheaper form: `post(body)` posts `body`, the JSON of an `AuditBatch`
    joined from the events' lines (each serialized once), and returns the `AuditAck`.

    `post_own(entries)`, when given, takes the batches of events this process built itself
    (typed models, serialized by `encode_event`) as (event id, JSON) pairs: in the control
    plane's own process they are stored without being parsed and validated again. Lines
    read back from the spool always go through `post`."""

    post: Callable[[bytes], Awaitable[AuditAck]]
    post_own: Callable[[list[tuple[str, bytes]]], Awaitable[AuditAck]] | None = None

#: Statuses that mean "this batch will never be taken as it is" (not "try later").
REJECT_STATUSES = frozenset({400, 413, 422})


class BatchRejected(Exception):
    """Raise from `send` when the control plane refused the batch itself (bad request, too
    large): sending it again unchanged will never work."""


class AuditSpoolError(Exception):
    """The spool directory cannot be used; the message says which and why."""


@dataclass
class ShipperStats:
    emitted: int = 0
    delivered: int = 0  # acknowledged as new by the control plane
    duplicates: int = 0  # acknowledged as already stored
    spooled: int = 0  # written to the spool (an event may be counted again after a restart)
    rejected: int = 0  # refused by the control plane, kept in rejected.jsonl
    lost: int = 0  # dropped: memory over its hard bound, or rejected.jsonl full
    send_failures: int = 0


@dataclass
class _Batch:
    # Each event's JSON: as serialized for those taken from memory, a spool line (with its
    # newline) for those read back from the spool. Sent as they are.
    items: list[bytes]
    # The events taken from memory (given back to it if they cannot be placed); None for
    # lines read back from the spool.
    events: list[EncodedEvent] | None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lines(self) -> list[bytes]:
        """The items as spool lines (each ending in a newline)."""
        if self.events is None:
            return self.items
        return [item + b"\n" for item in self.items]

    @property
    def nbytes(self) -> int:
        """Their size as spool lines."""
        size = sum(map(len, self.items))
        return size if self.events is None else size + len(self.items)

    def part(self, start: int, end: int | None = None) -> _Batch:
        events = self.events[start:end] if self.events is not None else None
        return _Batch(self.items[start:end], events)


class AuditShipper:
    """An `AuditSink` that delivers to the control plane through `send`, spooling to disk."""

    def __init__(
        self,
        send: SendJson,
        spool_dir: Path,
        *,
        batch_events: int = 500,
        batch_bytes: int = 192 * 1024,
        interval: float = 0.2,
        spool_max_bytes: int = 256 * 1024 * 1024,
        segment_bytes: int = SEGMENT_BYTES,
        max_memory_events: int = 50_000,
        retry_min: float = 0.2,
        retry_max: float = 10.0,
        send_timeout: float = 30.0,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        if batch_events < 1 or batch_bytes < 1 or spool_max_bytes < 1:
            raise ValueError("batch_events, batch_bytes and spool_max_bytes must be positive")
        if not isinstance(send, SendJson):
            raise TypeError(f"send must be a SendJson, not {type(send).__name__}")
        self._send = send
        self.spool_dir = Path(spool_dir)
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.interval = interval
        self.max_memory_events = max_memory_events
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.send_timeout = send_timeout
        self.max_event_bytes = max_event_bytes
        self.stats = ShipperStats()
        self._spool = Spool(self.spool_dir, spool_max_bytes, segment_bytes)
        self._queue: deque[EncodedEvent] = deque()
        self._queued = 0  # events ever put in memory: with `pending`, how many are done
        self._journal: Journal | None = None
        self._journal_base = 0  # `_queued` when the journal was opened
        self._keep_journal = False  # events were lost from memory: the journal has them
        self._lock = threading.Lock()  # memory and journal, in the same order
        self._first_at = 0.0  # when the oldest event in memory was queued (monotonic)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._stepped: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._reading: Segment | None = None  # the spool segment being sent
        self._in_flight = 0  # events taken from memory and not yet delivered or spooled
        self._flushing = 0
        self._stopping = False
        self._closed = False
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self._failing_since: datetime | None = None
        self._spool_full = False
        self._memory_full = False
        self._last_lost_log = 0.0

    # -- the data path's side ---------------------------------------------------------------

    def emit(self, event: Queued) -> None:
        """Queue `event` for delivery (and write it to the journal) and return at once;
        never raises."""
        try:
            queue = self._queue
            if self._closed or len(queue) >= 2 * self.max_memory_events:
                self._lose(1, "the shipper is closed" if self._closed else
                           f"{len(queue)} events already wait in memory")
                return
            if type(event) is not EncodedEvent or len(event.json) >= self.max_event_bytes:
                encoded = self._encoded(event)
                if encoded is None:
                    return
                event = encoded
            with self._lock:
                queue.append(event)
                self._queued += 1
                if self._journal is not None:
                    self._journal.append(event.json)
            self.stats.emitted += 1
            n = len(queue)
            if n == 1:
                self._first_at = time.monotonic()
                self._poke()
            elif n == self.batch_events:
                self._poke()
            elif n >= self.max_memory_events and not self._memory_full:
                self._memory_full = True
                log.error(
                    "audit: %d events wait in memory (the control plane is slow or away and "
                    "the spool cannot take them); new database sessions are refused until "
                    "they are delivered", n,
                )
        except Exception:
            log.exception("audit: an event could not be queued")

    def _encoded(self, event: Queued) -> EncodedEvent | None:
        """`event` serialized once, as it will be sent: a model through `encode_event` (text
        that is not valid Unicode replaced), cut by `fit_event` when its JSON is over
        `max_event_bytes`. None (counted as lost) for what is not an event at all."""
        if type(event) is EncodedEvent:
            model: AuditEvent = event.model()
            item = event.json
        else:
            model = event  # type: ignore[assignment]
            try:
                item = encode_event(model)
            except Exception as exc:
                try:
                    model, item = _cleaned(model, exc)
                except Exception as error:  # not an event at all: a defect in the emitter
                    self._lose(1, f"an emitted object could not be encoded ({error!r})")
                    return None
        if len(item) >= self.max_event_bytes:
            model, item = fit_event(model, item, self.max_event_bytes)
            log.warning("audit: event %s (%s) was cut to fit %d bytes: %s", model.id,
                        model.type, self.max_event_bytes, model.shortened)
        return EncodedEvent(model.id, model.type, item)

    def can_accept_sessions(self) -> bool:
        """False while events could not be kept (spool full, memory at its bound): the
        agent must then refuse new sessions rather than serve them unaudited."""
        return not (self._spool_full or self._memory_full)

    def refusal_reason(self) -> str | None:
        """Why new sessions are refused now, for the client and the agent's log."""
        if self._spool_full:
            return (
                "the audit log cannot be written: the control plane has not taken audit "
                f"events since {_when(self._failing_since)} and the agent's audit spool is "
                "full; try again later"
            )
        if self._memory_full:
            return (
                "the audit log cannot keep up: too many audit events wait to be delivered; "
                "try again later"
            )
        return None

    @property
    def pending(self) -> int:
        """Events in memory, not yet delivered or spooled."""
        return len(self._queue) + self._in_flight

    @property
    def spooled_bytes(self) -> int:
        return self._spool.bytes

    def _poke(self) -> None:
        if self._wake is None or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to wake
                self._loop.call_soon_threadsafe(self._wake.set)

    def _lose(self, n: int, why: str) -> None:
        self.stats.lost += n
        now = time.monotonic()
        if now - self._last_lost_log >= 10.0:
            self._last_lost_log = now
            log.error("audit: %d event(s) dropped so far: %s", self.stats.lost, why)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (an earlier run's events are sent first) and start sending."""
        if self._task is not None:
            return
        try:
            await asyncio.to_thread(self._spool.open)
        except OSError as exc:
            raise AuditSpoolError(
                f"cannot use the audit spool directory {self.spool_dir}: "
                f"{exc.strerror or exc}; the agent needs it writable to never lose events"
            ) from None
        journal = Journal(self.spool_dir / "journal")
        try:
            recovered = await asyncio.to_thread(journal.take_leftovers, self._spool.append)
        except OSError as exc:
            raise AuditSpoolError(
                f"cannot move the audit journal {journal.directory} of an earlier run to the "
                f"spool: {exc.strerror or exc}; the agent needs it to never lose events"
            ) from None
        if recovered:
            log.warning(
                "audit: %d event(s) in the journal of a run that did not stop cleanly; moved "
                "to the spool (the control plane drops those it already has)", recovered,
            )
        backlog = self._spool.bytes
        if backlog:
            log.info(
                "audit: %d byte(s) of events in %s from an earlier run; sending them first",
                backlog, self.spool_dir,
            )
        with self._lock:
            self._journal = journal
            self._journal_base = self._queued
        if not self._spool.fits(0):
            self._set_spool_full()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._stepped = asyncio.Event()
        if self._queue:
            self._wake.set()
        self._task = asyncio.create_task(self._run(), name="audit shipper")

    async def flush(self, timeout: float = 10.0) -> bool:
        """Deliver or spool every event now in memory; True when none is left there."""
        if self._task is None or self._stepped is None:
            return not self._queue
        self._flushing += 1
        try:
            async with asyncio.timeout(timeout):
                while (self._queue or self._in_flight) and not self._task.done():
                    self._stepped.clear()
                    self._poke()
                    await self._stepped.wait()
        except TimeoutError:
            pass
        finally:
            self._flushing -= 1
        left = self.pending
        if left:
            log.error(
                "audit: %d event(s) are still in memory after %gs: the control plane does "
                "not take them and the spool %s cannot", left, timeout, self.spool_dir,
            )
        return left == 0

    async def close(self, timeout: float = 10.0) -> bool:
        """Flush, then stop; True when no event was left in memory."""
        if self._task is None:
            self._closed = True
            return not self._queue
        ok = await self.flush(timeout)
        self._stopping = True
        self._closed = True
        self._poke()
        task = self._task
        try:
            await asyncio.wait_for(asyncio.shield(task), self.send_timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self._spool.close)
        with self._lock:
            if self._queue or self._in_flight:
                # Still in the journal: the next start sends them.
                self._keep_journal = True
            elif self._journal is not None:
                self._journal.release(self._queued - self._journal_base)
            if self._journal is not None:
                self._journal.close()
        if self._queue:
            self._lose(len(self._queue), "the shipper closed with events still in memory; "
                       f"they stay in {self.spool_dir / 'journal'} for the next start")
            self._queue.clear()
            ok = False
        return ok

    # -- the sender ---------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None and self._stepped is not None
        while True:
            self._wake.clear()
            try:
                if not await self._step():
                    return
            except asyncio.CancelledError:
                raise
            except Exception:
                # A defect here must not stop delivery for good: say so, pause, go on.
                log.exception("audit: the shipper failed; retrying")
                await asyncio.sleep(self.retry_min)
            finally:
                self._release_journal()
                if self._memory_full and len(self._queue) < self.max_memory_events * 0.9:
                    self._memory_full = False
                    log.warning("audit: events in memory are back under their bound; new "
                                "sessions are accepted")
                self._stepped.set()

    def _release_journal(self) -> None:
        """Let the journal delete what is delivered or spooled (memory is first in, first
        out: all but the `pending` last events queued are)."""
        with self._lock:
            journal = self._journal
            if journal is None or self._keep_journal:
                return
            journal.release(self._queued - self.pending - self._journal_base)

    async def _step(self) -> bool:
        """One unit of work (or one wait); False when the shipper is done."""
        now = time.monotonic()
        backing_off = now < self._retry_at
        backlog = self._reading is not None or not self._spool.empty
        # Older events are on disk, or sending fails: keep the order, spool these.
        spool_now = bool(self._queue) and (backlog or backing_off) and self._batch_ready(now)
        if spool_now and await self._spool_batch(self._take_batch()):
            return True
        if backlog and not backing_off and not self._stopping:
            await self._send_from_spool()
            return True
        if self._queue and not backlog and not backing_off and self._batch_ready(now):
            await self._send_from_memory(self._take_batch())
            return True
        if self._stopping:
            return False  # what could not be placed stays in memory: close() counts it
        await self._wait(now, backing_off)
        return True

    def _batch_ready(self, now: float) -> bool:
        return (
            len(self._queue) >= self.batch_events
            or self._flushing > 0
            or self._stopping
            or now - self._first_at >= self.interval
        )

    async def _wait(self, now: float, backing_off: bool) -> None:
        assert self._wake is not None
        timeouts = []
        if backing_off:
            timeouts.append(self._retry_at - now)
        if self._queue and not self._spool_full:
            timeouts.append(max(0.0, self._first_at + self.interval - now))
        elif self._queue:
            timeouts.append(self.retry_min)  # nowhere to put them now: look again later
        timeout = min(timeouts) if timeouts else None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    def _take_batch(self) -> _Batch:
        """Up to `batch_events` events and `batch_bytes` bytes from memory (at least one)."""
        events: list[EncodedEvent] = []
        items: list[bytes] = []
        size = 0  # as spool lines: with a newline each
        queue = self._queue
        limit = self.batch_events
        while queue and len(items) < limit:
            event = queue[0]
            item = event.json
            if items and size + len(item) >= self.batch_bytes:
                break
            queue.popleft()
            events.append(event)
            items.append(item)
            size += len(item) + 1
        # What is left (if any) keeps `_first_at`: it is older than `interval` too, or this
        # batch was full; either way it may go at once.
        self._in_flight += len(items)
        return _Batch(items, events)

    def _give_back(self, batch: _Batch) -> None:
        """Put events taken from memory back at its front, in order."""
        assert batch.events is not None
        self._queue.extendleft(reversed(batch.events))

    async def _send_from_memory(self, batch: _Batch) -> None:
        try:
            done = await self._deliver(batch)
        except asyncio.CancelledError:
            # Closing while this batch was on its way: keep it on disk if at all possible.
            try:
                if self._spool.fits(batch.nbytes):
                    self._spool.append(batch.lines)
                    self.stats.spooled += len(batch)
                else:
                    self._lose(len(batch), "closing while the spool was full")
            except OSError as exc:
                self._lose(len(batch), f"closing, and the spool failed: {exc}")
            self._in_flight -= len(batch)
            raise
        rest = batch.part(done)
        self._in_flight -= done
        if rest.items:
            await self._spool_batch(rest)

    async def _spool_batch(self, batch: _Batch) -> bool:
        """Append `batch` (taken from memory) to the spool; if it cannot, give it back to
        memory. True when it was spooled."""
        try:
            if not self._spool.fits(batch.nbytes):
                if self._failing_since is not None:
                    self._set_spool_full()
                # else: the control plane takes events and the spool drains; these wait
                # in memory meanwhile (bounded by max_memory_events).
                raise _NoRoom
            await asyncio.to_thread(self._spool.append, batch.lines)
        except (_NoRoom, OSError) as exc:
            if isinstance(exc, OSError):
                log.error("audit: cannot write the spool %s: %s", self.spool_dir, exc)
                self._set_spool_full()
            self._in_flight -= len(batch)
            self._give_back(batch)
            return False
        self.stats.spooled += len(batch)
        self._in_flight -= len(batch)
        return True

    async def _send_from_spool(self) -> None:
        if self._reading is None:
            # Its lines are sent as they are: the control plane validates them.
            self._reading = await asyncio.to_thread(self._spool.oldest)
            if self._reading is None:
                return
        segment = self._reading
        lines = segment.lines
        start = segment.position
        end = start
        size = 0
        while end < len(lines) and end - start < self.batch_events:
            if end > start and size + len(lines[end]) > self.batch_bytes:
                break
            size += len(lines[end])
            end += 1
        batch = _Batch(lines[start:end], None)
        if batch.items:
            segment.position += await self._deliver(batch)
        if segment.position >= len(lines):
            await asyncio.to_thread(self._spool.done, segment)
            self._reading = None
            if self._spool_full and self._spool.bytes <= self._spool.max_bytes * 0.9:
                self._spool_full = False
                log.warning(
                    "audit: the spool %s has room again (%d bytes); new sessions are "
                    "accepted", self.spool_dir, self._spool.bytes,
                )

    # -- sending --------------------------------------------------------------------------------

    async def _deliver(self, batch: _Batch) -> int:
        """Send `batch`; how many of its leading events are done with (acknowledged, or
        refused and kept in rejected.jsonl). 0 when the control plane is not taking events."""
        if not batch.items:
            return 0
        try:
            async with asyncio.timeout(self.send_timeout):
                own = self._send.post_own
                if own is not None and batch.events is not None:
                    ids = [event.id for event in batch.events]
                    ack = await own(list(zip(ids, batch.items, strict=True)))
                else:
                    ack = await self._send.post(encode_batch(batch.items))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, BatchRejected) or getattr(exc, "status", None) in REJECT_STATUSES:
                return await self._split_rejected(batch, exc)
            self._failed(exc)
            return 0
        self._succeeded(ack, len(batch))
        return len(batch)

    async def _split_rejected(self, batch: _Batch, exc: Exception) -> int:
        if len(batch) == 1:
            log.error(
                "audit: the control plane refused event %s: %s; kept in %s",
                _describe(batch), exc, self.spool_dir / "rejected.jsonl",
            )
            try:
                kept = await asyncio.to_thread(self._spool.reject, batch.lines[0])
            except OSError as error:
                log.error("audit: cannot write %s: %s", self.spool_dir / "rejected.jsonl", error)
                kept = False
            if kept:
                self.stats.rejected += 1
            else:
                self._lose(1, "the control plane refused it and rejected.jsonl is full")
            return 1
        middle = len(batch) // 2
        done = await self._deliver(batch.part(0, middle))
        if done < middle:
            return done
        return middle + await self._deliver(batch.part(middle))

    def _failed(self, exc: Exception) -> None:
        self.stats.send_failures += 1
        if self._failing_since is None:
            self._failing_since = datetime.now(UTC)
            log.warning(
                "audit: cannot send events to the control plane (%s); keeping them in %s "
                "and retrying", exc, self.spool_dir,
            )
        else:
            log.debug("audit: sending still fails: %s", exc)
        delay = min(self.retry_max, max(self.retry_min, self._retry_delay * 2))
        self._retry_delay = delay
        jitter = 0.8 + 0.4 * random.random()  # noqa: S311 (spreading retries, not a secret)
        self._retry_at = time.monotonic() + delay * jitter

    def _succeeded(self, ack: AuditAck, sent: int) -> None:
        self.stats.delivered += ack.accepted
        self.stats.duplicates += ack.duplicates
        if ack.accepted + ack.duplicates != sent:
            log.warning(
                "audit: the control plane acknowledged %d of %d events sent (%d new, %d "
                "duplicates)", ack.accepted + ack.duplicates, sent, ack.accepted, ack.duplicates,
            )
        if self._failing_since is not None:
            log.warning(
                "audit: the control plane takes events again (failing since %s); %d byte(s) "
                "of spooled events to send", _when(self._failing_since), self._spool.bytes,
            )
        self._failing_since = None
        self._retry_delay = 0.0
        self._retry_at = 0.0

    def _set_spool_full(self) -> None:
        if self._spool_full:
            return
        self._spool_full = True
        log.error(
            "audit: the spool %s is full (%d of %d bytes) and the control plane has not "
            "taken events since %s; %d event(s) wait in memory. New database sessions are "
            "refused until events are delivered (no unaudited access)",
            self.spool_dir, self._spool.bytes, self._spool.max_bytes,
            _when(self._failing_since), self.pending,
        )


class _NoRoom(Exception):
    pass


def _cleaned(event: AuditEvent, exc: Exception) -> tuple[AuditEvent, bytes]:
    """An event `encode_event` refused (`exc`), with text that is not valid Unicode (a lone
    surrogate) replaced so that it can be stored at all, and its line. Raises if `event` is
    not an event."""
    if not isinstance(exc, ValueError):
        raise exc
    text = json.dumps(event.model_dump(mode="json"), ensure_ascii=False)
    log.warning("audit: event %s held text that is not valid Unicode; replaced", event.id)
    cleaned = parse_event(text.encode("utf-8", "replace"))
    return cleaned, encode_event(cleaned)


def _describe(batch: _Batch) -> str:
    """`<id> (<type>)` of a one-event batch, for the log (never its contents)."""
    if batch.events:
        return f"{batch.events[0].id} ({batch.events[0].type})"
    try:
        data = json.loads(batch.items[0])
        return f"{data.get('id')} ({data.get('type')})"
    except (ValueError, AttributeError, RecursionError):
        return "(a spooled line that is not JSON)"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "(unknown)"

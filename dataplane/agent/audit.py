"""The audit of one session: scanned messages in, typed `schemas.audit` events out.

The relay feeds `SessionRecorder` the messages its `MessageScanner`s found beside the copy:
from the client Query, Parse, Bind, Execute, Close, FunctionCall (payloads), Sync and
Terminate (reported); from the server CommandComplete, ErrorResponse, FunctionCallResponse,
ReadyForQuery (payloads) and ParseComplete, BindComplete, CloseComplete,
EmptyQueryResponse, PortalSuspended (reported). Requests wait in a queue in the order the
client sent them; the server answers in that same order, which is how each request gets
its outcome. After an error the server skips the rest of an extended-protocol batch up to
Sync: those requests are recorded as not executed. Events are emitted at the
ReadyForQuery that closes their batch (or at the end of the session), with the time the
request was seen.

COPY data and result rows never reach this module (the scanners skip them by arithmetic).
Bind parameters are recorded: text as text, binary as base64, cut at `MAX_TEXT`.

`MemoryAuditSink` keeps events in a list: for tests and for callers that read them back.

Never: block (the sink must queue), raise into the relay (a malformed payload becomes a
best-effort record, never an exception), or keep unbounded state (statements, portals
and the request queue are capped).
"""

from __future__ import annotations

import base64
import logging
import re
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from dataplane.agent.interfaces import AuditSink
from dataplane.postgres import ScannedMessage
from schemas.audit import (
    MAX_TEXT,
    AuditEvent,
    BindEvent,
    CloseEvent,
    EncodedEvent,
    EventWriter,
    ExecuteEvent,
    FunctionCallEvent,
    Outcome,
    ParseEvent,
    QueryEvent,
    SessionEndEvent,
    SessionStartEvent,
    datetime_of,
    new_event_id,
)

logger = logging.getLogger(__name__)

CLIENT_CAPTURE = b"QPBECF"
CLIENT_REPORT = b"SXD"
SERVER_CAPTURE = b"CEVZ"
SERVER_REPORT = b"123Is"

MAX_NAMES = 10_000  # prepared statements and portals remembered per session
MAX_PENDING = 10_000  # requests waiting for their answers
_ROW_TAGS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "FETCH", "MOVE", "COPY"})
_NOT_EXECUTED = Outcome(
    status="error", message="not executed: an earlier message of the same batch failed"
)
# Statements about databases and roles as a whole (`on_cluster_command`).
_CLUSTER_COMMAND = re.compile(
    r"\b(?:(?:create|alter|drop)\s+database|(?:alter|drop)\s+(?:role|user)|revoke\s+connect)\b",
    re.IGNORECASE | re.ASCII,
)
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")


class MemoryAuditSink:
    """Audit events kept in memory, in order."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent | EncodedEvent) -> None:
        # An encoded event is parsed back: what a reader of the log would get from it.
        self.events.append(event.model() if isinstance(event, EncodedEvent) else event)

    def of_type(self, event_type: str, session_id: str | None = None) -> list[AuditEvent]:
        return [
            e
            for e in self.events
            if e.type == event_type and (session_id is None or e.session_id == session_id)
        ]

    def clear(self) -> None:
        self.events.clear()


# -- tolerant payload reading --------------------------------------------------------------


class _Cursor:
    """Reads fields from a payload that may be cut short (a truncated capture)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def cstr(self) -> tuple[str, bool]:
        """(text, complete): text up to the NUL, or to the end of what we have."""
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            text = self.data[self.pos :]
            self.pos = len(self.data)
            return text.decode("utf-8", "replace"), False
        text = self.data[self.pos : end]
        self.pos = end + 1
        return text.decode("utf-8", "replace"), True

    def i16(self) -> int | None:
        if self.pos + 2 > len(self.data):
            return None
        (value,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(value)

    def i32(self) -> int | None:
        if self.pos + 4 > len(self.data):
            return None
        (value,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def u32(self) -> int | None:
        if self.pos + 4 > len(self.data):
            return None
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def take(self, size: int) -> tuple[bytes, bool]:
        piece = self.data[self.pos : self.pos + size]
        self.pos += len(piece)
        return piece, len(piece) == size


def _render(value: bytes, binary: bool, complete: bool = True) -> str:
    if binary:
        text = base64.b64encode(value[: MAX_TEXT * 3 // 4]).decode("ascii")
        cut = len(value) > MAX_TEXT * 3 // 4
    else:
        text = value[:MAX_TEXT].decode("utf-8", "replace")
        cut = len(value) > MAX_TEXT
    if cut or not complete:
        text += "…(truncated)"
    return text


def _formats(cursor: _Cursor) -> list[int]:
    count = cursor.i16()
    if count is None or count < 0:
        return []
    out = []
    for _ in range(count):
        value = cursor.i16()
        if value is None:
            break
        out.append(value)
    return out


def _values(cursor: _Cursor, formats: list[int]) -> list[str | None]:
    count = cursor.i16()
    if count is None or count < 0:
        return []
    out: list[str | None] = []
    for index in range(count):
        size = cursor.i32()
        if size is None:
            out.append("…(truncated)")
            break
        if size < 0:
            out.append(None)
            continue
        fmt = formats[0] if len(formats) == 1 else (formats[index] if index < len(formats) else 0)
        raw, complete = cursor.take(size)
        out.append(_render(raw, fmt == 1, complete))
        if not complete:
            break
    return out


def _tag_outcome(tag: str) -> Outcome:
    words = tag.split()
    rows = None
    if words and words[0] in _ROW_TAGS and words[-1].isdigit():
        rows = int(words[-1])
    return Outcome(status="ok", command_tag=tag, rows=rows)


def _error_outcome(payload: bytes) -> Outcome:
    fields: dict[str, str] = {}
    for part in payload.split(b"\0"):
        if part:
            fields.setdefault(chr(part[0]), part[1:].decode("utf-8", "replace"))
    return Outcome(status="error", sqlstate=fields.get("C"), message=fields.get("M"))


class _Request:
    """A client request waiting for the server's answer."""

    __slots__ = ("emitted", "fields", "kind", "outcome", "outcomes", "time")

    def __init__(self, kind: str, fields: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.fields = fields
        self.time = time.time_ns()
        self.outcome: Outcome | None = None
        self.outcomes: list[Outcome] | None = [] if kind == "query" else None
        self.emitted = False


_ANSWERED_BY = {
    ord("1"): "parse",
    ord("2"): "bind",
    ord("3"): "close",
    ord("V"): "function",
}
_EVENT_CLASS = {
    "query": QueryEvent,
    "parse": ParseEvent,
    "bind": BindEvent,
    "execute": ExecuteEvent,
    "close": CloseEvent,
    "function": FunctionCallEvent,
}


class SessionRecorder:
    """Turns one session's scanned messages into audit events for `sink`."""

    def __init__(self, sink: AuditSink, context: dict[str, Any]) -> None:
        self.sink = sink
        self.context = context  # the SessionContext fields shared by every event
        self._pending: deque[_Request] = deque()
        self._statements: OrderedDict[str, str] = OrderedDict()
        self._portals: OrderedDict[str, tuple[str, list[str | None]]] = OrderedDict()
        self.started = datetime.now(UTC)
        self._writer = EventWriter(context)
        self._outcomes: dict[bytes | None, Outcome] = {}  # CommandComplete payloads, parsed once
        self.fatal_from_server: str | None = None
        self.client_terminated = False  # the client said goodbye (Terminate)
        self.status = b"I"  # the last ReadyForQuery's transaction status
        self._unsynced = False  # a Describe since the last Sync (it may open a transaction)
        self._overflowed = False  # requests were dropped from _pending: no longer counted
        # Called when the client sends (simple or extended protocol) CREATE, ALTER or DROP
        # DATABASE, ALTER or DROP ROLE or USER, or REVOKE CONNECT: the agent then closes
        # the idle server connections it keeps. The server waits a few seconds for every
        # other connection to a database it drops, renames or copies, then fails the
        # statement; and a kept connection must not outlive a login taken away, nor keep
        # the settings of the role or database from before (server reuse).
        self.on_cluster_command: Callable[[], object] | None = None

    @property
    def at_rest(self) -> bool:
        """Whether the server has answered every request, outside a transaction, with no
        extended-protocol message waiting for its Sync: its session holds no work."""
        return (
            not self._pending
            and self.status == b"I"
            and not self._unsynced
            and not self._overflowed
            and self.fatal_from_server is None
        )

    @property
    def in_flight(self) -> bool:
        """Whether a request is still waiting for the server (a query may be running)."""
        return bool(self._pending)

    # -- session start and end -----------------------------------------------------------------

    def _base(self) -> dict[str, Any]:
        return {"id": new_event_id(), "time": datetime.now(UTC)}

    def _emit(self, event: AuditEvent | EncodedEvent) -> None:
        try:
            self.sink.emit(event)
        except Exception:
            logger.exception("the audit sink refused an event")

    def session_start(self, success: bool, reason: str | None = None) -> None:
        self._emit(
            SessionStartEvent(**self.context, **self._base(), success=success, reason=reason)
        )

    def session_end(self, bytes_from_client: int, bytes_from_server: int, reason: str) -> None:
        self.flush()
        duration = datetime.now(UTC) - self.started
        self._emit(
            SessionEndEvent(
                **self.context,
                **self._base(),
                duration_ms=int(duration.total_seconds() * 1000),
                bytes_from_client=bytes_from_client,
                bytes_from_server=bytes_from_server,
                reason=reason,
            )
        )

    def flush(self) -> None:
        """Emit whatever is still waiting (the session ended before its answers)."""
        while self._pending:
            self._finish(self._pending.popleft())

    # -- the client's requests -------------------------------------------------------------------

    def client_messages(self, messages: list[ScannedMessage]) -> None:
        for message in messages:
            try:
                self._client_message(message)
            except Exception:  # a malformed payload must never break the relay
                logger.exception("could not record a %r message", message.type_code)

    def _remember(self, table: OrderedDict[str, Any], name: str, value: Any) -> None:
        table[name] = value
        table.move_to_end(name)
        if len(table) > MAX_NAMES:
            table.popitem(last=False)

    def _queue(self, request: _Request) -> None:
        self._pending.append(request)
        if len(self._pending) > MAX_PENDING:
            self._overflowed = True
            self._finish(self._pending.popleft())

    def _client_message(self, message: ScannedMessage) -> None:
        code, payload, size = message
        if code == b"Q":  # the most frequent by far: first, and without a cursor
            payload = payload or b""
            end = payload.find(b"\0")
            complete = end >= 0
            text = (payload[:end] if complete else payload).decode("utf-8", "replace")
            self._check_cluster_command(text)
            self._queue(_Request("query", {
                "query": text, "truncated": not complete or len(payload) < size,
            }))
            return
        if code == b"S":
            self._unsynced = False
            self._queue(_Request("sync"))
            return
        if code == b"X":
            self.client_terminated = True
            return
        if code == b"D":
            self._unsynced = True
            return
        payload = payload or b""
        cursor = _Cursor(payload)
        if code == b"P":
            name, _ = cursor.cstr()
            query, complete = cursor.cstr()
            self._check_cluster_command(query)
            self._remember(self._statements, name, query)
            self._queue(
                _Request(
                    "parse",
                    {
                        "statement_name": name,
                        "query": query,
                        "truncated": message.truncated or not complete,
                    },
                )
            )
        elif code == b"B":
            portal, _ = cursor.cstr()
            statement, _ = cursor.cstr()
            formats = _formats(cursor)
            params = _values(cursor, formats)
            self._remember(self._portals, portal, (statement, params))
            param_count = len(params)
            kinds: list[str] = [
                "binary"
                if (formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0))
                == 1
                else "text"
                for i in range(param_count)
            ]
            self._queue(
                _Request(
                    "bind",
                    {
                        "statement_name": statement,
                        "portal_name": portal,
                        "parameters": params,
                        "parameter_formats": kinds,
                    },
                )
            )
        elif code == b"E":
            portal, _ = cursor.cstr()
            statement, params = self._portals.get(portal, (None, []))
            query = self._statements.get(statement) if statement is not None else None
            self._queue(
                _Request(
                    "execute",
                    {
                        "portal_name": portal,
                        "statement_name": statement,
                        "query": query,
                        "parameters": list(params),
                    },
                )
            )
        elif code == b"C":
            kind = cursor.data[:1]
            cursor.pos = 1
            name, _ = cursor.cstr()
            if kind == b"S":
                self._statements.pop(name, None)
                target = "statement"
            else:
                self._portals.pop(name, None)
                target = "portal"
            self._queue(_Request("close", {"target": target, "name": name}))
        elif code == b"F":
            oid = cursor.u32() or 0
            formats = _formats(cursor)
            args = _values(cursor, formats)
            self._queue(_Request("function", {"function_oid": oid, "arguments": args}))

    def _check_cluster_command(self, text: str) -> None:
        callback = self.on_cluster_command
        if callback is None:
            return
        lowered = text.lower()  # a cheap test first: most statements are none of these
        if (
            "database" in lowered or "role" in lowered or "user" in lowered
            or "connect" in lowered
        ) and _CLUSTER_COMMAND.search(text):
            callback()

    # -- the server's answers ----------------------------------------------------------------------

    def server_messages(self, messages: list[ScannedMessage]) -> None:
        for message in messages:
            try:
                self._server_message(message)
            except Exception:
                logger.exception("could not record a %r message", message.type_code)

    def _front(self) -> _Request | None:
        """The oldest request still waiting for its (first) answer."""
        for request in self._pending:
            if request.kind == "sync":
                continue
            if request.kind == "query":
                if request.outcome is None:
                    return request
                continue
            if request.outcome is None:
                return request
        return None

    def _server_message(self, message: ScannedMessage) -> None:
        code = message.type_code[0]
        if code == 0x5A:  # 'Z' ReadyForQuery: the batch is over
            self.status = (message.payload or b"?")[:1]
            self._ready()
            return
        pending = self._pending
        if pending and pending[0].outcome is None and pending[0].kind != "sync":
            front: _Request | None = pending[0]  # the usual case, as `_front` would find it
        else:
            front = self._front()
        if code == 0x43:  # 'C' CommandComplete
            outcome = self._outcomes.get(message.payload)
            if outcome is None:
                if len(self._outcomes) > 256:
                    self._outcomes.clear()
                tag = (message.payload or b"").split(b"\0", 1)[0].decode("utf-8", "replace")
                outcome = self._outcomes[message.payload] = _tag_outcome(tag)
            if front is None:
                return
            if front.kind == "query":
                assert front.outcomes is not None
                front.outcomes.append(outcome)
            else:
                front.outcome = outcome
        elif code == 0x45:  # 'E' ErrorResponse
            outcome = _error_outcome(message.payload or b"")
            if front is None:
                if outcome.message:
                    self.fatal_from_server = outcome.message
                return
            if front.kind == "query":
                assert front.outcomes is not None
                front.outcomes.append(outcome)
                front.outcome = outcome  # the rest of the query string does not run
                return
            front.outcome = outcome
            skipping = False
            for request in self._pending:
                if request is front:
                    skipping = True
                    continue
                if skipping:
                    if request.kind in ("sync", "query"):
                        break
                    if request.outcome is None:
                        request.outcome = _NOT_EXECUTED
        elif code == 0x49:  # 'I' EmptyQueryResponse
            if front is None:
                return
            outcome = Outcome(status="ok", command_tag="")
            if front.kind == "query":
                assert front.outcomes is not None
                front.outcomes.append(outcome)
            else:
                front.outcome = outcome
        elif code == 0x73:  # 's' PortalSuspended
            if front is not None:
                front.outcome = Outcome(status="ok", command_tag="portal suspended")
        elif front is not None and front.kind == _ANSWERED_BY.get(code):
            front.outcome = Outcome(status="ok")

    def _ready(self) -> None:
        while self._pending:
            request = self._pending.popleft()
            self._finish(request)
            if request.kind in ("sync", "query", "function"):
                return

    def _finish(self, request: _Request) -> None:
        if request.emitted or request.kind == "sync":
            return
        request.emitted = True
        fields = request.fields or {}
        event_id = new_event_id()
        # Written straight to JSON (`EventWriter`), as encode_event would write the model:
        # building and copying a model per query cost more than the rest of its audit.
        if request.kind == "query":
            outcomes = request.outcomes or []
            try:
                self._emit(self._writer.query(
                    event_id, request.time, fields["query"], fields["truncated"], outcomes
                ))
                return
            except ValueError:
                pass  # the model below says what is wrong with the text
            extra: dict[str, Any] = {
                "outcomes": outcomes, "outcome": outcomes[-1] if outcomes else None
            }
        elif request.kind != "close":
            extra = {"outcome": request.outcome}
        else:
            extra = {}
        cls = _EVENT_CLASS[request.kind]
        values = {"id": event_id, "time": datetime_of(request.time), **fields, **extra}
        try:
            event: AuditEvent | EncodedEvent = self._writer.encode(cls, values)
        except (TypeError, ValueError):
            event = cls(**self.context, **values)
        self._emit(event)


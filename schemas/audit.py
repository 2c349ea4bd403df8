"""Audit events: what happened in each database session, typed, JSON on the wire.

Agents emit them; the control plane stores them (deduplicated by `id`, hash-chained per day)
and `tctl audit search` reads them. Every event names who (user, roles), where (db service,
db name, db user, client address, agent) and when, and belongs to one session. Query events
carry their outcome: the command tag and row count, or the error's SQLSTATE and message.
COPY data is never recorded; bind parameters are, as text when they are text and as base64
otherwise, truncated past a limit.

An event is serialized once, by `encode_event` (pydantic-core, in Rust): agents spool those
bytes and join them into the body of `POST /v1/audit/events` (`encode_batch`); the control
plane validates the body in one call and stores each event's `encode_event` bytes. On the
agent's data path, where a model per query would cost more than the rest of its audit,
`EventWriter` writes the same bytes without building one (an `EncodedEvent`). Nothing here
touches a disk or a socket.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import time as _time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic_core import PydanticSerializationError

SESSION_START = "db.session.start"
SESSION_END = "db.session.end"
QUERY = "db.session.query"
PARSE = "db.session.postgres.statements.parse"
BIND = "db.session.postgres.statements.bind"
EXECUTE = "db.session.postgres.statements.execute"
CLOSE = "db.session.postgres.statements.close"
FUNCTION = "db.session.postgres.function"

# Longest query text or parameter kept in an event; longer ones are cut and marked.
MAX_TEXT = 64 * 1024
# Largest event, as encoded JSON, that an agent sends (`fit_event`): well inside a batch and
# the API's request body limit, whatever the parameters, statements or error texts held.
MAX_EVENT_BYTES = 128 * 1024
# What `fit_event` may cut: the texts and lists a client or a server chose the size of.
_CUT_TEXTS = ("query", "reason")
_CUT_LISTS = ("parameters", "arguments", "outcomes")
_CUT_MARK = "…(truncated)"
# (characters per text, items per list) of each round of `fit_event`, loosest first: lists
# before texts, so that a query is kept whole when its many outcomes were the excess. The
# last round leaves a few hundred bytes of payload, whatever the event held.
_CUT_ROUNDS = (
    (MAX_TEXT, 1024), (MAX_TEXT, 256), (16384, 256), (16384, 64), (4096, 64), (4096, 16),
    (1024, 16), (256, 4), (64, 1), (16, 0),
)


class _EventIds:
    """This process's event ids: a random prefix drawn at start (again in a forked child)
    and a counter, in the layout of a UUID whose last group is longer. Unique without a
    system call per event, and one process's ids are consecutive numbers under one prefix,
    which lets the control plane remember the ids it stored as ranges
    (`control.audit_ids.EventIdIndex`) instead of one by one."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        raw = secrets.token_hex(10)
        self.prefix = f"{raw[:8]}-{raw[8:12]}-4{raw[12:15]}-8{raw[15:18]}-{raw[18:20]}"
        self.counter = itertools.count(1)  # next() is atomic: threads may share it


_EVENT_IDS = _EventIds()
os.register_at_fork(after_in_child=_EVENT_IDS.reset)
_EVENT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-8[0-9a-f]{3}-[0-9a-f]{14}")


def new_event_id() -> str:
    """A new id for an event of this process (see `_EventIds`)."""
    return f"{_EVENT_IDS.prefix}{next(_EVENT_IDS.counter):012x}"


def split_event_id(event_id: str) -> tuple[str, int] | None:
    """(prefix, number) of an id `new_event_id` made; None for an id of any other form."""
    if len(event_id) != 38 or _EVENT_ID.fullmatch(event_id) is None:
        return None
    return event_id[:26], int(event_id[26:], 16)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Outcome(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ok", "error"]
    command_tag: str | None = None
    rows: int | None = None
    sqlstate: str | None = None
    message: str | None = None


class SessionContext(BaseModel):
    """Who and where: the same for every event of a session."""

    model_config = ConfigDict(extra="forbid")

    cluster: str
    session_id: str
    user: str
    roles: list[str] = Field(default_factory=list)
    db_service: str
    db_name: str
    db_user: str
    client_addr: str = ""
    agent: str = ""


class _Event(SessionContext):
    id: str = Field(default_factory=new_event_id)
    time: datetime = Field(default_factory=utcnow)
    shortened: str | None = Field(
        default=None,
        description="set when the event was cut to fit MAX_EVENT_BYTES: what was left out",
    )


class SessionStartEvent(_Event):
    type: Literal["db.session.start"] = SESSION_START
    success: bool
    reason: str | None = Field(default=None, description="why the session was refused")


class SessionEndEvent(_Event):
    type: Literal["db.session.end"] = SESSION_END
    duration_ms: int
    bytes_from_client: int
    bytes_from_server: int
    reason: str = Field(default="client disconnected", description="why the session ended")


class QueryEvent(_Event):
    type: Literal["db.session.query"] = QUERY
    query: str
    truncated: bool = False
    outcome: Outcome | None = None
    # A simple-protocol query string may hold several statements: one outcome each.
    outcomes: list[Outcome] = Field(default_factory=list)


class ParseEvent(_Event):
    type: Literal["db.session.postgres.statements.parse"] = PARSE
    statement_name: str
    query: str
    truncated: bool = False
    outcome: Outcome | None = None


class BindEvent(_Event):
    type: Literal["db.session.postgres.statements.bind"] = BIND
    statement_name: str
    portal_name: str
    parameters: list[str | None] = Field(default_factory=list)
    parameter_formats: list[Literal["text", "binary"]] = Field(default_factory=list)
    outcome: Outcome | None = None


class ExecuteEvent(_Event):
    type: Literal["db.session.postgres.statements.execute"] = EXECUTE
    portal_name: str
    statement_name: str | None = None
    query: str | None = None
    parameters: list[str | None] = Field(default_factory=list)
    outcome: Outcome | None = None


class CloseEvent(_Event):
    type: Literal["db.session.postgres.statements.close"] = CLOSE
    target: Literal["statement", "portal"]
    name: str


class FunctionCallEvent(_Event):
    type: Literal["db.session.postgres.function"] = FUNCTION
    function_oid: int
    arguments: list[str | None] = Field(default_factory=list)
    outcome: Outcome | None = None


AuditEvent = Annotated[
    SessionStartEvent
    | SessionEndEvent
    | QueryEvent
    | ParseEvent
    | BindEvent
    | ExecuteEvent
    | CloseEvent
    | FunctionCallEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[AuditEvent] = TypeAdapter(AuditEvent)


def parse_event(data: bytes | str | dict) -> AuditEvent:
    if isinstance(data, dict):
        return EVENT_ADAPTER.validate_python(data)
    return EVENT_ADAPTER.validate_json(data)


def encode_event(event: AuditEvent) -> bytes:
    """The event as compact UTF-8 JSON (fields in model order): the one serialization an
    event gets. Raises ValueError when its text is not valid Unicode (a lone surrogate)."""
    try:
        return event.__pydantic_serializer__.to_json(event)
    except PydanticSerializationError:
        raise ValueError(
            f"event {event.id} holds text that is not valid Unicode (a lone surrogate); the "
            "sender must replace it before sending"
        ) from None


_new_tuple = tuple.__new__  # builds a NamedTuple without its slower Python-level __new__


class EncodedEvent(NamedTuple):
    """An event already serialized by `EventWriter`: `json` is, byte for byte, what
    `encode_event` gives for the event it stands for (`model()` parses it back)."""

    id: str
    type: str
    json: bytes

    def model(self) -> AuditEvent:
        return parse_event(self.json)


class EventWriter:
    """Serializes the events of one session straight to JSON, as `encode_event` would,
    without building a model per event.

    The session's context is validated and encoded once; each event then costs a join of
    its own values, written in model field order (strings with the same escapes as
    pydantic-core, UTF-8 kept, times as pydantic writes them). The values are the caller's
    own, already typed (str, int, bool, None, datetime, lists, `Outcome`s): they are not
    validated again, as a `model_copy` of a validated event would not be either. A value of
    another type raises TypeError, text that is not valid Unicode raises ValueError: the
    caller then builds the model, which says what is wrong.
    """

    def __init__(self, context: Mapping[str, Any]) -> None:
        head = encode_event(SessionContext(**context))  # type: ignore[arg-type]
        self._head = head[:-1]  # without the closing brace: the event's own fields follow
        self._models: dict[int, tuple[BaseModel, bytes]] = {}  # Outcomes seen, encoded once
        self._second = -1
        self._second_text = b""

    def encode(self, cls: type[_Event], values: Mapping[str, Any]) -> EncodedEvent:
        """The `cls` event of this session with `values`: `id` and `time` are required, the
        other fields not given take their defaults."""
        parts = [self._head]
        event_type, fields = _tail_fields(cls)
        for key, name, default in fields:
            value = values.get(name, default)
            if value is _GIVEN:
                raise KeyError(f"an audit event needs its {name!r}")
            parts.append(key)
            parts.append(self._json(value))
        parts.append(b"}")
        return EncodedEvent(values["id"], event_type, b"".join(parts))

    def query(self, event_id: str, time_ns: int, query: str, truncated: bool,
              outcomes: list[Outcome]) -> EncodedEvent:
        """A `QueryEvent` (the one event of most transactions, so written out field by field:
        the same bytes as `encode`, at a third of its cost). `time_ns`: `time.time_ns()`."""
        outcome = self._outcome
        if len(outcomes) == 1:  # one statement: its outcome is written twice, encoded once
            last = outcome(outcomes[0])
            listed = last
        elif outcomes:
            last = outcome(outcomes[-1])
            listed = b",".join([outcome(item) for item in outcomes])
        else:
            last, listed = b"null", b""
        try:
            id_json = encode_basestring(event_id).encode()
            query_json = encode_basestring(query).encode()
        except UnicodeEncodeError:
            raise ValueError("text that is not valid Unicode (a lone surrogate)") from None
        return _new_tuple(EncodedEvent, (event_id, QUERY, b"".join((
            self._head,
            b',"id":', id_json,
            b',"time":', self.time(time_ns),
            b',"shortened":null,"type":"db.session.query","query":', query_json,
            b',"truncated":true,"outcome":' if truncated else b',"truncated":false,"outcome":',
            last, b',"outcomes":[', listed, b"]}",
        ))))

    def time(self, time_ns: int) -> bytes:
        """`time_ns` (nanoseconds since the epoch) as JSON, written as pydantic writes the
        UTC datetime of that microsecond (`datetime_of(time_ns)`)."""
        seconds, rest = divmod(time_ns, 1_000_000_000)
        if seconds != self._second:
            self._second = seconds
            text = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(seconds))
            self._second_text = b'"' + text.encode()
        micros = rest // 1000
        if micros:
            return b"%s.%06dZ\"" % (self._second_text, micros)
        return self._second_text + b'Z"'

    def _json(self, value: Any) -> bytes:
        kind = type(value)
        if kind is str:
            try:
                return encode_basestring(value).encode()
            except UnicodeEncodeError:
                raise ValueError("text that is not valid Unicode (a lone surrogate)") from None
        if value is None:
            return b"null"
        if kind is bool:
            return b"true" if value else b"false"
        if kind is int:
            return str(value).encode()
        if kind is list:
            return b"[" + b",".join([self._json(item) for item in value]) + b"]"
        if kind is datetime:
            text = value.isoformat()
            if text.endswith("+00:00"):
                text = text[:-6] + "Z"
            return b'"' + text.encode() + b'"'
        if isinstance(value, Outcome):
            return self._outcome(value)
        raise TypeError(f"an audit event value of type {kind.__name__}")

    def _outcome(self, value: Outcome) -> bytes:
        seen = self._models.get(id(value))
        if seen is None:
            if not isinstance(value, Outcome):
                raise TypeError(f"an audit event outcome of type {type(value).__name__}")
            if len(self._models) >= 256:
                self._models.clear()
            # The model is kept with its JSON: its id cannot name another one meanwhile.
            seen = self._models[id(value)] = (value, encode_event(value))  # type: ignore[arg-type]
        return seen[1]


_TAILS: dict[type, tuple[str, list[tuple[bytes, str, Any]]]] = {}
_GIVEN = object()  # the default of a field the writer must be given (`id`, `time`)


def _tail_fields(cls: type[_Event]) -> tuple[str, list[tuple[bytes, str, Any]]]:
    """The event type of `cls`, and (`,"name":`, name, default) of its fields after the
    session context."""
    tail = _TAILS.get(cls)
    if tail is None:
        fields = cls.model_fields
        tail = _TAILS[cls] = (fields["type"].default, [
            (b"," + encode_basestring(name).encode() + b":", name,
             _GIVEN if name in ("id", "time") else field.get_default(call_default_factory=True))
            for name, field in fields.items()
            if name not in SessionContext.model_fields
        ])
    return tail


def datetime_of(time_ns: int) -> datetime:
    """The UTC datetime of `time_ns` (nanoseconds since the epoch), to the microsecond
    (what `EventWriter.time` writes for the same `time_ns`)."""
    seconds, rest = divmod(time_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest // 1000)


def encode_batch(events_json: Iterable[bytes]) -> bytes:
    """The JSON body of an `AuditBatch` (`{"events": [...]}`) from events already encoded by
    `encode_event`. Each may end in a newline, as spooled lines do: whitespace between the
    items of a JSON array is allowed, so lines are joined as they are."""
    return b'{"events":[' + b",".join(events_json) + b"]}"


def fit_event(event: AuditEvent, encoded: bytes, limit: int = MAX_EVENT_BYTES
              ) -> tuple[AuditEvent, bytes]:
    """`event` and its `encoded` JSON if that is at most `limit` bytes; otherwise a copy cut
    to fit, and its JSON. What a client or a server chose the size of is cut: long texts
    (query, reason, parameters, arguments, error messages) to a number of characters and
    long lists (parameters, arguments, the outcomes of a many-statement query) to their
    first items, tighter each round until the event fits. `shortened` says what was cut
    and how large the event was; `truncated` is set when the query was cut. Who, where,
    when and the outcome's status and SQLSTATE are never cut."""
    if len(encoded) <= limit:
        return event, encoded
    data = event.model_dump(mode="python")
    for chars, items in _CUT_ROUNDS:
        notes: list[str] = []
        cut = _cut(data, chars, items, notes)
        cut["shortened"] = (
            f"{len(encoded)} bytes of JSON, over the limit of {limit}: " + "; ".join(notes)
        )
        if "truncated" in cut and any(note.startswith("query") for note in notes):
            cut["truncated"] = True
        fitted = EVENT_ADAPTER.validate_python(cut)
        fitted_json = encode_event(fitted)
        if len(fitted_json) <= limit:
            break
    return fitted, fitted_json


def _cut(data: dict, chars: int, items: int, notes: list[str]) -> dict:
    out = dict(data)
    for name in _CUT_TEXTS:
        value = out.get(name)
        if isinstance(value, str) and len(value) > chars:
            out[name] = value[:chars] + _CUT_MARK
            notes.append(f"{name} cut to {chars} of {len(value)} characters")
    for name in _CUT_LISTS:
        values = out.get(name)
        if not isinstance(values, list):
            continue
        if len(values) > items:
            notes.append(f"{name}: the first {items} of {len(values)} kept")
            values = values[:items]
            if name == "parameters" and "parameter_formats" in out:
                out["parameter_formats"] = out["parameter_formats"][:items]
        longest = 0
        kept: list = []
        for value in values:
            item, size = value, 0
            if isinstance(value, dict):  # an outcome: its message is the server's text
                item, size = _cut_message(value, chars)
            elif isinstance(value, str) and len(value) > chars:
                item, size = value[:chars] + _CUT_MARK, len(value)
            longest = max(longest, size)
            kept.append(item)
        if longest:
            notes.append(f"{name}: texts cut to {chars} characters (the longest was {longest})")
        out[name] = kept
    outcome = out.get("outcome")
    if isinstance(outcome, dict):
        out["outcome"], size = _cut_message(outcome, chars)
        if size:
            notes.append(f"outcome message cut to {chars} of {size} characters")
    return out


def _cut_message(outcome: dict, chars: int) -> tuple[dict, int]:
    """The outcome with its message cut to `chars`, and the message's length if it was."""
    message = outcome.get("message")
    if isinstance(message, str) and len(message) > chars:
        return {**outcome, "message": message[:chars] + _CUT_MARK}, len(message)
    return outcome, 0

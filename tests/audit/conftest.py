"""Helpers for the audit tests: events, a settable clock, and a control plane endpoint.

`AuditEndpoint` is the control plane's side as far as audit goes: a real
`transport.http.HttpServer` on a loopback port serving `POST /v1/audit/events` with the
real handler and a real `AuditStore`. `stop()` and `start()` model a control plane restart:
the server goes away and the store is closed, then both come back on the same port, the
store rebuilt from its files.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from control.audit_store import (
    GENESIS,
    HEAD_FILE,
    AuditStore,
    audit_events_handler,
    legacy_record_hash,
)
from dataplane.audit import SendJson
from schemas.api import AuditAck, AuditBatch
from schemas.audit import (
    AuditEvent,
    Outcome,
    QueryEvent,
    SessionEndEvent,
    SessionStartEvent,
)
from schemas.bundle import canonical_json
from transport.http import (
    ApiError,
    HttpClient,
    HttpServer,
    Request,
    Response,
    ServerLimits,
)

AUDIT_PATH = "/v1/audit/events"
_counter = itertools.count(1)


def query_event(
    query: str = "select 1",
    *,
    user: str = "alice",
    db_service: str = "aurora",
    db_name: str = "postgres",
    db_user: str = "alice",
    time: datetime | None = None,
    session_id: str = "sess-1",
    outcome: Outcome | None = None,
) -> QueryEvent:
    extra = {"time": time} if time is not None else {}
    return QueryEvent(
        cluster="example",
        session_id=session_id,
        user=user,
        roles=["dba"],
        db_service=db_service,
        db_name=db_name,
        db_user=db_user,
        client_addr="127.0.0.1:50000",
        agent="agent-1",
        query=query,
        outcome=outcome or Outcome(status="ok", command_tag="SELECT 1", rows=1),
        **extra,
    )


def numbered_events(n: int, **kwargs: object) -> list[AuditEvent]:
    return [query_event(f"select {next(_counter)}", **kwargs) for _ in range(n)]  # type: ignore[arg-type]


def session_start(user: str = "bob", success: bool = True, reason: str | None = None
                  ) -> SessionStartEvent:
    return SessionStartEvent(
        cluster="example", session_id="sess-2", user=user, roles=["dev"], db_service="local",
        db_name="app", db_user="app", success=success, reason=reason,
    )


def session_end(user: str = "bob") -> SessionEndEvent:
    return SessionEndEvent(
        cluster="example", session_id="sess-2", user=user, roles=["dev"], db_service="local",
        db_name="app", db_user="app", duration_ms=1500, bytes_from_client=300,
        bytes_from_server=4200, reason="client disconnected",
    )


def format1_log(directory: Path, events: list, received: str) -> str:
    """A log as the control plane wrote it before the current format: canonical JSON with
    sorted keys, the hash over the parsed record. Returns the last hash."""
    prev, lines = GENESIS, []
    for seq, event in enumerate(events, 1):
        record = {"seq": seq, "prev": prev, "received": received, "from": "agent-1",
                  "event": event.model_dump(mode="json")}
        record["hash"] = prev = legacy_record_hash(record)
        lines.append(canonical_json(record) + b"\n")
    (directory / f"{received[:10]}.jsonl").write_bytes(b"".join(lines))
    head = {"seq": len(events), "hash": prev, "file": f"{received[:10]}.jsonl"}
    (directory / HEAD_FILE).write_text(json.dumps(head))
    return prev


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class AuditEndpoint:
    """`POST /v1/audit/events` on a real HTTP server feeding a real `AuditStore`."""

    def __init__(
        self, directory: Path, sender: str = "agent-1", limits: ServerLimits | None = None
    ) -> None:
        self.directory = directory
        self.sender = sender
        self.limits = limits
        self.store: AuditStore | None = None
        self.server: HttpServer | None = None
        self.port = 0
        self.requests = 0
        #: Called after a batch is stored and before the answer: raise to lose the answer.
        self.after_store: Callable[[AuditBatch], None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.store = AuditStore(self.directory)
        handler = audit_events_handler(self.store, self._authenticate)

        async def route(request: Request) -> Response:
            if request.path != AUDIT_PATH:
                raise ApiError(404, "not_found", request.path)
            self.requests += 1
            response = await handler(request)
            if self.after_store is not None and response.status == 200:
                self.after_store(request.json(AuditBatch))
            return response

        self.server = HttpServer(route, self.limits)
        _, self.port = await self.server.listen("127.0.0.1", self.port)

    def _authenticate(self, request: Request) -> str:
        return self.sender

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None


class HttpSend:
    """The agent's `send`: one batch per POST (the body's bytes) over a kept-alive
    connection."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.client = HttpClient(url, timeout=timeout)
        self.calls = 0

    async def post(self, body: bytes) -> AuditAck:
        self.calls += 1
        response = await self.client.request(
            "POST", AUDIT_PATH, body=body, headers={"content-type": "application/json"}
        )
        return response.raise_for_error().json(AuditAck)

    def sender(self) -> SendJson:
        return SendJson(self.post)

    async def aclose(self) -> None:
        await self.client.aclose()

"""Live sessions of a db agent: found by id and by the cancel key the proxy gave the client.

A `Session` is one relayed connection after a successful login. It knows who (the
verified identity, kept with its certificate so a new bundle can re-check it), where (the
database, db user, db name), its relay and its audit recorder, and the two cancel keys:
the one the proxy generated for the client and the server's own.

`SessionRegistry.find_by_key(pid, secret)` finds a session only when both match the key its
client was given (the server's process id and the proxy's secret); a wrong key finds
nothing, and nothing tells the caller so (PostgreSQL's behaviour).

This module holds state only; the decisions (what to re-check, when to terminate) are the
engine's. It never logs cancel secrets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from dataplane.agent.audit import SessionRecorder
from dataplane.postgres import messages as m
from dataplane.relay import Relay
from dataplane.tunnel.frames import BackendKey
from schemas.bundle import BundleDatabase
from schemas.identity import Identity


@dataclass(eq=False)
class Session:
    """One live session on this agent."""

    session_id: str
    identity: Identity
    certificate: bytes  # the client's certificate (DER), to re-verify against a new bundle
    verified_at: datetime
    service: str
    spec: BundleDatabase
    db_user: str
    db_name: str
    client_addr: str
    client_key: BackendKey  # what the client was given: server's process id, proxy's secret
    server_key: m.BackendKeyData | None  # what the server gave us
    relay: Relay
    recorder: SessionRecorder | None
    started: float  # loop time
    expiry_timer: asyncio.TimerHandle | None = None
    idle_timeout: float | None = None  # seconds without a byte from the client; None: never
    idle_timer: asyncio.TimerHandle | None = None
    idle_bytes: int = 0  # relay.bytes_from_client at the idle timer's last look
    idle_since: float = 0.0  # loop time from which the client counts as silent
    ending: str = ""  # why we are terminating it, once we are
    on_end: list[Callable[[Session], None]] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        return {
            "session_id": self.session_id,
            "user": self.identity.username,
            "database": self.service,
            "db_user": self.db_user,
            "db_name": self.db_name,
            "client_addr": self.client_addr,
            **self.relay.info(),
        }


class SessionRegistry:
    """Sessions by id and by the client's cancel key."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}
        self._by_key: dict[tuple[int, int], Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_id.values()))

    def add(self, session: Session) -> None:
        self._by_id[session.session_id] = session
        self._by_key[_key(session.client_key)] = session

    def remove(self, session: Session) -> None:
        if self._by_id.get(session.session_id) is session:
            del self._by_id[session.session_id]
        if self._by_key.get(_key(session.client_key)) is session:
            del self._by_key[_key(session.client_key)]

    def get(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def find_by_key(self, process_id: int, secret_key: int) -> Session | None:
        return self._by_key.get((process_id & 0xFFFFFFFF, secret_key & 0xFFFFFFFF))


def _key(key: BackendKey) -> tuple[int, int]:
    return key.process_id & 0xFFFFFFFF, key.secret_key & 0xFFFFFFFF

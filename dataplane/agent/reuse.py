"""Server connections kept for the next session of the same person (`server_idle_timeout`).

A PostgreSQL login is the dearest thing a session does: the server starts a process and
both ends run a full TLS handshake (the server offers no resumption). Clients that open a
connection per request pay it every time. So when such a client ends its session cleanly,
the agent keeps the server connection instead of closing it:

- such a client: one whose key (below) started at least `keep_after` (2) sessions within
  the last `idle_timeout` seconds, this one included. Anyone else's server process ends
  with the session, as on a direct connection: a one-off client that looks for its
  backend in pg_stat_activity after it left finds it gone (psycopg's own test suite does);
- cleanly means: the client sent Terminate while every request it made had been answered,
  outside any transaction (the last ReadyForQuery said idle), nothing of the extended
  protocol left without its Sync, and the agent was not ending the session itself;
- the agent then runs `DISCARD ALL` (closes cursors, drops temporary tables and prepared
  statements, stops listening, releases advisory locks, resets every setting and the
  session authorization); only if it completes with the server idle is the connection kept,
  else it is closed;
- a kept connection serves only a session with the same key: the same database, the same
  Teleport user, db user and db name, and the same startup options. Never another person,
  whatever db user they share. It is closed after `idle_timeout` seconds unused, when the
  server sends anything meanwhile (pg_terminate_backend, a shutdown), when the database
  refuses a new login for lack of connection slots (the engine frees them and retries),
  when a session sends a database or role statement (CREATE, ALTER or DROP DATABASE: the
  server waits up to 5 s for every other connection to the database to go, then fails the
  statement, and a kept one never would; ALTER or DROP ROLE or USER, REVOKE CONNECT: a
  role's new settings or lost login hold from the next session), and when the agent stops.
  After any of these `close_all`, no connection that logged in before it is kept. Nor one
  an hour after its login (`MAX_LIFETIME`), so no login outlives a rotation of the agent's
  credentials for long.

RBAC, audit and the rest of a session are unchanged: each session is decided, recorded and
ended as its own; only the login to the server is saved. What `DISCARD ALL` does not reset
is the same as behind a pooler: `ALTER ROLE ... SET` changes made meanwhile take effect at
the next new connection, and a procedural language's own session memory (PL/Python's `GD`)
persists. `server_idle_timeout: 0` turns reuse off.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from dataplane.postgres import BACKEND, MessageDecoder, ProtocolError, encode
from dataplane.postgres import messages as m
from dataplane.relay import ConnectionClosed, Inbox
from schemas.bundle import BundleDatabase
from schemas.config import DbService
from schemas.durations import parse_duration

logger = logging.getLogger(__name__)

# s: the default of db_service.server_idle_timeout, as the configuration schema states it
SERVER_IDLE_TIMEOUT = parse_duration(
    DbService.model_fields["server_idle_timeout"].default
).total_seconds()
RESET_QUERY = "DISCARD ALL"
RESET_TIMEOUT = 5.0  # s: a server that takes longer to reset is closed, not kept
MAX_RESET_ANSWER = 64 * 1024  # bytes: DISCARD ALL answers with a few short messages
MAX_LIFETIME = 3600.0  # s: a server connection older than this is closed, not kept
PER_KEY = 8  # kept connections per key
TOTAL = 64  # kept connections per agent
KEEP_AFTER = 2  # sessions of a key started within idle_timeout before its connection is kept
RECENT_KEYS = 4096  # keys whose latest session starts are remembered
_TERMINATE = encode(m.Terminate())

ReuseKey = tuple[str, str, str, str, str, tuple[tuple[str, str], ...]]


def reuse_key(
    spec: BundleDatabase, username: str, db_user: str, db_name: str,
    parameters: Mapping[str, str],
) -> ReuseKey:
    """What two sessions must share to use the same server connection."""
    return (spec.name, spec.uri, username, db_user, db_name, tuple(sorted(parameters.items())))


@dataclass(eq=False)
class KeptServer:
    """A logged-in, reset, idle server connection."""

    key: ReuseKey
    transport: asyncio.Transport
    server_key: m.BackendKeyData | None
    greeting: list[m.ParameterStatus] = field(default_factory=list)
    opened_at: float = 0.0  # loop time of its login
    timer: asyncio.TimerHandle | None = None
    generation: int = 0  # ServerReuse.generation at its login


class _Watch(asyncio.Protocol):
    """A kept connection's protocol: the server has nothing to say to an idle connection,
    so anything it sends (a FATAL from pg_terminate_backend, a shutdown) ends it."""

    def __init__(self, pool: ServerReuse, kept: KeptServer) -> None:
        self.pool = pool
        self.kept = kept

    def data_received(self, data: bytes) -> None:
        self.pool.drop(self.kept)

    def eof_received(self) -> bool:
        self.pool.drop(self.kept)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.drop(self.kept)


def close_server(transport: asyncio.Transport) -> None:
    """Say goodbye to the server (so its log shows no lost connection) and close."""
    if transport.is_closing():
        return
    try:
        transport.write(_TERMINATE)
        transport.close()
    except Exception:
        transport.abort()


class ServerReuse:
    """The agent's kept server connections, by key."""

    def __init__(
        self, idle_timeout: float, *, per_key: int = PER_KEY, total: int = TOTAL,
        max_lifetime: float = MAX_LIFETIME, keep_after: int = KEEP_AFTER,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self.per_key = per_key
        self.total = total
        self.keep_after = keep_after
        self._idle: dict[ReuseKey, list[KeptServer]] = {}
        # The loop times of each key's latest `keep_after` session starts (least recently
        # started key first, at most RECENT_KEYS of them).
        self._starts: OrderedDict[ReuseKey, deque[float]] = OrderedDict()
        self._count = 0
        self._resets: set[asyncio.Task[None]] = set()
        # close_all() counts up: a connection logged in before it is not kept (the database
        # may be waiting for it to go; its role or database settings may be outdated).
        self.generation = 0
        self.closed = False

    @property
    def enabled(self) -> bool:
        return self.idle_timeout > 0 and not self.closed

    def __len__(self) -> int:
        return self._count

    @property
    def resetting(self) -> int:
        """Connections given back and still being reset."""
        return len(self._resets)

    # -- taking ---------------------------------------------------------------------------------

    def take(self, key: ReuseKey) -> tuple[asyncio.Transport, Inbox, KeptServer] | None:
        """A session of `key` starts: a kept connection for it, its protocol now an Inbox;
        None if there is none."""
        self._started(key)
        while True:
            stack = self._idle.get(key)
            if not stack:
                return None
            kept = stack[-1]
            self._release(kept)
            if kept.transport.is_closing():
                continue
            inbox = Inbox(limit=MAX_RESET_ANSWER)
            inbox.transport = kept.transport
            kept.transport.set_protocol(inbox)
            return kept.transport, inbox, kept

    def _started(self, key: ReuseKey) -> None:
        starts = self._starts.pop(key, None)
        if starts is None or starts.maxlen != max(1, self.keep_after):
            while len(self._starts) >= RECENT_KEYS:
                self._starts.popitem(last=False)
            starts = deque(starts or (), maxlen=max(1, self.keep_after))
        starts.append(asyncio.get_running_loop().time())
        self._starts[key] = starts  # now the most recently started key

    def reconnects(self, key: ReuseKey) -> bool:
        """Whether `key` started `keep_after` sessions within the last `idle_timeout` s."""
        if self.keep_after <= 1:
            return True
        starts = self._starts.get(key)
        return (
            starts is not None
            and len(starts) >= self.keep_after
            and asyncio.get_running_loop().time() - starts[0] <= self.idle_timeout
        )

    # -- giving back ----------------------------------------------------------------------------

    def give_back(
        self,
        key: ReuseKey,
        transport: asyncio.Transport,
        server_key: m.BackendKeyData | None,
        greeting: list[m.ParameterStatus],
        opened_at: float,
        generation: int,
    ) -> bool:
        """Take over `transport` (a server connection whose client ended cleanly, logged in
        at loop time `opened_at`, when `self.generation` was `generation`): its protocol is
        replaced now, before the caller returns to the loop. It is reset, then kept or
        closed. False (nothing taken over) when reuse is off, `key` does not reconnect
        often, the connection is gone, has lived `max_lifetime` or logged in before the
        last `close_all`."""
        loop = asyncio.get_running_loop()
        if not self.enabled or transport.is_closing() or generation != self.generation:
            return False
        if not self.reconnects(key):
            return False
        if loop.time() - opened_at > self.max_lifetime:
            return False
        inbox = Inbox(limit=MAX_RESET_ANSWER)
        inbox.transport = transport
        transport.set_protocol(inbox)
        task = loop.create_task(
            self._reset(
                KeptServer(key, transport, server_key, greeting, opened_at, generation=generation),
                inbox,
            )
        )
        self._resets.add(task)
        task.add_done_callback(self._resets.discard)
        return True

    async def _reset(self, kept: KeptServer, inbox: Inbox) -> None:
        transport = kept.transport
        try:
            async with asyncio.timeout(RESET_TIMEOUT):
                parameters = await _discard_all(inbox, kept.greeting)
        except (TimeoutError, ConnectionClosed, ProtocolError) as exc:
            logger.info("a server connection was not kept: %s", exc or type(exc).__name__)
            close_server(transport)
            return
        if (
            parameters is None
            or not self.enabled
            or transport.is_closing()
            or kept.generation != self.generation
        ):
            close_server(transport)
            return
        stack = self._idle.setdefault(kept.key, [])
        if len(stack) >= self.per_key or self._count >= self.total:
            close_server(transport)
            return
        kept.greeting = parameters
        transport.set_protocol(_Watch(self, kept))
        kept.timer = asyncio.get_running_loop().call_later(self.idle_timeout, self.drop, kept)
        stack.append(kept)
        self._count += 1

    # -- ending ---------------------------------------------------------------------------------

    def _release(self, kept: KeptServer) -> bool:
        """Take `kept` out of the idle set; False if it was not in it."""
        stack = self._idle.get(kept.key)
        if not stack or kept not in stack:
            return False
        stack.remove(kept)
        if not stack:
            del self._idle[kept.key]
        self._count -= 1
        if kept.timer is not None:
            kept.timer.cancel()
            kept.timer = None
        return True

    def drop(self, kept: KeptServer) -> None:
        """Close a kept connection (its time is up, or the server spoke or left)."""
        if self._release(kept):
            close_server(kept.transport)

    def close_all(self) -> int:
        """Close every kept connection (the database wants its slots back, a session
        changed a database or role, or we stop), and keep none logged in before this call,
        even those being reset or still in a session now; the number closed."""
        self.generation += 1
        closed = 0
        for stack in list(self._idle.values()):
            for kept in list(stack):
                self.drop(kept)
                closed += 1
        return closed

    async def shutdown(self) -> None:
        self.closed = True
        for task in list(self._resets):
            task.cancel()
        if self._resets:
            await asyncio.gather(*self._resets, return_exceptions=True)
        self.close_all()


async def _discard_all(
    inbox: Inbox, greeting: list[m.ParameterStatus]
) -> list[m.ParameterStatus] | None:
    """Run DISCARD ALL; the session's parameters after it (the greeting, updated with what
    the server reported), or None when it did not end idle and clean."""
    inbox.write(encode(m.Query(RESET_QUERY)))
    reader = MessageDecoder(BACKEND, max_message_size=MAX_RESET_ANSWER)
    parameters = {p.name: p for p in greeting}
    done = False
    while True:
        message = await inbox.next_message(reader)
        if isinstance(message, m.CommandComplete):
            done = message.tag == RESET_QUERY
        elif isinstance(message, m.ParameterStatus):
            parameters[message.name] = message
        elif isinstance(message, m.ReadyForQuery):
            if message.status != "I" or not done:
                return None
            break
        elif not isinstance(message, m.NoticeResponse):
            logger.info("a server connection was not kept: %s after %s",
                        type(message).__name__, RESET_QUERY)
            return None
    if reader.take_unprocessed() or inbox.take():
        return None  # more than the answer: not a connection to trust with a session
    return list(parameters.values())

"""The proxy's listeners: tell a connection's kind from its first bytes, then dispatch it.

On the web port (3080) one address serves the HTTPS API and PostgreSQL clients. For each
accepted socket the listener waits until it is readable and peeks (`MSG_PEEK`, nothing is
consumed) at the first 8 bytes:
- 0x16, a TLS record (ClientHello): the whole first record is peeked (at most 16 KiB);
  a ClientHello that offers the ALPN protocol "postgresql" is a PostgreSQL client starting
  TLS at once (PostgreSQL 17's direct TLS, `sslnegotiation=direct`): the PostgreSQL
  frontend; any other TLS is the HTTPS API, handed over with every byte unread;
- a PostgreSQL startup packet (a length of 8..10,000 and SSLRequest, GSSENCRequest,
  CancelRequest or protocol 3.0): the PostgreSQL frontend;
- anything else, or nothing within `first_bytes_timeout` (10 s): closed.
The optional `postgres_listen_addr` uses the same dispatcher without an API: TLS there must
offer "postgresql" (as PostgreSQL 17 requires of direct TLS), or it is closed.

Never: read (consume) a byte before the connection's owner is decided, spin on a socket
that has sent fewer than 8 bytes, or keep a silent connection past the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from enum import Enum

from dataplane.postgres.codec import DEFAULT_MAX_STARTUP_SIZE
from dataplane.postgres.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
)
from dataplane.proxy.client_hello import POSTGRESQL, offered_alpn, record_size
from dataplane.tunnel.accept import Acceptor, bind_listener

logger = logging.getLogger(__name__)

FIRST_BYTES_TIMEOUT = 10.0
_RECHECK = 0.02  # fewer than 8 bytes so far: look again this much later
_HEAD = struct.Struct("!ii")

Handler = Callable[[socket.socket, str], Awaitable[None]]


class Kind(Enum):
    TLS = "tls"
    POSTGRES = "postgres"
    POSTGRES_TLS = "postgres-direct-tls"
    UNKNOWN = "unknown"
    NEED_MORE = "need-more"


def classify(head: bytes) -> Kind:
    """What a connection is, from the bytes peeked so far (at most 8)."""
    if not head:
        return Kind.NEED_MORE
    if head[0] == 0x16:
        return Kind.TLS
    if len(head) < 8:
        # A startup packet's length is big-endian and below 10,000: two zero bytes first.
        return Kind.NEED_MORE if head[: min(2, len(head))] == b"\0" * min(2, len(head)) else \
            Kind.UNKNOWN
    length, code = _HEAD.unpack(head[:8])
    if not 8 <= length <= DEFAULT_MAX_STARTUP_SIZE:
        return Kind.UNKNOWN
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE, PROTOCOL_3_0):
        return Kind.POSTGRES
    if code >> 16 in (1, 2, 3):
        return Kind.POSTGRES  # another protocol version: the frontend answers it properly
    return Kind.UNKNOWN


def classify_tls(record: bytes) -> Kind:
    """What a connection that starts with a TLS record is, from the bytes peeked so far."""
    offered = offered_alpn(record)
    if offered is None:
        return Kind.NEED_MORE
    return Kind.POSTGRES_TLS if POSTGRESQL in offered else Kind.TLS


class PeekListener:
    """Accepts on one address and dispatches each connection by its first bytes."""

    def __init__(
        self,
        on_postgres: Handler,
        on_tls: Handler | None,
        *,
        on_postgres_tls: Handler | None = None,
        first_bytes_timeout: float = FIRST_BYTES_TIMEOUT,
    ) -> None:
        self._handlers = {
            Kind.POSTGRES: on_postgres, Kind.TLS: on_tls, Kind.POSTGRES_TLS: on_postgres_tls,
        }
        self._on_tls = on_tls
        self.first_bytes_timeout = first_bytes_timeout
        self._acceptor: Acceptor | None = None
        self._waiting: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        self._acceptor = Acceptor(bind_listener(host, port), self._accepted)
        return self._acceptor.address

    @property
    def address(self) -> tuple[str, int] | None:
        return self._acceptor.address if self._acceptor else None

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
        for fd in list(self._waiting):
            self._drop(fd)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accepted(self, sock: socket.socket, peer: str) -> None:
        assert self._loop is not None
        fd = sock.fileno()
        timer = self._loop.call_later(self.first_bytes_timeout, self._timed_out, fd, peer)
        self._waiting[fd] = (sock, timer)
        self._loop.add_reader(fd, self._readable, fd, peer)

    def _timed_out(self, fd: int, peer: str) -> None:
        logger.info("connection from %s sent nothing usable within %g s; closed", peer,
                    self.first_bytes_timeout)
        self._drop(fd)

    def _drop(self, fd: int) -> None:
        entry = self._waiting.pop(fd, None)
        if entry is None:
            return
        sock, timer = entry
        timer.cancel()
        assert self._loop is not None
        self._loop.remove_reader(fd)
        sock.close()

    def _readable(self, fd: int, peer: str) -> None:
        assert self._loop is not None
        entry = self._waiting.get(fd)
        if entry is None:
            return
        sock = entry[0]
        try:
            head = sock.recv(8, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not head:
            self._drop(fd)  # closed before saying anything
            return
        kind = classify(head)
        if kind is Kind.TLS:
            size = record_size(head)
            if size is not None and size > len(head):
                try:
                    head = sock.recv(size, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    self._drop(fd)
                    return
            kind = classify_tls(head)
        if kind is Kind.NEED_MORE:
            # Level-triggered readiness would call us again at once: look later instead.
            self._loop.remove_reader(fd)
            self._loop.call_later(_RECHECK, self._rearm, fd, sock, peer)
            return
        sock, timer = self._waiting.pop(fd)
        timer.cancel()
        self._loop.remove_reader(fd)
        handler = self._handlers.get(kind)
        if handler is None:
            if kind is Kind.TLS:
                logger.info("connection from %s started TLS without offering the ALPN "
                            "protocol 'postgresql' (direct TLS requires it); closed", peer)
            else:
                logger.info("connection from %s is neither PostgreSQL nor %s; closed", peer,
                            "HTTPS" if self._on_tls else "accepted here")
            sock.close()
            return
        task = self._loop.create_task(self._run(handler, sock, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _rearm(self, fd: int, sock: socket.socket, peer: str) -> None:
        entry = self._waiting.get(fd)
        # The same socket still waiting (its descriptor may since belong to another one).
        if entry is not None and entry[0] is sock and self._loop is not None:
            self._loop.add_reader(fd, self._readable, fd, peer)

    async def _run(self, handler: Handler, sock: socket.socket, peer: str) -> None:
        try:
            await handler(sock, peer)
        except Exception:
            logger.exception("handling the connection from %s failed", peer)
            with contextlib.suppress(OSError):
                sock.close()

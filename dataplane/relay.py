"""Two connections joined: the byte copy at the heart of the proxy and of the db agent.

`Relay(client, server)` takes two connected asyncio transports (plain TCP or TLS, on uvloop
or asyncio) and installs its own protocol on each with `transport.set_protocol`: every
chunk received from one side is written to the other with exactly one `write` and,
beside the copy, optionally fed to a `MessageScanner` whose messages go to an observer
(audit): the client's after the write, the server's before it (the audit records an answer
before the client gets it).
Backpressure is end to end: when a destination's transport calls `pause_writing`, the
source transport stops reading until `resume_writing`; nothing here buffers without bound.

`keep_server()` (optional) is asked when the client's Terminate arrives on its own: if it
takes the server connection (the agent keeps it for the next session, dataplane/agent/
reuse.py), the Terminate is not forwarded and only the client side is closed.

`terminate(fatal)` ends a live session cleanly: the ErrorResponse goes to the client at the
next message boundary of the server-to-client stream (finishing the message in flight
first), then both sides are closed. `bytes_from_client` and `bytes_from_server` count what
each side sent (an idle timeout samples the first; the copy notes nothing else per chunk).

`Inbox` is the protocol a connection runs before a relay takes it over (TLS upgrade,
startup packets, tunnel frames, upstream login): it collects bytes for one awaiting task,
with a bounded buffer, and hands whatever was read beyond the handshake to the relay.

This module must never: write once per protocol message, copy or parse a payload in the
copy path, await anything per chunk (the hot path is callbacks), or keep reading a side
whose destination has stopped draining.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from dataplane.postgres import MessageScanner, ProtocolError, ScannedMessage

logger = logging.getLogger(__name__)

# A closing side waits this long for its buffered bytes to drain before it is aborted.
CLOSE_FLUSH_TIMEOUT = 10.0
# A termination waits this long for the server to finish the message in flight.
TERMINATE_BOUNDARY_TIMEOUT = 1.0
_TERMINATE_MESSAGE = b"X\x00\x00\x00\x04"

Observer = Callable[[list[ScannedMessage]], None]
_T_co = TypeVar("_T_co", covariant=True)


class Decoder(Protocol[_T_co]):
    """A sans-IO decoder (MessageDecoder, StartupDecoder): fed bytes, gives messages."""

    def receive_data(self, data: bytes) -> None: ...

    def next_message(self) -> _T_co | None: ...


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (or it failed) while we were waiting for its bytes."""


class Inbox(asyncio.Protocol):
    """Collects the bytes of a connection for one awaiting task, before a relay starts.

    At most `limit` bytes are buffered: past it, the transport stops reading until the
    task takes the bytes. `receive()` raises ConnectionClosed once the peer is gone and
    nothing is left.
    """

    def __init__(self, limit: int = 256 * 1024) -> None:
        self.transport: asyncio.Transport | None = None
        self.limit = limit
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._lost = False
        self._exc: BaseException | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self.limit and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._exc = exc
        self._wake()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- for the task ----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def closed(self) -> bool:
        return self._lost or self._eof

    async def receive(self) -> bytes:
        """The bytes received so far (at least one); waits for them if there are none."""
        while not self._buf:
            if self._lost or self._eof:
                raise ConnectionClosed(
                    f"the peer closed the connection{f' ({self._exc})' if self._exc else ''}"
                )
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take()

    async def next_message(self, decoder: Decoder[_T_co]) -> _T_co:
        """`decoder`'s next message, fed with this connection's bytes until it has one
        (raises ConnectionClosed as `receive` does)."""
        while (message := decoder.next_message()) is None:
            decoder.receive_data(await self.receive())
        return message

    def take(self) -> bytes:
        """Whatever is buffered (possibly nothing), without waiting."""
        data = bytes(self._buf)
        self._buf.clear()
        if self._reading_paused and self.transport is not None and not self._lost:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is None or self._lost:
            raise ConnectionClosed("the connection is closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._writing_paused and not self._lost:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter


class _End(asyncio.Protocol):
    """The relay's protocol on one of its two transports."""

    __slots__ = ("is_client", "lost", "relay")

    def __init__(self, relay: Relay, is_client: bool) -> None:
        self.relay = relay
        self.is_client = is_client
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        pass  # set_protocol on a live transport never calls this

    def data_received(self, data: bytes) -> None:
        if self.is_client:
            self.relay._from_client(data)
        else:
            self.relay._from_server(data)

    def eof_received(self) -> bool:
        return False  # a half-closed PostgreSQL session is a closed one

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay._lost(self.is_client, exc)

    def pause_writing(self) -> None:
        # Our transport is full: stop reading the side that fills it.
        self.relay._pause(not self.is_client)

    def resume_writing(self) -> None:
        self.relay._resume(not self.is_client)


class Relay:
    """A byte relay between a client-side and a server-side transport.

    `client_scanner` / `server_scanner` (optional) see the bytes each side sends (the
    client's after they were forwarded, the server's before); their messages go to
    `on_client_messages` / `on_server_messages`. A `server_scanner` is needed for
    `terminate` to find message boundaries. `on_closed(reason)` runs once, when both sides
    are closed.
    """

    def __init__(
        self,
        client: asyncio.Transport,
        server: asyncio.Transport,
        *,
        client_scanner: MessageScanner | None = None,
        server_scanner: MessageScanner | None = None,
        on_client_messages: Observer | None = None,
        on_server_messages: Observer | None = None,
        on_closed: Callable[[str], None] | None = None,
        keep_server: Callable[[], bool] | None = None,
    ) -> None:
        self.client = client
        self.server = server
        self.client_scanner = client_scanner
        self.server_scanner = server_scanner
        self._on_client_messages = on_client_messages
        self._on_server_messages = on_server_messages
        self.on_closed = on_closed
        self.keep_server = keep_server
        self._released = False  # the server connection went to keep_server's owner
        self._client_end = _End(self, True)
        self._server_end = _End(self, False)
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        self.close_reason = ""
        self._closing = False
        self._closed_reported = False
        self._fatal: bytes | None = None  # the ErrorResponse waiting for a boundary
        self._paused = [False, False]  # reading paused on [server, client]
        self._timers: list[asyncio.TimerHandle] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(
        self,
        client_pending: bytes = b"",
        server_pending: bytes = b"",
        *,
        client_gone: bool = False,
        server_gone: bool = False,
    ) -> None:
        """Take both transports over. `*_pending` are bytes each side sent that were read
        before the relay started (they are forwarded first); `*_gone` says the side's
        previous protocol already saw the connection end (the relay would never hear it)."""
        self.client.set_protocol(self._client_end)
        self.server.set_protocol(self._server_end)
        if client_pending:
            self._from_client(client_pending)
        if server_pending:
            self._from_server(server_pending)
        for gone, end in ((client_gone, self._client_end), (server_gone, self._server_end)):
            if gone and not end.lost:
                end.connection_lost(None)

    @property
    def closed(self) -> bool:
        return self._closing

    def buffered(self) -> tuple[int, int]:
        """Bytes waiting in the (client, server) transports' write buffers right now."""
        return self.client.get_write_buffer_size(), self.server.get_write_buffer_size()

    def close(self, reason: str) -> None:
        """Close both sides now (buffered bytes are still flushed)."""
        if not self._closing:
            self.close_reason = reason
        self._closing = True
        for transport in (self.client, self.server):
            self._close_transport(transport)

    # -- the copy ------------------------------------------------------------------------------

    def _from_client(self, data: bytes) -> None:
        if self._closing:
            return
        if data == _TERMINATE_MESSAGE and self.keep_server is not None and self._hand_over():
            return
        self.server.write(data)
        self.bytes_from_client += len(data)
        scanner = self.client_scanner
        if scanner is not None:
            try:
                messages = scanner.feed(data)
            except ProtocolError as exc:
                self._scan_failed("client", exc)
                return
            if messages and self._on_client_messages is not None:
                self._on_client_messages(messages)

    def _from_server(self, data: bytes) -> None:
        if self._closing:
            return
        if self._fatal is not None:
            self._server_data_while_terminating(data)
            return
        scanner = self.server_scanner
        if scanner is not None:
            # Seen before it is forwarded: the audit has the answer (in its journal) before
            # the client can act on it, so a process killed in between loses nothing the
            # client saw.
            try:
                messages = scanner.feed(data)
            except ProtocolError as exc:
                self._scan_failed("server", exc)
                return
            if messages and self._on_server_messages is not None:
                self._on_server_messages(messages)
                if self._closing:
                    return  # the observer closed the session
        self.client.write(data)
        self.bytes_from_server += len(data)

    def _hand_over(self) -> bool:
        """The client's Terminate, alone in its chunk: if `keep_server()` takes the server
        connection (it installs its own protocol on it before returning True), the
        Terminate is not forwarded and only the client side is closed."""
        scanner = self.client_scanner
        if self._fatal is not None or self._paused[0]:
            return False
        if scanner is not None and not scanner.at_boundary:
            return False
        if scanner is not None:
            messages = scanner.feed(_TERMINATE_MESSAGE)
            if self._on_client_messages is not None:
                self._on_client_messages(messages)
        self.bytes_from_client += len(_TERMINATE_MESSAGE)
        assert self.keep_server is not None
        if not self.keep_server():
            self.server.write(_TERMINATE_MESSAGE)
            return True
        self.close_reason = "client disconnected"
        self._closing = True
        self._released = True
        self._server_end.lost = True  # no longer ours: its new owner hears of its end
        self._close_transport(self.client)
        if self._client_end.lost:
            self._report_closed()
        return True

    def _scan_failed(self, side: str, exc: ProtocolError) -> None:
        # A stream we cannot follow cannot be audited: end the session (fail closed).
        logger.warning("closing a session: the %s broke the protocol: %s", side, exc)
        self.close(f"the {side} broke the PostgreSQL protocol: {exc}")

    # -- flow control --------------------------------------------------------------------------

    def _pause(self, client_side: bool) -> None:
        index = int(client_side)
        if self._paused[index] or (self._released and not client_side):
            return
        self._paused[index] = True
        transport = self.client if client_side else self.server
        if not transport.is_closing():
            transport.pause_reading()

    def _resume(self, client_side: bool) -> None:
        index = int(client_side)
        if not self._paused[index]:
            return
        self._paused[index] = False
        transport = self.client if client_side else self.server
        if not transport.is_closing():
            transport.resume_reading()

    # -- the end -------------------------------------------------------------------------------

    def _lost(self, client_side: bool, exc: Exception | None) -> None:
        if not self._closing:
            who = "client" if client_side else "server"
            self.close_reason = f"{who} disconnected" + (f" ({exc})" if exc else "")
            self._closing = True
        self._close_transport(self.server if client_side else self.client)
        if self._client_end.lost and self._server_end.lost:
            self._report_closed()

    def _report_closed(self) -> None:
        if self._closed_reported:
            return
        self._closed_reported = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self.on_closed is not None:
            self.on_closed(self.close_reason)

    def _close_transport(self, transport: asyncio.Transport) -> None:
        if transport.is_closing() or (self._released and transport is self.server):
            return
        if transport is self.client and self._paused[1]:
            self._paused[1] = False
        if transport is self.server and self._paused[0]:
            self._paused[0] = False
        try:
            transport.close()
        except Exception:
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(CLOSE_FLUSH_TIMEOUT, self._abort, transport))

    def _abort(self, transport: asyncio.Transport) -> None:
        end = self._client_end if transport is self.client else self._server_end
        if not end.lost:
            transport.abort()

    # -- termination at a message boundary ------------------------------------------------------

    def terminate(self, fatal: bytes, reason: str) -> None:
        """Send `fatal` (an encoded ErrorResponse) to the client at the next server message
        boundary, then close both sides."""
        if self._closing or self._fatal is not None:
            return
        self.close_reason = reason
        self._fatal = fatal
        scanner = self.server_scanner
        if scanner is None or scanner.at_boundary:
            self._inject_and_close()
            return
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(TERMINATE_BOUNDARY_TIMEOUT, self._boundary_timeout))

    def _boundary_timeout(self) -> None:
        if not self._closing:
            logger.warning("session terminated mid-message: the server stalled inside one")
            self.close(self.close_reason)

    def _server_data_while_terminating(self, data: bytes) -> None:
        scanner = self.server_scanner
        assert scanner is not None
        pos, n = 0, len(data)
        view = memoryview(data)
        try:
            while pos < n and not scanner.at_boundary:
                need = scanner.bytes_to_boundary
                step = 1 if need is None else need
                piece = view[pos : pos + step]
                messages = scanner.feed(piece)
                pos += len(piece)
                if messages and self._on_server_messages is not None:
                    self._on_server_messages(messages)
        except ProtocolError as exc:
            self._scan_failed("server", exc)
            return
        if pos:
            self.client.write(bytes(view[:pos]))
            self.bytes_from_server += pos
        if scanner.at_boundary:
            self._inject_and_close()

    def _inject_and_close(self) -> None:
        fatal = self._fatal or b""
        if not self.client.is_closing():
            self.client.write(fatal)
        scanner = self.client_scanner
        if scanner is not None and scanner.at_boundary and not self.server.is_closing():
            self.server.write(_TERMINATE_MESSAGE)
        self.close(self.close_reason)

    def info(self) -> dict[str, Any]:
        client_buf, server_buf = self.buffered()
        return {
            "bytes_from_client": self.bytes_from_client,
            "bytes_from_server": self.bytes_from_server,
            "client_write_buffer": client_buf,
            "server_write_buffer": server_buf,
            "closing": self._closing,
        }

"""The HTTP/1.1 server: h11's state machine driven by asyncio streams, with limits.

Rules for this module:
- Every wait has a deadline: the TLS handshake and the request head (`header_timeout`), the
  body (`body_timeout`), the gap between keep-alive requests (`keepalive_timeout`) and each
  write (`send_timeout`). A peer that misses one is answered 408 when it sent part of a
  request, and disconnected in every case.
- Nothing is buffered past a limit: the head is bounded by h11's `max_incomplete_event_size`,
  the body by `max_body_bytes` (413 as soon as `Content-Length` says too much, or when a
  chunked body grows past it).
- A handler's failure is answered 500 and logged with its traceback and the method and path;
  never the query, headers or body (they may hold secrets). The server keeps serving.
- A handler runs in its own task while the connection is watched: a client that goes away
  cancels it, and a long handler never blocks other connections.
- Works on any asyncio event loop, uvloop included.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import pydantic

from transport.http._headers import Headers, head_size
from transport.http._messages import (
    ApiError,
    Request,
    Response,
    describe_validation_error,
    error_response,
    split_target,
)
from transport.http._streams import READ_CHUNK, close_stream

logger = logging.getLogger("transport.http")

Handler = Callable[[Request], Awaitable[Response]]

_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """How much and how long the server waits for one client. Times are in seconds."""

    #: The request line and header block together (h11's `max_incomplete_event_size`).
    max_header_bytes: int = 32 * 1024
    max_body_bytes: int = 1024 * 1024
    #: From connection (or from the first byte of a keep-alive request) to the full head;
    #: also the TLS handshake timeout.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 60.0
    send_timeout: float = 30.0
    max_connections: int = 1024
    #: After an early error answer (413, 431, ...) input is read and dropped this long, so
    #: that a client still sending its request sees the answer rather than a reset.
    linger_timeout: float = 2.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) <= 0:
                raise ValueError(f"ServerLimits.{name} must be positive, got "
                                 f"{getattr(self, name)!r}")


class HttpServer:
    """Serves `handler(Request) -> Response` over HTTP/1.1, plain or TLS.

    Start it with `await listen(host, port, ssl=ctx)` and/or hand it connections another
    listener accepted with `await accept_socket(sock, ssl=ctx)`; stop it with `await close()`.
    """

    def __init__(self, handler: Handler, limits: ServerLimits | None = None) -> None:
        self._handler = handler
        self.limits = limits or ServerLimits()
        self._listeners: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def listen(
        self, host: str, port: int, *, ssl: ssl.SSLContext | None = None, backlog: int = 128
    ) -> tuple[str, int]:
        """Listen on `host:port` (port 0 picks a free one); returns the bound address."""
        extra = {"ssl_handshake_timeout": self.limits.header_timeout} if ssl else {}
        listener = await asyncio.start_server(
            self._on_connection, host, port, ssl=ssl, backlog=backlog, limit=READ_CHUNK,
            **extra,
        )
        self._listeners.append(listener)
        address = listener.sockets[0].getsockname()
        return address[0], address[1]

    async def accept_socket(self, sock: socket.socket, *, ssl: ssl.SSLContext | None = None
                            ) -> None:
        """Serve a connection someone else accepted; bytes only peeked at are still read.

        Returns once the connection is set up (after the TLS handshake); it is then served
        in the background. A failed handshake is logged and the socket closed.
        """
        loop = asyncio.get_running_loop()
        peer = _sock_peer(sock)
        sock.setblocking(False)

        def protocol() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=READ_CHUNK, loop=loop)
            return asyncio.StreamReaderProtocol(reader, self._on_connection, loop=loop)

        extra = {"ssl_handshake_timeout": self.limits.header_timeout} if ssl else {}
        try:
            await loop.connect_accepted_socket(protocol, sock, ssl=ssl, **extra)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            logger.info("HTTP connection from %s dropped during the TLS handshake: %s",
                        peer, exc)
            sock.close()

    async def close(self) -> None:
        """Stop listening, end every connection (cancelling running handlers), and wait."""
        self._closing = True
        for listener in self._listeners:
            listener.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()

    async def __aenter__(self) -> HttpServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                       ) -> None:
        # Our own task per connection (not the stream protocol's), so that close() can
        # cancel it and nothing outside this class ever sees its outcome.
        if self._closing:
            writer.transport.abort()
            return
        task = asyncio.create_task(self._serve(reader, writer),
                                   name=f"http connection from {_peer(writer)}")
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        connection = _ServerConnection(self, reader, writer)
        try:
            if len(self._connections) > self.limits.max_connections:
                logger.warning("HTTP connection from %s refused: %d connections are open "
                               "(max_connections)", connection.peer, self.limits.max_connections)
                await connection.refuse_busy()
            else:
                await connection.serve()
            await connection.close()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception:
            # A defect in this module, not in a handler: keep the server up, say where.
            logger.exception("HTTP connection from %s failed", connection.peer)
            writer.transport.abort()


class _Timeout(Exception):
    pass


class _ClientGone(Exception):
    pass


class _BodyTooLarge(Exception):
    pass


class _ServerConnection:
    """One client connection: a loop of request/response cycles on one h11.Connection."""

    def __init__(self, server: HttpServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.limits = server.limits
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.h11 = h11.Connection(h11.SERVER,
                                  max_incomplete_event_size=self.limits.max_header_bytes)
        self.peer = _peer(writer)
        self.linger = False
        ssl_object = writer.get_extra_info("ssl_object")
        self.peer_cert: bytes | None = (
            ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        )

    async def serve(self) -> None:
        """Serve requests until the connection must end (then call close())."""
        started: float | None = self.loop.time()
        with contextlib.suppress(_ClientGone):
            while await self._cycle(started):
                self.h11.start_next_cycle()
                started = None

    async def refuse_busy(self) -> None:
        await self._send_error(503, "server_busy", "the server has too many open connections; "
                               "retry in a moment")

    async def _cycle(self, connected_at: float | None) -> bool:
        """Serve one request; whether the connection may carry another."""
        try:
            head = await self._receive_head(connected_at)
        except _Timeout:
            if self.h11.trailing_data[0]:
                await self._send_error(408, "request_timeout", "the request head did not "
                                       f"arrive within {self.limits.header_timeout:g}s")
            return False
        except h11.RemoteProtocolError as exc:
            if not self.h11.trailing_data[1]:  # the peer is still there to read an answer
                await self._send_error(*_protocol_error(exc, self.limits))
            return False
        if head is None:
            return False
        method = head.method.decode("ascii")

        declared = _content_length(head)
        if declared is not None and declared > self.limits.max_body_bytes:
            await self._send_error(413, "body_too_large", f"the request body of {declared} "
                                   f"bytes is larger than the limit of "
                                   f"{self.limits.max_body_bytes} bytes")
            return False
        if self.h11.they_are_waiting_for_100_continue:
            await self._write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        try:
            body = await self._receive_body()
        except _Timeout:
            await self._send_error(408, "request_timeout", "the request body did not arrive "
                                   f"within {self.limits.body_timeout:g}s")
            return False
        except _BodyTooLarge:
            await self._send_error(413, "body_too_large", "the request body is larger than "
                                   f"the limit of {self.limits.max_body_bytes} bytes")
            return False
        except h11.RemoteProtocolError as exc:
            if not self.h11.trailing_data[1]:
                await self._send_error(*_protocol_error(exc, self.limits))
            return False

        target = head.target.decode("ascii")
        try:
            path, query = split_target(target)
        except ApiError as exc:
            response: Response | None = exc.to_response()
        else:
            request = Request(
                method=method, target=target, path=path, query=query,
                headers=Headers(head.headers), body=body, peer=self.peer,
                peer_cert=self.peer_cert, http_version=head.http_version.decode("ascii"),
            )
            response = await self._run_handler(request)
            if response is None:
                return False
        await self._send(response, method, close=False)
        logger.debug("%s %s from %s: %d", method, target.partition("?")[0], self.peer,
                     response.status)
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def _receive_head(self, connected_at: float | None) -> h11.Request | None:
        # A new connection must complete its head within header_timeout of connecting; a
        # kept-alive one may idle for keepalive_timeout, then has header_timeout from its
        # first byte.
        if connected_at is not None:
            deadline, clock_running = connected_at + self.limits.header_timeout, True
        else:
            deadline, clock_running = self.loop.time() + self.limits.keepalive_timeout, False
        while True:
            event = self.h11.next_event()
            if isinstance(event, h11.Request):
                if head_size((event.method, event.target), event.headers) > \
                        self.limits.max_header_bytes:
                    raise h11.RemoteProtocolError("head too large", error_status_hint=431)
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            if event is not h11.NEED_DATA:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before a "
                                              "request")
            if not clock_running and self.h11.trailing_data[0]:
                deadline, clock_running = self.loop.time() + self.limits.header_timeout, True
            self.h11.receive_data(await self._read(deadline))

    async def _receive_body(self) -> bytes:
        deadline = self.loop.time() + self.limits.body_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self._read(deadline))
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.limits.max_body_bytes:
                    raise _BodyTooLarge
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:  # ConnectionClosed mid-body makes h11 raise; nothing else can come here
                raise _ClientGone

    async def _read(self, deadline: float) -> bytes:
        """Up to one chunk; b"" at end of stream (including a reset); _Timeout at deadline."""
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                return await self.reader.read(READ_CHUNK)
        except TimeoutError:
            if timeout.expired():
                raise _Timeout from None
            return b""
        except OSError:  # reset, or a TLS record that does not decrypt
            return b""

    async def _run_handler(self, request: Request) -> Response | None:
        """The handler's response, or None when the client went away (handler cancelled)."""
        handling = asyncio.create_task(self._call_handler(request))
        watching = asyncio.create_task(self._watch_for_disconnect())
        try:
            await asyncio.wait({handling, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not handling.done():
                handling.cancel()
            watching.cancel()
            await asyncio.gather(handling, watching, return_exceptions=True)
        if handling.cancelled():
            logger.debug("%s %s: client %s went away; handler cancelled", request.method,
                         request.path, self.peer)
            return None
        return handling.result()

    async def _call_handler(self, request: Request) -> Response:
        try:
            response = await self.server._handler(request)
            if not isinstance(response, Response):
                raise TypeError(f"the handler returned {type(response).__name__}, "
                                "not a Response")
            return response
        except ApiError as exc:
            return exc.to_response()
        except pydantic.ValidationError as exc:
            return error_response(400, "invalid_request",
                                  f"invalid request: {describe_validation_error(exc)}")
        except Exception:
            logger.exception("handler failed on %s %s from %s", request.method, request.path,
                             self.peer)
            return error_response(500, "internal_error", "the server failed to handle this "
                                  "request; the cause is in the server's log")

    async def _watch_for_disconnect(self) -> None:
        """Return when the client closes; bytes it pipelines meanwhile are kept for h11."""
        kept = 0
        while kept <= self.limits.max_header_bytes:
            try:
                data = await self.reader.read(READ_CHUNK)
            except OSError:
                return
            if not data:
                return
            self.h11.receive_data(data)
            kept += len(data)
        # Enough pipelined input for now: stop reading (flow control holds the rest).
        await asyncio.Event().wait()

    async def _send_error(self, status: int, code: str, message: str) -> None:
        """Answer an error and mark the connection to end. The client may still be sending
        (a body we refused, a head we cut off): close() reads and drops that for a moment,
        so that it reads this answer rather than a connection reset."""
        self.linger = True
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(_ClientGone):
                await self._send(error_response(status, code, message), None, close=True)

    async def _send(self, response: Response, method: str | None, *, close: bool) -> None:
        event, body = self._response_event(response, close)
        data = self.h11.send(event)
        if body and method != "HEAD":
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self._write(data)

    def _response_event(self, response: Response, close: bool) -> tuple[h11.Response, bytes]:
        status = response.status
        body = b"" if status in _NO_BODY_STATUSES else response.body
        fields = [(k, v) for k, v in response.headers
                  if k.lower() not in ("content-length", "transfer-encoding", "connection")]
        if status not in _NO_BODY_STATUSES:
            fields.append(("content-length", str(len(body))))
        if close or any(k.lower() == "connection" and v.lower() == "close"
                        for k, v in response.headers):
            fields.append(("connection", "close"))
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        try:
            return h11.Response(status_code=status, headers=fields, reason=reason), body
        except (h11.LocalProtocolError, TypeError, ValueError) as exc:
            logger.error("handler returned an invalid response (status %r): %s", status, exc)
            failed = error_response(500, "internal_error", "the server produced an invalid "
                                    "response; the cause is in the server's log")
            return self._response_event(failed, close)

    async def _write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.limits.send_timeout):
                await self.writer.drain()
        except (OSError, TimeoutError):
            raise _ClientGone from None

    async def close(self) -> None:
        if self.linger:
            await self._linger()
        await close_stream(self.writer)

    async def _linger(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
        try:
            async with asyncio.timeout(self.limits.linger_timeout):
                while await self.reader.read(READ_CHUNK):
                    pass
        except (OSError, TimeoutError):
            pass


def _protocol_error(exc: h11.RemoteProtocolError, limits: ServerLimits
                    ) -> tuple[int, str, str]:
    status = exc.error_status_hint
    if status == 431:
        return (431, "headers_too_large", "the request line and headers are larger than the "
                f"limit of {limits.max_header_bytes} bytes")
    return status, "bad_http", f"malformed HTTP request: {exc}"


def _content_length(head: h11.Request) -> int | None:
    for name, value in head.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked that it is one decimal number
    return None


def _peer(writer: asyncio.StreamWriter) -> tuple[str, int] | None:
    name = writer.get_extra_info("peername")
    return (name[0], name[1]) if isinstance(name, tuple) and len(name) >= 2 else None


def _sock_peer(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return "a closed socket"

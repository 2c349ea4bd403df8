"""TLS run by hand over memory BIOs, for every TLS leg of the data path: the proxy's side
of a PostgreSQL client's TLS and of the agents' tunnel connections (`accept_tls`), the
agent's side of its tunnel connections and of its TLS to the database (`connect_tls`).

Why not `loop.start_tls`:
- when OpenSSL refuses the client's certificate during the handshake (one from another
  CA, say), it writes a TLS alert that names the cause ("unknown ca"), and both asyncio's
  and uvloop's SSL protocols drop it: they abort the socket without sending what OpenSSL
  left in the outgoing buffer, so psql can only say "server closed the connection
  unexpectedly". Here the handshake's output is always flushed before the socket is
  closed, so psql prints e.g. `SSL error: tlsv1 alert unknown ca`;
- it costs less per chunk: uvloop's SSL protocol learns that a chunk is fully decrypted
  from an SSLWantReadError raised by one more read, every time; here the BIOs' pending
  counts say so. Measured on the agent's database leg (pgbench -S -c 8 through `teleport
  start`, both in the same lab run, CPU of the process per transaction, two rounds each):
  40.3-41.7 us against 42.1-43.6 with uvloop's; on the proxy's client leg the two were the
  same within the noise (42.5 and 49.9 against 44.7 and 50.7). With the tunnel's two legs
  too, the distributed path went from 30.6 to 29.6 us per transaction in the proxy and
  from 53.7 to 51 in the agent (one run each, two rounds).

`accept_tls(raw, protocol, context, pending=b"")` runs the server side of the handshake on
`raw` (a connected asyncio transport whose protocol it replaces), `connect_tls(raw,
protocol, context, server_hostname)` the client side; both return a `TlsTransport` for
`protocol` once it succeeds, or raise `TlsHandshakeFailed` after any alert went out.
`TlsTransport` is a complete `asyncio.Transport` (the relay and the all-in-one agent take
it over with `set_protocol`):
- every chunk read from the socket is decrypted and handed on in one `data_received` (all
  the records it held, joined);
- every `write` is encrypted at once and written to the socket in one `write`;
- flow control is the socket's: `pause_reading` pauses it (what was read waits, still
  encrypted, in the BIO: at most one read), its `pause_writing` / `resume_writing` reach
  `protocol`;
- `close` sends close_notify after what is buffered, as PostgreSQL does.
It is also the protocol of the raw transport (one object: one call less per chunk on the
hot path). Pushing 256 KiB writes through the proxy's client leg cost 0.42-0.46 against
0.46-0.50 ms of CPU per MB with uvloop's.

Never: deliver a byte before the handshake verified what the context requires, keep
reading a socket whose reader paused, swallow an alert, or let an SSL error escape as a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

logger = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024  # one call of SSLObject.read takes at most one record (16 KiB)

_HANDSHAKE, _OPEN, _CLOSED = 0, 1, 2


class TlsHandshakeFailed(ConnectionError):
    """The TLS handshake with the peer failed; `reason` is OpenSSL's (e.g. "certificate
    verify failed: unable to get local issuer certificate"). Any alert was sent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


class TlsTransport(asyncio.Transport):
    """One TLS connection over a raw asyncio transport (see the module docstring): its
    server side, or its client side when `server_hostname` is given (the name checked
    against the server's certificate when the context checks host names). Built by
    `accept_tls` and `connect_tls`; also the raw transport's protocol."""

    def __init__(
        self,
        raw: asyncio.Transport,
        context: ssl.SSLContext,
        loop: asyncio.AbstractEventLoop,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__()
        self._raw = raw
        self._loop = loop
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        if server_hostname is None:
            self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        else:
            self._ssl = context.wrap_bio(
                self._incoming, self._outgoing, server_side=False,
                server_hostname=server_hostname,
            )
        self._peer = "client" if server_hostname is None else "server"
        self._protocol: Any = None
        self._state = _HANDSHAKE
        self._waiter: asyncio.Future[None] | None = loop.create_future()
        self._reading_paused = False
        self._closing = False
        self._protocol_told = False  # the app protocol saw connection_made
        self._lost_reported = False
        self._eof = False  # the socket ended (or close_notify): tell the protocol once read
        self._eof_told = False
        self._raw_lost = False
        self._lost_exc: Exception | None = None
        self._deliver_scheduled = False

    # -- the handshake -------------------------------------------------------------------------

    def _handshake_step(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ValueError) as exc:
            self._fail_handshake(_reason(exc))
            return
        self._flush()
        self._state = _OPEN
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail_handshake(self, reason: str) -> None:
        self._flush()  # the alert: the whole point of this module
        self._state = _CLOSED
        self._closing = True
        self._raw.close()  # after the buffered alert is written
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TlsHandshakeFailed(reason))

    def _start(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._protocol_told = True
        protocol.connection_made(self)
        if self._incoming.pending or self._ssl.pending() or self._eof:
            # Bytes the peer sent right after its Finished (and maybe its end, or the
            # socket's, all before the protocol was connected): hand them on now.
            self._deliver(after_loss=self._raw_lost)
        if self._raw_lost and not self._lost_reported:
            self._lost_reported = True
            protocol.connection_lost(self._lost_exc)

    # -- the raw transport's protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        pass  # set_protocol on a connected transport never calls this

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self._state == _OPEN:
            self._deliver()
        elif self._state == _HANDSHAKE:
            self._handshake_step()

    def eof_received(self) -> bool:
        self._incoming.write_eof()
        self._eof = True
        if self._state == _HANDSHAKE:
            self._fail_handshake(
                f"the {self._peer} closed the connection during the TLS handshake"
            )
        elif self._state == _OPEN:
            self._deliver()  # what came before the end, then the end
        return False  # a TLS connection is never half-open: the raw transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._raw_lost = True
        self._lost_exc = exc
        self._state = _CLOSED
        self._closing = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                TlsHandshakeFailed(f"the connection was lost during the TLS handshake ({exc})")
                if exc is not None
                else TlsHandshakeFailed(
                    f"the {self._peer} closed the connection during the handshake"
                )
            )
        if self._protocol_told and not self._lost_reported:
            self._lost_reported = True
            self._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._protocol_told:
            self._protocol.pause_writing()

    def resume_writing(self) -> None:
        if self._protocol_told:
            self._protocol.resume_writing()

    # -- decrypting ------------------------------------------------------------------------------

    def _deliver(self, after_loss: bool = False) -> None:
        """Decrypt what the BIO holds and hand it to the protocol in one call (`after_loss`:
        also once the socket is gone, for what arrived before the protocol was connected)."""
        if self._reading_paused or not self._protocol_told:
            return
        if self._state != _OPEN and not after_loss:
            return
        read = self._ssl.read
        incoming = self._incoming
        first = b""
        more: list[bytes] | None = None
        try:
            while True:
                chunk = read(_READ_SIZE)
                if not chunk:
                    self._eof = True
                    break
                if not first:
                    first = chunk
                elif more is None:
                    more = [first, chunk]
                else:
                    more.append(chunk)
                if not incoming.pending and not self._ssl.pending():
                    break  # the common case: no exception raised to learn it
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof = True  # close_notify
        except ssl.SSLEOFError:
            self._eof = True  # the socket ended without close_notify (libpq does that)
        except ssl.SSLError as exc:
            self._fatal(f"TLS error from the {self._peer}: {_reason(exc)}")
            return
        if self._outgoing.pending:
            self._flush()  # a post-handshake message (KeyUpdate) needs an answer
        if first:
            self._protocol.data_received(b"".join(more) if more is not None else first)
        if self._eof and not self._eof_told and not self._reading_paused:
            if after_loss:
                self._eof_told = True
                self._protocol.eof_received()
            else:
                self._tell_eof()

    def _tell_eof(self) -> None:
        self._eof_told = True
        keep = self._protocol.eof_received()
        if keep:
            logger.debug("the protocol asked to keep a TLS connection half-open; closing")
        self.close()

    def _fatal(self, reason: str) -> None:
        logger.info("closing a TLS connection with a %s: %s", self._peer, reason)
        self._flush()
        self._state = _CLOSED
        self._closing = True
        self._raw.close()

    def _scheduled_deliver(self) -> None:
        self._deliver_scheduled = False
        self._deliver()

    # -- encrypting ------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._outgoing.pending:
            data = self._outgoing.read()
            if not self._raw.is_closing():
                self._raw.write(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN or self._closing or not data:
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            self._fatal(f"cannot encrypt for the {self._peer}: {_reason(exc)}")
            return
        self._raw.write(self._outgoing.read())

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        raise NotImplementedError("a TLS connection cannot be half-closed")

    def can_write_eof(self) -> bool:
        return False

    # -- the transport API --------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        if name == "compression":
            return self._ssl.compression()
        return self._raw.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def close(self) -> None:
        """Send close_notify after the buffered bytes, then close the socket."""
        if self._closing:
            return
        self._closing = True
        if self._state == _OPEN:
            # WantRead: we do not wait for the peer's close_notify
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._ssl.unwrap()
            self._flush()
        self._state = _CLOSED
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._state = _CLOSED
        self._raw.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        if self._reading_paused:
            return
        self._reading_paused = True
        if not self._raw.is_closing():
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        if not self._raw.is_closing():
            self._raw.resume_reading()
        if not self._deliver_scheduled and (
            self._incoming.pending or self._ssl.pending() or self._eof
        ):
            self._deliver_scheduled = True  # what was decrypted-to-be while paused
            self._loop.call_soon(self._scheduled_deliver)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()  # type: ignore[attr-defined, no-any-return]

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() + self._outgoing.pending


async def accept_tls(
    raw: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    pending: bytes = b"",
) -> TlsTransport:
    """The server side of a TLS handshake on `raw` (whose protocol is replaced); `pending`
    are bytes of the handshake already read. Returns the TLS transport, with `protocol`
    connected to it; raises TlsHandshakeFailed (the alert, if any, sent). The caller bounds
    the time (asyncio.timeout) and aborts `raw` when it runs out."""
    tls = TlsTransport(raw, context, asyncio.get_running_loop())
    return await _handshake(tls, raw, protocol, pending)


async def connect_tls(
    raw: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    server_hostname: str,
) -> TlsTransport:
    """The client side of a TLS handshake on `raw` (whose protocol is replaced), as
    `accept_tls`; `server_hostname` is sent (SNI) and checked against the server's
    certificate when `context` checks host names."""
    tls = TlsTransport(raw, context, asyncio.get_running_loop(), server_hostname)
    return await _handshake(tls, raw, protocol, b"")


async def _handshake(
    tls: TlsTransport, raw: asyncio.Transport, protocol: asyncio.BaseProtocol, pending: bytes
) -> TlsTransport:
    waiter = tls._waiter
    assert waiter is not None
    raw.set_protocol(tls)
    if not tls._ssl.server_side:
        tls._handshake_step()  # the client speaks first: its ClientHello
    if pending:
        tls.data_received(pending)
    if raw.is_closing() and not waiter.done():
        tls.connection_lost(None)
    await waiter
    tls._start(protocol)
    return tls

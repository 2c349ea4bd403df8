"""TLS over memory BIOs (`dataplane.tls_transport`), against
Python's own TLS client over real loopback sockets: the alert of a refused certificate
reaches the client, bytes arrive intact both ways, a paused reader stops the socket, close
sends close_notify after what is buffered.

Its cost against uvloop's TLS transport is in the module's docstring (measured with real
pgbench runs, not asserted here: no timed asserts in tests)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from control.ca import ClusterCAs
from dataplane.relay import Inbox
from dataplane.tls_transport import TlsHandshakeFailed, TlsTransport, accept_tls, connect_tls
from tests.dataplane.support import Pki, UserCert
from transport.tls import peer_certificate, server_context


class Collect(asyncio.Protocol):
    """Gathers what the client sends; optionally echoes it."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.data = bytearray()
        self.transport: Any = None
        loop = asyncio.get_running_loop()  # made inside the test's loop
        self.eof: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.chunks = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks += 1
        self.data += data
        if self.echo:
            self.transport.write(data)

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


def server_ctx(pki: Pki) -> ssl.SSLContext:
    creds = pki.host("proxy-tls", "proxy")
    ctx = server_context(
        creds.cert_pem, creds.key_pem, [pki.cas.user.certificate_pem()], "required"
    )
    # As the proxy's PostgreSQL context: no session tickets (libpq never resumes). With
    # tickets, a client that closes at once would get them after its close, answer with
    # RST, and the kernel would drop what it had sent: a race of the test, not of TLS.
    ctx.num_tickets = 0
    return ctx


def client_ctx(pki: Pki, cert: UserCert | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.host_ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
    return ctx


async def serve_one(
    ctx: ssl.SSLContext,
    client: Callable[[int], Any],
    protocol: asyncio.Protocol,
    body: Callable[[TlsTransport], Awaitable[None]] | None = None,
) -> tuple[Any, TlsTransport | TlsHandshakeFailed]:
    """Accept one connection, run the handshake (after the client's 'S' cue, as the proxy
    does), then `body`; the client runs in a thread. Returns (client result, transport or
    the handshake failure)."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    result: dict[str, Any] = {}

    def run_client() -> None:
        try:
            result["value"] = client(port)
        except BaseException as exc:  # handed back to the test
            result["value"] = exc

    thread = threading.Thread(target=run_client, daemon=True)
    thread.start()
    sock, _ = await loop.sock_accept(listener)
    listener.close()
    inbox = Inbox()
    raw, _ = await loop.connect_accepted_socket(lambda: inbox, sock)
    raw.write(b"S")
    outcome: TlsTransport | TlsHandshakeFailed
    try:
        outcome = await accept_tls(raw, protocol, ctx, inbox.take())
    except TlsHandshakeFailed as exc:
        outcome = exc
    if body is not None and isinstance(outcome, TlsTransport):
        await body(outcome)
    await asyncio.to_thread(thread.join, 30)
    return result.get("value"), outcome


def connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    assert raw.recv(1) == b"S"
    return ctx.wrap_socket(raw, server_hostname="localhost")


def run(coro: Awaitable[Any]) -> Any:
    return uvloop.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


def alert_seen(pki: Pki, cert: UserCert | None) -> Callable[[int], str]:
    """A client that connects with `cert` (None: none), sends a byte string and returns
    the TLS alert it then reads ("no alert" when the server answered instead). With TLS
    1.3 the handshake is over on the client's side before the server checks the
    certificate, so the refusal arrives as the first read."""

    def client(port: int) -> str:
        with connect(port, client_ctx(pki, cert)) as tls:
            tls.sendall(b"hello")
            try:
                tls.recv(100)
            except ssl.SSLError as exc:
                return str(exc)
            return "no alert"

    return client


def test_a_certificate_from_another_ca_gets_the_alert_that_names_it(
    pki: Pki, tmp_path: Path
) -> None:
    impostor = ClusterCAs.load_or_create(tmp_path / "impostor", pki.cluster)
    cert = pki.route_cert("alice", ["admin"], "pg", cas=impostor)


    async def main() -> tuple[Any, Any]:
        return await serve_one(server_ctx(pki), alert_seen(pki, cert), Collect())

    said, outcome = run(main())
    assert "TLSV1_ALERT_UNKNOWN_CA" in said  # what psql prints as "tlsv1 alert unknown ca"
    assert isinstance(outcome, TlsHandshakeFailed)
    assert "certificate verify failed" in outcome.reason


def test_no_client_certificate_when_one_is_required_gets_an_alert(pki: Pki) -> None:

    async def main() -> tuple[Any, Any]:
        return await serve_one(server_ctx(pki), alert_seen(pki, None), Collect())

    said, outcome = run(main())
    assert "ALERT_CERTIFICATE_REQUIRED" in said
    assert isinstance(outcome, TlsHandshakeFailed)


def test_bytes_arrive_intact_both_ways_and_the_peer_certificate_is_known(pki: Pki) -> None:
    cert = pki.route_cert("alice", ["admin"], "pg")
    payload = os.urandom(6 * 1024 * 1024 + 123)
    box: dict[str, Collect] = {}

    def client(port: int) -> bytes:
        with connect(port, client_ctx(pki, cert)) as tls:
            # One thread (an SSLSocket is not for two); the server buffers its echo.
            tls.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = tls.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
            return bytes(got)

    peer: dict[str, bytes | None] = {}

    async def body(transport: TlsTransport) -> None:
        peer["der"] = peer_certificate(transport)
        await box["p"].eof

    async def main() -> tuple[Any, Any]:
        box["p"] = Collect(echo=True)
        return await serve_one(server_ctx(pki), client, box["p"], body)

    echoed, outcome = run(main())
    protocol = box["p"]
    assert isinstance(outcome, TlsTransport)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert bytes(protocol.data) == payload
    # many TLS records per socket read are handed on together, not one call per record
    assert protocol.chunks < len(payload) // 16384
    assert peer["der"] == ssl.PEM_cert_to_DER_cert(cert.cert_file.read_text())


def test_a_paused_reader_stops_the_socket_and_loses_nothing(pki: Pki) -> None:
    cert = pki.route_cert("alice", ["admin"], "pg")
    payload = os.urandom(32 * 1024 * 1024)
    box: dict[str, Collect] = {}
    progress: dict[str, int] = {"sent": 0}

    def client(port: int) -> None:
        with connect(port, client_ctx(pki, cert)) as tls:
            view = memoryview(payload)
            while progress["sent"] < len(payload):
                progress["sent"] += tls.send(view[progress["sent"] : progress["sent"] + 65536])
            tls.unwrap()

    async def body(transport: TlsTransport) -> None:
        protocol = box["p"]
        transport.pause_reading()
        assert not transport.is_reading()
        await asyncio.sleep(1.0)
        held = len(protocol.data)
        stuck_at = progress["sent"]
        await asyncio.sleep(0.5)
        # Nothing more reached the protocol, and the client is blocked by TCP: the bytes
        # in between sit in socket buffers, not in ours.
        assert len(protocol.data) == held
        assert progress["sent"] == stuck_at < len(payload)
        assert transport.get_write_buffer_size() == 0
        transport.resume_reading()
        await protocol.eof

    async def main() -> tuple[Any, Any]:
        box["p"] = Collect()
        return await serve_one(server_ctx(pki), client, box["p"], body)

    failure, outcome = run(main())
    protocol = box["p"]
    assert failure is None
    assert isinstance(outcome, TlsTransport)
    assert hashlib.sha256(protocol.data).digest() == hashlib.sha256(payload).digest()


def test_close_flushes_what_is_buffered_then_sends_close_notify(pki: Pki) -> None:
    cert = pki.route_cert("alice", ["admin"], "pg")
    payload = os.urandom(3 * 1024 * 1024)
    box: dict[str, Collect] = {}

    def client(port: int) -> tuple[bytes, str]:
        with connect(port, client_ctx(pki, cert)) as tls:
            got = bytearray()
            try:
                while chunk := tls.recv(1 << 20):
                    got += chunk
                end = "close_notify"  # recv() returns b"" only on close_notify
            except ssl.SSLEOFError:
                end = "eof without close_notify"
            return bytes(got), end

    async def body(transport: TlsTransport) -> None:
        transport.write(payload)
        transport.close()
        assert transport.is_closing()
        transport.write(b"after close: dropped")
        await box["p"].lost

    async def main() -> tuple[Any, Any]:
        box["p"] = Collect()
        return await serve_one(server_ctx(pki), client, box["p"], body)

    (got, end), _ = run(main())
    assert got == payload
    assert end == "close_notify"


def test_the_client_leaving_reaches_the_protocol(pki: Pki) -> None:
    cert = pki.route_cert("alice", ["admin"], "pg")
    box: dict[str, Collect] = {}

    def client(port: int) -> None:
        tls = connect(port, client_ctx(pki, cert))
        tls.sendall(b"last words")
        tls.close()  # no close_notify: a plain TCP close, as a killed psql

    async def body(transport: TlsTransport) -> None:
        await box["p"].lost

    async def main() -> tuple[Any, Any]:
        box["p"] = Collect()
        return await serve_one(server_ctx(pki), client, box["p"], body)

    run(main())
    protocol = box["p"]
    assert bytes(protocol.data) == b"last words"
    assert protocol.eof.done()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05hello"])
def test_garbage_instead_of_a_handshake_is_a_handshake_failure(
    pki: Pki, garbage: bytes
) -> None:
    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            assert raw.recv(1) == b"S"
            raw.sendall(garbage)
            with contextlib.suppress(OSError):
                return raw.recv(100)
        return b""

    async def main() -> tuple[Any, Any]:
        return await serve_one(server_ctx(pki), client, Collect())

    answer, outcome = run(main())
    assert isinstance(outcome, TlsHandshakeFailed)
    assert answer[:1] in (b"", b"\x15")  # nothing, or an alert record


# -- the client side (`connect_tls`: the agent's TLS to its database) ----------------------------


def tls_server(pki: Pki, work: Callable[[ssl.SSLSocket], Any]) -> tuple[int, Callable[[], Any]]:
    """Python's own TLS server (the host certificate, for "localhost" and 127.0.0.1) in a
    thread: it accepts one connection, runs `work` on it and keeps what it returns (or the
    exception it raised). Returns (port, a function that waits for that outcome)."""
    creds = pki.host("db-tls", "db")
    ctx = server_context(creds.cert_pem, creds.key_pem, [], "none")
    listener = socket.create_server(("127.0.0.1", 0))
    result: dict[str, Any] = {}

    def serve() -> None:
        try:
            sock, _ = listener.accept()
            with ctx.wrap_socket(sock, server_side=True) as tls:
                result["value"] = work(tls)
        except BaseException as exc:  # handed back to the test
            result["value"] = exc
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def outcome() -> Any:
        thread.join(30)
        return result.get("value")

    return listener.getsockname()[1], outcome


async def dial(
    port: int, protocol: asyncio.Protocol, ctx: ssl.SSLContext, hostname: str
) -> TlsTransport:
    loop = asyncio.get_running_loop()
    raw, _ = await loop.create_connection(Inbox, "127.0.0.1", port)
    try:
        return await connect_tls(raw, protocol, ctx, hostname)  # type: ignore[arg-type]
    except BaseException:
        raw.abort()
        raise


def database_client_ctx(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.host_ca_file))  # verify-full


def test_the_client_side_carries_bytes_both_ways_and_ends_with_close_notify(pki: Pki) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 7)

    def echo(tls: ssl.SSLSocket) -> str:
        got = 0
        while got < len(payload):
            chunk = tls.recv(1 << 20)
            if not chunk:
                return "ended early"
            tls.sendall(chunk)
            got += len(chunk)
        try:
            return "close_notify" if tls.recv(1) == b"" else "more bytes"
        except ssl.SSLEOFError:
            return "eof without close_notify"

    port, outcome = tls_server(pki, echo)
    box: dict[str, Any] = {}

    async def main() -> None:
        protocol = Collect()
        transport = await dial(port, protocol, database_client_ctx(pki), "localhost")
        assert protocol.transport is transport
        assert transport.get_extra_info("ssl_object").server_hostname == "localhost"
        transport.write(payload)
        while len(protocol.data) < len(payload) and not protocol.lost.done():
            await asyncio.sleep(0.01)
        box["echoed"] = bytes(protocol.data)
        transport.close()
        await protocol.lost

    run(main())
    assert box["echoed"] == payload
    assert outcome() == "close_notify"


@pytest.mark.parametrize(
    ("hostname", "why"),
    [("db.example.com", "Hostname mismatch"), ("localhost", "unable to get local issuer")],
)
def test_a_server_the_client_cannot_verify_fails_the_handshake_and_hears_why(
    pki: Pki, tmp_path: Path, hostname: str, why: str
) -> None:
    port, outcome = tls_server(pki, lambda tls: "handshake done")
    ctx = database_client_ctx(pki)
    if hostname == "localhost":  # trust another CA than the one that signed the server
        other = ClusterCAs.load_or_create(tmp_path / "other", pki.cluster)
        (tmp_path / "other.pem").write_bytes(other.host.certificate_pem())
        ctx = ssl.create_default_context(cafile=str(tmp_path / "other.pem"))

    async def main() -> TlsHandshakeFailed:
        with pytest.raises(TlsHandshakeFailed) as failed:
            await dial(port, Collect(), ctx, hostname)
        return failed.value

    failure = run(main())
    assert failure.reason.startswith("certificate verify failed") and why in failure.reason
    server_saw = outcome()
    # The alert was sent before the socket closed: the server knows why, too.
    assert isinstance(server_saw, ssl.SSLError) and "ALERT" in str(server_saw)

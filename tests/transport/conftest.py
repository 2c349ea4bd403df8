"""Helpers for the HTTP tests: event loops (asyncio and uvloop), a throwaway PKI, raw sockets.

Every test runs against real loopback sockets; TLS uses real certificates made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from transport import tls
from transport.http import Handler, HttpServer, Request, Response, ServerLimits

#: Small limits so that every timeout in the tests fires quickly.
FAST = ServerLimits(header_timeout=0.5, body_timeout=0.5, keepalive_timeout=0.5,
                    send_timeout=2.0, linger_timeout=0.3)

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Run a coroutine to completion on a fresh loop of each kind (the processes use uvloop)."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(20):
                return await coro

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


@dataclass
class Serving:
    server: HttpServer
    host: str
    port: int
    scheme: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    async def exchange(self, data: bytes, timeout: float = 2.0) -> bytes:
        """Send raw bytes on a new connection; everything the server sends until it closes."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(data)
            return await read_all(reader, timeout)
        finally:
            await close_quietly(writer)


@contextlib.asynccontextmanager
async def serving(handler: Handler, limits: ServerLimits = FAST,
                  ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Serving]:
    server = HttpServer(handler, limits)
    host, port = await server.listen("127.0.0.1", 0, ssl=ssl_context)
    try:
        yield Serving(server, host, port, "https" if ssl_context else "http")
    finally:
        await server.close()


class Parked:
    """A handler that waits forever (a long poll with nothing new) and records whether it
    was entered and cancelled."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def __call__(self, request: Request) -> Response:
        self.entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("a parked handler is only ever cancelled")


# --- raw clients ------------------------------------------------------------------------


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until the server closes (a TimeoutError if it does not within `timeout`)."""
    chunks = []
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_responses(data: bytes, methods: list[bytes] | None = None
                    ) -> list[tuple[h11.Response, bytes]]:
    """Split raw bytes from the server into (response head, body) pairs with h11; one
    pair per request method in `methods`, fewer if the data ends early."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    out: list[tuple[h11.Response, bytes]] = []
    for method in methods or [b"GET"]:
        if out:
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        head: h11.Response | None = None
        body = b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                out.append((head, body))
                break
            elif not isinstance(event, h11.InformationalResponse):
                return out
    return out


async def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait until `condition()` holds (an AssertionError after `timeout` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    """Close a test's raw connection and wait until the loop has let go of it."""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def status_line(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


# --- a throwaway PKI --------------------------------------------------------------------


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _issue(directory: Path, name: str, issuer: Issued | None, *, ca: bool,
           usage: ExtendedKeyUsageOID | None = None) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                       critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    signer = issuer.key if issuer else key
    cert = builder.sign(signer, hashes.SHA256())
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return Issued(cert, key, cert_path, key_path)


@dataclass
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    other_client: Issued

    def server_context(self, client_certs: ssl.VerifyMode = ssl.CERT_NONE) -> ssl.SSLContext:
        """The product's server context (transport.tls) with this PKI's server certificate."""
        auth = {ssl.CERT_NONE: "none", ssl.CERT_OPTIONAL: "optional",
                ssl.CERT_REQUIRED: "required"}[client_certs]
        return tls.server_context(self.server.cert_path, self.server.key_path,
                                  client_cas=[self.ca.pem] if auth != "none" else (),
                                  client_auth=auth)

    def client_context(self, identity: Issued | None = None, trust: Issued | None = None
                       ) -> ssl.SSLContext:
        """The product's client context trusting `trust` (this PKI's CA by default)."""
        return tls.client_context(
            [(trust or self.ca).pem],
            identity.cert_path if identity else None,
            identity.key_path if identity else None,
        )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = _issue(d, "test-ca", None, ca=True)
    other = _issue(d, "other-ca", None, ca=True)
    return Pki(
        ca=ca,
        server=_issue(d, "server", ca, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH),
        client=_issue(d, "alice", ca, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
        other_ca=other,
        other_client=_issue(d, "mallory", other, ca=False,
                            usage=ExtendedKeyUsageOID.CLIENT_AUTH),
    )


# --- a server on a background thread, for synchronous callers ----------------------------


@contextlib.contextmanager
def server_thread(handler: Handler, limits: ServerLimits = FAST,
                  ssl_context: ssl.SSLContext | None = None) -> Iterator[Serving]:
    """An HttpServer on its own event loop in a thread (for request_sync and fuzzing)."""
    loop = asyncio.new_event_loop()
    started: list[Serving] = []

    async def start() -> None:
        server = HttpServer(handler, limits)
        host, port = await server.listen("127.0.0.1", 0, ssl=ssl_context)
        started.append(Serving(server, host, port, "https" if ssl_context else "http"))

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield started[0]
    finally:
        asyncio.run_coroutine_threadsafe(started[0].server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class ErrorLog(logging.Handler):
    """Collects the ERROR records of the `transport.http` logger (defects, handler crashes)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def http_errors() -> Iterator[ErrorLog]:
    log = ErrorLog()
    logger = logging.getLogger("transport.http")
    logger.addHandler(log)
    try:
        yield log
    finally:
        logger.removeHandler(log)

"""The web port's dispatcher: TLS goes to the API with every byte unread, PostgreSQL to the
frontend, anything else (or silence) is closed; startup packets are bounded."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterator

import psycopg
import pytest
import uvloop
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dataplane.postgres import encode
from dataplane.postgres import messages as m
from dataplane.proxy.listener import Kind, PeekListener, classify
from tests.dataplane.conftest import DataPath, Pg
from tests.dataplane.support import Pki, client_hello, conninfo_for
from tests.fixtures.pg import run_psql


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01", Kind.TLS),
        (encode(m.SSLRequest()), Kind.POSTGRES),
        (encode(m.GSSENCRequest()), Kind.POSTGRES),
        (encode(m.CancelRequest(1, 2))[:8], Kind.POSTGRES),
        (encode(m.StartupMessage({"user": "a"}))[:8], Kind.POSTGRES),
        (struct.pack("!ii", 40, 2 << 16), Kind.POSTGRES),  # protocol 2.0: answered properly
        (b"GET / HTTP/1.1\r\n", Kind.UNKNOWN),
        (struct.pack("!ii", 20_000, 196608), Kind.UNKNOWN),  # over the startup limit
        (struct.pack("!ii", 8, 12345), Kind.UNKNOWN),
        (b"\x00\x00\x00", Kind.NEED_MORE),
        (b"", Kind.NEED_MORE),
        (b"\x01\x02", Kind.UNKNOWN),
    ],
)
def test_classify(head: bytes, kind: Kind) -> None:
    assert classify(head) is kind


def run(coro: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(coro(), 30))


def dispatched(sends: list[tuple[bytes, int]], direct_tls: bool = False) -> dict[str, bytes]:
    """What each owner of a listener received from connections that sent these bytes (each
    in so many pieces, 20 ms apart) and closed: "postgres", "tls" (the API) and, when the
    listener serves it, "postgres-tls" (direct TLS)."""
    got: dict[str, bytes] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def owner(kind: str) -> Callable[[socket.socket, str], Awaitable[None]]:
            async def handle(sock: socket.socket, peer: str) -> None:
                data = b""
                while chunk := await loop.sock_recv(sock, 4096):  # to the client's close
                    data += chunk
                got[kind] = data
                sock.close()
                if len(got) == len(sends):
                    done.set()

            return handle

        listener = PeekListener(owner("postgres"), owner("tls"),
                                on_postgres_tls=owner("postgres-tls") if direct_tls else None)
        host, port = await listener.listen("127.0.0.1", 0)
        try:
            for data, pieces in sends:
                _, writer = await asyncio.open_connection(host, port)
                step = -(-len(data) // pieces)
                for start in range(0, len(data), step):
                    writer.write(data[start : start + step])
                    await writer.drain()
                    await asyncio.sleep(0.02)
                writer.close()
            await asyncio.wait_for(done.wait(), 5)
        finally:
            await listener.close()

    run(main)
    return got


def test_dispatch_leaves_every_byte_unread_for_the_owner() -> None:
    hello = b"\x16\x03\x01\x00\x05hello"  # a whole TLS record
    startup = encode(m.SSLRequest())
    # one byte at a time: the listener waits for 8 (and for a whole TLS record)
    got = dispatched([(hello, len(hello)), (startup, len(startup))])
    assert got == {"tls": hello, "postgres": startup}


def test_direct_tls_and_the_api_are_told_apart_by_their_alpn() -> None:
    direct, api = client_hello(["postgresql"]), client_hello(["http/1.1"])
    startup = encode(m.SSLRequest())
    got = dispatched([(direct, 3), (api, 1), (startup, 1)], direct_tls=True)  # a hello in
    assert got == {"postgres-tls": direct, "tls": api, "postgres": startup}  # pieces waits


def test_garbage_and_silence_are_closed() -> None:
    async def main() -> None:
        called: list[str] = []

        async def handle(sock: socket.socket, peer: str) -> None:
            called.append(peer)
            sock.close()

        listener = PeekListener(handle, handle, first_bytes_timeout=0.5)
        host, port = await listener.listen("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):  # closed with unread bytes
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # silence: closed
            assert asyncio.get_running_loop().time() - started >= 0.45
            writer.close()
            assert called == []
        finally:
            await listener.close()

    run(main)


@pytest.mark.slow
def test_gssenc_is_declined_and_the_startup_goes_on(path: DataPath) -> None:
    with socket.create_connection(("127.0.0.1", path.web_port), timeout=5) as sock:
        sock.sendall(encode(m.GSSENCRequest()))
        assert sock.recv(1) == b"N"
        sock.sendall(encode(m.SSLRequest()))
        assert sock.recv(1) == b"S"
        ctx = ssl.create_default_context(cafile=str(path.pki.host_ca_file))
        cert = path.cert("alice")
        ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(encode(m.StartupMessage({"user": "alice", "database": "main"})))
            assert tls.recv(1) == b"R"  # AuthenticationOk, from the agent


@pytest.mark.slow
def test_an_oversized_or_broken_startup_is_refused(path: DataPath) -> None:
    with socket.create_connection(("127.0.0.1", path.web_port), timeout=5) as sock:
        sock.sendall(encode(m.SSLRequest()) + b"x")  # bytes injected before TLS
        answer = sock.recv(4096)
        assert answer.startswith(b"E") and b"could have been injected" in answer
    with socket.create_connection(("127.0.0.1", path.web_port), timeout=5) as sock:
        sock.sendall(struct.pack("!ii", 9000, 196608) + b"u" * 8992)
        answer = sock.recv(4096)
        assert answer.startswith(b"E") and b"FATAL" in answer


@pytest.fixture(scope="module")
def postgres_port(pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey
                  ) -> Iterator[tuple[DataPath, int]]:
    """A proxy with the optional `postgres_listen_addr`, an agent behind it, and that port."""
    dp = DataPath(pki, pg, signing_key)
    dp.bundle_bytes = dp.next_bundle()
    try:
        proxy = dp.start_proxy("proxy-pgport", postgres_addr=("127.0.0.1", 0))
        dp.start_agent("agent-pgport")
        yield dp, proxy.postgres_address[1]  # type: ignore[index]
    finally:
        dp.close()


@pytest.mark.slow
def test_the_optional_postgres_port(postgres_port: tuple[DataPath, int]) -> None:
    dp, port = postgres_port
    dsn = conninfo_for(port, dp.cert("alice"), dp.pki.host_ca_file, "alice", "main")
    done = run_psql(dsn, "select 'postgres port'")
    assert done.stdout.strip() == "postgres port", done.stderr
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello")  # HTTPS is not served here
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # closed with unread bytes
            assert sock.recv(100) == b""


@pytest.mark.slow
@pytest.mark.skipif(psycopg.pq.version() < 170000,
                    reason="psycopg's libpq has no sslnegotiation=direct")
def test_direct_tls_on_the_postgres_port_needs_the_postgresql_alpn(
    postgres_port: tuple[DataPath, int]
) -> None:
    dp, port = postgres_port
    cert = dp.cert("alice")
    dsn = conninfo_for(port, cert, dp.pki.host_ca_file, "alice", "main",
                       sslnegotiation="direct")
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("select 'direct tls'").fetchone() == ("direct tls",)
    # TLS at once without offering "postgresql": closed, as PostgreSQL 17 does.
    ctx = ssl.create_default_context(cafile=str(dp.pki.host_ca_file))
    ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(raw, server_hostname="localhost")

"""PostgreSQL 17's direct TLS (`sslnegotiation=direct`): a client that starts TLS at once,
offering the ALPN protocol "postgresql", is told from an HTTPS client by its ClientHello,
before a byte is consumed, and served as if it had sent an SSLRequest first."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable

import psycopg
import pytest
import uvloop
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.postgres import encode
from dataplane.postgres import messages as m
from dataplane.proxy.client_hello import MAX_FRAGMENT, offered_alpn, record_size
from dataplane.proxy.listener import Kind, PeekListener, classify_tls
from tests.dataplane.conftest import DataPath, Pg
from tests.dataplane.support import Pki, conninfo_for


def client_hello(alpn: list[str] | None) -> bytes:
    """The first flight of a real TLS client (Python's OpenSSL) offering `alpn`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="db")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("alpn", [
    None, ["postgresql"], ["http/1.1"], ["h2", "http/1.1"], ["http/1.1", "postgresql"],
])
def test_the_alpn_names_of_a_real_client_hello(alpn: list[str] | None) -> None:
    hello = client_hello(alpn)
    assert record_size(hello) == len(hello)  # one record, whole
    expected = tuple(name.encode() for name in alpn or ())
    assert offered_alpn(hello) == expected
    assert offered_alpn(hello + b"more bytes after the record") == expected
    kind = Kind.POSTGRES_TLS if alpn and "postgresql" in alpn else Kind.TLS
    assert classify_tls(hello) is kind


def test_an_incomplete_record_needs_more_and_then_is_read() -> None:
    hello = client_hello(["postgresql"])
    for cut in (0, 1, 4, 5, 40, len(hello) - 1):
        assert offered_alpn(hello[:cut]) is None
        assert classify_tls(hello[:cut]) is Kind.NEED_MORE
    assert offered_alpn(hello) == (b"postgresql",)


@pytest.mark.parametrize("record", [
    b"\x16\x03\x01\x00\x05hello",  # a handshake record that is not a ClientHello
    b"\x17\x03\x03\x00\x02ab",  # application data
    b"\x16\x03\x01" + struct.pack("!H", MAX_FRAGMENT + 1) + b"\x01" * (MAX_FRAGMENT + 1),
    b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # a hello longer than its record, cut short
])
def test_what_is_not_a_readable_client_hello_offers_nothing(record: bytes) -> None:
    assert offered_alpn(record) == ()
    assert classify_tls(record) is Kind.TLS


def test_a_declared_length_over_the_limit_waits_for_no_more_than_the_limit() -> None:
    assert record_size(b"\x16\x03\x01\xff\xff") == 5 + MAX_FRAGMENT


def test_an_empty_alpn_name_is_unreadable() -> None:
    hello = client_hello(["postgresql"])
    at = hello.index(b"\x0apostgresql")
    broken = hello[:at] + b"\x00" + hello[at + 1 :]  # the name's length byte, now 0
    assert offered_alpn(broken) == ()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_break_the_reader(data: bytes) -> None:
    for head in (data, b"\x16\x03\x01" + data[:2] + data[2:], b"\x16" + data):
        offered = offered_alpn(head)
        assert offered is None or isinstance(offered, tuple)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_real_hello_with_any_byte_changed_never_breaks_the_reader(data: st.DataObject) -> None:
    hello = bytearray(client_hello(["http/1.1", "postgresql"]))
    at = data.draw(st.integers(5, len(hello) - 1))
    hello[at] = data.draw(st.integers(0, 255))
    offered = offered_alpn(bytes(hello))
    assert offered is None or isinstance(offered, tuple)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(coro(), 30))


def test_each_kind_of_tls_goes_to_its_owner_with_every_byte_unread() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        got: dict[str, bytes] = {}
        done = asyncio.Event()

        def owner(kind: str) -> Callable[[socket.socket, str], Awaitable[None]]:
            async def handle(sock: socket.socket, peer: str) -> None:
                data = b""
                while chunk := await loop.sock_recv(sock, 4096):
                    data += chunk
                got[kind] = data
                sock.close()
                if len(got) == 3:
                    done.set()

            return handle

        listener = PeekListener(owner("postgres"), owner("api"),
                                on_postgres_tls=owner("postgres-tls"))
        host, port = await listener.listen("127.0.0.1", 0)
        direct, api = client_hello(["postgresql"]), client_hello(["http/1.1"])
        try:
            for data, pieces in ((direct, 3), (api, 1), (encode(m.SSLRequest()), 1)):
                _, writer = await asyncio.open_connection(host, port)
                step = -(-len(data) // pieces)
                for start in range(0, len(data), step):  # a hello in pieces: it waits
                    writer.write(data[start : start + step])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                writer.close()
            await asyncio.wait_for(done.wait(), 5)
            assert got == {"postgres-tls": direct, "api": api,
                           "postgres": encode(m.SSLRequest())}
        finally:
            await listener.close()

    run(main)


# -- through the proxy, with libpq 18 (psycopg's) -------------------------------------------

needs_libpq_17 = pytest.mark.skipif(
    psycopg.pq.version() < 170000, reason="psycopg's libpq has no sslnegotiation=direct"
)


@pytest.mark.slow
@needs_libpq_17
def test_psql_clients_with_direct_tls_are_served_on_the_web_port(path: DataPath) -> None:
    dsn = path.dsn(path.cert("alice"), "alice", "main", sslnegotiation="direct")
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user, current_database()").fetchone() == (
            "alice", "main")

        def cancel_soon() -> None:
            time.sleep(0.5)
            conn.cancel_safe()  # libpq 17's cancel: direct TLS too, with the certificate

        canceller = threading.Thread(target=cancel_soon)
        canceller.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(20)")
        canceller.join()
        assert time.monotonic() - started < 10


@pytest.mark.slow
@needs_libpq_17
def test_direct_tls_on_the_postgres_port_needs_the_postgresql_alpn(
    pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey
) -> None:
    dp = DataPath(pki, pg, signing_key)
    dp.bundle_bytes = dp.next_bundle()
    try:
        proxy = dp.start_proxy("proxy-direct", postgres_addr=("127.0.0.1", 0))
        dp.start_agent("agent-direct")
        port = proxy.postgres_address[1]  # type: ignore[index]
        cert = dp.cert("alice")
        dsn = conninfo_for(port, cert, pki.host_ca_file, "alice", "main",
                           sslnegotiation="direct")
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            assert conn.execute("select 'direct tls'").fetchone() == ("direct tls",)
        # TLS at once without offering "postgresql": closed, as PostgreSQL 17 does.
        ctx = ssl.create_default_context(cafile=str(pki.host_ca_file))
        ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(raw, server_hostname="localhost")
    finally:
        dp.close()


"""PostgreSQL 17's direct TLS (`sslnegotiation=direct`): a client that starts TLS at once,
offering the ALPN protocol "postgresql", is told from an HTTPS client by its ClientHello,
before a byte is consumed, and served as if it had sent an SSLRequest first. (How the
listener dispatches it, and the separate PostgreSQL port: tests/dataplane/test_listener.py.)"""

from __future__ import annotations

import struct
import threading
import time

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.proxy.client_hello import MAX_FRAGMENT, offered_alpn, record_size
from dataplane.proxy.listener import Kind, classify_tls
from tests.dataplane.conftest import DataPath
from tests.dataplane.support import client_hello


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

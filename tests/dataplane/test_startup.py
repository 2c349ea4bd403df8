"""The proxy's answers before a session starts: before the first bundle (psql is told to
wait, inside TLS where libpq shows it), and protocol negotiation (3.2 and `_pq_.` options
are answered with NegotiateProtocolVersion, as PostgreSQL does, and the session goes on
with 3.0)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dataplane.postgres import encode
from dataplane.postgres import messages as m
from dataplane.proxy import ProxyService
from dataplane.proxy.postgres import NO_BUNDLE
from tests.dataplane import rawclient
from tests.dataplane.conftest import DataPath, Node
from tests.dataplane.support import Pki, conninfo_for
from tests.fixtures.pg import run_psql

pytestmark = pytest.mark.slow


class Joining:
    """A proxy that has joined but has no policy bundle yet."""

    def __init__(self, pki: Pki, key: Ed25519PrivateKey) -> None:
        self.node = Node("proxy-joining", key)
        creds = pki.host("proxy-joining", "proxy")

        async def start() -> ProxyService:
            service = ProxyService(
                credentials=creds, bundles=self.node.feed, web_addr=("127.0.0.1", 0),
                tunnel_addr=("127.0.0.1", 0),
            )  # fmt: skip
            await service.start()
            return service

        self.service: ProxyService = self.node.thread.run(start())
        self.node.service = self.service
        assert self.service.web_address is not None
        self.port = self.service.web_address[1]


@pytest.fixture
def joining(pki: Pki, signing_key: Ed25519PrivateKey) -> Iterator[Joining]:
    proxy = Joining(pki, signing_key)
    try:
        yield proxy
    finally:
        proxy.node.stop()


# -- before the first bundle ---------------------------------------------------------------


@pytest.mark.parametrize("sslmode", ["verify-full", "require", "disable"])
def test_before_the_first_bundle_psql_is_told_to_wait(
    joining: Joining, pki: Pki, sslmode: str
) -> None:
    cert = pki.route_cert("alice", ["admin"], "pg")
    dsn = conninfo_for(joining.port, cert, pki.host_ca_file, "alice", "main", sslmode=sslmode)
    done = run_psql(dsn, "select 'LEAKED'", timeout=30)
    assert done.returncode != 0
    assert "LEAKED" not in done.stdout
    assert (
        "FATAL:  the proxy has no policy bundle yet (it is joining the cluster); try again in "
        "a few seconds"
    ) in done.stderr
    # not libpq's "server does not support SSL", nor "error response during SSL exchange"
    assert "SSL" not in done.stderr


def test_a_bundle_arriving_during_the_handshake_does_not_admit_an_unverified_client(
    joining: Joining, pki: Pki, path: DataPath
) -> None:
    # TLS started without a client certificate request (no user CA yet); the bundle that
    # arrives before the StartupMessage must not turn that connection into a session.
    session = rawclient.tls_session(joining.port, None, pki.host_ca_file)
    try:
        joining.node.activate(path.bundle_bytes)
        messages = rawclient.start(session, m.StartupMessage({"user": "alice", "database": "x"}))
    finally:
        session.close()
    error = messages[-1]
    assert isinstance(error, m.ErrorResponse)
    assert (error.severity, error.sqlstate, error.message) == ("FATAL", "57P03", NO_BUNDLE)
    # and the next connection is verified as usual
    done = run_psql(
        conninfo_for(joining.port, None, pki.host_ca_file, "alice", "main"), "select 1"
    )
    assert "no client certificate was presented" in done.stderr


# -- protocol negotiation -------------------------------------------------------------------


def negotiate(path: DataPath, minor: int, options: dict[str, str]) -> list[m.BackendMessage]:
    session = rawclient.tls_session(path.web_port, path.cert("alice"), path.pki.host_ca_file)
    try:
        startup = m.StartupMessage({"user": "alice", "database": "main", **options}, minor)
        messages = rawclient.start(session, startup)
        if isinstance(messages[-1], m.ReadyForQuery):
            answer = session.query("select current_user || '@' || current_database()")
            rows = [msg for msg in answer if isinstance(msg, m.DataRow)]
            assert [row.values for row in rows] == [(b"alice@main",)]
            session.send(m.Terminate())
        return messages
    finally:
        session.close()


def test_protocol_3_2_with_options_is_negotiated_down_to_3_0(path: DataPath) -> None:
    options = {"_pq_.command_marker": "on", "_pq_.other": "1"}
    messages = negotiate(path, 2, options)
    assert messages[0] == m.NegotiateProtocolVersion(
        m.PROTOCOL_3_0, ("_pq_.command_marker", "_pq_.other")
    )
    assert isinstance(messages[1], m.AuthenticationOk)
    assert isinstance(messages[-1], m.ReadyForQuery)
    # the server never saw the options (PostgreSQL 15 would refuse an unknown one)
    assert not any(isinstance(msg, m.ErrorResponse) for msg in messages)


def test_protocol_3_2_alone_gets_the_newest_minor(path: DataPath) -> None:
    messages = negotiate(path, 2, {})
    assert messages[0] == m.NegotiateProtocolVersion(m.PROTOCOL_3_0, ())
    assert isinstance(messages[-1], m.ReadyForQuery)


def test_options_alone_on_3_0_are_listed(path: DataPath) -> None:
    messages = negotiate(path, 0, {"_pq_.x": "y"})
    assert messages[0] == m.NegotiateProtocolVersion(m.PROTOCOL_3_0, ("_pq_.x",))
    assert isinstance(messages[-1], m.ReadyForQuery)


def test_plain_3_0_gets_no_negotiation(path: DataPath) -> None:
    messages = negotiate(path, 0, {})
    assert isinstance(messages[0], m.AuthenticationOk)
    assert not any(isinstance(msg, m.NegotiateProtocolVersion) for msg in messages)


def test_another_major_version_is_refused_as_postgresql_does(path: DataPath) -> None:
    session = rawclient.tls_session(path.web_port, path.cert("alice"), path.pki.host_ca_file)
    try:
        body = struct.pack("!i", 4 << 16) + b"user\0alice\0\0"
        session.sock.sendall(struct.pack("!i", 4 + len(body)) + body)
        error = session.read_message()
    finally:
        session.close()
    assert isinstance(error, m.ErrorResponse)
    assert (error.severity, error.sqlstate) == ("FATAL", "0A000")
    assert error.message.startswith("unsupported frontend protocol 4.0")


def test_a_plain_text_startup_with_3_2_is_still_refused_for_tls(path: DataPath) -> None:
    with socket.create_connection(("127.0.0.1", path.web_port), timeout=10) as sock:
        sock.sendall(encode(m.StartupMessage({"user": "alice"}, 2)))
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data[:1] == b"E"  # no NegotiateProtocolVersion outside TLS: only the refusal
    assert b"TLS is required" in data

"""The all-in-one process (`teleport start --roles=proxy,db`): the proxy hands the client's
own TLS connection to the in-process agent, with no tunnel and no extra TLS leg; databases
the local agent does not serve still go through the tunnel to remote agents."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dataplane.agent import AgentService, StaticDatabases
from dataplane.postgres import messages as pm
from dataplane.proxy import ProxyService
from schemas.bundle import BundleDatabase
from tests.dataplane import rawclient
from tests.dataplane.conftest import FAST_TUNNEL, DataPath, Node, Pg, databases_for
from tests.dataplane.support import DbCerts, Pki
from tests.dataplane.test_cancel import check_cancel_closes_after_delivery, held, wait_running
from tests.fixtures.pg import run_psql

pytestmark = pytest.mark.slow


class AllInOne(DataPath):
    """One node running the proxy with its local agent; remote agents may join."""

    def start_all(self, **proxy_options: Any) -> None:
        node = Node("all-in-one", self.key)
        node.activate(self.bundle_bytes)
        proxy_creds = self.pki.host("all-1", "proxy")
        agent_creds = self.pki.host("all-1-db", "db")

        async def start() -> tuple[ProxyService, AgentService]:
            agent = AgentService(
                credentials=agent_creds,
                bundles=node.feed,
                databases=StaticDatabases(databases_for(self.pg)),
                db_certs=DbCerts(self.pki.cas),
                audit=self.audit,
            )
            await agent.start()
            proxy = ProxyService(
                credentials=proxy_creds,
                bundles=node.feed,
                web_addr=("127.0.0.1", 0),
                tunnel_addr=("127.0.0.1", 0),
                local_agent=agent,
                audit=self.audit,
                tunnel_options=FAST_TUNNEL,
                **proxy_options,
            )
            await proxy.start()
            return proxy, agent

        proxy, agent = node.thread.run(start())
        node.service = proxy
        self.local_agent = agent
        self.nodes.append(node)
        self.proxy = node

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.thread.run(self.local_agent.stop())
        super().close()


@pytest.fixture(scope="module")
def aio(pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey) -> Iterator[AllInOne]:
    dp = AllInOne(pki, pg, signing_key)
    dp.bundle_bytes = dp.next_bundle()
    try:
        dp.start_all()
        remote = BundleDatabase(name="pgremote", uri=pg.uri, labels={"env": "prod"})
        dp.start_agent("remote-1", databases=[remote])
        yield dp
    finally:
        dp.close()


def der(path: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def test_the_client_connection_itself_reaches_the_local_agent(aio: AllInOne) -> None:
    cert = aio.cert("alice")
    session = rawclient.connect(aio.web_port, cert, aio.pki.host_ca_file, "alice", "main")
    try:
        def peer_certs() -> list[bytes | None]:
            out = []
            for s in aio.local_agent.registry:
                ssl_object = s.relay.client.get_extra_info("ssl_object")
                out.append(ssl_object.getpeercert(binary_form=True) if ssl_object else None)
            return out

        seen = aio.proxy.thread.call(peer_certs)  # type: ignore[union-attr]
        # The agent relays on the very TLS connection psql opened: its peer is the user.
        assert der(cert.cert_file) in seen
        rows = session.query("select current_user, current_database()")
        values = next(r for r in rows if isinstance(r, pm.DataRow)).values
        assert values == (b"alice", b"main")
        links = aio.proxy.thread.call(aio.proxy_service.tunnel.agents)  # type: ignore[union-attr]
        assert all(link.sessions == 0 for link in links)  # no tunnel connection was used
    finally:
        session.close()


def test_psql_through_the_all_in_one_and_through_its_tunnel(aio: AllInOne) -> None:
    local = run_psql(aio.dsn(aio.cert("alice"), "alice", "main"), "select 'local'")
    assert local.returncode == 0, local.stderr
    assert local.stdout.strip() == "local"
    remote = run_psql(aio.dsn(aio.cert("alice", "pgremote"), "alice", "main"), "select 'remote'")
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.strip() == "remote"
    links = aio.proxy.thread.call(aio.proxy_service.tunnel.agents)  # type: ignore[union-attr]
    assert [link.sessions for link in links if link.host_id == "remote-1"] == [1]


def test_refusals_and_cancel_in_the_all_in_one(aio: AllInOne) -> None:
    denied = run_psql(aio.dsn(aio.cert("bob"), "bob", "metrics"), "select 1")
    assert "db name 'metrics' is denied by role 'no-metrics'" in denied.stderr
    session = rawclient.connect(aio.web_port, aio.cert("alice"), aio.pki.host_ca_file, "alice",
                                "main")
    try:
        assert session.key is not None
        session.send(pm.Query("select pg_sleep(30)"))
        wait_running(aio, "select pg_sleep(30)")  # type: ignore[arg-type]
        rawclient.send_cancel(aio.web_port, session.key.process_id, session.key.secret_key ^ 7)
        rawclient.send_cancel(aio.web_port, session.key.process_id, session.key.secret_key)
        started = time.monotonic()
        message = session.read_message()
        while isinstance(message, pm.RowDescription):
            message = session.read_message()
        assert isinstance(message, pm.ErrorResponse) and message.sqlstate == "57014"
        assert time.monotonic() - started < 1.0
    finally:
        session.close()


def test_the_cancel_connection_closes_once_the_local_agent_sent_the_cancel(
    aio: AllInOne,
) -> None:
    session = rawclient.connect(aio.web_port, aio.cert("alice"), aio.pki.host_ca_file, "alice",
                                "main")
    try:
        with held(aio.local_agent, "cancel") as gate:
            check_cancel_closes_after_delivery(aio, session, gate)
    finally:
        session.close()


def test_recheck_in_the_all_in_one(aio: AllInOne) -> None:
    session = rawclient.connect(aio.web_port, aio.cert("bob"), aio.pki.host_ca_file, "bob",
                                "main")
    try:
        revoked = aio.next_bundle(users={"alice": ["admin"], "carol": ["dev"]})
        aio.publish(revoked)
        message = session.read_message()
        assert isinstance(message, pm.ErrorResponse) and message.sqlstate == "28000"
        assert "user 'bob' is not in the policy in force" in (message.message or "")
    finally:
        session.close()
        aio.restore()

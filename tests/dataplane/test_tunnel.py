"""The reverse tunnel: who may connect, heartbeats and dead peers, reconnecting after a
proxy restart within 10 s, the warm pool and Dial, label updates."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control.ca import ClusterCAs, certificate_pem
from dataplane.postgres import messages as pm
from dataplane.tunnel.client import BACKOFF_CAP, backoff_delay, split_address
from schemas.bundle import BundleDatabase
from tests.dataplane import rawclient
from tests.dataplane.conftest import DataPath, Pg
from tests.dataplane.support import HostCreds, Pki
from tests.fixtures.pg import run_psql
from transport.tls import new_private_key, private_key_pem

pytestmark = pytest.mark.slow


@pytest.fixture
def dp(pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey) -> Iterator[DataPath]:
    out = DataPath(pki, pg, signing_key)
    out.bundle_bytes = out.next_bundle()
    try:
        out.start_proxy("proxy-t")
        yield out
    finally:
        out.close()


def routable(dp: DataPath) -> dict[str, list[str]]:
    links = dp.proxy.thread.call(dp.proxy_service.tunnel.agents)  # type: ignore[union-attr]
    return {link.host_id: sorted(link.databases) for link in links}


def wait_for(predicate: object, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def test_backoff_is_exponential_jittered_and_capped() -> None:
    for attempt in range(40):
        delay = backoff_delay(attempt)
        ceiling = min(BACKOFF_CAP, 0.25 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert BACKOFF_CAP + 1 < 10  # a restarted proxy sees every agent within 10 s


def test_proxy_addresses_are_checked() -> None:
    assert split_address("proxy.example.com:3024") == ("proxy.example.com", 3024)
    assert split_address("[::1]:3024") == ("::1", 3024)
    for bad in ("proxy", "proxy:http", ":3024", "proxy:0"):
        with pytest.raises(ValueError, match="must be host:port"):
            split_address(bad)


def test_an_agent_registers_its_databases_and_label_updates(dp: DataPath) -> None:
    agent = dp.start_agent("agent-labels")
    assert routable(dp)["agent-labels"] == ["pg", "pgdev"]
    node = dp.agents[0]

    def change() -> None:
        agent.databases.replace([BundleDatabase(name="pg", uri=dp.pg.uri, labels={"env": "x"})])
        agent.labels_changed()

    node.thread.call(change)
    wait_for(lambda: routable(dp).get("agent-labels") == ["pg"], 5, "the label update")
    links = dp.proxy.thread.call(dp.proxy_service.tunnel.agents)  # type: ignore[union-attr]
    assert links[0].databases["pg"].labels == {"env": "x"}


def test_a_host_that_is_not_a_db_agent_cannot_register(dp: DataPath) -> None:
    impostor = dp.pki.host("not-an-agent", "proxy")  # a proxy's certificate
    dp.pki.host = (lambda host_id, role, **kw: impostor)  # type: ignore[method-assign]
    try:
        dp.start_agent("not-an-agent", wait=False)
    finally:
        del dp.pki.host
    time.sleep(1.5)  # it dials, says hello, and is thrown out, again and again
    assert "not-an-agent" not in routable(dp)


def test_an_agent_refuses_a_proxy_without_a_proxy_certificate(
    pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey
) -> None:
    fake = DataPath(pki, pg, signing_key)
    fake.bundle_bytes = fake.next_bundle()
    real_host = pki.host
    pki.host = (  # type: ignore[method-assign]
        lambda host_id, role, **kw: real_host(host_id, "db" if role == "proxy" else role)
    )
    try:
        fake.start_proxy("fake-proxy")
    finally:
        del pki.host
    try:
        agent = fake.start_agent("careful-agent", wait=False)
        link = agent.tunnel.links[0]
        wait_for(lambda: "is a db host, not a proxy host" in link.last_error, 5,
                 "the agent refusing the proxy")
        assert "careful-agent" not in routable(fake)
    finally:
        fake.close()


def test_a_host_certificate_from_another_cluster_ca_is_refused(
    dp: DataPath, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = ClusterCAs.load_or_create(tmp_path / "other", dp.pki.cluster)
    real = dp.pki.host("outsider", "db")
    key = new_private_key()
    cert = other.host.issue_host(key.public_key(), "outsider", "db", ttl=timedelta(hours=1))
    forged = HostCreds(real.cluster, "outsider", "db", certificate_pem(cert),
                       private_key_pem(key), real.host_cas)
    dp.pki.host = (lambda host_id, role, **kw: forged)  # type: ignore[method-assign]
    try:
        agent = dp.start_agent("outsider", wait=False)
    finally:
        del dp.pki.host
    caplog.set_level(logging.INFO, logger="dataplane.tunnel.client")
    time.sleep(1.5)
    assert "outsider" not in routable(dp)
    # Never up, not even between its TLS handshake and the proxy's refusal (TLS 1.3 ends
    # the client's handshake before the server has checked the client's certificate).
    assert not agent.tunnel.links[0].connected.is_set()
    assert not [r for r in caplog.records if "is up" in r.getMessage()]


def test_a_silent_agent_is_dropped_and_comes_back(dp: DataPath) -> None:
    dp.start_agent("agent-frozen")
    node = dp.agents[0]
    frozen = threading.Event()

    def freeze() -> None:
        frozen.set()
        time.sleep(3.5)  # the agent's loop stops: no heartbeats (dead after 2 s here)

    node.thread.loop.call_soon_threadsafe(freeze)
    frozen.wait(5)
    gone = wait_for(lambda: "agent-frozen" not in routable(dp), 5, "dropping the silent agent")
    assert gone < 3.5
    wait_for(lambda: "agent-frozen" in routable(dp), 10, "the agent's return")
    dp.wait_routable("agent-frozen")
    done = run_psql(dp.dsn(dp.cert("alice"), "alice", "main"), "select 1")
    assert done.returncode == 0, done.stderr


def test_after_a_proxy_restart_the_agent_is_back_within_10_seconds(dp: DataPath) -> None:
    # Production timings: heartbeats every 5 s, dead after 15 s, backoff capped at 4 s.
    dp.start_agent("agent-patient", tunnel_options={})
    tunnel_port = dp.proxy_service.tunnel_address[1]  # type: ignore[index]
    old = dp.proxy
    dp.stop_node(old)  # type: ignore[arg-type]
    time.sleep(6)  # the agent keeps retrying, its backoff grows to the cap
    dp.start_proxy("proxy-t", tunnel_addr=("127.0.0.1", tunnel_port))
    back = wait_for(lambda: "agent-patient" in routable(dp), 10, "the agent's return")
    assert back < 10
    dp.wait_routable("agent-patient")
    done = run_psql(dp.dsn(dp.cert("alice"), "alice", "main"), "select 'back'")
    assert done.stdout.strip() == "back", done.stderr


def test_an_empty_pool_is_refilled_on_demand(dp: DataPath) -> None:
    dp.start_agent("agent-small", pool_size=1)
    dsn = dp.dsn(dp.cert("alice"), "alice", "main")
    results: list[int] = []

    def one() -> None:
        results.append(run_psql(dsn, "select pg_sleep(0.3)", timeout=30).returncode)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [0] * 8


def test_data_connections_resume_their_tls_session(dp: DataPath) -> None:
    dp.start_agent("agent-resume", pool_size=2)
    dsn = dp.dsn(dp.cert("alice"), "alice", "main")
    for _ in range(6):  # each session takes a data connection; the agent dials new ones
        assert run_psql(dsn, "select 1").returncode == 0
    dp.wait_routable("agent-resume")

    def reused() -> list[bool]:
        links = dp.proxy_service.tunnel.agents()
        return [
            bool(conn.transport.get_extra_info("ssl_object").session_reused)
            for link in links for conn in link.idle
        ]

    flags = dp.proxy.thread.call(reused)  # type: ignore[union-attr]
    assert flags and all(flags), flags  # the proxy still verified who they are (routable)


def test_an_agent_serves_every_proxy_it_is_given(dp: DataPath) -> None:
    first = dp.proxy_service
    first_node = dp.proxy
    second = dp.start_proxy("proxy-u")
    addresses = [f"127.0.0.1:{p.tunnel_address[1]}" for p in (first, second)]  # type: ignore[index]
    agent = dp.start_agent("agent-both", proxies=addresses)
    dp.wait_routable("agent-both")  # on the second proxy
    dp.proxy = first_node
    dp.wait_routable("agent-both")  # and on the first
    for proxy in (first, second):
        port = proxy.web_address[1]  # type: ignore[index]
        dsn = dp.dsn(dp.cert("alice"), "alice", "main").replace(
            f"port='{dp.web_port}'", f"port='{port}'"
        )
        assert run_psql(dsn, "select 1").stdout.strip() == "1"
    # the control plane's list changes: the second proxy is dropped
    node = dp.agents[-1]
    node.thread.call(agent.set_proxies, addresses[:1])
    assert [link.address for link in agent.tunnel.links] == addresses[:1]


def test_a_stuck_agent_is_passed_over_for_a_live_one(dp: DataPath) -> None:
    dp.start_agent("agent-live")
    dp.start_agent("agent-stuck")
    stuck = next(n for n in dp.agents if n.thread._thread.name == "agent-stuck")
    frozen = threading.Event()

    def freeze() -> None:
        frozen.set()
        time.sleep(4)  # no acks, no heartbeats

    stuck.thread.loop.call_soon_threadsafe(freeze)
    frozen.wait(5)
    dsn = dp.dsn(dp.cert("alice"), "alice", "main")
    started = time.monotonic()
    for _ in range(4):
        done = run_psql(dsn, "select 'served'", timeout=30)
        assert done.stdout.strip() == "served", done.stderr
    # at most one ack timeout (2 s) is paid before the stuck agent is dropped or skipped
    assert time.monotonic() - started < 3.5


def test_stopping_an_agent_ends_its_sessions_with_a_clear_error(dp: DataPath) -> None:
    dp.start_agent("agent-leaving")
    session = rawclient.connect(dp.web_port, dp.cert("alice"), dp.pki.host_ca_file, "alice",
                                "main")
    try:
        dp.stop_node(dp.agents[0])
        message = session.read_message()
        assert isinstance(message, pm.ErrorResponse)
        assert (message.severity, message.sqlstate) == ("FATAL", "57P01")
        assert message.message == "the db agent agent-leaving is shutting down"
    finally:
        session.close()
    wait_for(lambda: "agent-leaving" not in routable(dp), 5, "the proxy dropping the agent")
    done = run_psql(dp.dsn(dp.cert("alice"), "alice", "main"), "select 1")
    assert "no agent is serving database 'pg'" in done.stderr

"""`client_idle_timeout`: a second proxy process, `teleport-agent run --role=proxy` with
`proxy_service.client_idle_timeout: 2s` in its teleport.yaml, joins the cluster; the db
agent learns of it from its heartbeat and dials it. A psql session through it that sends
nothing for 2 s is ended with a FATAL error saying why, and audited; a session that keeps
talking, or one through the first proxy (no timeout), goes on."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.e2e.cluster import E2ECluster, Person, PsqlPipe, free_ports, wait_for

pytestmark = pytest.mark.slow

TIMEOUT = 2.0
IDLE_FATAL = (
    "FATAL:  terminating connection due to idle-session timeout: the client sent nothing "
    "for 2s (client_idle_timeout)"
)


@pytest.fixture(scope="module")
def idle_proxy(cluster: E2ECluster) -> Iterator[int]:
    """The second proxy's web port, once the agent serves through it."""
    web, tunnel = free_ports(2)
    proxy = cluster.data_service(
        "proxy-idle",
        web,
        tunnel,
        ready_port=web,
        extra_yaml=f"  client_idle_timeout: {TIMEOUT:g}s\n",
    )
    cluster.extra.append(proxy)
    proxy.start()
    alice = cluster.people["alice"]
    wait_for(
        "the agent to serve through the second proxy",
        lambda: alice.psql("-c", "select 1", dsn=alice.dsn(port=str(web))).returncode == 0,
        timeout=40,
        interval=0.5,
    )
    try:
        yield web
    finally:
        proxy.stop()
        cluster.extra.remove(proxy)


def through(person: Person, port: int) -> PsqlPipe:
    """A psql session kept open through the proxy on `port` (service file for the rest)."""
    return PsqlPipe(person, dsn=person.dsn(port=str(port)))


def backend_alive(cluster: E2ECluster, pid: int) -> bool:
    assert cluster.pg is not None
    sql = f"select count(*) from pg_stat_activity where pid = {pid}"
    return cluster.pg.psql_admin(sql).strip() == "1"


def test_an_idle_session_is_ended_after_client_idle_timeout(
    cluster: E2ECluster, alice: Person, idle_proxy: int
) -> None:
    with through(alice, idle_proxy) as idle:
        pid = int(idle.ask("select pg_backend_pid()"))
        last_sent = time.monotonic()
        wait_for("the idle session's backend to end", lambda: not backend_alive(cluster, pid), 10)
        ended_after = time.monotonic() - last_sent
        assert TIMEOUT - 0.2 <= ended_after < TIMEOUT + 1.5, ended_after
        idle.send("select 'too late'")
        assert idle.wait_end(5) == 2
        assert IDLE_FATAL in idle.errors, idle.errors

    ends = wait_for(
        "the audited end of the idle session",
        lambda: [
            e
            for e in cluster.audit_events("--type=db.session.end", "--user=alice", "--since=2m")
            if "idle-session timeout" in e["reason"]
        ],
        timeout=30,
        interval=0.5,
    )
    assert ends[-1]["reason"].startswith(
        "terminating connection due to idle-session timeout: the client sent nothing for 2s"
    ), ends[-1]["reason"]


def test_a_session_that_keeps_talking_and_one_through_the_first_proxy_go_on(
    cluster: E2ECluster, alice: Person, idle_proxy: int
) -> None:
    with through(alice, idle_proxy) as talking, alice.open_psql() as untimed:
        assert untimed.ask("select 'no timeout here'") == "no timeout here"
        for n in range(8):  # 4 s, a query every 0.5 s
            assert talking.ask(f"select {n}") == str(n)
            time.sleep(0.5)
        assert untimed.ask("select 'still here'") == "still here"

"""Faults, as an operator meets them, on the product's own processes: the control plane
stopped, a db agent killed, the proxy restarted, PostgreSQL restarted. What the people
using the databases see is asserted with real psql sessions: the ones they keep open (fed
through a pipe) and new ones."""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e.cluster import E2ECluster, Person, wait_for

pytestmark = pytest.mark.slow

LOST = "connection to server was lost"


def test_with_the_control_plane_stopped_sessions_old_and_new_keep_working(
    cluster: E2ECluster, alice: Person, bob: Person
) -> None:
    assert cluster.auth is not None
    assert bob.query("select 'bob, before'") == "bob, before"
    with alice.open_psql() as session:
        assert session.ask("select 'before'") == "before"
        cluster.auth.stop()

        assert session.ask("select 'during'") == "during"
        # New sessions: the certificates from `tsh db login` before, the bundle in force,
        # the agent's cached client certificates for PostgreSQL.
        assert alice.query("select current_user") == "alice"
        assert bob.query("select 'bob, new session'") == "bob, new session"
        # The agent still enforces that bundle: bob may not use alice's database.
        refused = bob.psql("-c", "select 1", dbname="bench")
        assert refused.returncode != 0
        assert "access denied to 'bob'" in refused.stderr, refused.stderr

        cluster.auth.start()
        assert session.ask("select 'after'") == "after"
    alice.login()  # and logins work again


def test_tsh_login_says_the_control_plane_cannot_be_reached(
    cluster: E2ECluster, alice: Person
) -> None:
    assert cluster.auth is not None
    cluster.auth.stop()
    failed = alice.tsh(
        "login",
        f"--proxy=localhost:{cluster.web_port}",
        "--user=alice",
        f"--ca-pin={cluster.ca_pin}",
        stdin="any password\n",
        check=False,
    )
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr
    # What is wrong (the cluster's auth service cannot be reached through the proxy), not a
    # guess about certificates: tsh login presents none.
    assert re.search(
        r"(control plane|auth (server|service)).{0,80}(cannot be reached|unreachable|"
        r"not reachable|is down|not running)",
        failed.stderr,
        re.IGNORECASE,
    ), failed.stderr
    assert "client certificate" not in failed.stderr, failed.stderr


def test_a_db_user_new_to_the_agent_gets_a_clear_error_while_the_control_plane_is_down(
    cluster: E2ECluster,
) -> None:
    """The agent logs in to PostgreSQL with a client certificate per db user, which only
    the control plane issues: a db user it has none cached for cannot be served while the
    control plane is down, and the person must be told so."""
    assert cluster.auth is not None and cluster.pg is not None
    carol = cluster.people.get("carol")
    if carol is None:
        cluster.pg.create_role("carol")
        carol = cluster.add_person("carol", ["carol"], ["postgres"])
    cluster.wait_agent_has_policy_in_force()  # carol is in the policy every agent holds
    cluster.auth.stop()
    refused = carol.psql("-c", "select 1")
    assert refused.returncode == 2
    assert "FATAL:" in refused.stderr, refused.stderr
    assert "client certificate for database user 'carol'" in refused.stderr
    assert "the control plane is unreachable" in refused.stderr
    cluster.auth.start()
    assert carol.query("select current_user") == "carol"


def test_a_killed_agent_fails_its_sessions_and_a_restarted_one_serves_again(
    cluster: E2ECluster, alice: Person
) -> None:
    assert cluster.agent is not None and cluster.proxy is not None
    with alice.open_psql() as session:
        assert session.ask("select 'before'") == "before"
        cluster.agent.kill()
        session.send("select 'after the kill'")
        assert session.wait_end(10) == 2  # psql: the connection went bad
        assert LOST in session.errors, session.errors

    assert cluster.proxy.running()
    refused = alice.psql("-c", "select 1")
    assert refused.returncode == 2
    assert "FATAL:  no agent is serving database 'pg'" in refused.stderr, refused.stderr

    cluster.agent.start()
    took = cluster.wait_serving(alice, timeout=30)
    assert took < 5.0, f"the restarted agent served after {took:.1f}s"
    assert alice.query("select 'served again'") == "served again"


def test_a_restarted_proxy_has_its_agents_back_within_10_seconds(
    cluster: E2ECluster, alice: Person
) -> None:
    assert cluster.proxy is not None and cluster.agent is not None
    with alice.open_psql() as session:
        assert session.ask("select 'before'") == "before"
        cluster.proxy.stop()
        session.send("select 'proxy gone'")
        assert session.wait_end(10) == 2
        assert LOST in session.errors, session.errors

    mark = cluster.agent.log_size()
    started = time.monotonic()
    cluster.proxy.start()
    took = cluster.wait_serving(alice, timeout=30)
    assert time.monotonic() - started < 10.0, f"sessions worked again after {took:.1f}s"
    assert re.search(r"tunnel to proxy \S+ is up", cluster.agent.log_text(mark))


def test_a_restarted_postgres_gives_clear_errors_then_serves_new_sessions(
    cluster: E2ECluster, alice: Person
) -> None:
    assert cluster.pg is not None
    with alice.open_psql() as session:
        assert session.ask("select 'before'") == "before"
        cluster.pg.stop()
        session.send("select 'postgres gone'")
        assert session.wait_end(10) == 2
        # PostgreSQL's own goodbye reaches psql through the agent and the proxy.
        assert "FATAL:  terminating connection due to administrator command" in session.errors

    refused = alice.psql("-c", "select 1")
    assert refused.returncode == 2
    assert (
        f"FATAL:  could not connect to database 'pg' at localhost:{cluster.pg.port}: "
        "Connection refused"
    ) in refused.stderr, refused.stderr
    assert "HINT:  check that the database is running and reachable from the db agent" in (
        refused.stderr
    )

    cluster.pg.start()
    assert alice.query("select 'postgres is back'") == "postgres is back"


def test_after_a_control_plane_restart_agents_keep_their_tunnels(
    cluster: E2ECluster, alice: Person
) -> None:
    """A restarted control plane knows no proxy until the proxies' next heartbeat (every
    10 s). An agent that heartbeats first must not take the answer as "there are no
    proxies" and drop its tunnels: sessions would be refused until the next beat. To make
    the agent beat first, the control plane comes back right after the proxy's failed
    beat (the proxy logs that one), and the agent is restarted then (it beats at once)."""
    assert cluster.auth is not None and cluster.proxy is not None
    assert cluster.agent is not None
    mark = cluster.proxy.log_size()
    cluster.auth.stop()
    cluster.proxy.wait_log(r"heartbeat to the control plane failed", mark, timeout=25)
    cluster.auth.start()
    cluster.agent.stop()
    agent_mark = cluster.agent.log_size()
    cluster.agent.start()
    # The agent heartbeats as it starts; sessions must keep working from then on, through
    # the proxy's next heartbeat and beyond.
    failures = []
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        done = alice.psql("-c", "select 1", timeout=15)
        if done.returncode != 0:
            failures.append(done.stderr.strip())
        time.sleep(0.2)
    assert failures == [], f"{len(failures)} new sessions refused, e.g. {failures[0]}"
    assert "tunnel addresses are now none" not in cluster.agent.log_text(agent_mark)


def test_the_control_plane_is_up_again_after_each_fault(cluster: E2ECluster) -> None:
    """`tctl status` after the faults above: policy in force, proxy and agent reporting."""
    status = wait_for(
        "the proxy and the agent in tctl status",
        lambda: (out := cluster.tctl("status").stdout) and "Agents:         2" in out and out,
        timeout=30,
        interval=1.0,
    )
    assert "Control plane:  running" in status
    assert re.search(r"In force:\s+serial \d+", status)

"""Query cancel through the product's own processes: psql's Ctrl-C (SIGINT) stops a
running query within a second; a CancelRequest with a wrong key cancels nothing, while the
key the proxy gave the session does cancel (so the wrong key's failure means something)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from cryptography import x509

from dataplane.postgres import messages as pm
from schemas.identity import load_certificates, verify_identity
from tests.dataplane import rawclient
from tests.dataplane.support import UserCert
from tests.e2e.cluster import E2ECluster, Person, wait_for

pytestmark = pytest.mark.slow


def wait_running(cluster: E2ECluster, query: str) -> None:
    """Until PostgreSQL itself runs `query` (pg_stat_activity, as the superuser)."""
    assert cluster.pg is not None
    sql = (
        "select count(*) from pg_stat_activity where state = 'active' "
        f"and query = '{query.replace(chr(39), chr(39) * 2)}'"
    )
    wait_for(f"PostgreSQL to run {query!r}", lambda: cluster.pg.psql_admin(sql).strip() != "0", 10)


def test_psql_ctrl_c_cancels_pg_sleep_within_a_second(cluster: E2ECluster, alice: Person) -> None:
    proc = subprocess.Popen(
        ["psql", "-X", "-At", "-c", "select pg_sleep(30)", alice.dsn()],
        env=alice.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_running(cluster, "select pg_sleep(30)")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "ERROR:  canceling statement due to user request" in stderr, stderr
    assert elapsed < 1.0, f"psql came back {elapsed:.2f}s after Ctrl-C"
    # The audit log has the query with the cancel as its outcome.
    events = wait_for(
        "the cancelled query's event",
        lambda: [
            e
            for e in cluster.audit_events("--type=db.session.query", "--user=alice", "--since=5m")
            if e["query"] == "select pg_sleep(30)"
        ],
        timeout=30,
        interval=0.5,
    )
    assert events[-1]["outcome"]["status"] == "error"
    assert events[-1]["outcome"]["sqlstate"] == "57014"


def tsh_cert(cluster: E2ECluster, person: Person) -> tuple[UserCert, Path]:
    """The certificate `tsh db login` wrote (its identity verified against the cluster's
    user CA) and the CA file psql verifies the proxy with."""
    config = person.db_config()
    cert_file, key_file = Path(config["cert"]), Path(config["key"])
    user_ca = x509.load_pem_x509_certificate((cluster.auth_dir / "ca" / "user.crt").read_bytes())
    identity = verify_identity(
        load_certificates(cert_file.read_bytes()), [user_ca], datetime.now(UTC), "db"
    )
    return UserCert(cert_file, key_file, identity), Path(config["ca"])


def test_a_cancel_request_with_a_wrong_key_cancels_nothing(
    cluster: E2ECluster, alice: Person
) -> None:
    cert, host_ca = tsh_cert(cluster, alice)
    session = rawclient.connect(cluster.web_port, cert, host_ca, "alice", "postgres")
    try:
        assert session.key is not None
        pid, secret = session.key.process_id, session.key.secret_key
        session.send(pm.Query("select pg_sleep(1.5), 'finished'"))
        wait_running(cluster, "select pg_sleep(1.5), 'finished'")
        # As libpq sends them (plain connections to the web port): the session's process
        # id with a wrong secret, and an unknown process id with the right secret.
        rawclient.send_cancel(cluster.web_port, pid, secret ^ 1)
        rawclient.send_cancel(cluster.web_port, pid ^ 0x5A5A, secret)
        messages = session.read_until_ready()
        assert not any(isinstance(m, pm.ErrorResponse) for m in messages), messages
        rows = [m for m in messages if isinstance(m, pm.DataRow)]
        assert [r.values for r in rows] == [(b"", b"finished")]

        # The right key cancels: the wrong ones above were refused, not ignored by chance.
        session.send(pm.Query("select pg_sleep(30)"))
        wait_running(cluster, "select pg_sleep(30)")
        sent = time.monotonic()
        rawclient.send_cancel(cluster.web_port, pid, secret)
        messages = session.read_until_ready()
        assert time.monotonic() - sent < 1.0
        errors = [m for m in messages if isinstance(m, pm.ErrorResponse)]
        assert [(e.sqlstate, e.message) for e in errors] == [
            ("57014", "canceling statement due to user request")
        ]
        assert any(isinstance(m, pm.DataRow) for m in session.query("select 1"))
    finally:
        session.close()


def test_tools_that_cancel_by_backend_pid_work_as_directly(
    cluster: E2ECluster, alice: Person
) -> None:
    """psycopg's `info.backend_pid` is PostgreSQL's own pid through the proxy, as on a direct
    connection: a GUI's "cancel" that runs pg_cancel_backend(pid) on a second connection
    stops the first one's query, and a NOTIFY names its sender by that pid."""
    with alice.libpq_env():
        busy = psycopg.connect(alice.dsn(), autocommit=True)
        other = psycopg.connect(alice.dsn(), autocommit=True)
    try:
        pid = busy.info.backend_pid
        assert busy.execute("select pg_backend_pid()").fetchone() == (pid,)
        outcome: list[BaseException | None] = []

        def sleep() -> None:
            try:
                busy.execute("select pg_sleep(30)")
                outcome.append(None)
            except BaseException as exc:  # reported below
                outcome.append(exc)

        thread = threading.Thread(target=sleep, daemon=True)
        thread.start()
        wait_running(cluster, "select pg_sleep(30)")
        started = time.monotonic()
        assert other.execute("select pg_cancel_backend(%s)", [pid]).fetchone() == (True,)
        thread.join(10)
        assert time.monotonic() - started < 2
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled)

        busy.execute("listen e2e_channel")
        other.execute("notify e2e_channel, 'from other'")
        busy.execute("notify e2e_channel, 'from busy'")
        got = list(busy.notifies(timeout=5, stop_after=2))
        assert {(n.payload, n.pid) for n in got} == {
            ("from other", other.info.backend_pid), ("from busy", pid)
        }
    finally:
        busy.close()
        other.close()

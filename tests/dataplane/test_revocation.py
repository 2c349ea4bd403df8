"""Live revocation: a newly activated bundle that no longer allows a live session ends it
with a FATAL error the client sees, within a second, and the audit log says why; so does
certificate expiry when the cluster says `disconnect_expired_cert`."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from dataplane.postgres import messages as pm
from tests.dataplane import rawclient
from tests.dataplane.conftest import DataPath, base_bundle
from tests.dataplane.support import role, sign
from tests.dataplane.test_cancel import wait_running
from tests.fixtures.pg import PSQL_DEFAULTS, client_env

pytestmark = pytest.mark.slow


@pytest.fixture
def restore(path: DataPath) -> Iterator[None]:
    yield
    path.restore()


def wait_end_event(path: DataPath, predicate: object, timeout: float = 5.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in path.audit.of_type("db.session.end"):
            if predicate(event):  # type: ignore[operator]
                return event
        time.sleep(0.02)
    raise AssertionError("no matching db.session.end event")


def test_a_bundle_that_removes_access_ends_a_running_psql_within_a_second(
    path: DataPath, restore: None
) -> None:
    dsn = path.dsn(path.cert("bob"), "bob", "main")
    proc = subprocess.Popen(
        ["psql", *PSQL_DEFAULTS, "-c", "select pg_sleep(30)", "-d", dsn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(),
    )
    try:
        wait_running(path, "select pg_sleep(30)")
        # bob is removed from the policy.
        revoked = path.next_bundle(users={"alice": ["admin"], "carol": ["dev"]})
        started = time.monotonic()
        path.publish(revoked)
        _, stderr = proc.communicate(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert elapsed < 1.0, f"the session lasted {elapsed:.2f} s after the bundle's activation"
    assert (
        "FATAL:  access to database 'pg' as db user 'bob' was revoked: user 'bob' is not in the "
        "policy in force (commit "
    ) in stderr, stderr
    event = wait_end_event(path, lambda e: e.user == "bob" and "revoked" in e.reason)
    assert "was revoked" in event.reason  # type: ignore[attr-defined]
    # the query the client was running does not go on in the server either
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = path.pg.server.psql_admin(
            "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)'"
        )
        if left.strip() == "0":
            break
        time.sleep(0.05)
    assert left.strip() == "0"


def test_an_idle_session_gets_the_fatal_error_and_others_go_on(
    path: DataPath, restore: None
) -> None:
    bob = rawclient.connect(path.web_port, path.cert("bob"), path.pki.host_ca_file, "bob", "main")
    alice = rawclient.connect(path.web_port, path.cert("alice"), path.pki.host_ca_file,
                              "alice", "main")
    try:
        deny_main = path.next_bundle(
            roles=[
                role("admin", deny={"db_users": ["postgres"]}),
                role("dev", {"env": ["dev"]}, db_users=["{{internal.db_users}}"]),
                role("no-metrics", deny={"db_names": ["metrics", "main"]}),
            ]
        )
        path.publish(deny_main)
        message = bob.read_message()
        assert isinstance(message, pm.ErrorResponse)
        assert message.severity == "FATAL" and message.sqlstate == "28000"
        assert message.message == (
            "access to database 'pg' as db user 'bob' was revoked: db name 'main' is denied by "
            "role 'no-metrics'"
        )
        assert "no longer allows this session" in (message.hint or "")
        with pytest.raises(ConnectionError):
            bob.read_message()
        rows = alice.query("select 'still here'")  # alice is not affected
        assert any(isinstance(r, pm.DataRow) for r in rows)
    finally:
        bob.close()
        alice.close()


def test_a_revoked_session_mid_result_gets_the_error_after_a_whole_message(
    path: DataPath, restore: None
) -> None:
    bob = rawclient.connect(path.web_port, path.cert("bob"), path.pki.host_ca_file, "bob", "main")
    try:
        bob.send(pm.Query("select repeat('x', 5000) from generate_series(1, 20000)"))
        first = bob.read_message()  # RowDescription: the result is streaming
        assert isinstance(first, pm.RowDescription)
        path.publish(path.next_bundle(users={"alice": ["admin"], "carol": ["dev"]}))
        rows = 0
        while True:
            message = bob.read_message()  # the decoder checks every message is whole
            if isinstance(message, pm.DataRow):
                assert message.values == (b"x" * 5000,)
                rows += 1
                continue
            break
        assert isinstance(message, pm.ErrorResponse), message
        assert "is not in the policy in force" in (message.message or "")
    finally:
        bob.close()


def test_disconnect_expired_cert_ends_the_session_at_expiry(
    path: DataPath, restore: None
) -> None:
    path.publish(sign(base_bundle(path.pki, path.serial + 1, disconnect_expired_cert=True),
                      path.key))
    path.serial += 1
    cert = path.pki.route_cert("alice", ["admin"], "pg", ttl=timedelta(seconds=3))
    session = rawclient.connect(path.web_port, cert, path.pki.host_ca_file, "alice", "main")
    try:
        session.send(pm.Query("select pg_sleep(20)"))
        message = session.read_message()
        assert isinstance(message, pm.ErrorResponse), message
        assert message.severity == "FATAL"
        assert "the certificate of 'alice' expired at" in (message.message or "")
        assert "disconnects sessions of expired certificates" in (message.message or "")
    finally:
        session.close()

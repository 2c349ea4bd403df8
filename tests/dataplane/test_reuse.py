"""Server connections kept between sessions of the same person (db_service.server_idle_timeout).

Real psycopg through the proxy and the agent to a real PostgreSQL: only a client that
reconnects has its server connection kept (a one-off session's server process ends with
it, as directly). The other tests keep every clean end (`keep_after` 1), so that one
earlier session is enough to show what a kept connection does: it is
reset (DISCARD ALL) before its next session, serves only the same Teleport user with the
same db user, db name and options, is never kept with work or a transaction left in it, is
dropped when the server ends it, gives its slot back when the database is full, and goes
when its idle time is up. Each session on it is audited as its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from dataplane.agent.engine import PostgresEngine
from dataplane.agent.reuse import KEEP_AFTER, SERVER_IDLE_TIMEOUT
from tests.dataplane.conftest import DataPath

pytestmark = pytest.mark.slow


def engine_of(path: DataPath) -> PostgresEngine:
    return path.agents[0].service.engine  # type: ignore[union-attr, no-any-return]


def kept(path: DataPath) -> int:
    return path.agents[0].thread.call(lambda: len(engine_of(path).reuse))


def wait_kept(path: DataPath, count: int, timeout: float = 5.0) -> None:
    """The reset of a given-back connection runs after the client has gone: wait for it."""
    deadline = time.monotonic() + timeout
    while kept(path) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{kept(path)} kept server connections, not {count}")
        time.sleep(0.02)


def close_kept(path: DataPath, timeout: float = 5.0) -> None:
    """Once every session has ended and its connection is reset, close what is kept."""
    engine = engine_of(path)
    deadline = time.monotonic() + timeout
    while path.agents[0].thread.call(lambda: len(engine.registry) + engine.reuse.resetting):
        if time.monotonic() > deadline:
            raise AssertionError("sessions still running")
        time.sleep(0.02)
    path.agents[0].thread.call(engine.reuse.close_all)


def set_keep_after(path: DataPath, sessions: int) -> None:
    path.agents[0].thread.call(setattr, engine_of(path).reuse, "keep_after", sessions)


@pytest.fixture
def clean(path: DataPath) -> Iterator[DataPath]:
    """No kept connection from an earlier test, none left for the next; every clean end of
    a session is kept during the test."""
    close_kept(path)
    set_keep_after(path, 1)
    try:
        yield path
    finally:
        set_keep_after(path, KEEP_AFTER)
        close_kept(path)


def test_a_one_off_sessions_server_process_ends_with_it_and_a_reconnecting_one_is_kept(
    clean: DataPath,
) -> None:
    path = clean
    set_keep_after(path, KEEP_AFTER)  # the default: 2 sessions within server_idle_timeout
    with connect(path, application_name="reuse-one-off") as one:
        first = backend_pid(one)
    left = time.monotonic()
    assert backend_gone(path, first, timeout=1.0), "a one-off session's backend lingered"
    assert time.monotonic() - left < 1.0
    assert kept(path) == 0
    # the same client again, soon: now it connects often, and its connection is kept
    with connect(path, application_name="reuse-one-off") as two:
        second = backend_pid(two)
    wait_kept(path, 1)
    with connect(path, application_name="reuse-one-off") as three:
        assert backend_pid(three) == second


def connect(path: DataPath, user: str = "alice", db_user: str = "alice", dbname: str = "main",
            **extra: Any) -> psycopg.Connection[Any]:
    dsn = path.dsn(path.cert(user), db_user, dbname, **extra)
    return psycopg.connect(dsn, autocommit=True)


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def backend_gone(path: DataPath, pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.pg.server.psql_admin(
            f"select count(*) from pg_stat_activity where pid = {pid}"
        ).strip() == "0":
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def alice_may_be_bob(path: DataPath) -> Iterator[None]:
    path.pg.server.psql_admin("grant bob to alice")
    yield
    path.pg.server.psql_admin("revoke bob from alice")


@pytest.mark.usefixtures("alice_may_be_bob")
def test_the_next_session_gets_the_server_connection_reset(clean: DataPath) -> None:
    path = clean
    with connect(path) as one:
        first = backend_pid(one)
        one.execute("set datestyle = 'German'")
        one.execute("set search_path = nowhere")
        one.execute("set my.flag = 'left behind'")
        one.execute("create temp table left_behind (x int)")
        one.execute("prepare left_behind as select 1")
        one.execute("select pg_advisory_lock(4242)")
        one.execute("listen left_behind")
        one.execute("declare left_behind cursor with hold for select 1")
        one.execute("set role bob")
        assert one.execute("select current_user").fetchone() == ("bob",)
        assert one.info.parameter_status("DateStyle") == "German, DMY"
    wait_kept(path, 1)
    with connect(path) as two:
        assert backend_pid(two) == first  # the same server process: no new login
        assert two.info.backend_pid == first
        assert two.info.parameter_status("DateStyle") == "ISO, MDY"
        row = two.execute(
            "select current_user, session_user, current_setting('search_path'),"
            " coalesce(current_setting('my.flag', true), ''),"
            " to_regclass('pg_temp.left_behind') is null,"
            " (select count(*) from pg_prepared_statements),"
            " (select count(*) from pg_locks where locktype = 'advisory'"
            "  and pid = pg_backend_pid()),"
            " (select count(*) from pg_listening_channels()),"
            " (select count(*) from pg_cursors)"
        ).fetchone()
        assert row == ("alice", "alice", '"$user", public', "", True, 0, 0, 0, 0)
    wait_kept(path, 1)


def test_each_session_on_a_kept_connection_is_audited_as_its_own(clean: DataPath) -> None:
    path = clean
    ids = []
    for n in range(2):
        with connect(path, application_name="reuse-audit") as conn:
            conn.execute(f"select {n + 100} as reuse_audit")
            ids.append(backend_pid(conn))
        wait_kept(path, 1)
    assert ids[0] == ids[1]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        queries = [e for e in path.audit.of_type("db.session.query")
                   if "reuse_audit" in e.query]
        ends = {e.session_id for e in path.audit.of_type("db.session.end")}
        if len(queries) == 2 and all(q.session_id in ends for q in queries):
            break
        time.sleep(0.05)
    assert [q.query for q in queries] == ["select 100 as reuse_audit", "select 101 as reuse_audit"]
    assert queries[0].session_id != queries[1].session_id
    starts = {e.session_id: e for e in path.audit.of_type("db.session.start")}
    for query in queries:
        assert starts[query.session_id].user == "alice"
    assert all(q.session_id in ends for q in queries)


def test_only_the_same_person_with_the_same_login_gets_it(clean: DataPath) -> None:
    path = clean
    with connect(path, application_name="reuse-a") as one:
        first = backend_pid(one)
    wait_kept(path, 1)
    # another Teleport user as the same db user, and the same user with other options
    with connect(path, user="bob", db_user="alice", application_name="reuse-a") as other:
        assert backend_pid(other) != first
    with connect(path, application_name="reuse-b") as other:
        assert backend_pid(other) != first
    with connect(path, dbname="bench", application_name="reuse-a") as other:
        assert backend_pid(other) != first
    with connect(path, application_name="reuse-a") as same:
        assert backend_pid(same) == first


def test_work_left_in_the_session_is_never_kept(clean: DataPath) -> None:
    path = clean
    path.pg.server.psql_admin("drop table if exists left_in_a_transaction", "bench")
    one = connect(path, dbname="bench")
    first = backend_pid(one)
    one.execute("begin")
    one.execute("create table left_in_a_transaction (x int)")
    one.close()  # Terminate inside the transaction (leaving a `with` block would commit)
    assert backend_gone(path, first)  # the open transaction went with its server process
    assert kept(path) == 0
    with connect(path, dbname="bench") as two:
        assert backend_pid(two) != first
        row = two.execute("select to_regclass('left_in_a_transaction') is null").fetchone()
        assert row == (True,)


def test_a_kept_connection_the_server_ended_is_not_handed_out(clean: DataPath) -> None:
    path = clean
    with connect(path) as one:
        first = backend_pid(one)
    wait_kept(path, 1)
    path.pg.server.psql_admin(f"select pg_terminate_backend({first})")
    wait_kept(path, 0)
    with connect(path) as two:
        assert backend_pid(two) != first
        assert two.execute("select 1").fetchone() == (1,)


def test_kept_connections_give_way_when_the_database_is_full(clean: DataPath) -> None:
    path = clean
    path.pg.server.psql_admin("alter role bob connection limit 1")
    try:
        with connect(path, db_user="bob", application_name="reuse-full-1") as one:
            first = backend_pid(one)
        wait_kept(path, 1)  # it holds bob's only slot
        with connect(path, db_user="bob", application_name="reuse-full-2") as two:
            assert backend_pid(two) != first
        assert backend_gone(path, first)
    finally:
        path.pg.server.psql_admin("alter role bob connection limit -1")


@pytest.mark.parametrize(
    ("limit", "value"),
    [("idle_timeout", 0.3), ("max_lifetime", 0.0)],
    ids=["its idle time is up", "past its lifetime"],
)
def test_a_kept_connection_goes_when(clean: DataPath, limit: str, value: float) -> None:
    path = clean
    reuse = engine_of(path).reuse
    before = getattr(reuse, limit)
    path.agents[0].thread.call(setattr, reuse, limit, value)
    try:
        with connect(path) as one:
            first = backend_pid(one)
        assert backend_gone(path, first)
        assert kept(path) == 0
    finally:
        path.agents[0].thread.call(setattr, reuse, limit, before)


@pytest.fixture
def alice_creates_databases(path: DataPath) -> Iterator[None]:
    path.pg.server.psql_admin("alter role alice createdb")
    yield
    path.pg.server.psql_admin("alter role alice nocreatedb")
    for name in ("scratch", "scratch_renamed", "scratch_copy"):
        path.pg.server.psql_admin(f"drop database if exists {name}")


@pytest.mark.usefixtures("alice_creates_databases")
@pytest.mark.parametrize(
    "sql",
    [
        "drop database scratch",
        "alter database scratch rename to scratch_renamed",
        "create database scratch_copy template scratch",
    ],
)
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_a_database_someone_just_left_can_be_dropped(
    clean: DataPath, sql: str, protocol: str
) -> None:
    # PostgreSQL waits up to 5 s for every other connection to such a database to go, then
    # fails the statement: a kept connection would never go, though its client left.
    path = clean
    path.pg.server.psql_admin("create database scratch owner alice")
    with connect(path, dbname="scratch") as one:
        first = backend_pid(one)
    wait_kept(path, 1)
    with connect(path) as admin:
        if protocol == "simple":
            result = admin.pgconn.exec_(sql.encode())  # libpq's PQexec: one Query message
            assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message
        else:
            admin.execute(sql, prepare=True)  # Parse, Bind, Execute, Sync (raises if it fails)
    assert backend_gone(path, first)


@pytest.mark.usefixtures("alice_creates_databases")
def test_a_database_left_through_the_agent_can_be_dropped_around_it(clean: DataPath) -> None:
    # A DROP DATABASE sent directly, or through another agent, does not tell this one. The
    # server waits up to 5 s for the database's other connections to go: a kept one goes
    # server_idle_timeout after its session ended, by default in less (a test runner drops
    # the database its sessions through the proxy just used).
    path = clean
    assert engine_of(path).reuse.idle_timeout == SERVER_IDLE_TIMEOUT
    path.pg.server.psql_admin("create database scratch owner alice")
    with connect(path, dbname="scratch") as one:
        first = backend_pid(one)
    wait_kept(path, 1)
    path.pg.server.psql_admin("drop database scratch")  # raises if the server refuses it
    assert backend_gone(path, first, timeout=0.1)
    assert kept(path) == 0


def test_a_role_changed_through_the_proxy_is_seen_by_the_next_session(clean: DataPath) -> None:
    path = clean
    try:
        with connect(path, application_name="reuse-role") as one:
            first = backend_pid(one)
        wait_kept(path, 1)
        with connect(path, application_name="reuse-role") as two:
            assert backend_pid(two) == first
            two.execute("alter role alice set work_mem = '3MB'")  # for its next logins
        # The connection logged in before the change is not kept: it has the old default.
        assert backend_gone(path, first)
        with connect(path, application_name="reuse-role") as three:
            assert backend_pid(three) != first
            assert three.execute("show work_mem").fetchone() == ("3MB",)
    finally:
        path.pg.server.psql_admin("alter role alice reset work_mem")

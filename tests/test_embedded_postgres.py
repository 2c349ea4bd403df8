"""The embedded PostgreSQL on its own: TLS with client certificates, lifecycle, errors, helpers.

Every test runs the real server and the real psql/pgbench over loopback. Tests that restart
or stop a server start their own; the rest share the session-wide `pg_server`.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from launcher.embedded_postgres import (
    AdminSQLError,
    DataAreaUnreachable,
    EmbeddedPostgres,
    HostRule,
    PostgresNotFound,
    PostgresStartError,
    find_binaries,
    free_tcp_port,
)
from tests.fixtures.pg import (
    PgPKI,
    PgServer,
    client_env,
    run_pgbench,
    run_psql,
    start_server,
)


def _processes_working_in(directory: Path) -> list[int]:
    """Pids of live processes whose working directory is `directory` (postgres chdirs there)."""
    target = directory.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == target:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective uid
    raise AssertionError(f"no Uid line for pid {pid}")


# ----------------------------------------------------------------------- TLS and cert auth


def test_alice_connects_with_verify_full_and_a_certificate_from_the_ca(pg_server: PgServer) -> None:
    done = run_psql(
        pg_server.conninfo("alice"),
        "select current_user, ssl, version from pg_stat_ssl where pid = pg_backend_pid()",
    )
    assert done.returncode == 0, done.stderr
    user, ssl, version = done.stdout.strip().split("|")
    assert (user, ssl) == ("alice", "t")
    assert version in ("TLSv1.2", "TLSv1.3")


def test_session_server_has_the_roles_and_databases_tests_rely_on(pg_server: PgServer) -> None:
    roles = pg_server.server.psql_admin(
        "select rolname || ':' || rolsuper from pg_roles where rolname in "
        "('alice', 'bob', 'postgres') order by 1"
    ).split()
    assert roles == ["alice:false", "bob:false", "postgres:true"]
    databases = run_psql(
        pg_server.conninfo("bob", "metrics"),
        "select string_agg(datname, ',' order by datname) from pg_database "
        "where not datistemplate",
    )
    assert databases.returncode == 0, databases.stderr
    assert set(databases.stdout.strip().split(",")) >= {"postgres", "metrics", "main"}
    setting = run_psql(pg_server.conninfo("alice", "main"), "show max_connections")
    assert setting.stdout.strip() == "200"


def test_certificate_from_another_ca_is_rejected(pg_server: PgServer) -> None:
    stranger = pg_server.pki.other_ca.issue_client("alice", file_stem="stranger-alice")
    done = run_psql(pg_server.conninfo("alice", cert=stranger), "select current_user")
    assert done.returncode != 0
    assert "unknown ca" in done.stderr
    assert done.stdout == ""


def test_certificate_for_another_user_is_rejected(pg_server: PgServer) -> None:
    done = run_psql(
        pg_server.conninfo("bob", cert=pg_server.client_cert("alice")), "select current_user"
    )
    assert done.returncode != 0
    assert 'certificate authentication failed for user "bob"' in done.stderr


def test_plain_tcp_is_rejected_by_pg_hba(pg_server: PgServer) -> None:
    done = run_psql(pg_server.conninfo("alice", sslmode="disable"), "select 1")
    assert done.returncode != 0
    assert "no pg_hba.conf entry" in done.stderr
    assert "no encryption" in done.stderr


def test_tls_without_a_client_certificate_is_rejected(pg_server: PgServer) -> None:
    done = run_psql(
        pg_server.conninfo("alice", sslcert="/nonexistent.crt", sslkey="/nonexistent.key"),
        "select 1",
    )
    assert done.returncode != 0
    assert "certificate" in done.stderr


def test_server_runs_unprivileged_and_keeps_its_key_private(pg_server: PgServer) -> None:
    server = pg_server.server
    pid = server.pid
    assert pid is not None
    assert _uid_of(pid) == server.user.uid
    if os.geteuid() == 0:
        assert server.user.uid != 0
    key = (server.tls_dir / "server.key").stat()
    assert stat.S_IMODE(key.st_mode) == 0o600
    assert key.st_uid == server.user.uid
    area = server.data_dir.stat()
    assert stat.S_IMODE(area.st_mode) == 0o700
    assert area.st_uid == server.user.uid
    assert stat.S_IMODE(server.socket_dir.stat().st_mode) == 0o700
    client_key = pg_server.client_cert("alice").key_file.stat()
    assert stat.S_IMODE(client_key.st_mode) == 0o600
    assert client_key.st_uid == os.geteuid()


# ----------------------------------------------------------------------- lifecycle


def test_restart_keeps_data(pg_pki: PgPKI) -> None:
    server = start_server(pg_pki)
    try:
        server.create_role("alice")
        server.create_database("keep", owner="alice")
        pg = PgServer(server=server, pki=pg_pki)
        wrote = run_psql(
            pg.conninfo("alice", "keep"),
            "create table notes (body text); insert into notes values ('still here')",
        )
        assert wrote.returncode == 0, wrote.stderr
        first_pid = server.pid
        server.restart()
        assert server.pid not in (None, first_pid)
        read = run_psql(pg.conninfo("alice", "keep"), "select body from notes")
        assert read.returncode == 0, read.stderr
        assert read.stdout == "still here\n"
    finally:
        server.destroy()


def test_stop_ends_sessions_and_leaves_no_process_behind(pg_pki: PgPKI) -> None:
    server = start_server(pg_pki)
    try:
        server.create_role("alice")
        pg = PgServer(server=server, pki=pg_pki)
        session = subprocess.Popen(
            ["psql", "-X", "-At", "-c", "select pg_sleep(60)", "-d", pg.conninfo("alice")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env(),
        )
        try:
            deadline = time.monotonic() + 20
            while "alice" not in server.psql_admin("select usename from pg_stat_activity"):
                assert time.monotonic() < deadline, "the psql session never showed up"
                time.sleep(0.05)
            postmaster = server.pid
            assert postmaster is not None
            workers = _processes_working_in(server.pgdata)
            assert postmaster in workers and len(workers) > 2  # backends and helpers too

            server.stop()

            _out, err = session.communicate(timeout=20)
        finally:
            if session.poll() is None:
                session.kill()
                session.wait()
        assert session.returncode != 0
        assert "terminating connection due to administrator command" in err
        assert not server.is_running()
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists(), f"process {pid} survived stop()"
        assert _processes_working_in(server.pgdata) == []
        assert not (server.pgdata / "postmaster.pid").exists()
        server.stop()  # stopping a stopped server is a no-op
    finally:
        server.destroy()


def test_second_handle_on_a_running_area_refuses_to_start_and_can_stop_it(pg_pki: PgPKI) -> None:
    server = start_server(pg_pki)
    try:
        twin = EmbeddedPostgres(
            server.data_dir, port=free_tcp_port(), tls=pg_pki.server_tls, fsync=False
        )
        assert twin.pid == server.pid
        with pytest.raises(PostgresStartError, match=r"already runs .*stop it first"):
            twin.start()
        twin.stop()
        assert not server.is_running()
    finally:
        server.destroy()


def test_two_instances_run_side_by_side(pg_server: PgServer, pg_pki: PgPKI) -> None:
    other = start_server(pg_pki)
    try:
        with other:
            assert other.port != pg_server.port
            other.create_role("alice")
            other.psql_admin("create table only_here (x int)")
            second = PgServer(server=other, pki=pg_pki)
            here = run_psql(
                second.conninfo("alice"), "select current_setting('port'), to_regclass('only_here')"
            )
            there = run_psql(
                pg_server.conninfo("alice"),
                "select current_setting('port'), to_regclass('only_here')",
            )
            assert here.returncode == 0 and there.returncode == 0, here.stderr + there.stderr
            assert here.stdout.strip() == f"{other.port}|only_here"
            assert there.stdout.strip() == f"{pg_server.port}|"
        assert not other.is_running()  # the context manager stopped it
        assert pg_server.server.is_running()
    finally:
        other.destroy()
    assert not other.data_dir.exists()
    assert not other.data_dir.parent.exists()  # the directory temporary() made is gone too


def test_password_rule_added_by_reload(pg_pki: PgPKI) -> None:
    server = start_server(pg_pki)
    try:
        server.create_role("carol", password="s3cret 'quoted'")
        pg = PgServer(server=server, pki=pg_pki)
        no_cert = pg.conninfo("carol", sslcert="/nonexistent.crt", sslkey="/nonexistent.key")
        env = {"PGPASSWORD": "s3cret 'quoted'"}
        refused = run_psql(no_cert, "select current_user", env)
        assert refused.returncode != 0
        assert "certificate" in refused.stderr

        server.host_rules = (HostRule("scram-sha-256", users=("carol",)), HostRule("cert"))
        server.reload()
        deadline = time.monotonic() + 10
        while True:
            done = run_psql(no_cert, "select current_user", env)
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "carol\n"
        wrong = run_psql(no_cert, "select 1", {"PGPASSWORD": "wrong"})
        assert 'password authentication failed for user "carol"' in wrong.stderr
        alice = run_psql(pg.conninfo("alice", sslmode="verify-full"), "select 1")
        assert 'role "alice" does not exist' in alice.stderr  # cert rule still applies
    finally:
        server.destroy()


# ----------------------------------------------------------------------- errors a person sees


def test_missing_binaries_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PostgresNotFound) as info:
        find_binaries(search_path="", lib_root=tmp_path / "no-postgresql")
    message = str(info.value)
    assert "initdb, postgres" in message
    assert "apt-get install postgresql" in message
    assert str(tmp_path / "no-postgresql") in message


def test_highest_installed_version_with_both_server_programs_is_chosen(tmp_path: Path) -> None:
    for version, programs in {
        "9.6": ("initdb", "postgres", "psql"),
        "15": ("initdb", "postgres", "psql"),
        "16": ("initdb",),  # incomplete: no postgres beside initdb
        "notes": ("initdb", "postgres"),
    }.items():
        bin_dir = tmp_path / version / "bin"
        bin_dir.mkdir(parents=True)
        for program in programs:
            (bin_dir / program).write_text("#!/bin/sh\nexit 1\n")
            (bin_dir / program).chmod(0o755)
    found = find_binaries(search_path="", lib_root=tmp_path)
    assert found.initdb == tmp_path / "15" / "bin" / "initdb"
    assert found.postgres == tmp_path / "15" / "bin" / "postgres"
    assert found.psql == tmp_path / "15" / "bin" / "psql"


def test_binaries_on_path_come_first() -> None:
    found = find_binaries()
    assert found.initdb.name == "initdb" and found.postgres.parent == found.initdb.parent


def test_start_failure_shows_the_end_of_the_log(pg_server: PgServer, pg_pki: PgPKI) -> None:
    clash = EmbeddedPostgres.temporary(port=pg_server.port, tls=pg_pki.server_tls, fsync=False)
    try:
        started = time.monotonic()
        with pytest.raises(PostgresStartError) as info:
            clash.start()
        assert time.monotonic() - started < clash.start_timeout  # it noticed the exit
        message = str(info.value)
        assert f"port {pg_server.port}" in message
        assert str(clash.log_file) in message
        assert "could not bind" in message or "could not create" in message
        assert not clash.is_running()
    finally:
        clash.destroy()
    assert pg_server.server.is_running()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the data area to another user")
def test_data_area_out_of_reach_of_the_server_user_is_explained(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    server = EmbeddedPostgres(private / "pg", port=free_tcp_port(), tls=None, host_rules=())
    with pytest.raises(DataAreaUnreachable) as info:
        server.start()
    message = str(info.value)
    assert "drwx------" in message
    assert repr(server.user.name) in message
    assert "temporary()" in message
    assert not (private / "pg").exists()


def test_cert_rule_without_tls_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hostssl rules need TLS"):
        EmbeddedPostgres(tmp_path / "pg", port=free_tcp_port(), tls=None)
    with pytest.raises(ValueError, match="cert method needs TLS"):
        HostRule("cert", tls_only=False)
    with pytest.raises(ValueError, match=r"cannot go in pg_hba\.conf"):
        HostRule("scram-sha-256", users=("bad name",))


def test_admin_sql_errors_say_what_failed(pg_server: PgServer) -> None:
    with pytest.raises(AdminSQLError, match='relation "no_such_table" does not exist'):
        pg_server.server.psql_admin("select * from no_such_table")


def test_create_role_and_database_are_idempotent(pg_server: PgServer) -> None:
    server = pg_server.server
    server.create_role("dave")
    server.create_role("dave", superuser=True)
    server.create_database("daves db", owner="dave")
    server.create_database("daves db", owner="dave")
    owner = server.psql_admin(
        "select rolname || ':' || rolsuper from pg_database d join pg_roles r "
        "on r.oid = d.datdba where datname = 'daves db'"
    )
    assert owner.strip() == "dave:true"


# ----------------------------------------------------------------------- client helpers


def test_run_psql_accepts_a_service_name(pg_server: PgServer, tmp_path: Path) -> None:
    cert = pg_server.client_cert("bob")
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text(
        "[test-main]\n"
        f"host=localhost\nhostaddr=127.0.0.1\nport={pg_server.port}\n"
        "user=bob\ndbname=main\nsslmode=verify-full\ngssencmode=disable\n"
        f"sslrootcert={pg_server.pki.ca.cert_file}\n"
        f"sslcert={cert.cert_file}\nsslkey={cert.key_file}\n"
    )
    done = run_psql(
        "test-main", "select current_user, current_database()", {"PGSERVICEFILE": str(service_file)}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "bob|main\n"


def test_run_psql_feeds_copy_from_standard_input(pg_server: PgServer) -> None:
    script = (
        "create temp table t (n int, word text);\n"
        "\\copy t from stdin\n1\tone\n2\ttwo\n3\tthree\n\\.\n"
        "select sum(n), string_agg(word, ',' order by n) from t;\n"
    )
    done = run_psql(pg_server.conninfo("alice"), ["-f", "-"], input=script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "6|one,two,three"


def test_pgbench_runs_with_32_clients(pg_server: PgServer, pgbench_db: str) -> None:
    done = run_pgbench(
        pg_server.conninfo("bob", pgbench_db), ["-n", "-S", "-c", "32", "-j", "2", "-t", "10"]
    )
    assert done.returncode == 0, done.stderr
    assert "number of transactions actually processed: 320/320" in done.stdout
    writes = run_pgbench(
        pg_server.conninfo("alice", pgbench_db), ["-n", "-M", "prepared", "-c", "2", "-t", "20"]
    )
    assert writes.returncode == 0, writes.stderr
    assert "number of transactions actually processed: 40/40" in writes.stdout

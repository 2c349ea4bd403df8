"""End to end: a real PostgreSQL set up with the files of `tctl auth sign --format=db`.

The server gets server.crt / server.key / server.cas from tctl and only `hostssl ... cert`
rules (127.0.0.1/32 and ::1/128). Real psql, sslmode=verify-full with sslrootcert =
server.cas, then proves what the db CA is for: a client certificate from it (CN = database
user) logs in; one from another CA with the very same name does not, and neither does a
client that trusts another CA for the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

import control.tctl as tctl
from control.ca import ClusterCAs, certificate_pem
from launcher.embedded_postgres import EmbeddedPostgres, ServerTLS, free_tcp_port
from tests.fixtures.pg import conninfo, run_psql
from transport.tls import new_private_key, private_key_pem

from .conftest import CLUSTER

pytestmark = pytest.mark.slow


def write_client(ca_set: ClusterCAs, db_user: str, directory: Path) -> tuple[Path, Path]:
    """A db-CA client certificate for `db_user`, written the way the agent would hold it."""
    directory.mkdir(parents=True, exist_ok=True)
    key = new_private_key()
    cert = ca_set.db.issue_db_client(key.public_key(), db_user, timedelta(hours=1))
    crt_path, key_path = directory / f"{db_user}.crt", directory / f"{db_user}.key"
    crt_path.write_bytes(certificate_pem(cert))
    key_path.touch(mode=0o600)
    key_path.write_bytes(private_key_pem(key))
    return crt_path, key_path


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmbeddedPostgres, ClusterCAs, ClusterCAs, Path]]:
    base = tmp_path_factory.mktemp("pg-e2e")
    cas = ClusterCAs.load_or_create(base / "data", CLUSTER)
    impostor = ClusterCAs.load_or_create(base / "impostor", CLUSTER)
    saved = tctl.SUBCOMMANDS
    tctl.SUBCOMMANDS = ["auth"]
    try:
        code = tctl.main(
            ["auth", "sign", "--format=db", "--host=localhost", f"--out={base / 'server'}",
             "--ttl=8760h", f"--data-dir={base / 'data'}"]
        )  # fmt: skip
    finally:
        tctl.SUBCOMMANDS = saved
    assert code == 0
    server = EmbeddedPostgres.temporary(
        port=free_tcp_port(),
        tls=ServerTLS(base / "server.crt", base / "server.key", base / "server.cas"),
        fsync=False,
    )
    try:
        server.start()
        server.create_role("alice")
        yield server, cas, impostor, base
    finally:
        server.destroy()


def psql_as(server: EmbeddedPostgres, user: str, crt: Path, key: Path, rootcert: Path) -> str:
    return conninfo(
        host="localhost",
        hostaddr="127.0.0.1",
        port=server.port,
        user=user,
        dbname="postgres",
        sslmode="verify-full",
        sslrootcert=str(rootcert),
        sslcert=str(crt),
        sslkey=str(key),
        gssencmode="disable",
        connect_timeout=10,
    )


def test_db_ca_client_certificate_is_accepted(setup) -> None:  # type: ignore[no-untyped-def]
    server, cas, _, base = setup
    crt, key = write_client(cas, "alice", base / "good")
    done = run_psql(
        psql_as(server, "alice", crt, key, base / "server.cas"),
        "select current_user || ' ' || (select ssl from pg_stat_ssl where pid = pg_backend_pid())",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "alice true"


def test_certificate_from_another_ca_is_rejected(setup) -> None:  # type: ignore[no-untyped-def]
    server, _, impostor, base = setup
    crt, key = write_client(impostor, "alice", base / "impostor-client")
    done = run_psql(psql_as(server, "alice", crt, key, base / "server.cas"), "select current_user")
    assert done.returncode != 0
    assert "alice" not in done.stdout
    assert any(
        hint in done.stderr
        for hint in ("certificate verify failed", "unknown ca", "bad certificate", "SSL error")
    ), done.stderr


def test_client_certificate_cn_must_be_the_database_user(setup) -> None:  # type: ignore[no-untyped-def]
    server, cas, _, base = setup
    crt, key = write_client(cas, "bob", base / "bob")
    done = run_psql(psql_as(server, "alice", crt, key, base / "server.cas"), "select 1")
    assert done.returncode != 0
    assert 'certificate authentication failed for user "alice"' in done.stderr


def test_psql_verifies_the_server_against_the_db_ca(setup) -> None:  # type: ignore[no-untyped-def]
    server, cas, impostor, base = setup
    crt, key = write_client(cas, "alice", base / "good2")
    wrong_root = base / "impostor-db-ca.crt"
    wrong_root.write_bytes(impostor.db.certificate_pem())
    done = run_psql(psql_as(server, "alice", crt, key, wrong_root), "select 1")
    assert done.returncode != 0
    assert "certificate verify failed" in done.stderr

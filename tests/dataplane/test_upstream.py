"""The agent's login to PostgreSQL: certificates and passwords, the database's CA, and
failures that say what went wrong."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control.ca import ClusterCAs
from schemas.bundle import BundleDatabase
from tests.dataplane.conftest import SAM_PASSWORD, DataPath, Pg
from tests.dataplane.support import Pki
from tests.fixtures.pg import run_psql

pytestmark = pytest.mark.slow
OTHER_NAME = socket.gethostname()


@pytest.fixture(scope="module")
def up(
    pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DataPath]:
    other = ClusterCAs.load_or_create(tmp_path_factory.mktemp("other-db-ca"), pki.cluster)
    wrong_ca = tmp_path_factory.mktemp("wrong") / "ca.crt"
    wrong_ca.write_bytes(other.db.certificate_pem())
    asked: list[tuple[str, str]] = []

    async def passwords(database: str, db_user: str) -> str | None:
        asked.append((database, db_user))
        return {"pgpass": SAM_PASSWORD, "pgwrongpass": "not it"}.get(database)

    dp = DataPath(pki, pg, signing_key)
    dp.bundle_bytes = dp.next_bundle()
    dp.asked = asked  # type: ignore[attr-defined]
    databases = [
        BundleDatabase(name="pgpass", uri=pg.uri),
        BundleDatabase(name="pgwrongpass", uri=pg.uri),
        BundleDatabase(name="pgnopass", uri=pg.uri),
        BundleDatabase(name="pgcafile", uri=pg.uri, ca_cert_file=str(pki.db_ca_file)),
        BundleDatabase(name="pgbadca", uri=pg.uri, ca_cert_file=str(wrong_ca)),
        # A name of this host that the server's certificate does not carry.
        BundleDatabase(name="pgverifyca", uri=f"{OTHER_NAME}:{pg.port}", tls_mode="verify-ca"),
        BundleDatabase(name="pgverifyfull", uri=f"{OTHER_NAME}:{pg.port}"),
        BundleDatabase(name="pgdown", uri="127.0.0.1:1"),
    ]
    try:
        dp.start_proxy("proxy-up")
        dp.start_agent("agent-up", databases=databases, password_provider=passwords)
        yield dp
    finally:
        dp.close()


def psql(
    dp: DataPath, service: str, user: str, sql: str = "select current_user"
) -> tuple[int, str, str]:
    done = run_psql(dp.dsn(dp.cert("alice", service), user, "main"), sql, timeout=30)
    return done.returncode, done.stdout.strip(), done.stderr


def test_a_password_from_the_provider_answers_scram(up: DataPath) -> None:
    assert psql(up, "pgpass", "sam")[:2] == (0, "sam")
    assert ("pgpass", "sam") in up.asked  # type: ignore[attr-defined]
    # certificate users never ask the provider
    assert psql(up, "pgpass", "alice")[:2] == (0, "alice")
    assert ("pgpass", "alice") not in up.asked  # type: ignore[attr-defined]


def test_a_wrong_password_is_the_server_error_unchanged(up: DataPath) -> None:
    code, _, err = psql(up, "pgwrongpass", "sam")
    assert code != 0
    assert 'FATAL:  password authentication failed for user "sam"' in err


def test_no_password_says_what_to_configure(up: DataPath) -> None:
    code, _, err = psql(up, "pgnopass", "sam")
    assert code != 0
    assert (
        "the server asks for a password (SCRAM-SHA-256) for database user 'sam', but none is "
        "configured"
    ) in err


def test_the_database_ca_file_is_used_and_checked(up: DataPath) -> None:
    assert psql(up, "pgcafile", "alice")[:2] == (0, "alice")
    code, _, err = psql(up, "pgbadca", "alice")
    assert code != 0
    assert "TLS with database 'pgbadca' at" in err and "certificate verify failed" in err


@pytest.mark.skipif(
    OTHER_NAME in ("localhost", "") or socket.gethostbyname(OTHER_NAME) != "127.0.0.1",
    reason="needs a second name for 127.0.0.1",
)
def test_verify_ca_checks_the_chain_only_and_verify_full_the_host_name(up: DataPath) -> None:
    assert psql(up, "pgverifyca", "alice")[:2] == (0, "alice")
    code, _, err = psql(up, "pgverifyfull", "alice")
    assert code != 0
    assert "TLS with database 'pgverifyfull'" in err and "Hostname mismatch" in err


def test_an_unreachable_database(up: DataPath) -> None:
    code, _, err = psql(up, "pgdown", "alice")
    assert code != 0
    assert "could not connect to database 'pgdown' at 127.0.0.1:1" in err
    assert "check that the database is running and reachable from the db agent" in err


def test_the_upstream_connection_is_tls_with_the_db_users_certificate(up: DataPath) -> None:
    code, out, err = psql(
        up, "pgcafile", "alice",
        "select ssl, client_dn from pg_stat_ssl where pid = pg_backend_pid()",
    )
    assert code == 0, err
    assert out == "t|/CN=alice"

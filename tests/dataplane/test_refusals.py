"""Every way a connection is refused gets its own clear message in psql, and no access."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from control.ca import ClusterCAs
from tests.dataplane.conftest import DataPath
from tests.fixtures.pg import run_psql

pytestmark = pytest.mark.slow


def refused(path: DataPath, dsn: str) -> str:
    done = run_psql(dsn, "select 'LEAKED'", timeout=30)
    assert done.returncode != 0
    assert "LEAKED" not in done.stdout
    return done.stderr


def test_wrong_db_user_for_the_route(path: DataPath) -> None:
    cert = path.cert("alice", db_user="alice")
    err = refused(path, path.dsn(cert, "bob", "main"))
    assert (
        "FATAL:  the certificate of 'alice' for database 'pg' is for db user 'alice', but the "
        "connection asks for db user 'bob': connect as 'alice', or run "
        "`tsh db login --db-user=bob pg` for a certificate for it"
    ) in err


def test_wrong_db_name_for_the_route(path: DataPath) -> None:
    cert = path.cert("alice", db_name="main")
    err = refused(path, path.dsn(cert, "alice", "metrics"))
    assert (
        "is for db name 'main', but the connection asks for db name 'metrics': connect to "
        "'main', or run `tsh db login --db-name=metrics pg`"
    ) in err


def test_route_defaults_fill_what_the_startup_leaves_open(path: DataPath) -> None:
    cert = path.cert("alice", db_user="alice", db_name="metrics")
    done = run_psql(path.dsn(cert, "alice", "metrics"), "select current_user, current_database()")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "alice|metrics"


def test_db_user_not_allowed_by_rbac(path: DataPath) -> None:
    err = refused(path, path.dsn(path.cert("carol", "pgdev"), "alice", "main"))
    assert (
        "FATAL:  access denied to 'carol' for database 'pgdev' as db user 'alice', db name "
        "'main': db user 'alice' is not allowed on database 'pgdev' (allowed: carol)"
    ) in err


def test_labels_that_do_not_match(path: DataPath) -> None:
    err = refused(path, path.dsn(path.cert("carol"), "carol", "main"))
    assert (
        "access denied to 'carol' for database 'pg' as db user 'carol', db name 'main': no role "
        "of 'carol' (dev) allows database 'pg' (labels: env=prod)"
    ) in err


def test_matching_labels_and_trait_template_let_carol_in(path: DataPath) -> None:
    done = run_psql(path.dsn(path.cert("carol", "pgdev"), "carol", "main"), "select current_user")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "carol"


def test_a_deny_rule_on_db_names(path: DataPath) -> None:
    err = refused(path, path.dsn(path.cert("bob"), "bob", "metrics"))
    assert "db name 'metrics' is denied by role 'no-metrics'" in err
    ok = run_psql(path.dsn(path.cert("bob"), "bob", "main"), "select 1")
    assert ok.returncode == 0, ok.stderr


def test_a_deny_rule_on_db_users(path: DataPath) -> None:
    err = refused(path, path.dsn(path.cert("alice"), "postgres", "main"))
    assert "db user 'postgres' is denied by role 'admin'" in err


def test_an_expired_certificate(path: DataPath) -> None:
    cert = path.pki.route_cert(
        "alice", ["admin"], "pg", now=datetime.now(UTC) - timedelta(hours=3)
    )
    err = refused(path, path.dsn(cert, "alice", "main"))
    assert "FATAL:  the client certificate was refused: certificate expired at " in err
    assert "run `tsh db login` again" in err


def test_a_certificate_from_another_ca(path: DataPath, tmp_path: Path) -> None:
    # Same cluster name, other keys: OpenSSL refuses it during the TLS handshake already.
    impostor = ClusterCAs.load_or_create(tmp_path / "impostor", path.pki.cluster)
    cert = path.pki.route_cert("alice", ["admin"], "pg", cas=impostor)
    err = refused(path, path.dsn(cert, "alice", "main"))
    # The proxy runs its client TLS over memory BIOs so that the alert reaches psql
    # (asyncio and uvloop drop it and psql would say only "server closed the connection").
    print(err)
    assert "SSL error: tlsv1 alert unknown ca" in err


def test_a_login_certificate_is_not_a_database_certificate(path: DataPath) -> None:
    err = refused(path, path.dsn(path.pki.login_cert("alice", ["admin"]), "alice", "main"))
    assert (
        "the client certificate was refused: this is a login certificate (from tsh login), not "
        "a database certificate: run `tsh db login <database>`"
    ) in err


def test_roles_no_longer_held_are_not_used(path: DataPath) -> None:
    cert = path.cert("carol", "pgdev", roles=["admin"])  # carol only has dev in the bundle
    err = refused(path, path.dsn(cert, "carol", "main"))
    assert "none of the roles in the certificate (admin) are still assigned to 'carol'" in err


def test_plain_text_startup(path: DataPath) -> None:
    err = refused(path, path.dsn(path.cert("alice"), "alice", "main", sslmode="disable"))
    assert (
        "FATAL:  TLS is required: connect with sslmode=verify-full and the files tsh db login "
        "wrote"
    ) in err


def test_no_client_certificate(path: DataPath) -> None:
    err = refused(path, path.dsn(None, "alice", "main"))
    assert (
        "FATAL:  no client certificate was presented: connect with sslcert/sslkey from "
        "`tsh db login`"
    ) in err


def test_no_agent_for_the_database(path: DataPath) -> None:
    err = refused(path, path.dsn(path.cert("alice", "nowhere"), "alice", "main"))
    assert "FATAL:  no agent is serving database 'nowhere'" in err


def test_server_errors_reach_psql_unchanged(path: DataPath) -> None:
    err = refused(path, path.dsn(path.cert("alice"), "dave", "main"))
    assert 'FATAL:  role "dave" does not exist' in err
    err = refused(path, path.dsn(path.cert("alice"), "alice", "nosuchdb"))
    assert 'FATAL:  database "nosuchdb" does not exist' in err


def test_refusals_are_audited_with_their_reason(path: DataPath) -> None:
    refused(path, path.dsn(path.cert("bob"), "bob", "metrics"))
    refused(path, path.dsn(path.cert("alice", db_user="alice"), "bob", "main"))
    starts = [e for e in path.audit.of_type("db.session.start") if not e.success]  # type: ignore[union-attr]
    reasons = [e.reason or "" for e in starts]
    assert any("db name 'metrics' is denied by role 'no-metrics'" in r for r in reasons)
    assert any("is for db user 'alice', but the connection asks for db user 'bob'" in r
               for r in reasons)
    denied = next(e for e in starts if "no-metrics" in (e.reason or ""))
    assert (denied.user, denied.db_service, denied.db_user, denied.db_name) == (
        "bob", "pg", "bob", "metrics"
    )

"""`tsh db ls | login | logout | config | env` against a real control plane: the databases
an agent serves, route certificates RBAC allows, and the user's own pg_service.conf."""

from __future__ import annotations

import json
import shlex
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dataplane.tsh.pgservice import read_section, section_names
from schemas.identity import Route, verify_identity
from tests.api.conftest import ApiCluster
from tests.tsh.conftest import PASSWORD, Tsh, proxy_of

FOREIGN = (
    b"# my own databases\r\n"
    b"[prod]   \r\n"
    b"host = db.prod.internal\r\n"
    b"port=5432\t\r\n"
    b"\r\n"
    b"# keep this comment\r\n"
    b"[root-aurora-staging]\r\n"
    b"host=staging"  # no line ending at the end of the file
)


def _logged_in(tsh: Tsh, cluster: ApiCluster, user: str = "alice") -> None:
    done = tsh("login", "--insecure", f"--proxy={proxy_of(cluster)}", f"--user={user}",
               stdin=f"{PASSWORD}\n")
    assert done.code == 0, done.err


def _profile(tsh: Tsh, cluster: ApiCluster) -> Path:
    return tsh.tsh_home / "profiles" / f"127.0.0.1_{cluster.port}"


def test_db_ls_shows_the_allowed_databases_as_in_the_seed(tsh: Tsh, cluster: ApiCluster) -> None:
    _logged_in(tsh, cluster)
    done = tsh("db", "ls")
    assert done.code == 0, done.err
    assert done.out.splitlines() == [
        "Name    Description Labels",
        "------- ----------- ----------------",
        "aurora  AWS Aurora  env=dev",
        "metrics Metrics     env=dev,team=obs",
    ]
    # vault (env=prod) is not shown: alice's role allows env=dev only.
    listed = json.loads(tsh("db", "ls", "--format", "json").out)
    assert [d["name"] for d in listed] == ["aurora", "metrics"]
    assert listed[0]["labels"] == {"env": "dev"}
    assert listed[0]["allowed_db_users"] == ["alice"]
    assert listed[0]["logged_in"] is False


def test_login_to_two_databases_keeps_the_users_sections(tsh: Tsh, cluster: ApiCluster) -> None:
    tsh.service_file.write_bytes(FOREIGN)
    _logged_in(tsh, cluster)

    first = tsh("db", "login", "aurora")
    assert first.code == 0, first.err
    assert 'psql "service=root-aurora user=alice dbname=postgres"' in first.out
    assert "GUI and JDBC clients: tsh db config aurora (--format=jdbc for a JDBC URL)." \
        in first.out
    second = tsh("db", "login", "metrics")
    assert second.code == 0, second.err

    data = tsh.service_file.read_bytes()
    assert data.startswith(FOREIGN + b"\r\n")
    assert section_names(data) == ["prod", "root-aurora-staging", "root-aurora", "root-metrics"]
    profile = _profile(tsh, cluster)
    assert read_section(data, "root-aurora") == {
        "host": "127.0.0.1",
        "port": str(cluster.port),
        "sslmode": "verify-full",
        "sslrootcert": str(profile / "host-ca.pem"),
        "sslcert": str(profile / "db" / "aurora.crt"),
        "sslkey": str(profile / "db" / "aurora.key"),
        "gssencmode": "disable",
        "user": "alice",
        "dbname": "postgres",
    }
    for name in ("aurora", "metrics"):
        assert stat.S_IMODE((profile / "db" / f"{name}.key").stat().st_mode) == 0o600
    # The route certificate is the user CA's, for the database; without --db-user and
    # --db-name it binds neither (psql's user/dbname choose, the agent's RBAC decides), and
    # the only values alice's roles allow are the section's defaults.
    user_ca = x509.load_pem_x509_certificate((cluster.data_dir / "ca/user.crt").read_bytes())
    identity = verify_identity((profile / "db" / "aurora.crt").read_bytes(), [user_ca],
                               datetime.now(UTC), "db")
    assert identity.route == Route(service="aurora", db_user=None, db_name=None)

    listed = tsh("db", "ls").out.splitlines()
    assert listed[2].startswith("> aurora ")
    assert listed[3].startswith("> metrics ")
    status = tsh("status").out
    assert "Databases:    aurora (user alice, db postgres)" in status
    assert "metrics (user alice, db postgres)" in status

    # Logging in again to the same database (new key, new certificate) rewrites its
    # section in place, with the same settings: the file does not change.
    cert_before = (profile / "db" / "aurora.crt").read_bytes()
    again = tsh("db", "login", "aurora")
    assert again.code == 0
    assert (profile / "db" / "aurora.crt").read_bytes() != cert_before
    assert tsh.service_file.read_bytes() == data

    # Log out of one, then of all: the user's bytes come back (with the line ending the
    # file's last line lacked).
    one = tsh("db", "logout", "aurora")
    assert one.code == 0, one.err
    assert "Logged out of database aurora" in one.out
    after_one = tsh.service_file.read_bytes()
    assert section_names(after_one) == ["prod", "root-aurora-staging", "root-metrics"]
    assert not (profile / "db" / "aurora.crt").exists()
    assert not (profile / "db" / "aurora.key").exists()
    assert not (profile / "db" / "aurora.pk8").exists()
    assert tsh("db", "ls").out.splitlines()[2].startswith("aurora ")
    every = tsh("db", "logout")
    assert every.code == 0
    assert "Logged out of database metrics" in every.out
    assert tsh.service_file.read_bytes() == FOREIGN + b"\r\n"
    assert tsh("db", "logout").out.strip() == "You are not logged in to any database."
    missing = tsh("db", "logout", "aurora")
    assert missing.code == 1
    assert "you are not logged in to database 'aurora'" in missing.err


def test_logout_removes_the_database_sections_too(tsh: Tsh, cluster: ApiCluster) -> None:
    tsh.service_file.write_bytes(FOREIGN)
    _logged_in(tsh, cluster)
    assert tsh("db", "login", "aurora").code == 0
    assert tsh("db", "login", "metrics").code == 0
    assert tsh("logout").code == 0
    assert tsh.service_file.read_bytes() == FOREIGN + b"\r\n"
    assert not _profile(tsh, cluster).exists()


def test_defaults_and_refusals_come_from_rbac(tsh: Tsh, cluster: ApiCluster) -> None:
    _logged_in(tsh, cluster, "bob")  # db users bob, reporting; db names main, metrics
    # Several values allowed: the route stays open and the section names no default.
    vague = tsh("db", "login", "aurora")
    assert vague.code == 0, vague.err
    assert "choose the db user and db name in psql" in vague.out
    assert 'psql "service=root-aurora user=\'<db user>\' dbname=\'<db name>\'"' in vague.out
    open_section = read_section(tsh.service_file.read_bytes(), "root-aurora")
    assert open_section is not None and "user" not in open_section
    assert tsh("db", "logout", "aurora").code == 0
    refused = tsh("db", "login", "--db-user=postgres", "--db-name=main", "aurora")
    assert refused.code == 1
    assert "tsh: error: access denied:" in refused.err
    assert "'postgres'" in refused.err
    assert read_section(tsh.service_file.read_bytes(), "root-aurora") is None
    done = tsh("db", "login", "--db-user=reporting", "--db-name=metrics", "aurora")
    assert done.code == 0, done.err
    section = read_section(tsh.service_file.read_bytes(), "root-aurora")
    assert section is not None
    assert (section["user"], section["dbname"]) == ("reporting", "metrics")
    unknown = tsh("db", "login", "vault")
    assert unknown.code == 1
    assert "`tsh db ls` lists those you can log in to" in unknown.err
    bad_name = tsh("db", "login", "../etc")
    assert bad_name.code == 2
    assert "is not a database name" in bad_name.err


def test_config_and_env_for_gui_clients_and_shells(tsh: Tsh, cluster: ApiCluster) -> None:
    _logged_in(tsh, cluster)
    nothing = tsh("db", "config")
    assert nothing.code == 1
    assert "you are not logged in to any database: run `tsh db login NAME`" in nothing.err
    assert tsh("db", "login", "aurora").code == 0
    profile = _profile(tsh, cluster)

    text = tsh("db", "config").out.splitlines()
    assert text[:5] == ["Name:     aurora", "Host:     127.0.0.1", f"Port:     {cluster.port}",
                        "User:     alice", "Database: postgres"]
    assert text[5] == f"CA:       {profile / 'host-ca.pem'}"
    assert text[6] == f"Cert:     {profile / 'db' / 'aurora.crt'}"
    assert text[7] == f"Key:      {profile / 'db' / 'aurora.key'}"
    assert text[8] == f"JDBC key: {profile / 'db' / 'aurora.pk8'}"

    # pgjdbc reads its key only as PKCS#8 DER: the same key, written 0600 at login.
    pem = (profile / "db" / "aurora.key").read_bytes()
    der = profile / "db" / "aurora.pk8"
    assert stat.S_IMODE(der.stat().st_mode) == 0o600
    assert serialization.load_der_private_key(der.read_bytes(), None).private_numbers() == \
        serialization.load_pem_private_key(pem, None).private_numbers()
    url = tsh("db", "config", "--format", "jdbc").out.strip()
    assert url == (
        f"jdbc:postgresql://127.0.0.1:{cluster.port}/postgres?user=alice&sslmode=verify-full"
        f"&sslrootcert={profile / 'host-ca.pem'}&sslcert={profile / 'db' / 'aurora.crt'}"
        f"&sslkey={der}"
    )
    # A login from before tsh wrote the DER file gets it when it is asked for.
    der.unlink()
    assert tsh("db", "config", "--format", "jdbc").out.strip() == url
    assert serialization.load_der_private_key(der.read_bytes(), None) is not None

    as_json = json.loads(tsh("db", "config", "aurora", "--format", "json").out)
    assert as_json["host"] == "127.0.0.1" and as_json["port"] == str(cluster.port)
    assert as_json["ca"] == str(profile / "host-ca.pem")
    assert as_json["service"] == "root-aurora"
    assert as_json["key_pk8"] == str(der) and as_json["jdbc_url"] == url

    cmd = shlex.split(tsh("db", "config", "--format", "cmd").out)
    assert cmd[0] == "psql"
    assert cmd[1].split() == [
        "host=127.0.0.1", f"port={cluster.port}", "sslmode=verify-full",
        f"sslrootcert={profile / 'host-ca.pem'}", f"sslcert={profile / 'db' / 'aurora.crt'}",
        f"sslkey={profile / 'db' / 'aurora.key'}", "gssencmode=disable", "user=alice",
        "dbname=postgres",
    ]

    env_line = tsh("db", "env").out.strip()
    assert env_line.startswith("export ")
    assignments = dict(part.split("=", 1) for part in shlex.split(env_line)[1:])
    assert assignments == {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(cluster.port),
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": str(profile / "host-ca.pem"),
        "PGSSLCERT": str(profile / "db" / "aurora.crt"),
        "PGSSLKEY": str(profile / "db" / "aurora.key"),
        "PGGSSENCMODE": "disable",
        "PGUSER": "alice",
        "PGDATABASE": "postgres",
    }

    assert tsh("db", "login", "metrics").code == 0
    which = tsh("db", "env")
    assert which.code == 1
    assert "several databases (aurora, metrics): name one" in which.err
    assert tsh("db", "env", "metrics").code == 0


def test_a_new_login_keeps_the_same_users_databases_and_drops_anothers(
    tsh: Tsh, cluster: ApiCluster
) -> None:
    _logged_in(tsh, cluster)
    assert tsh("db", "login", "aurora").code == 0
    _logged_in(tsh, cluster)  # alice again: her database login stays
    assert "Databases:    aurora (user alice, db postgres)" in tsh("status").out
    assert read_section(tsh.service_file.read_bytes(), "root-aurora") is not None
    _logged_in(tsh, cluster, "bob")  # another user on the same proxy: alice's go
    assert "Databases:" not in tsh("status").out
    assert read_section(tsh.service_file.read_bytes(), "root-aurora") is None
    assert not (_profile(tsh, cluster) / "db" / "aurora.crt").exists()


def test_logout_all_removes_every_profile(tsh: Tsh, cluster: ApiCluster) -> None:
    _logged_in(tsh, cluster)
    assert tsh("db", "login", "aurora").code == 0
    # A second profile: the same API under another name of this host.
    other = tsh("login", "--insecure", f"--proxy=localhost:{cluster.port}", "--user=bob",
                stdin=f"{PASSWORD}\n")
    assert other.code == 0, other.err
    status = tsh("status").out
    assert f"> Profile URL:  https://localhost:{cluster.port}" in status
    assert f"  Profile URL:  https://127.0.0.1:{cluster.port}" in status
    done = tsh("logout", "--all")
    assert done.code == 0
    assert f"Logged out alice from 127.0.0.1:{cluster.port}." in done.out
    assert f"Logged out bob from localhost:{cluster.port}." in done.out
    assert not list((tsh.tsh_home / "profiles").iterdir())
    assert read_section(tsh.service_file.read_bytes(), "root-aurora") is None


def test_an_expired_database_certificate_after_a_new_login(
    tsh: Tsh, cluster: ApiCluster
) -> None:
    done = tsh("login", "--insecure", f"--proxy={proxy_of(cluster)}", "--user=alice",
               "--ttl=3s", stdin=f"{PASSWORD}\n")
    assert done.code == 0, done.err
    assert tsh("db", "login", "aurora").code == 0
    cert = x509.load_pem_x509_certificate(
        (_profile(tsh, cluster) / "db" / "aurora.crt").read_bytes()
    )
    # A route certificate never outlives the login it came from.
    assert cert.not_valid_after_utc <= datetime.now(UTC) + timedelta(seconds=3)
    time.sleep(max(0.0, (cert.not_valid_after_utc - datetime.now(UTC)).total_seconds()) + 0.2)
    _logged_in(tsh, cluster)
    config = tsh("db", "config", "aurora")
    assert config.code == 1
    assert "your certificate for database 'aurora' expired at" in config.err
    assert "run `tsh db login aurora`" in config.err
    assert tsh("db", "ls").out.splitlines()[2].startswith("aurora ")  # not marked
    assert "aurora (user alice, db postgres, EXPIRED)" in tsh("status").out
    assert tsh("db", "login", "aurora").code == 0
    assert tsh("db", "config", "aurora").code == 0

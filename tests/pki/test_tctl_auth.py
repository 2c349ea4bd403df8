"""`tctl auth sign` and `tctl auth export` on a real data dir: files, modes, output, errors."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

import control.tctl as tctl
from control.ca import ClusterCAs, certificate_pem
from schemas.identity import Route, verify_identity

from .conftest import CLUSTER


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run `tctl ARGS...` in-process; (exit code, stdout, stderr).

    Only the auth subcommand is registered, so that this test does not depend on the
    other subcommands' modules.
    """
    monkeypatch.setattr(tctl, "SUBCOMMANDS", ["auth"])
    monkeypatch.delenv("TELEPORT_DATA_DIR", raising=False)

    def _run(*args: str) -> tuple[int, str, str]:
        try:
            code = tctl.main(list(args))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture
def data_dir(tmp_path: Path) -> tuple[Path, ClusterCAs]:
    path = tmp_path / "data"
    return path, ClusterCAs.load_or_create(path, CLUSTER)


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sign_db_server_files_modes_and_printed_config(
    run, data_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_umask: None
) -> None:
    path, cas = data_dir
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.chdir(out_dir)
    code, out, err = run(
        "auth", "sign", "--format=db", "--host=db.example.com,10.0.0.5", "--out=server",
        "--ttl=8760h", f"--data-dir={path}",
    )  # fmt: skip
    assert (code, err) == (0, "")
    crt, key, cas_file = out_dir / "server.crt", out_dir / "server.key", out_dir / "server.cas"
    assert mode(key) == 0o600
    assert mode(crt) == 0o644 and mode(cas_file) == 0o644
    assert cas_file.read_bytes() == cas.db.certificate_pem()
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    cert.verify_directly_issued_by(cas.db.certificate)
    assert abs(cert.not_valid_after_utc - datetime.now(UTC) - timedelta(hours=8760)) < timedelta(
        minutes=1
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["db.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert b"PRIVATE KEY" in key.read_bytes() and "PRIVATE KEY" not in out
    # The seed's lines, with the real absolute paths.
    assert "ssl = on\n" in out
    assert f"ssl_cert_file = '{crt}'\n" in out
    assert f"ssl_key_file = '{key}'\n" in out
    assert f"ssl_ca_file = '{cas_file}'\n" in out
    assert re.search(r"^hostssl all +all +::/0 +cert$", out, re.M)
    assert re.search(r"^hostssl all +all +0\.0\.0\.0/0 +cert$", out, re.M)


def test_sign_refuses_to_overwrite_without_the_flag(run, data_dir, tmp_path: Path) -> None:
    path, _ = data_dir
    prefix = tmp_path / "server"
    args = ["auth", "sign", "--format=db", "--host=localhost", f"--out={prefix}",
            f"--data-dir={path}"]  # fmt: skip
    assert run(*args)[0] == 0
    first = (tmp_path / "server.key").read_bytes()
    code, _, err = run(*args)
    assert code == 2 and "already exist" in err and "--overwrite" in err
    assert (tmp_path / "server.key").read_bytes() == first
    assert run(*args, "--overwrite")[0] == 0
    assert (tmp_path / "server.key").read_bytes() != first


def test_sign_for_a_robot_user(run, data_dir, tmp_path: Path, open_umask: None) -> None:
    path, cas = data_dir
    out_dir = tmp_path / "ci"
    code, out, err = run(
        "auth", "sign", "--user=ci-bot", "--format=db", "--db-service=aurora",
        "--db-user=reporter", "--db-name=metrics", "--roles=ci-readonly,auditor", "--ttl=1h",
        f"--out={out_dir}", "--proxy=proxy.example.com:3080", f"--data-dir={path}",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert mode(out_dir) == 0o700
    assert mode(out_dir / "ci-bot.key") == 0o600
    assert (out_dir / "ca.crt").read_bytes() == cas.host.certificate_pem()
    identity = verify_identity(
        (out_dir / "ci-bot.crt").read_bytes(), [cas.user.certificate], datetime.now(UTC), "db"
    )
    assert identity.username == "ci-bot"
    assert identity.roles == ("ci-readonly", "auditor")
    assert identity.route == Route(service="aurora", db_user="reporter", db_name="metrics")
    assert timedelta(minutes=59) < identity.expires - datetime.now(UTC) <= timedelta(hours=1)
    assert (
        f'psql "host=proxy.example.com port=3080 sslmode=verify-full '
        f"sslrootcert={out_dir}/ca.crt sslcert={out_dir}/ci-bot.crt "
        f'sslkey={out_dir}/ci-bot.key user=reporter dbname=metrics"'
    ) in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user=ci", "--db-service=a", "--ttl=1h"], "--roles is required"),
        (["--user=ci", "--roles=r", "--ttl=1h"], "--db-service is required"),
        (["--ttl=1h"], "--host is required"),
        (["--host=localhost", "--db-user=x"], "--db-user is only for --user"),
        (["--host=localhost", "--ttl=12"], "no unit"),
        (["--host=bad host!"], "neither an IP address nor a DNS name"),
        (["--host=localhost", "--ttl=100000h"], "outlive the db CA"),
    ],
)
def test_sign_usage_errors_exit_2(
    run, data_dir, tmp_path: Path, args: list[str], message: str
) -> None:
    path, _ = data_dir
    code, out, err = run(
        "auth", "sign", "--format=db", f"--out={tmp_path / 'x'}", f"--data-dir={path}", *args
    )
    assert code == 2, (out, err)
    assert message in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("x*"))


def test_export_prints_each_ca(run, data_dir) -> None:
    path, cas = data_dir
    for kind in ("user", "host", "db"):
        code, out, _ = run("auth", "export", f"--type={kind}", f"--data-dir={path}")
        assert code == 0
        assert out.encode() == certificate_pem(cas[kind].certificate)


def test_data_dir_from_the_environment(run, data_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    path, cas = data_dir
    monkeypatch.setenv("TELEPORT_DATA_DIR", str(path))
    code, out, _ = run("auth", "export", "--type=db")
    assert code == 0 and out.encode() == cas.db.certificate_pem()


def test_missing_data_dir_or_ca_exits_2(run, tmp_path: Path) -> None:
    code, _, err = run("auth", "export", "--type=user", f"--data-dir={tmp_path / 'nope'}")
    assert code == 2 and "does not exist" in err and "--data-dir" in err
    code, _, err = run(
        "auth", "sign", "--format=db", "--host=localhost", f"--out={tmp_path / 's'}",
        f"--data-dir={tmp_path}",
    )  # fmt: skip
    assert code == 2 and "no db CA" in err and "teleport start" in err


@contextlib.contextmanager
def as_postgres_user() -> Iterator[None]:
    """Run the block with the effective ids of the `postgres` OS user (we are root)."""
    os.setegid(104)
    os.seteuid(101)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to take another user's ids")
def test_unreadable_data_dir_exits_2(run) -> None:
    base = Path(tempfile.mkdtemp(prefix="tdb-pki-"))
    try:
        base.chmod(0o711)  # others may pass through to data/, not read it
        path = base / "data"
        ClusterCAs.load_or_create(path, CLUSTER)
        path.chmod(0o700)
        with as_postgres_user():
            code, _, err = run("auth", "export", "--type=user", f"--data-dir={path}")
        assert code == 2 and "not readable by this user" in err
    finally:
        shutil.rmtree(base)

"""`tsh login`, `tsh status`, `tsh logout` against a real control plane: trust (insecure,
CA pin, pinned CA), passwords, lockout, TTL, expiry, signup with the token `tctl users add`
prints, and the profile on disk."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import re
import select
import shlex
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from control import tctl
from launcher.embedded_postgres import free_tcp_port
from schemas.identity import fingerprint, verify_identity
from tests.api.conftest import ApiCluster
from tests.tsh.conftest import PASSWORD, Tsh, proxy_of


def _login(tsh: Tsh, cluster: ApiCluster, user: str, *extra: str, password: str = PASSWORD):
    return tsh("login", "--insecure", f"--proxy={proxy_of(cluster)}", f"--user={user}", *extra,
               stdin=f"{password}\n")


def _profile_dir(tsh: Tsh, cluster: ApiCluster) -> Path:
    return tsh.tsh_home / "profiles" / f"127.0.0.1_{cluster.port}"


def _host_pin(cluster: ApiCluster) -> str:
    return fingerprint(x509.load_pem_x509_certificate(cluster.host_ca))


def test_login_with_the_right_password_writes_a_private_profile(
    tsh: Tsh, cluster: ApiCluster
) -> None:
    done = _login(tsh, cluster, "alice")
    assert done.code == 0, done.err
    assert "WARNING: --insecure" in done.err
    assert _host_pin(cluster) in done.err
    assert f"> Profile URL:  https://127.0.0.1:{cluster.port}" in done.out
    assert "Logged in as: alice" in done.out
    assert "Cluster:      root" in done.out
    assert "Roles:        dev" in done.out
    assert PASSWORD not in done.out + done.err

    profile = _profile_dir(tsh, cluster)
    for directory in (tsh.tsh_home, profile):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("key.pem", "cert.pem", "host-ca.pem", "user-ca.pem", "profile.json"):
        assert stat.S_IMODE((profile / name).stat().st_mode) == 0o600, name
    # The key is ECDSA P-256, made here; the certificate is for it, from the user CA.
    key = load_pem_private_key((profile / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert = x509.load_pem_x509_certificate((profile / "cert.pem").read_bytes())
    assert cert.public_key() == key.public_key()
    user_ca = x509.load_pem_x509_certificate((cluster.data_dir / "ca/user.crt").read_bytes())
    der = cert.public_bytes(Encoding.DER)
    identity = verify_identity(der, [user_ca], datetime.now(UTC), "user")
    assert identity.username == "alice"
    assert (profile / "host-ca.pem").read_bytes().strip() == cluster.host_ca.strip()
    assert (tsh.tsh_home / "current-profile").read_text().strip() == profile.name

    status = tsh("status")
    assert status.code == 0, status.err
    assert "Logged in as: alice" in status.out
    assert "valid for" in status.out


def test_wrong_password_prints_the_api_message(tsh: Tsh, cluster: ApiCluster) -> None:
    done = _login(tsh, cluster, "bob", password="not the password")
    assert done.code == 1
    assert done.err.strip().endswith("tsh: error: invalid user name or password")
    assert "Traceback" not in done.err
    assert not (tsh.tsh_home / "current-profile").exists()
    # An unknown user gets the very same answer.
    unknown = _login(tsh, cluster, "nobody-here", password="whatever")
    assert unknown.code == 1
    assert unknown.err.strip().endswith("tsh: error: invalid user name or password")


def test_locked_account_prints_the_api_message(tsh: Tsh, cluster: ApiCluster) -> None:
    for _ in range(3):  # lockout_failures = 3
        assert _login(tsh, cluster, "lena", password="wrong guess").code == 1
    done = _login(tsh, cluster, "lena")
    assert done.code == 1
    assert "tsh: error: " in done.err
    assert "locked" in done.err
    assert "Traceback" not in done.err


def test_ttl_is_asked_for_and_shown(tsh: Tsh, cluster: ApiCluster) -> None:
    started = datetime.now(UTC)
    done = _login(tsh, cluster, "alice", "--ttl=5m")
    assert done.code == 0, done.err
    cert = x509.load_pem_x509_certificate(
        (_profile_dir(tsh, cluster) / "cert.pem").read_bytes()
    )
    assert started + timedelta(minutes=4) < cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= started + timedelta(minutes=5, seconds=1)
    assert re.search(r"valid for (4m5\ds|5m0s|5m)", done.out), done.out
    bad = tsh("login", "--insecure", f"--proxy={proxy_of(cluster)}", "--user=alice",
              "--ttl=12", stdin=f"{PASSWORD}\n")
    assert bad.code == 2
    assert "--ttl: duration '12' has no unit" in bad.err


def test_expired_profile_says_so_for_every_command(tsh: Tsh, cluster: ApiCluster) -> None:
    # Short, but long enough for the login itself (scrypt, two round trips) to finish.
    assert _login(tsh, cluster, "carl", "--ttl=3s").code == 0
    cert = x509.load_pem_x509_certificate(
        (_profile_dir(tsh, cluster) / "cert.pem").read_bytes()
    )
    time.sleep(max(0.0, (cert.not_valid_after_utc - datetime.now(UTC)).total_seconds()) + 0.2)
    for argv in (["db", "ls"], ["db", "login", "aurora"], ["db", "config"], ["db", "env"],
                 ["db", "connect", "aurora"], ["status"]):
        done = tsh(*argv)
        assert done.code == 1, argv
        assert "your session has expired, run tsh login" in done.err, (argv, done.err)
        assert "Traceback" not in done.err
    assert "EXPIRED" in tsh("status").out
    # Logging out needs no valid login.
    assert tsh("logout").code == 0


def test_without_insecure_an_unknown_ca_is_refused_with_advice(
    tsh: Tsh, cluster: ApiCluster
) -> None:
    done = tsh("login", f"--proxy={proxy_of(cluster)}", "--user=alice", stdin=f"{PASSWORD}\n")
    assert done.code == 2
    assert "is not trusted" in done.err
    assert "--ca-pin" in done.err and "--insecure" in done.err
    assert not (tsh.tsh_home / "current-profile").exists()


def test_ca_pin_trusts_the_right_ca_only(tsh: Tsh, cluster: ApiCluster) -> None:
    malformed = tsh("login", f"--proxy={proxy_of(cluster)}", "--user=alice", "--ca-pin=abc")
    assert malformed.code == 2
    assert "--ca-pin: the CA pin 'abc' is not sha256:<64 hex digits>" in malformed.err
    wrong = "sha256:" + "ab" * 32
    done = tsh("login", f"--proxy={proxy_of(cluster)}", "--user=alice", f"--ca-pin={wrong}",
               stdin=f"{PASSWORD}\n")
    assert done.code == 1
    assert f"not the pin {wrong}" in done.err
    good = tsh("login", f"--proxy={proxy_of(cluster)}", "--user=alice",
               f"--ca-pin={_host_pin(cluster)}", stdin=f"{PASSWORD}\n")
    assert good.code == 0, good.err
    assert "WARNING" not in good.err


def test_a_pinned_ca_is_used_by_the_next_login_without_flags(
    tsh: Tsh, cluster: ApiCluster
) -> None:
    assert _login(tsh, cluster, "alice").code == 0
    again = tsh("login", f"--proxy={proxy_of(cluster)}", "--user=alice", stdin=f"{PASSWORD}\n")
    assert again.code == 0, again.err
    assert "WARNING" not in again.err
    # Without --proxy, the current profile's proxy and user.
    third = tsh("login", stdin=f"{PASSWORD}\n")
    assert third.code == 0, third.err
    assert "Logged in as: alice" in third.out


def test_logout_removes_the_profile(tsh: Tsh, cluster: ApiCluster) -> None:
    assert _login(tsh, cluster, "alice").code == 0
    done = tsh("logout")
    assert done.code == 0
    assert f"Logged out alice from 127.0.0.1:{cluster.port}." in done.out
    assert not _profile_dir(tsh, cluster).exists()
    assert not (tsh.tsh_home / "current-profile").exists()
    assert tsh("logout").out.strip() == "You are not logged in."
    status = tsh("status")
    assert status.code == 1
    assert "you are not logged in" in status.err
    ls = tsh("db", "ls")
    assert ls.code == 1
    assert "you are not logged in: run `tsh login" in ls.err


def test_bad_proxy_addresses_and_unreachable_proxies(tsh: Tsh, cluster: ApiCluster) -> None:
    bad = tsh("login", "--insecure", "--proxy=no spaces:80", "--user=alice")
    assert bad.code == 2
    assert "is not a proxy address" in bad.err
    port = free_tcp_port()
    down = tsh("login", "--insecure", f"--proxy=127.0.0.1:{port}", "--user=alice",
               stdin=f"{PASSWORD}\n")
    assert down.code == 2
    assert f"cannot connect to https://127.0.0.1:{port}: connection refused" in down.err


def _signup_line(cluster: ApiCluster, name: str) -> list[str]:
    """Run `tctl users add` and return the tsh line it prints, split as a shell would."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = tctl.main(["users", "add", name, "--db-users", name, "--db-names", "main",
                          "--roles", "dev", "--data-dir", str(cluster.data_dir)])
    assert code == 0
    lines = [line.strip() for line in out.getvalue().splitlines()]
    line = next(line for line in lines if line.startswith("tsh login "))
    return shlex.split(line)


def _trusting(argv: list[str], cluster: ApiCluster) -> list[str]:
    """The signup line, with --ca-pin added if tctl did not already put a trust flag in."""
    if not any(a.startswith(("--ca-pin", "--insecure")) for a in argv):
        argv = [*argv, f"--ca-pin={_host_pin(cluster)}"]
    return argv


def test_signup_with_the_line_tctl_users_add_prints(tsh: Tsh, cluster: ApiCluster) -> None:
    argv = _signup_line(cluster, "dora")
    assert argv[:2] == ["tsh", "login"]
    assert f"--proxy=127.0.0.1:{cluster.port}" in argv
    new_password = "dora's own password 123"
    done = tsh(*_trusting(argv, cluster)[1:], stdin=f"{new_password}\n")
    assert done.code == 0, done.err
    assert "Signing up dora" in done.err
    assert "Password set for dora." in done.err
    assert "Logged in as: dora" in done.out
    # The token is spent; the password works.
    assert tsh(*_trusting(argv, cluster)[1:], stdin=f"{new_password}\n").code == 1
    again = tsh("login", f"--proxy={proxy_of(cluster)}", "--user=dora",
                stdin=f"{new_password}\n")
    assert again.code == 0, again.err


def test_signup_refusals_are_the_apis_messages(tsh: Tsh, cluster: ApiCluster) -> None:
    argv = _trusting(_signup_line(cluster, "eddy"), cluster)[1:]
    weak = tsh(*argv, stdin="short\n")
    assert weak.code == 1
    assert "password" in weak.err and "at least" in weak.err
    other = [a if not a.startswith("--user=") else "--user=alice" for a in argv]
    wrong_user = tsh(*other, stdin="a good long password\n")
    assert wrong_user.code == 1
    assert "this signup token is for user 'eddy', not 'alice'" in wrong_user.err
    bogus = [a if not a.startswith("--signup-token=") else "--signup-token=nope" for a in argv]
    assert tsh(*bogus, stdin="a good long password\n").code == 1


def test_tsh_as_a_real_process_reads_the_password_from_stdin(
    tmp_path: Path, cluster: ApiCluster
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(TELEPORT_HOME=str(tmp_path / "tsh"), HOME=str(tmp_path),
               PGSERVICEFILE=str(tmp_path / "pg_service.conf"))
    tsh_bin = Path(sys.executable).parent / "tsh"
    done = subprocess.run(
        [str(tsh_bin), "login", "--insecure", f"--proxy={proxy_of(cluster)}", "--user=alice"],
        input=f"{PASSWORD}\n", capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Logged in as: alice" in done.stdout
    assert PASSWORD not in done.stdout + done.stderr
    wrong = subprocess.run(
        [str(tsh_bin), "login", f"--proxy={proxy_of(cluster)}", "--user=alice"],
        input="wrong password\n", capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert wrong.returncode == 1
    assert wrong.stderr.strip().endswith("tsh: error: invalid user name or password")
    assert "Traceback" not in wrong.stderr


def _read_until(fd: int, marker: bytes, seen: bytearray, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} on the terminal; got {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(f"the terminal closed before {marker!r}; got {bytes(seen)!r}")
        seen += chunk


def test_on_a_terminal_the_password_is_asked_without_echo(
    tmp_path: Path, cluster: ApiCluster
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(TELEPORT_HOME=str(tmp_path / "tsh"), HOME=str(tmp_path),
               PGSERVICEFILE=str(tmp_path / "pg_service.conf"))
    tsh_bin = str(Path(sys.executable).parent / "tsh")
    argv = [tsh_bin, "login", "--insecure", f"--proxy={proxy_of(cluster)}", "--user=alice"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: tsh on a real terminal (its controlling tty)
        os.execve(tsh_bin, argv, env)
    seen = bytearray()
    try:
        _read_until(fd, b"Password for alice@", seen)
        os.write(fd, f"{PASSWORD}\n".encode())
        _read_until(fd, b"Valid until:", seen)
        with contextlib.suppress(OSError):
            while chunk := os.read(fd, 4096):
                seen += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, bytes(seen)
    assert PASSWORD.encode() not in seen
    assert b"Logged in as: alice" in seen

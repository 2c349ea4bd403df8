"""Seed 001's Getting Started, replayed command by command (self-hosted flavour).

The seed's commands run as real processes, with a local PostgreSQL (set up as the seed's
"Self-Hosted PostgreSQL" section says, with `tctl auth sign --format=db`) standing in for
Aurora. The only additions to the seed's command lines are `--data-dir` (the seed uses
/var/lib/teleport) and, for the new user's first login, the signup token `tctl users add`
prints. State (data dir, tsh profile, pg_service.conf) lives in the test's temp dir, and
the services use the seed's default ports 3080, 3024 and 3025.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.embedded_postgres import EmbeddedPostgres, ServerTLS, free_tcp_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery staple"


def _ports_free(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


class Shell:
    """Runs the seed's commands as a user would, with the test's environment."""

    def __init__(self, tmp: Path) -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PG")},
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(tmp / "home"),
            "TELEPORT_HOME": str(tmp / "home" / ".tsh"),
            "TELEPORT_DATA_DIR": str(tmp / "teleport"),
        }
        (tmp / "home").mkdir()

    def __call__(self, command: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            command,
            shell=True,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, f"$ {command}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr


@pytest.fixture
def shell(tmp_path: Path) -> Shell:
    return Shell(tmp_path)


@pytest.fixture
def cluster(tmp_path: Path, shell: Shell) -> Iterator[subprocess.Popen[str]]:
    if not _ports_free(3080, 3024, 3025):
        pytest.fail(
            "seed 001 uses ports 3080, 3024 and 3025 and something else holds one: if it is "
            "the quick start (make quickstart, teleport demo), stop it with Ctrl-C first"
        )
    pg_port = free_tcp_port()
    # Step 2/3 of the seed, with a local PostgreSQL instead of the Aurora endpoint.
    proc = subprocess.Popen(
        [
            str(BIN / "teleport"),
            "start",
            "--roles=proxy,auth,db",
            "--db-name=aurora",
            "--db-protocol=postgres",
            f"--db-uri=localhost:{pg_port}",
            f"--data-dir={tmp_path / 'teleport'}",
        ],
        env=shell.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "teleport" / "run" / "api.json").exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "teleport start did not come up in 60 s"
            time.sleep(0.1)
        proc.pg_port = pg_port  # type: ignore[attr-defined]
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_seed_001_getting_started(
    tmp_path: Path, shell: Shell, cluster: subprocess.Popen[str]
) -> None:
    # "Self-Hosted PostgreSQL": tctl auth sign, then postgresql.conf and pg_hba.conf.
    out = shell(
        f"cd {tmp_path} && tctl auth sign --format=db --host=localhost --out=server --ttl=8760h"
    )
    assert "ssl_cert_file" in out and "hostssl" in out
    pg = EmbeddedPostgres.temporary(
        port=cluster.pg_port,  # type: ignore[attr-defined]
        tls=ServerTLS(tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "server.cas"),
        fsync=False,
    )
    try:
        pg.start()
        pg.create_role("alice")  # as the seed's "CREATE USER alice;"

        # Create a user allowed to connect to database postgres as db account alice.
        out = shell("tctl users add alice root --db-names=postgres --db-users=alice")
        signup = re.search(r"(tsh login --proxy=\S+ --user=alice .*--signup-token=\S+)", out)
        assert signup, out
        shell(signup.group(1), stdin=PASSWORD + "\n")  # alice chooses her password

        # Step 3/3: log in, inspect, get credentials, connect.
        shell("tsh login --insecure --proxy=localhost:3080 --user=alice", stdin=PASSWORD + "\n")
        listed = shell("tsh db ls")
        assert re.search(r"^aurora\s", listed, re.MULTILINE), listed
        cluster_name = re.search(r"Cluster:\s+(\S+)", shell("tsh status")).group(1)  # type: ignore[union-attr]
        login = shell("tsh db login aurora")
        assert f'psql "service={cluster_name}-aurora user=alice dbname=postgres"' in login
        result = shell(
            f'psql "service={cluster_name}-aurora user=alice dbname=postgres" -X -At '
            '-c "select current_user"'
        )
        assert result.strip() == "alice"

        # "To log out of the database and remove credentials"
        shell("tsh db logout aurora")
        shell("tsh db logout")
    finally:
        pg.stop()
        pg.destroy()

"""The quick start as a newcomer runs it: `teleport demo --smoke`, a real process."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.ports import free_port_block


def test_demo_smoke_reaches_psql_through_the_proxy(tmp_path: Path) -> None:
    teleport = Path(sys.executable).with_name("teleport")
    proc = subprocess.run(
        [
            str(teleport),
            "demo",
            "--smoke",
            "--data-dir",
            str(tmp_path / "demo"),
            "--port",
            str(free_port_block(4)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "smoke test passed" in out
    # psql ran through the proxy as alice, over TLS to PostgreSQL.
    assert "alice        | t               | TLSv1." in out
    # tsh db ls showed the database as seed 001 does.
    assert "local Local PostgreSQL standing in for Aurora env=dev" in out
    # The query is in the audit log.
    assert "db.session.query  alice  local/postgres/alice" in out


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    teleport = Path(sys.executable).with_name("teleport")
    proc = subprocess.run(
        [str(teleport), "demo", "--smoke", "--data-dir", str(tmp_path), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "was not made by teleport demo" in proc.stdout
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_a_port_in_use_is_named_before_anything_is_touched(tmp_path: Path) -> None:
    """A second demo on the same ports (the first one still running) gets a clear error,
    and the data dir it would have wiped is left as it is."""
    base = free_port_block(4)
    data = tmp_path / "demo"
    data.mkdir()
    (data / ".teleport-demo").write_text("made by teleport demo; wiped at its next start\n")
    (data / "still-running.txt").write_text("the first demo's data")
    teleport = Path(sys.executable).with_name("teleport")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + 2))
        busy.listen()
        proc = subprocess.run(
            [str(teleport), "demo", "--smoke", "--data-dir", str(data), "--port", str(base)],
            capture_output=True, text=True, timeout=60, check=False,
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert f"port {base + 2} (the control plane's API) is in use" in out
    assert f"--port={base + 1000}" in out
    assert (data / "still-running.txt").read_text() == "the first demo's data"

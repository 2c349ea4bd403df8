"""`teleport start` and `teleport-agent run` when they cannot do what they were asked: a
clear error and an exit code, never a silent exit 0 (a failing role once stopped the
others and the process said nothing) and never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.cluster.conftest import TOKEN, start_control_plane
from tests.ports import free_port_block

TELEPORT = Path(sys.executable).with_name("teleport")
TELEPORT_AGENT = Path(sys.executable).with_name("teleport-agent")


def run_with_port_busy(port: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` while another socket listens on 127.0.0.1:`port`; check that it fails with
    exit 1, names the address, and shows no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr, (
        proc.stderr[-2000:]
    )
    return proc


def test_a_web_port_in_use_is_named_and_the_process_fails(tmp_path: Path) -> None:
    base = free_port_block(3)
    auth, web, tunnel = base, base + 1, base + 2
    config = tmp_path / "teleport.yaml"
    config.write_text(
        f"""teleport:
  nodename: localhost
auth_service:
  enabled: yes
  cluster_name: busy
  listen_addr: 127.0.0.1:{auth}
proxy_service:
  enabled: yes
  web_listen_addr: 127.0.0.1:{web}
  tunnel_listen_addr: 127.0.0.1:{tunnel}
"""
    )
    proc = run_with_port_busy(web, [
        str(TELEPORT), "start", "--roles=auth,proxy", "--config", str(config),
        "--data-dir", str(tmp_path / "data"),
    ])
    assert proc.stderr.rstrip().endswith(
        f"teleport: error: cannot listen on 127.0.0.1:{web}: Address already in use"
    ), proc.stderr[-2000:]


def test_teleport_agent_run_names_a_web_port_in_use_and_fails(tmp_path: Path) -> None:
    """A proxy joined to a real control plane, whose web port another process holds."""
    plane = start_control_plane(tmp_path / "auth")
    try:
        web = free_port_block(2)
        tunnel = web + 1
        config = tmp_path / "proxy.yaml"
        config.write_text(
            f"""teleport:
  nodename: localhost
proxy_service:
  enabled: yes
  web_listen_addr: 127.0.0.1:{web}
  tunnel_listen_addr: 127.0.0.1:{tunnel}
"""
        )
        run_with_port_busy(web, [
            str(TELEPORT_AGENT), "run", "--role=proxy", "--config", str(config),
            "--data-dir", str(tmp_path / "proxy"), f"--auth-server={plane.addr}",
            f"--token={TOKEN}", f"--ca-pin={plane.pin}",
        ])
    finally:
        plane.shutdown()

"""`teleport start` when it cannot do what it was asked: a clear error and an exit code,
never a silent exit 0 (a failing role once stopped the others and the process said
nothing) and never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.ports import free_port_block

TELEPORT = Path(sys.executable).with_name("teleport")


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
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", web))
        busy.listen()
        proc = subprocess.run(
            [str(TELEPORT), "start", "--roles=auth,proxy", "--config", str(config),
             "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.rstrip().endswith(
        f"teleport: error: cannot listen on 127.0.0.1:{web}: Address already in use"
    ), proc.stderr[-2000:]

"""Two agents (separate processes) serve one database: sessions spread over both; when one
is killed, new sessions go to the other at once, and the proxy stays up."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.dataplane.conftest import FAST_LINK, DataPath, Pg
from tests.dataplane.support import Pki
from tests.fixtures.pg import run_psql

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def start_agent_process(dp: DataPath, host_id: str, directory: Path) -> subprocess.Popen[str]:
    bundle = directory / "bundle"
    bundle.write_bytes(dp.bundle_bytes)
    public = dp.key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    config = {
        "role": "agent",
        "host_id": host_id,
        "pki_base": str(dp.pki.base),
        "bundle": str(bundle),
        "signing_public": base64.b64encode(public).decode(),
        "databases": [{"name": "pg", "uri": dp.pg.uri, "labels": {"env": "prod"}}],
        "proxies": [f"127.0.0.1:{dp.proxy_service.tunnel_address[1]}"],  # type: ignore[index]
        "pool_size": 2,
        # the proxy runs FAST_TUNNEL (dead after 2 s of silence): heartbeat as often
        "tunnel_options": FAST_LINK,
    }
    path = directory / f"{host_id}.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.dataplane.node", str(path)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline(), f"{host_id} did not start"
    return proc


@pytest.fixture
def two_agents(
    pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> Iterator[tuple[DataPath, dict[str, subprocess.Popen[str]]]]:
    dp = DataPath(pki, pg, signing_key)
    dp.bundle_bytes = dp.next_bundle()
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        dp.start_proxy("proxy-failover")
        for host_id in ("agent-a", "agent-b"):
            procs[host_id] = start_agent_process(dp, host_id, tmp_path)
        for host_id in procs:
            dp.wait_routable(host_id, timeout=20)
        yield dp, procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        dp.close()


def sessions_by_agent(dp: DataPath) -> dict[str, int]:
    links = dp.proxy.thread.call(dp.proxy_service.tunnel.agents)  # type: ignore[union-attr]
    return {link.host_id: link.sessions for link in links}


def test_killing_one_agent_sends_new_sessions_to_the_other(
    two_agents: tuple[DataPath, dict[str, subprocess.Popen[str]]],
) -> None:
    dp, procs = two_agents
    dsn = dp.dsn(dp.cert("alice"), "alice", "main")
    for _ in range(12):
        done = run_psql(dsn, "select 1")
        assert done.returncode == 0, done.stderr
    spread = sessions_by_agent(dp)
    assert set(spread) == {"agent-a", "agent-b"}
    assert all(count > 0 for count in spread.values()), spread  # random among equals

    procs["agent-a"].send_signal(signal.SIGKILL)
    procs["agent-a"].wait(10)
    started = time.monotonic()
    for _ in range(10):
        done = run_psql(dsn, "select 'still served'", timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "still served"
    assert time.monotonic() - started < 15
    after = sessions_by_agent(dp)
    assert "agent-a" not in after  # the proxy noticed the dead agent
    assert after["agent-b"] >= spread["agent-b"] + 10

"""An agent's link against the real control plane: bundles after a git push, db client
certificates, heartbeats in `tctl status`, and what keeps working when the control plane
is stopped."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from control import tctl
from dataplane.cluster import (
    BundleFeed,
    ControlPlaneClient,
    DbCertError,
    DbClientCerts,
    DynamicLabels,
    Heartbeater,
    HostCredentials,
    join,
)
from schemas.config import DatabaseConfig, LabelCommand
from schemas.identity import common_name, load_certificates
from tests.cluster.conftest import TOKEN, LiveControlPlane
from tests.cluster.helpers import run

DBA_ROLE = b"""\
kind: role
version: v5
metadata:
  name: dba
spec:
  allow:
    db_labels:
      env: prod
    db_users: ["postgres"]
    db_names: ["*"]
"""


@dataclass
class Agent:
    creds: HostCredentials
    client: ControlPlaneClient
    feed: BundleFeed
    stop: asyncio.Event


@asynccontextmanager
async def agent(cp: LiveControlPlane, data_dir: Path, role: str = "db",
                poll_wait: float = 30) -> AsyncIterator[Agent]:
    """A joined host with its bundle feed running, as `teleport start --roles=db` has it."""
    creds = await join(data_dir, cp.addr, TOKEN, role, ca_pin=cp.pin)  # type: ignore[arg-type]
    client = ControlPlaneClient(cp.addr, creds.api_context())
    feed = BundleFeed(data_dir, creds.cluster, creds.bundle_keys, client, poll_wait=poll_wait)
    stop = asyncio.Event()
    task = asyncio.create_task(feed.run(stop))
    try:
        yield Agent(creds, client, feed, stop)
    finally:
        stop.set()
        await task
        await client.aclose()


async def until(predicate, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


# --- bundles -------------------------------------------------------------------------------


def test_a_pushed_commit_is_in_force_on_the_agent_within_a_second(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    async def main() -> tuple[float, float]:
        async with agent(control_plane, agent_dir) as a:
            first = control_plane.serial()
            await until(lambda: a.feed.serial == first)
            assert a.feed.cache_file.exists()
            push = asyncio.create_task(asyncio.to_thread(
                control_plane.commit, {"roles/dba.yaml": DBA_ROLE}, "Add the dba role"))
            # the moment the control plane has published the new serial...
            await until(lambda: control_plane.serial() > first, timeout=20)
            published = time.monotonic()
            # ...to the moment the agent has it in force
            await until(lambda: a.feed.serial > first)
            activated = time.monotonic() - published
            await push
            current = a.feed.current
            assert current is not None and "dba" in current.roles
            assert current.serial == control_plane.serial()
            return activated, a.feed.activations

    activated, activations = run(main())
    assert activated < 1.0, f"activation took {activated:.3f}s after the publish"
    assert activations == 2


def test_a_restarted_agent_serves_its_cached_bundle_while_the_control_plane_is_down(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    async def first_run() -> tuple[HostCredentials, int]:
        async with agent(control_plane, agent_dir) as a:
            await until(lambda: a.feed.serial == control_plane.serial())
            return a.creds, a.feed.serial

    creds, serial = run(first_run())
    control_plane.shutdown()

    async def restart() -> None:
        again = await join(agent_dir, control_plane.addr, None, "db")  # no token, no network
        client = ControlPlaneClient(control_plane.addr, again.api_context(), timeout=1)
        feed = BundleFeed(agent_dir, again.cluster, again.bundle_keys, client)
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        await asyncio.sleep(0)
        assert feed.current is not None and feed.current.serial == serial
        await asyncio.sleep(1.0)  # fetches fail meanwhile; the bundle stays
        assert feed.current is not None and feed.current.serial == serial
        stop.set()
        await task
        await client.aclose()

    run(restart())
    assert creds.host_id


# --- db client certificates ------------------------------------------------------------


def test_db_client_certificates_are_cached_and_shared_by_concurrent_callers(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    async def main() -> None:
        async with agent(control_plane, agent_dir) as a:
            certs = DbClientCerts(a.client, trusted_db_cas=a.creds.db_cas)
            many = await asyncio.gather(*(certs.get("alice") for _ in range(20)))
            assert certs.requests == 1
            assert all(c is many[0] for c in many)
            assert await certs.get("alice") is many[0]  # cached
            assert certs.requests == 1
            others = await asyncio.gather(certs.get("bob"), certs.get("postgres"),
                                          certs.get("bob"))
            assert certs.requests == 3
            assert others[0] is others[2]
            cert = x509.load_pem_x509_certificate(many[0].cert_pem)
            assert common_name(cert) == "alice"
            [db_ca] = load_certificates(a.creds.db_cas[0])
            cert.verify_directly_issued_by(db_ca)
            assert "key_pem" not in repr(many[0])
            # the TLS context for PostgreSQL is built once per certificate
            assert many[0].client_context() is many[0].client_context()

    run(main())


def test_a_db_client_certificate_is_fetched_again_after_two_thirds_of_its_life(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    async def main() -> None:
        async with agent(control_plane, agent_dir) as a:
            certs = DbClientCerts(a.client, ttl=timedelta(seconds=3))
            first = await certs.get("alice")
            life = (first.expires - first.received).total_seconds()
            assert 1.5 < life <= 3.0
            assert await certs.get("alice") is first  # young: cached
            await asyncio.sleep((first.refresh_at - datetime.now(UTC)).total_seconds() + 0.05)
            second = await certs.get("alice")
            assert second is not first and second.cert_pem != first.cert_pem
            assert certs.requests == 2

    run(main())


def test_while_the_control_plane_is_down_a_cached_certificate_is_used_until_it_expires(
    control_plane: LiveControlPlane, agent_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with agent(control_plane, agent_dir) as a:
            certs = DbClientCerts(a.client, ttl=timedelta(seconds=6))
            cached = await certs.get("alice")
            await asyncio.to_thread(control_plane.shutdown)
            await asyncio.sleep((cached.refresh_at - datetime.now(UTC)).total_seconds() + 0.05)
            assert cached.usable()
            with caplog.at_level(logging.WARNING, "teleport.cluster.dbcerts"):
                assert await certs.get("alice") is cached  # due for refresh, but unreachable
            assert any("unreachable" in r.getMessage() for r in caplog.records)
            # a user never fetched before cannot be served
            with pytest.raises(DbCertError, match="no valid certificate is cached"):
                await certs.get("bob")
            # past the usable window even the cached one is refused
            while cached.usable():
                await asyncio.sleep(0.05)
            with pytest.raises(DbCertError, match="unreachable"):
                await certs.get("alice")

    run(main())


def test_a_proxy_is_refused_db_client_certificates(
    control_plane: LiveControlPlane, tmp_path: Path
) -> None:
    async def main() -> None:
        async with agent(control_plane, tmp_path / "proxy", role="proxy") as p:
            certs = DbClientCerts(p.client)
            with pytest.raises(DbCertError, match="refused"):
                await certs.get("alice")

    run(main())


# --- heartbeats --------------------------------------------------------------------------


def tctl_status(cp: LiveControlPlane) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert tctl.main(["status", "--data-dir", str(cp.data_dir)]) == 0
    return out.getvalue()


def test_heartbeats_put_the_agent_and_its_serial_in_tctl_status(
    control_plane: LiveControlPlane, agent_dir: Path, tmp_path: Path
) -> None:
    labels = DynamicLabels([DatabaseConfig(
        name="aurora", protocol="postgres", uri="localhost:5432", labels={"env": "prod"},
        commands=[LabelCommand(name="kernel", command=["uname", "-s"], period="1m")],
    )])

    async def main() -> None:
        async with agent(control_plane, agent_dir) as a:
            await until(lambda: a.feed.serial == control_plane.serial())
            await labels.refresh()
            beat = Heartbeater(a.client, a.creds.host_id, "db", serial=lambda: a.feed.serial,
                               databases=labels.database_infos, interval=0.5)
            a.feed.subscribe(lambda _bundle: beat.poke())
            stop = asyncio.Event()
            task = asyncio.create_task(beat.run(stop))
            await until(lambda: beat.sent >= 1)
            await until(lambda: "1 on serial" in tctl_status(control_plane))
            status = tctl_status(control_plane)
            assert f"Agents:         1 (1 on serial {a.feed.serial})" in status, status
            assert beat.last_ack is not None and beat.last_ack.serial == a.feed.serial

            # after a push, the agent reports the new serial at once (poke on activation)
            old = a.feed.serial
            await asyncio.to_thread(control_plane.commit, {"roles/dba.yaml": DBA_ROLE}, "dba")
            await until(lambda: a.feed.serial > old, timeout=20)
            await until(lambda: f"1 on serial {a.feed.serial}" in tctl_status(control_plane))
            stop.set()
            await task
            # the control plane knows the database with its static and dynamic labels
            assert control_plane.plane.api is not None
            record = control_plane.plane.api.state.inventory.get(a.creds.host_id,
                                                                 datetime.now(UTC))
            assert record is not None and record.serial == a.feed.serial
            [served] = record.databases
            assert served.name == "aurora"
            assert served.labels == {"env": "prod", "kernel": "Linux"}

    run(main())


def test_tunnel_addresses_reach_agents_when_a_proxy_heartbeats(
    control_plane: LiveControlPlane, tmp_path: Path
) -> None:
    async def main() -> list[list[str]]:
        async with agent(control_plane, tmp_path / "agent", "db") as a, \
                agent(control_plane, tmp_path / "proxy", "proxy") as p:
            agent_beat = Heartbeater(a.client, a.creds.host_id, "db", serial=lambda: 1,
                                     tunnel_addrs=a.creds.tunnel_addrs)
            heard: list[list[str]] = []
            agent_beat.on_tunnel_addrs(heard.append)
            await agent_beat.beat()
            assert heard == [] and agent_beat.tunnel_addrs == []
            proxy_beat = Heartbeater(p.client, p.creds.host_id, "proxy", serial=lambda: 1,
                                     tunnel_addr="127.0.0.1:3024",
                                     public_addr="127.0.0.1:3080")
            await proxy_beat.beat()
            await agent_beat.beat()
            await agent_beat.beat()  # unchanged: not told twice
            return heard

    heard = run(main())
    assert heard == [["127.0.0.1:3024"]]


def test_heartbeats_survive_a_control_plane_outage(
    control_plane: LiveControlPlane, agent_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with agent(control_plane, agent_dir) as a:
            client = ControlPlaneClient(control_plane.addr, a.creds.api_context(), timeout=1)
            beat = Heartbeater(client, a.creds.host_id, "db", serial=lambda: a.feed.serial,
                               interval=0.2)
            stop = asyncio.Event()
            with caplog.at_level(logging.WARNING, "teleport.cluster.heartbeat"):
                task = asyncio.create_task(beat.run(stop))
                await until(lambda: beat.sent >= 1)
                await asyncio.to_thread(control_plane.shutdown)
                await asyncio.sleep(1.0)
                assert not task.done()  # still beating (and failing), not crashed
                stop.set()
                await task
            warnings = [r for r in caplog.records if "heartbeat" in r.getMessage()]
            assert len(warnings) == 1  # once per outage, not once per beat
            await client.aclose()

    run(main())


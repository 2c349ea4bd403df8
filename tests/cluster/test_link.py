"""ClusterLink: a db agent's whole link to the real control plane, as `teleport start
--roles=db --token=... --auth-server=...` (seed 001) runs it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from dataplane.cluster import ClusterLink, JoinError
from schemas.config import DatabaseConfig, LabelCommand
from tests.cluster.conftest import TOKEN, LiveControlPlane
from tests.cluster.helpers import run
from tests.cluster.test_live import DBA_ROLE, tctl_status

SEED_DB = DatabaseConfig(
    name="test", protocol="postgres", uri="db.example.com:5432", labels={"env": "test"},
    commands=[LabelCommand(name="time", command=["date", "+%H:%M:%S"], period="1m")],
)


async def until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_a_db_agent_joins_serves_the_bundle_reports_and_restarts_without_a_token(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    cp = control_plane

    async def first_start() -> str:
        link = await ClusterLink.connect(agent_dir, cp.addr, "db", token=TOKEN, ca_pin=cp.pin,
                                         databases=[SEED_DB], heartbeat_interval=10)
        stop = asyncio.Event()
        task = asyncio.create_task(link.run(stop))
        await until(lambda: link.feed.serial == cp.serial())
        await until(lambda: "time" in link.labels.labels("test"))
        await until(lambda: f"1 on serial {cp.serial()}" in tctl_status(cp))
        assert link.db_certs is not None
        cert = await link.db_certs.get("postgres")
        assert cert.db_user == "postgres"
        # a push: activated and reported (heartbeat poked, not after the 10 s interval)
        before = link.feed.serial
        await asyncio.to_thread(cp.commit, {"roles/dba.yaml": DBA_ROLE}, "Add dba")
        await until(lambda: link.feed.serial > before)
        await until(lambda: f"1 on serial {link.feed.serial}" in tctl_status(cp), timeout=5)
        stop.set()
        await task
        return link.credentials.host_id

    host_id = run(first_start())

    async def restart() -> str:
        link = await ClusterLink.connect(agent_dir, cp.addr, "db", databases=[SEED_DB])
        stop = asyncio.Event()
        task = asyncio.create_task(link.run(stop))
        await until(lambda: link.feed.current is not None)
        stop.set()
        await task
        return link.credentials.host_id

    assert run(restart()) == host_id


def test_an_agent_that_never_joined_needs_a_token(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    with pytest.raises(JoinError, match="has not joined a cluster yet: give a join token"):
        run(ClusterLink.connect(agent_dir, control_plane.addr, "db"))

"""ControlPlaneClient: addresses, which failures are outages and which are refusals, the
connection pool; against real HTTP servers over real TLS. Plus two gates that must never
raise: the bundle activation gate on arbitrary bytes, and seed 000's config in DynamicLabels.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.ca import CertificateAuthority, ClusterCAs
from dataplane.cluster.api_client import (
    ControlPlaneClient,
    ControlPlaneRefused,
    ControlPlaneUnavailable,
    parse_auth_addr,
)
from dataplane.cluster.bundles import BundleFeed
from dataplane.cluster.identity import HostCredentials
from dataplane.cluster.labels import DynamicLabels
from schemas.api import Heartbeat, HeartbeatAck
from schemas.bundle import key_id
from schemas.config import load_config
from tests.cluster.helpers import run
from tests.cluster.pki import credentials
from transport.http import HttpServer, Request, Response, error_response, json_response

CAS = ClusterCAs(*(CertificateAuthority.generate(k, "root") for k in ("user", "host", "db")))
AUTH: HostCredentials = credentials(CAS, "auth", "auth")
AGENT: HostCredentials = credentials(CAS, "db", "agent-1")


@pytest.mark.parametrize(
    ("given_addr", "url"),
    [
        ("auth.example.com:3025", "https://auth.example.com:3025"),
        ("teleport.example.com:3080", "https://teleport.example.com:3080"),
        ("auth.example.com", "https://auth.example.com:3025"),
        ("https://10.0.0.1:443", "https://10.0.0.1:443"),
        ("[::1]:3025", "https://[::1]:3025"),
    ],
)
def test_auth_addresses(given_addr: str, url: str) -> None:
    assert parse_auth_addr(given_addr) == url


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("http://auth:3025", "over https only"),
        ("", "empty"),
        ("auth:99999", "invalid port"),
        ("auth:3025/v1", "is not host:port"),
    ],
)
def test_bad_auth_addresses_say_what_to_give(bad: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_auth_addr(bad)


async def serve(handler) -> tuple[HttpServer, str]:
    server = HttpServer(handler)
    host, port = await server.listen("127.0.0.1", 0, ssl=AUTH.server_context("optional"))
    return server, f"{host}:{port}"


BEAT = Heartbeat(host_id="agent-1", role="db", serial=1)


@pytest.mark.parametrize(
    ("status", "kind"),
    [(503, ControlPlaneUnavailable), (500, ControlPlaneUnavailable),
     (429, ControlPlaneUnavailable), (403, ControlPlaneRefused), (400, ControlPlaneRefused)],
)
def test_5xx_and_429_are_outages_4xx_are_refusals(status: int, kind: type[Exception]) -> None:
    async def handler(request: Request) -> Response:
        return error_response(status, "some_code", f"answer {status}")

    async def main() -> None:
        server, addr = await serve(handler)
        async with ControlPlaneClient(addr, AGENT.api_context()) as client:
            with pytest.raises(kind, match=f"answer {status}") as info:
                await client.heartbeat(BEAT)
        if isinstance(info.value, ControlPlaneRefused):
            assert info.value.status == status and info.value.code == "some_code"
        await server.close()

    run(main())


def test_a_body_that_is_not_the_contract_is_an_outage_not_a_crash() -> None:
    async def handler(request: Request) -> Response:
        return json_response({"tunnel_addrs": "not a list"})

    async def main() -> None:
        server, addr = await serve(handler)
        async with ControlPlaneClient(addr, AGENT.api_context()) as client:
            with pytest.raises(ControlPlaneUnavailable, match="not a HeartbeatAck"):
                await client.heartbeat(BEAT)
        await server.close()

    run(main())


def test_nothing_listening_is_an_outage_that_names_the_address() -> None:
    async def main() -> None:
        async with ControlPlaneClient("127.0.0.1:9", AGENT.api_context(), timeout=2) as client:
            with pytest.raises(ControlPlaneUnavailable, match=r"127\.0\.0\.1:9"):
                await client.heartbeat(BEAT)

    run(main())


def test_a_slow_call_does_not_hold_up_another_and_connections_are_reused() -> None:
    release = asyncio.Event()
    peers: list[tuple[str, int] | None] = []

    async def handler(request: Request) -> Response:
        peers.append(request.peer)
        body = request.json(Heartbeat)
        if body.serial == 99:
            await release.wait()
        return json_response(HeartbeatAck(serial=body.serial))

    async def main() -> None:
        server, addr = await serve(handler)
        async with ControlPlaneClient(addr, AGENT.api_context()) as client:
            slow = asyncio.create_task(client.heartbeat(BEAT.model_copy(update={"serial": 99})))
            await asyncio.sleep(0.1)
            quick = await asyncio.wait_for(client.heartbeat(BEAT), timeout=5)
            assert quick.serial == 1 and not slow.done()
            release.set()
            assert (await slow).serial == 99
            await client.heartbeat(BEAT)
            await client.heartbeat(BEAT)
        await server.close()

    run(main())
    # two connections were opened (slow and quick ran at once); later calls reused them
    assert len(set(peers)) == 2 and len(peers) == 4


KEY = Ed25519PrivateKey.generate()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda s: s.encode(), st.text(max_size=512)),
    st.builds(lambda p: b'{"format": "teleport-db-bundle/1", "key_id": "' + p + b'"}',
              st.binary(max_size=64)),
))
def test_the_activation_gate_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    feed = BundleFeed(Path("/nonexistent"), "root", {key_id(KEY.public_key()): KEY.public_key()})
    assert feed.offer(data, "fuzz") is None
    assert feed.current is None and feed.last_rejection is not None


SEED_000 = """\
db_service:
  enabled: "yes"
  databases:
  - name: "aurora"
    description: "AWS Aurora instance of PostgreSQL 13.0"
    protocol: "postgres"
    endpoint: "postgres-aurora-instance-1.xxx.us-east-1.rds.amazonaws.com:5432"
    auth: "aws-iam"
    region: "us-east-1"
    labels:
      env: "stage"
    commands:
    - name: "time"
      command: ["date", "+%H:%M:%S"]
      period: "1m"
"""


def test_seed_000_db_service_section_drives_dynamic_labels(tmp_path: Path) -> None:
    config = load_config(tmp_path / "teleport.yaml", SEED_000)
    labels = DynamicLabels(config.db_service.databases)
    run(labels.refresh())
    got = labels.labels("aurora")
    assert got["env"] == "stage"
    assert re.fullmatch(r"\d\d:\d\d:\d\d", got["time"])

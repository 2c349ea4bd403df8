"""POST /v1/audit/events on the real control plane API: mTLS with host certificates, the
sender recorded from the certificate, and an `AuditShipper` delivering through it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.audit_store import search_log, verify_log
from dataplane.audit import AuditShipper
from schemas.api import AuditAck, AuditBatch
from tests.api.conftest import ApiCluster, Creds, api_settings, start_api_cluster
from tests.audit.conftest import AUDIT_PATH, numbered_events
from transport import tls
from transport.http import HttpClient


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiCluster]:
    running = start_api_cluster(tmp_path_factory.mktemp("audit-api") / "data", api_settings())
    yield running
    running.running.shutdown()


def body(n: int) -> dict:
    return {"events": [e.model_dump(mode="json") for e in numbered_events(n)]}


def test_hosts_only(cluster: ApiCluster) -> None:
    anonymous = cluster.call("POST", AUDIT_PATH, json=body(1))
    assert anonymous.status == 401
    assert "host certificate" in anonymous.json()["error"]["message"]


def test_an_agent_posts_a_batch_and_is_named_as_its_sender(cluster: ApiCluster) -> None:
    agent = cluster.join("db")
    batch = body(3)
    first = cluster.call("POST", AUDIT_PATH, json=batch, creds=agent)
    again = cluster.call("POST", AUDIT_PATH, json=batch, creds=agent)
    assert first.raise_for_error().json(AuditAck) == AuditAck(accepted=3, duplicates=0)
    assert again.raise_for_error().json(AuditAck) == AuditAck(accepted=0, duplicates=3)
    audit = cluster.data_dir / "audit"
    records = [json.loads(line) for path in sorted(audit.glob("*.jsonl"))
               for line in path.read_bytes().splitlines()]
    mine = [r for r in records if r["event"]["id"] in {e["id"] for e in batch["events"]}]
    assert [r["from"] for r in mine] == [agent.host_id] * 3
    assert verify_log(audit).ok


def test_a_shipper_delivers_over_mtls(cluster: ApiCluster, tmp_path: Path) -> None:
    agent: Creds = cluster.join("db")
    events = numbered_events(700)

    async def main() -> AuditShipper:
        context = tls.client_context([cluster.host_ca], agent.cert_pem, agent.key_pem)
        async with HttpClient(cluster.url, ssl_context=context) as client:

            async def send(batch: AuditBatch) -> AuditAck:
                response = await client.request("POST", AUDIT_PATH, json=batch)
                return response.raise_for_error().json(AuditAck)

            shipper = AuditShipper(send, tmp_path / "spool", interval=0.02)
            await shipper.start()
            for event in events:
                shipper.emit(event)
            assert await shipper.flush()
            assert await shipper.close()
            return shipper

    shipper = asyncio.run(main())
    assert shipper.stats.delivered == 700
    wanted = {e.id for e in events}
    stored = [e.id for e in search_log(cluster.data_dir / "audit") if e.id in wanted]
    assert stored == [e.id for e in events]

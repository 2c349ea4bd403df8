"""POST /v1/audit/events on the real control plane API: mTLS with host certificates, the
sender recorded from the certificate, and an `AuditShipper` delivering through it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.audit_store import (
    AuditStore,
    in_process_post,
    in_process_store,
    search_log,
    verify_log,
)
from dataplane.audit import AuditShipper, SendJson
from schemas.api import AuditAck
from schemas.audit import encode_event
from tests.api.conftest import ApiCluster, Creds, api_settings, start_api_cluster
from tests.audit.conftest import AUDIT_PATH, numbered_events
from transport import tls
from transport.http import ApiError, HttpClient


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

            async def post(body: bytes) -> AuditAck:
                response = await client.request(
                    "POST", AUDIT_PATH, body=body, headers={"content-type": "application/json"}
                )
                return response.raise_for_error().json(AuditAck)

            shipper = AuditShipper(SendJson(post), tmp_path / "spool", interval=0.02)
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


def stored_with_sender(directory: Path) -> list[tuple[str, str]]:
    """(event id, sender) of every record in the log, in order, read from the raw lines."""
    records = [json.loads(line) for path in sorted(directory.glob("*.jsonl"))
               for line in path.read_bytes().splitlines()]
    return [(r["event"]["id"], r["from"]) for r in records]


def test_an_agent_in_the_control_planes_process_stores_without_http(tmp_path: Path) -> None:
    """`teleport start --roles=auth,db`: the local agent's shipper posts straight to the
    audit store (`in_process_post`), named as its sender; a body the endpoint would refuse
    with 400 is refused the same way and kept aside in rejected.jsonl, the rest stored."""
    store = AuditStore(tmp_path / "audit")
    events = numbered_events(5)

    async def main() -> AuditShipper:
        post = in_process_post(store, "local-agent")
        with pytest.raises(ApiError) as refused:
            await post(b'{"events": [{"type": "db.session.query"}]}')
        assert refused.value.status == 400
        shipper = AuditShipper(SendJson(post), tmp_path / "spool", interval=0.02)
        await shipper.start()
        for event in events:
            shipper.emit(event)
        assert await shipper.flush()
        assert await shipper.close()
        return shipper

    shipper = asyncio.run(main())
    assert shipper.stats.delivered == 5 and shipper.stats.rejected == 0
    assert stored_with_sender(tmp_path / "audit") == [
        (e.id, "local-agent") for e in events
    ]
    assert verify_log(tmp_path / "audit").ok


def test_the_local_agents_own_events_skip_parsing_and_its_spooled_lines_do_not(
    tmp_path: Path,
) -> None:
    """With `in_process_store` beside `in_process_post`, the events the local agent built
    reach the store as the JSON it serialized them to (no second parse); lines read back
    from its spool, which a disk could have garbled, still go through the validating post."""
    store = AuditStore(tmp_path / "audit")
    events = numbered_events(30)
    spooled, fresh = events[:20], events[20:]
    bodies: list[bytes] = []
    owned: list[list[tuple[str, bytes]]] = []

    async def main() -> None:
        async def away(body: bytes) -> AuditAck:
            raise ConnectionError("the control plane is away")

        first = AuditShipper(SendJson(away), tmp_path / "spool", interval=0.02)
        await first.start()
        for event in spooled:
            first.emit(event)
        await first.close()  # nothing delivered: all of it is in the spool now
        assert first.stats.spooled == 20 and first.stats.delivered == 0

        post, own = in_process_post(store, "local-agent"), in_process_store(store, "local-agent")

        async def counting_post(body: bytes) -> AuditAck:
            bodies.append(body)
            return await post(body)

        async def counting_own(entries: list[tuple[str, bytes]]) -> AuditAck:
            owned.append(entries)
            return await own(entries)

        second = AuditShipper(
            SendJson(counting_post, counting_own), tmp_path / "spool", interval=0.02
        )
        await second.start()
        async with asyncio.timeout(10):
            while second.stats.delivered < 20:  # the spool first (new events would queue
                await asyncio.sleep(0.01)       # behind it, spooled too, to keep the order)
        for event in fresh:
            second.emit(event)
        assert await second.flush()
        assert await second.close()
        assert second.stats.delivered == 30

    asyncio.run(main())
    assert bodies and all(b.startswith(b'{"events":') for b in bodies)
    assert sum(len(e) for e in owned) == 10
    assert [entry for batch in owned for entry in batch] == [
        (e.id, encode_event(e)) for e in fresh
    ]
    assert stored_with_sender(tmp_path / "audit") == [
        (e.id, "local-agent") for e in spooled + fresh
    ]
    assert verify_log(tmp_path / "audit").ok

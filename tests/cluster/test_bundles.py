"""BundleFeed through its cache file: what is activated, what is refused, expiry, restart.

Bundles here are real: real `Bundle` models signed with real Ed25519 keys, verified by
`schemas.bundle.verify_bundle`, delivered by writing the cache file that watchfiles watches.
The path from the real control plane (a git commit to activation) is in test_control_plane.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control.ca import CertificateAuthority, ClusterCAs
from dataplane.cluster._backoff import Backoff
from dataplane.cluster.api_client import ControlPlaneClient
from dataplane.cluster.bundles import BundleFeed, cache_path
from schemas.bundle import (
    Bundle,
    BundleCluster,
    BundleDatabase,
    RejectReason,
    key_id,
    sign_bundle,
    verify_bundle,
)
from tests.cluster.helpers import run
from tests.cluster.pki import credentials
from transport import tls
from transport.files import write_atomic
from transport.http import HttpServer, Request, Response

KEY = Ed25519PrivateKey.generate()
KEYS = {key_id(KEY.public_key()): KEY.public_key()}


def signed(
    serial: int,
    *,
    cluster: str = "root",
    key: Ed25519PrivateKey = KEY,
    expires_in: timedelta = timedelta(hours=1),
    issued_ago: timedelta = timedelta(0),
    description: str = "",
) -> bytes:
    now = datetime.now(UTC)
    bundle = Bundle(
        cluster=BundleCluster(name=cluster, certificate_ttl_seconds=3600,
                              max_session_ttl_seconds=3600),
        serial=serial,
        commit=f"{serial:040x}",
        issued_at=now - issued_ago,
        expires_at=now + expires_in,
        databases={"aurora": BundleDatabase(name="aurora", uri="localhost:5432",
                                            description=description)},
    )
    return sign_bundle(bundle, key)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def drop_in_cache(data_dir: Path, data: bytes) -> None:
    path = cache_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def test_a_bundle_written_to_the_cache_is_activated_and_subscribers_told(tmp_path: Path) -> None:
    feed = BundleFeed(tmp_path, "root", KEYS)
    told: list[int] = []
    feed.subscribe(lambda b: told.append(b.serial))

    async def main() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        await asyncio.sleep(0.3)  # the watcher is up
        assert feed.current is None
        drop_in_cache(tmp_path, signed(1))
        took = await wait_until(lambda: feed.serial == 1)
        drop_in_cache(tmp_path, signed(2, description="new"))
        await wait_until(lambda: feed.serial == 2)
        stop.set()
        await task
        return took

    took = run(main())
    assert took < 1.0
    assert told == [1, 2]
    assert feed.current is not None and feed.current.databases["aurora"].description == "new"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda: signed(5, key=Ed25519PrivateKey.generate()), RejectReason.UNKNOWN_KEY),
        (lambda: signed(5, cluster="other"), RejectReason.WRONG_CLUSTER),
        (lambda: signed(2), RejectReason.ROLLBACK),
        (lambda: signed(5, expires_in=timedelta(seconds=-1), issued_ago=timedelta(hours=1)),
         RejectReason.EXPIRED),
        (lambda: signed(5)[:-40] + b"garbage\n", RejectReason.GARBLED),
        (lambda: signed(5).replace(b'"payload": "', b'"payload": "AAAA'),
         RejectReason.BAD_SIGNATURE),
    ],
    ids=["other-key", "other-cluster", "lower-serial", "expired", "truncated", "altered"],
)
def test_a_refused_bundle_is_never_activated_and_the_current_one_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: Callable[[], bytes],
    reason: RejectReason,
) -> None:
    feed = BundleFeed(tmp_path, "root", KEYS)
    told: list[int] = []
    feed.subscribe(lambda b: told.append(b.serial))

    async def main() -> None:
        stop = asyncio.Event()
        drop_in_cache(tmp_path, signed(3))
        task = asyncio.create_task(feed.run(stop))
        await wait_until(lambda: feed.serial == 3)
        await asyncio.sleep(0.2)
        with caplog.at_level(logging.ERROR, "teleport.cluster.bundles"):
            drop_in_cache(tmp_path, bad())
            await wait_until(lambda: feed.last_rejection is not None)
        # a valid newer bundle still gets through afterwards
        drop_in_cache(tmp_path, signed(4))
        await wait_until(lambda: feed.serial == 4)
        stop.set()
        await task

    run(main())
    assert feed.last_rejection is not None and feed.last_rejection.reason == reason
    assert told == [3, 4]  # the refused one was never in force, not even for a moment
    [record] = [r for r in caplog.records if "REFUSED" in r.getMessage()]
    assert reason.value in record.getMessage() and "serial 3 stays in force" in record.getMessage()


def test_same_serial_with_other_content_is_refused(tmp_path: Path) -> None:
    feed = BundleFeed(tmp_path, "root", KEYS)
    assert feed.offer(signed(7), "test") is not None
    assert feed.offer(signed(7, description="forged twin"), "test") is None
    assert feed.last_rejection is not None
    assert "already in force with different content" in str(feed.last_rejection)
    assert feed.current is not None and feed.current.databases["aurora"].description == ""


def test_restart_with_the_control_plane_down_serves_the_cached_bundle(tmp_path: Path) -> None:
    drop_in_cache(tmp_path, signed(9))
    # a control plane address where nothing listens: fetching fails, the cache still loads
    dead = ControlPlaneClient("127.0.0.1:9", tls.client_context([_any_ca()]), timeout=1)
    feed = BundleFeed(tmp_path, "root", KEYS, dead)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        await asyncio.sleep(0)
        assert feed.current is not None and feed.current.serial == 9  # at once, before fetching
        await asyncio.sleep(1.5)  # fetch attempts fail meanwhile
        assert feed.current is not None and feed.current.serial == 9
        stop.set()
        await task
        await dead.aclose()

    run(main())


def test_an_invalid_cache_at_start_is_not_used(tmp_path: Path) -> None:
    drop_in_cache(tmp_path, signed(9, cluster="other"))
    feed = BundleFeed(tmp_path, "root", KEYS)
    assert feed.load_cache() is None
    assert feed.current is None
    assert feed.last_rejection is not None
    assert feed.last_rejection.reason == RejectReason.WRONG_CLUSTER


def test_an_expired_bundle_is_no_longer_used_and_that_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    feed = BundleFeed(tmp_path, "root", KEYS)
    told: list[str] = []
    feed.subscribe(lambda b: told.append(f"activated {b.serial}"))
    feed.on_expired(lambda b: told.append(f"expired {b.serial}"))

    async def main() -> None:
        stop = asyncio.Event()
        drop_in_cache(tmp_path, signed(3, expires_in=timedelta(seconds=1.5)))
        task = asyncio.create_task(feed.run(stop))
        await wait_until(lambda: feed.serial == 3)
        assert feed.current is not None
        with caplog.at_level(logging.ERROR, "teleport.cluster.bundles"):
            await wait_until(lambda: told[-1:] == ["expired 3"], timeout=5)
        assert feed.current is None  # fail closed
        # a fresh bundle brings service back
        drop_in_cache(tmp_path, signed(4))
        await wait_until(lambda: feed.current is not None)
        stop.set()
        await task

    run(main())
    assert told == ["activated 3", "expired 3", "activated 4"]
    assert any("EXPIRED" in r.getMessage() and "fail closed" in r.getMessage()
               for r in caplog.records)


def _any_ca() -> bytes:
    return CertificateAuthority.generate("host", "root").certificate_pem()


def test_the_fetcher_never_caches_a_bundle_it_would_refuse(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A control plane serving a bundle signed by a foreign key (a test double on the real
    HTTP server and TLS: the real control plane verifies its bundles before serving them)."""
    cas = ClusterCAs(*(CertificateAuthority.generate(k, "root") for k in ("user", "host", "db")))
    auth = credentials(cas, "auth", "auth")
    me = credentials(cas, "db", "agent-1")
    foreign = signed(2, key=Ed25519PrivateKey.generate())
    answers = [signed(1), foreign, signed(3)]
    asked: list[str | None] = []

    async def handler(request: Request) -> Response:
        assert request.path == "/v1/bundle"
        asked.append(request.arg("after"))
        if not answers:
            await asyncio.sleep(float(request.arg("wait") or 0))
            return Response(304)
        return Response(200, [("content-type", "application/json")], answers.pop(0))

    feed_holder: list[BundleFeed] = []

    async def main() -> None:
        server = HttpServer(handler)
        host, port = await server.listen("127.0.0.1", 0, ssl=auth.server_context("optional"))
        client = ControlPlaneClient(f"{host}:{port}", me.api_context())
        feed = BundleFeed(tmp_path, "root", KEYS, client, poll_wait=1,
                          retry=Backoff(first=0.2, cap=0.5))
        feed_holder.append(feed)
        stop = asyncio.Event()
        with caplog.at_level(logging.ERROR, "teleport.cluster.bundles"):
            task = asyncio.create_task(feed.run(stop))
            await wait_until(lambda: feed.serial == 1)
            await wait_until(lambda: feed.last_rejection is not None)
            cached = cache_path(tmp_path).read_bytes()
            assert verify_bundle(cached, KEYS, "root", 0, datetime.now(UTC)).serial == 1
            await wait_until(lambda: feed.serial == 3)
            stop.set()
            await task
        await client.aclose()
        await server.close()

    run(main())
    feed = feed_holder[0]
    assert feed.last_rejection is not None
    assert feed.last_rejection.reason == RejectReason.UNKNOWN_KEY
    assert asked[:3] == ["0", "1", "1"]  # after the refusal it asks again from serial 1
    assert any("REFUSED" in r.getMessage() and "control plane" in r.getMessage()
               for r in caplog.records)


"""The agent's `AuditShipper` against a real HTTP endpoint and a real `AuditStore`: batches,
control plane restarts, the disk spool and its bound, a spool left by a killed agent,
refused events, and an `emit` that never gets in the data path's way."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import uvloop

from control.audit_store import search_log, verify_log
from control.settings import ApiSettings
from dataplane.audit import AuditShipper
from schemas.audit import AuditEvent, EncodedEvent, EventWriter, Outcome, encode_event
from tests.audit.conftest import AuditEndpoint, HttpSend, numbered_events, query_event
from transport.http import ServerLimits

FAST = {"interval": 0.02, "retry_min": 0.02, "retry_max": 0.2, "send_timeout": 3.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def delivered(endpoint: AuditEndpoint, count: int, timeout: float = 30.0) -> None:
    """Wait until the store holds `count` records."""
    deadline = time.monotonic() + timeout
    while endpoint.store is None or endpoint.store.last_seq < count:
        if time.monotonic() > deadline:
            seq = endpoint.store.last_seq if endpoint.store else None
            raise AssertionError(f"only {seq} of {count} events were stored in {timeout}s")
        await asyncio.sleep(0.02)


async def ship_all(
    endpoint: AuditEndpoint, spool: Path, events: list[AuditEvent], **options: Any
) -> AuditShipper:
    """Start `endpoint`, emit `events` through a shipper, flush it (all of
    them delivered or kept aside within 10 s), then close the shipper and the endpoint."""
    await endpoint.start()
    send = HttpSend(endpoint.url)
    shipper = AuditShipper(send.sender(), spool, **options)
    await shipper.start()
    for event in events:
        shipper.emit(event)
    assert await shipper.flush(timeout=10)
    await shipper.close()
    await send.aclose()
    await endpoint.stop()
    return shipper


async def deliver_through(
    endpoint: AuditEndpoint,
    spool: Path,
    count: int,
    *,
    before_start: Sequence[AuditEvent] = (),
    after_start: Callable[[AuditShipper], None] | None = None,
    **options: Any,
) -> AuditShipper:
    """Start `endpoint` and a shipper on `spool` (FAST, unless `options` say otherwise):
    emit `before_start`, start the shipper, call `after_start(shipper)`; once the store
    holds `count` records, close the shipper (nothing left in memory) and the endpoint."""
    await endpoint.start()
    send = HttpSend(endpoint.url)
    shipper = AuditShipper(send.sender(), spool, **{**FAST, **options})
    for event in before_start:
        shipper.emit(event)
    await shipper.start()
    if after_start is not None:
        after_start(shipper)
    await delivered(endpoint, count)
    assert await shipper.close()
    await send.aclose()
    await endpoint.stop()
    return shipper


def stored_ids(directory: Path) -> list[str]:
    return [e.id for e in search_log(directory)]


def test_events_go_in_batches_in_the_order_they_were_emitted(
    tmp_path: Path
) -> None:
    endpoint = AuditEndpoint(tmp_path / "audit")
    events = numbered_events(1200)

    def emit_all(shipper: AuditShipper) -> None:
        for event in events:
            shipper.emit(event)

    shipper = asyncio.run(
        deliver_through(endpoint, tmp_path / "spool", 1200, batch_events=500,
                        after_start=emit_all)
    )
    assert stored_ids(tmp_path / "audit") == [e.id for e in events]
    assert endpoint.requests == 3  # 500 + 500 + 200
    assert (shipper.stats.delivered, shipper.stats.spooled, shipper.stats.lost) == (1200, 0, 0)
    assert [p for p in (tmp_path / "spool").rglob("*") if not p.is_dir()] == []  # nor journal


def test_a_lone_event_waits_at_most_the_interval(tmp_path: Path) -> None:
    endpoint = AuditEndpoint(tmp_path / "audit")

    async def main() -> float:
        await endpoint.start()
        send = HttpSend(endpoint.url)
        shipper = AuditShipper(send.sender(), tmp_path / "spool", interval=0.2)
        await shipper.start()
        started = time.monotonic()
        shipper.emit(query_event())
        await delivered(endpoint, 1)
        took = time.monotonic() - started
        await shipper.close()
        await send.aclose()
        await endpoint.stop()
        return took

    assert 0.15 <= asyncio.run(main()) < 2.0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_ten_thousand_events_from_twenty_clients_across_two_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, loop: str
) -> None:
    """The acceptance's bar for the delivery path: exactly 10,000 stored, none twice, the
    chain intact, while the control plane is stopped and started twice mid-stream."""
    endpoint = AuditEndpoint(tmp_path / "audit")
    emitted: list[AuditEvent] = []
    lost_answers = 0

    def lose_one_answer(_batch: object) -> None:
        # Once, the control plane stores a batch and dies before answering.
        nonlocal lost_answers
        if lost_answers == 0:
            lost_answers += 1
            raise RuntimeError("the answer is lost")

    async def main() -> AuditShipper:
        await endpoint.start()
        endpoint.after_store = lose_one_answer
        send = HttpSend(endpoint.url, timeout=1.0)
        shipper = AuditShipper(send.sender(), tmp_path / "spool", batch_events=200,
                               segment_bytes=64 * 1024, **FAST)
        await shipper.start()
        outage_at: list[int] = []

        async def client(n: int) -> None:
            for i in range(500):
                event = query_event(f"select {i}", session_id=f"client-{n}")
                emitted.append(event)
                shipper.emit(event)
                if i % 5 == 4:
                    await asyncio.sleep(0.01)

        async def restarts() -> None:
            for threshold in (2_500, 6_000):
                while len(emitted) < threshold:
                    await asyncio.sleep(0.005)
                outage_at.append(len(emitted))
                await endpoint.stop()
                await asyncio.sleep(0.3)
                await endpoint.start()

        await asyncio.gather(*(client(n) for n in range(20)), restarts())
        assert all(0 < n < 10_000 for n in outage_at), outage_at
        await delivered(endpoint, 10_000)
        await asyncio.sleep(0.2)  # anything sent twice would be stored by now
        assert await shipper.close()
        await send.aclose()
        await endpoint.stop()
        return shipper

    factory = uvloop.new_event_loop if loop == "uvloop" else None
    with caplog.at_level(logging.WARNING, logger="teleport.audit.shipper"), \
            asyncio.Runner(loop_factory=factory) as runner:
        shipper = runner.run(main())
    ids = stored_ids(tmp_path / "audit")
    assert len(ids) == 10_000
    assert len(set(ids)) == 10_000
    assert set(ids) == {e.id for e in emitted}
    report = verify_log(tmp_path / "audit")
    assert report.ok, report.problems
    assert report.records == 10_000
    # Each client's events are in the log in the order it emitted them.
    by_client: dict[str, list[str]] = defaultdict(list)
    for event in search_log(tmp_path / "audit"):
        by_client[event.session_id].append(event.query)  # type: ignore[union-attr]
    assert all(q == [f"select {i}" for i in range(500)] for q in by_client.values())
    # The outages really happened: sends failed, events went through the spool, and a
    # batch stored without an answer was sent again and dropped as a duplicate.
    assert shipper.stats.send_failures > 0
    assert shipper.stats.spooled > 0
    assert shipper.stats.duplicates > 0
    assert shipper.stats.lost == 0
    # Every event is acknowledged exactly once: as new, or (its first answer lost) as a
    # duplicate of what the store already had.
    assert shipper.stats.delivered + shipper.stats.duplicates == 10_000
    assert "cannot send events to the control plane" in caplog.text
    assert "takes events again" in caplog.text
    assert list((tmp_path / "spool").glob("*.jsonl")) == []


def test_a_full_spool_refuses_sessions_until_delivery_frees_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = AuditEndpoint(tmp_path / "audit")
    endpoint.port = free_port()
    events = numbered_events(300)

    async def main() -> None:
        send = HttpSend(endpoint.url, timeout=0.5)
        shipper = AuditShipper(send.sender(), tmp_path / "spool", batch_events=20,
                               spool_max_bytes=40_000, segment_bytes=8_000, **FAST)
        await shipper.start()
        assert shipper.can_accept_sessions() and shipper.refusal_reason() is None
        for event in events:
            shipper.emit(event)
        assert not await shipper.flush(timeout=1.0)  # nowhere for all of them to go
        assert not shipper.can_accept_sessions()
        reason = shipper.refusal_reason()
        assert reason is not None and "audit spool is full" in reason
        assert 0 < shipper.spooled_bytes <= 40_000
        assert shipper.pending > 0
        spool_bytes = sum(p.stat().st_size for p in (tmp_path / "spool").glob("*.jsonl"))
        assert spool_bytes == shipper.spooled_bytes

        await endpoint.start()  # the control plane is back
        await delivered(endpoint, 300)
        deadline = time.monotonic() + 5
        while not shipper.can_accept_sessions() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert shipper.can_accept_sessions()
        assert await shipper.close()
        await send.aclose()
        await endpoint.stop()
        assert shipper.stats.lost == 0

    with caplog.at_level(logging.WARNING, logger="teleport.audit.shipper"):
        asyncio.run(main())
    full = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
    assert len(full) == 1
    assert f"the spool {tmp_path / 'spool'} is full" in full[0]
    assert "New database sessions are refused" in full[0]
    assert "has room again" in caplog.text
    assert stored_ids(tmp_path / "audit") == [e.id for e in events]


AGENT_TO_KILL = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from dataplane.audit import AuditShipper, SendJson
    from tests.audit.conftest import numbered_events

    async def send(body):
        {send}

    async def main():
        shipper = AuditShipper(SendJson(send), Path(sys.argv[1]), interval=0.01, {options})
        await shipper.start()
        events = numbered_events({count})
        for event in events:
            shipper.emit(event)
        {until}
        print(" ".join(e.id for e in events), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def killed_agent(spool: Path, *, send: str, options: str, count: int, until: str) -> list[str]:
    """An agent's shipper in a process of its own (spool `spool`, `send` the body of its
    send function): it emits `count` events, awaits `until`, prints their ids and is then
    killed with SIGKILL. The ids."""
    script = AGENT_TO_KILL.format(send=send, options=options, count=count, until=until)
    agent = subprocess.Popen([sys.executable, "-c", script, str(spool)],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert agent.stdout is not None
        return agent.stdout.readline().split()
    finally:
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)


def tear(segment: Path) -> None:
    """As if killed in the middle of a write: a line without its end."""
    with segment.open("ab") as f:
        f.write(b'{"cluster":"example","session_id":"sess-1","us')


def test_a_spool_left_by_a_killed_agent_is_sent_first_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    old_ids = killed_agent(
        spool, send='raise ConnectionRefusedError("the control plane is down")',
        options="retry_min=0.01", count=120,
        until="while shipper.stats.spooled < 120: await asyncio.sleep(0.01)",
    )
    assert len(old_ids) == 120
    segments = sorted(spool.glob("*.jsonl"))
    assert segments
    tear(segments[-1])  # killed in the middle of a spool write
    endpoint = AuditEndpoint(tmp_path / "audit")
    new = numbered_events(30)

    with caplog.at_level(logging.INFO):
        # emitted before start: they wait behind the spool
        asyncio.run(deliver_through(endpoint, spool, 150, before_start=new))
    assert stored_ids(tmp_path / "audit") == old_ids + [e.id for e in new]
    assert "from an earlier run; sending them first" in caplog.text
    assert "unfinished line" in caplog.text
    assert list(spool.glob("*.jsonl")) == []


def test_events_a_killed_agent_held_in_memory_come_back_from_its_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL while a batch is on its way and more events wait in memory (neither sent
    nor spooled): the next start moves the journal to the spool and delivers them all."""
    spool = tmp_path / "spool"
    old_ids = killed_agent(
        spool, send="await asyncio.Event().wait()  # never answers",
        options="batch_events=100", count=250,
        # the first batch is on its way, the rest waits in memory
        until="await asyncio.sleep(0.2)",
    )
    assert len(old_ids) == 250
    assert list(spool.glob("*.jsonl")) == []  # nothing was spooled: all in memory
    journal = sorted((spool / "journal").glob("*.jsonl"))
    assert journal
    tear(journal[-1])
    endpoint = AuditEndpoint(tmp_path / "audit")

    with caplog.at_level(logging.INFO):
        asyncio.run(deliver_through(endpoint, spool, 250))
    assert stored_ids(tmp_path / "audit") == old_ids
    assert "250 event(s) in the journal of a run that did not stop cleanly" in caplog.text
    assert "unfinished line" in caplog.text
    assert [p for p in spool.rglob("*") if not p.is_dir()] == []


def test_a_journal_that_cannot_be_written_is_turned_off_and_events_still_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = AuditEndpoint(tmp_path / "audit")
    events = numbered_events(50)

    def without_journal_dir(shipper: AuditShipper) -> None:
        (tmp_path / "spool" / "journal").rmdir()  # its first segment cannot be created
        for event in events:
            shipper.emit(event)

    with caplog.at_level(logging.ERROR):
        shipper = asyncio.run(
            deliver_through(endpoint, tmp_path / "spool", 50, after_start=without_journal_dir)
        )
    assert stored_ids(tmp_path / "audit") == [e.id for e in events]
    assert shipper.stats.lost == 0
    assert "the journal is off: cannot write to" in caplog.text
    assert "a kill of this process can now lose the ones it holds" in caplog.text


def test_a_spooled_line_that_is_not_an_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Disk corruption in a spool segment: sent as it is (the control plane refuses it, and
    it is kept in rejected.jsonl); the events around it are delivered."""
    spool = tmp_path / "spool"
    spool.mkdir()
    first, last = numbered_events(3), numbered_events(2)
    garbage = b'{"cluster":"example","session_id":"sess-1",\x00garbage}\n'
    (spool / f"{1:020d}.jsonl").write_bytes(
        b"".join(encode_event(e) + b"\n" for e in first) + garbage
        + b"".join(encode_event(e) + b"\n" for e in last)
    )
    endpoint = AuditEndpoint(tmp_path / "audit")

    with caplog.at_level(logging.ERROR, logger="teleport.audit.shipper"):
        shipper = asyncio.run(deliver_through(endpoint, spool, 5))
    assert stored_ids(tmp_path / "audit") == [e.id for e in [*first, *last]]
    assert list(spool.glob("0*.jsonl")) == []
    assert (spool / "rejected.jsonl").read_bytes() == garbage
    assert (shipper.stats.rejected, shipper.stats.lost) == (1, 0)
    assert "refused event (a spooled line that is not JSON)" in caplog.text


def test_an_event_the_control_plane_refuses_is_kept_aside_and_the_rest_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = AuditEndpoint(tmp_path / "audit", limits=ServerLimits(max_body_bytes=16 * 1024))
    before, after = numbered_events(7), numbered_events(8)
    huge = query_event("select '" + "x" * 40_000 + "'")

    with caplog.at_level(logging.ERROR, logger="teleport.audit.shipper"):
        shipper = asyncio.run(ship_all(
            endpoint, tmp_path / "spool", [*before, huge, *after],
            batch_bytes=64 * 1024, interval=10.0, retry_min=0.02,
        ))
    assert stored_ids(tmp_path / "audit") == [e.id for e in [*before, *after]]
    (kept,) = (tmp_path / "spool" / "rejected.jsonl").read_bytes().splitlines()
    assert json.loads(kept)["id"] == huge.id
    assert shipper.stats.rejected == 1 and shipper.stats.lost == 0
    assert f"refused event {huge.id}" in caplog.text


def test_an_event_over_the_size_limit_is_cut_to_fit_and_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A statement of 7,000 queries (one outcome each) and a query of control characters
    (six bytes of JSON each) are stored shortened under the control plane's own body limit,
    not refused: nothing goes to rejected.jsonl."""
    limits = ServerLimits(max_body_bytes=ApiSettings().max_body_bytes)
    endpoint = AuditEndpoint(tmp_path / "audit", limits=limits)
    many = query_event("select 1;" * 7000)
    many.outcomes = [Outcome(status="ok", command_tag="SELECT 1", rows=1)] * 7000
    escaped = query_event("select '" + "\x01" * 60_000 + "'")
    small = numbered_events(3)
    events = [small[0], many, small[1], escaped, small[2]]
    assert all(len(encode_event(e)) > limits.max_body_bytes for e in (many, escaped))

    with caplog.at_level(logging.WARNING, logger="teleport.audit.shipper"):
        shipper = asyncio.run(ship_all(endpoint, tmp_path / "spool", events, **FAST))
    stored = search_log(tmp_path / "audit")
    assert [e.id for e in stored] == [e.id for e in events]
    assert shipper.stats.rejected == 0 and shipper.stats.lost == 0
    assert not (tmp_path / "spool" / "rejected.jsonl").exists()
    by_id = {e.id: e for e in stored}
    cut_many, cut_escaped = by_id[many.id], by_id[escaped.id]
    assert cut_many.query == many.query and 0 < len(cut_many.outcomes) < 7000
    assert cut_many.shortened and "outcomes: the first" in cut_many.shortened
    assert cut_escaped.truncated and cut_escaped.query.startswith("select '\x01")
    assert by_id[small[1].id].shortened is None
    assert f"event {many.id} (db.session.query) was cut to fit" in caplog.text
    assert "\x01" not in caplog.text  # sizes only, never the contents


def test_events_the_data_path_wrote_are_shipped_as_written_and_cut_to_fit_too(
    tmp_path: Path
) -> None:
    """The recorder emits `EncodedEvent`s (EventWriter): stored byte for byte as written,
    in order with models emitted beside them, and one over the size limit cut to fit."""
    endpoint = AuditEndpoint(tmp_path / "audit")
    context = {"cluster": "example", "session_id": "sess-9", "user": "alice",
               "roles": ["dev"], "db_service": "local", "db_name": "app", "db_user": "app"}
    writer = EventWriter(context)
    ok = [Outcome(status="ok", command_tag="SELECT 1", rows=1)]
    written = [writer.query(f"id-{n}", time.time_ns(), f"select {n}", False, ok)
               for n in range(3)]
    huge = writer.query("id-huge", time.time_ns(), "select '" + "x" * 200_000 + "'", False, ok)
    model = numbered_events(1)[0]
    events = [written[0], model, written[1], huge, written[2]]
    shipper = asyncio.run(ship_all(endpoint, tmp_path / "spool", events, **FAST))
    assert (shipper.stats.delivered, shipper.stats.lost) == (5, 0)
    (log_file,) = (tmp_path / "audit").glob("*.jsonl")
    records = log_file.read_bytes().splitlines()
    stored = [json.loads(line)["event"] for line in records]
    assert [e["id"] for e in stored] == ["id-0", model.id, "id-1", "id-huge", "id-2"]
    for record, sent in zip(records, events, strict=True):
        if sent is not huge and isinstance(sent, EncodedEvent):
            assert b',"event":' + sent.json + b',"hash":' in record
    assert stored[3]["shortened"] and stored[3]["truncated"] is True


def test_emit_never_raises_and_never_blocks(tmp_path: Path) -> None:
    endpoint = AuditEndpoint(tmp_path / "audit")
    good = numbered_events(3)
    odd = query_event("select '\udc80'")  # not valid Unicode: cleaned, still delivered

    async def main() -> AuditShipper:
        await endpoint.start()
        send = HttpSend(endpoint.url)
        shipper = AuditShipper(send.sender(), tmp_path / "spool", **FAST)
        await shipper.start()
        shipper.emit(good[0])
        shipper.emit("not an event")  # type: ignore[arg-type]
        shipper.emit(odd)
        thread = threading.Thread(target=lambda: [shipper.emit(e) for e in good[1:]])
        thread.start()
        thread.join()
        await delivered(endpoint, 4)
        await shipper.close()
        shipper.emit(query_event())  # after close: counted, not raised
        await send.aclose()
        await endpoint.stop()
        return shipper

    shipper = asyncio.run(main())
    stored = search_log(tmp_path / "audit")
    assert [e.id for e in stored] == [good[0].id, odd.id, good[1].id, good[2].id]
    assert stored[1].query == "select '?'"  # type: ignore[union-attr]
    assert shipper.stats.lost == 2


def test_close_with_the_control_plane_away_spools_what_is_in_memory(
    tmp_path: Path
) -> None:
    port = free_port()
    events = numbered_events(40)

    async def main() -> AuditShipper:
        send = HttpSend(f"http://127.0.0.1:{port}", timeout=0.3)
        shipper = AuditShipper(send.sender(), tmp_path / "spool", interval=5.0, retry_min=0.05)
        await shipper.start()
        for event in events:
            shipper.emit(event)
        assert await shipper.close(timeout=5)
        await send.aclose()
        return shipper

    shipper = asyncio.run(main())
    spooled = [json.loads(line)["id"] for p in sorted((tmp_path / "spool").glob("*.jsonl"))
               for line in p.read_bytes().splitlines()]
    assert spooled == [e.id for e in events]
    assert shipper.stats.lost == 0


def test_too_many_events_in_memory_refuse_sessions_then_count_what_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()

    async def main() -> AuditShipper:
        send = HttpSend(f"http://127.0.0.1:{port}", timeout=0.3)
        shipper = AuditShipper(send.sender(), tmp_path / "spool", spool_max_bytes=2_000,
                               max_memory_events=50, **FAST)
        await shipper.start()
        for event in numbered_events(99):
            shipper.emit(event)
        assert not shipper.can_accept_sessions()
        assert shipper.refusal_reason() is not None
        for event in numbered_events(5):
            shipper.emit(event)  # beyond twice the bound: dropped, counted, never raised
        await shipper.close(timeout=0.5)
        await send.aclose()
        return shipper

    with caplog.at_level(logging.ERROR, logger="teleport.audit.shipper"):
        shipper = asyncio.run(main())
    assert shipper.stats.emitted == 100
    assert shipper.stats.lost >= 4
    assert "new database sessions are refused" in caplog.text
    assert "dropped so far" in caplog.text


def test_a_send_that_is_not_a_sendjson_is_refused_at_once(tmp_path: Path) -> None:
    async def send(batch: object) -> None:  # the model form that was removed
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="SendJson"):
        AuditShipper(send, tmp_path / "spool")  # type: ignore[arg-type]

"""The control plane's audit store: dedupe, the hash chain across days, tamper detection with
file:line, torn writes, concurrent appends, search, and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pydantic
import pytest

import control.audit_store as audit_store
from control.audit_store import (
    BUILD_SLICE,
    GENESIS,
    HEAD_FILE,
    INDEX_FILE,
    AuditStore,
    AuditStoreError,
    encode_record,
    line_hash,
    prune_log,
    record_middle,
    search_log,
    verify_log,
)
from schemas.audit import Outcome, encode_batch, encode_event
from schemas.bundle import canonical_json
from tests.audit.conftest import (
    AUDIT_PATH,
    AuditEndpoint,
    Clock,
    format1_log,
    numbered_events,
    query_event,
    session_end,
    session_start,
)
from transport.http import HttpClient


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def only_file(directory: Path) -> Path:
    (path,) = sorted(directory.glob("*.jsonl"))
    return path


def rewritten(record: dict, *, rehash: bool) -> bytes:
    """`record` (fields possibly edited) as a line in the store's form; with `rehash` its
    hash is computed again, as a forger would, else the old hash is kept."""
    event_json = json.dumps(record["event"], separators=(",", ":"), ensure_ascii=False)
    middle = record_middle(record["received"], record["from"])
    line, digest = encode_record(record["seq"], record["prev"].encode(), middle,
                                 event_json.encode())
    return line if rehash else line.replace(digest, record["hash"].encode())


def three_days(directory: Path) -> tuple[list[Path], Clock]:
    """Five records a day on 2024-05-01, 02 and 03."""
    clock = Clock()
    with AuditStore(directory, clock=clock) as store:
        for _ in range(3):
            store.append(numbered_events(5))
            clock.advance(days=1)
    return sorted(directory.glob("*.jsonl")), clock


# -- appending and the chain ---------------------------------------------------------------


def test_records_are_chained_and_hash_their_own_bytes(tmp_path: Path) -> None:
    events = numbered_events(3)
    with AuditStore(tmp_path, clock=Clock()) as store:
        assert store.append(events, "agent-7") == (3, 0)
    path = only_file(tmp_path)
    assert path.name == "2024-05-01.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600
    records = [json.loads(line) for line in lines_of(path)]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == GENESIS
    for before, record, line, event in zip([None, *records], records, lines_of(path), events,
                                           strict=False):
        # The line as written: fixed key order, the event as encode_event serialized it,
        # the hash over the bytes before `,"hash":`.
        prefix = (f'{{"seq":{record["seq"]},"prev":"{record["prev"]}","received":'
                  f'"{record["received"]}","from":"agent-7","event":').encode()
        assert line == prefix + encode_event(event) + f',"hash":"{record["hash"]}"}}\n'.encode()
        assert record["hash"] == line_hash(line[:-1])
        assert record["hash"] == hashlib.sha256(line[: line.rindex(b',"hash":')]).hexdigest()
        assert record["received"] == "2024-05-01T12:00:00.000000Z"
        if before is not None:
            assert record["prev"] == before["hash"]
    assert [r["event"]["id"] for r in records] == [e.id for e in events]
    head = json.loads((tmp_path / HEAD_FILE).read_text())
    assert head == {"seq": 3, "hash": records[-1]["hash"], "file": "2024-05-01.jsonl"}
    report = verify_log(tmp_path)
    assert report.ok and report.records == 3 and report.notes == []


def test_duplicates_are_dropped_within_a_batch_and_across_batches(tmp_path: Path) -> None:
    a, b, c = numbered_events(3)
    with AuditStore(tmp_path) as store:
        assert store.append([a, b, a]) == (2, 1)
        assert store.append([b, c, c]) == (1, 2)
        assert store.append([]) == (0, 0)
        assert store.last_seq == 3
    ids = [e.id for e in search_log(tmp_path)]
    assert ids == [a.id, b.id, c.id]


def test_a_batch_sent_again_after_a_restart_is_recognised(tmp_path: Path) -> None:
    batch = numbered_events(50)
    with AuditStore(tmp_path) as store:
        store.append(batch[:30])
    with AuditStore(tmp_path) as store:
        assert store.known_ids() == 30
        # The agent never got the answer to its first try: it sends the whole batch again.
        assert store.append(batch) == (20, 30)
        assert store.last_seq == 50
    assert len(search_log(tmp_path)) == 50
    assert verify_log(tmp_path).ok


# -- the duplicate index's checkpoint -----------------------------------------------------


def full_scan_index(directory: Path, clock: Clock | None = None) -> dict:
    """The index a store builds from the day files alone (no checkpoint to read)."""
    saved = directory / INDEX_FILE
    kept = saved.read_bytes() if saved.exists() else None
    saved.unlink(missing_ok=True)
    store = AuditStore(directory, clock=clock or Clock())
    index = store._ids.to_json()
    store._closed = True  # leave no checkpoint of its own behind
    store._close_fd()
    if kept is not None:
        saved.write_bytes(kept)
    return index


def scans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(file name, offset) of each day file the stores opened from now on read."""
    seen: list[tuple[str, int]] = []
    real = audit_store._scan_file

    def spy(path: Path, day: date, ids: object, start: object = None) -> object:
        seen.append((path.name, start.offset if start is not None else 0))
        return real(path, day, ids, start)  # type: ignore[arg-type]

    monkeypatch.setattr(audit_store, "_scan_file", spy)
    return seen


def two_days(directory: Path, clock: Clock, batch: list, first: int, second: int) -> Path:
    """`batch[:first]` stored on 2024-05-01, `batch[first:second]` the next day (the store
    then closed, so checkpointed); the second day's file."""
    with AuditStore(directory, clock=clock) as store:
        store.append(batch[:first])
        clock.advance(days=1)
        store.append(batch[first:second])
    return directory / "2024-05-02.jsonl"


def test_a_restart_reads_the_checkpointed_index_and_only_the_records_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    batch = numbered_events(40)
    day2 = two_days(tmp_path, clock, batch, 10, 20)
    index_file = tmp_path / INDEX_FILE
    assert index_file.stat().st_mode & 0o777 == 0o600
    saved = json.loads(index_file.read_text())
    assert (saved["file"], saved["offset"], saved["lines"], saved["seq"]) == (
        day2.name, day2.stat().st_size, 10, 20)
    # A crash after more records: they are not in the checkpoint, on two days.
    store = AuditStore(tmp_path, clock=clock)
    store.append(batch[20:30])
    clock.advance(days=1)
    store.append(batch[30:35])
    store._closed = True  # killed: no checkpoint at close
    seen = scans(monkeypatch)
    with AuditStore(tmp_path, clock=clock) as store:
        assert seen == [(day2.name, saved["offset"]), ("2024-05-03.jsonl", 0)]
        assert store.known_ids() == 35 and store.last_seq == 35
        assert store._ids.to_json() == full_scan_index(tmp_path, clock)
        # Re-sent batches are recognised, from the checkpoint and from what followed it.
        assert store.append(batch) == (5, 35)
    assert [e.id for e in search_log(tmp_path)] == [e.id for e in batch]
    assert verify_log(tmp_path).ok


def test_a_checkpoint_is_written_while_writing_not_only_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_store, "CHECKPOINT_SECONDS", 0.0)
    batch = numbered_events(6)
    store = AuditStore(tmp_path)
    store.append(batch[:3])
    saved = json.loads((tmp_path / INDEX_FILE).read_text())
    assert saved["seq"] == 3
    store.append(batch[3:])
    assert json.loads((tmp_path / INDEX_FILE).read_text())["seq"] == 6
    store._closed = True  # killed
    seen = scans(monkeypatch)
    with AuditStore(tmp_path) as again:
        assert seen == [(only_file(tmp_path).name, only_file(tmp_path).stat().st_size)]
        assert again.append(batch) == (0, 6)


def _break_index(directory: Path, **changes: object) -> None:
    path = directory / INDEX_FILE
    saved = json.loads(path.read_text())
    saved.update(changes)
    path.write_text(json.dumps(saved))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("not json", "is not used (not JSON: Expecting property name"),
        ("other format", "not an index checkpoint of format 1"),
        ("bad ranges", "must be sorted, disjoint and not empty"),
        ("missing field", "'hash' is missing"),
        ("records cut", "is shorter than the"),
        ("record replaced", "is not seq 8 with the hash it names"),
        ("offset inside a line", "has no line ending at offset"),
        ("day file gone", "its day file 2024-05-02.jsonl is gone"),
    ],
)
def test_a_checkpoint_that_no_longer_describes_the_log_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str, why: str
) -> None:
    clock = Clock()
    batch = numbered_events(12)
    day2 = two_days(tmp_path, clock, batch, 4, 8)
    saved = json.loads((tmp_path / INDEX_FILE).read_text())
    expected = 8
    if damage == "not json":
        (tmp_path / INDEX_FILE).write_text("{")
    elif damage == "other format":
        _break_index(tmp_path, format=2)
    elif damage == "bad ranges":
        (held,) = saved["index"]["ranges"].values()
        held["starts"], held["ends"] = [5, 1], [6, 2]
        _break_index(tmp_path, index=saved["index"])
    elif damage == "missing field":
        del saved["hash"]
        (tmp_path / INDEX_FILE).write_text(json.dumps(saved))
    elif damage == "records cut":
        write_lines(day2, lines_of(day2)[:-1])  # HEAD then says where the chain goes on
    elif damage == "record replaced":
        lines = lines_of(day2)
        record = json.loads(lines[-1])
        record["event"]["query"] = "x" * len(record["event"]["query"])  # same length
        write_lines(day2, [*lines[:-1], rewritten(record, rehash=True)])
    elif damage == "offset inside a line":
        _break_index(tmp_path, offset=saved["offset"] - 5)
    elif damage == "day file gone":
        day2.unlink()
        expected = 4
    with caplog.at_level(logging.WARNING, logger="teleport.control.audit"):
        store = AuditStore(tmp_path, clock=clock)
    assert why in caplog.text and "rebuilding the duplicate index from the day files" in (
        caplog.text)
    with store:
        assert store.known_ids() == expected - (damage == "records cut")
        assert store._ids.to_json() == full_scan_index(tmp_path, clock)
        accepted, duplicates = store.append(batch)
        assert duplicates == store.known_ids() - accepted
    # The store wrote a good checkpoint again at close.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="teleport.control.audit"):
        AuditStore(tmp_path, clock=clock).close()
    assert "is not used" not in caplog.text


def test_a_torn_write_after_the_checkpoint_is_cut_and_numbered_as_in_the_file(
    tmp_path: Path,
) -> None:
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(3))
    path = only_file(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good + b'{"seq":4,"prev":')
    with AuditStore(tmp_path) as store:
        (repair,) = store.repairs
        assert (repair.line, repair.nbytes) == (4, len(b'{"seq":4,"prev":'))
        assert path.read_bytes() == good
        assert store.append(numbered_events(1)) == (1, 0)
    assert verify_log(tmp_path).ok


def test_ids_are_remembered_for_the_window_only(tmp_path: Path) -> None:
    clock = Clock()
    event = query_event()
    with AuditStore(tmp_path, clock=clock, dedupe_window=timedelta(days=7)) as store:
        store.append([event])
    clock.advance(days=7)
    with AuditStore(tmp_path, clock=clock, dedupe_window=timedelta(days=7)) as store:
        assert store.append([event]) == (0, 1)
    clock.advance(days=1)
    with AuditStore(tmp_path, clock=clock, dedupe_window=timedelta(days=7)) as store:
        assert store.known_ids() == 0
        assert store.append([event]) == (1, 0)  # documented: beyond the window, stored again


def test_days_are_arrival_days_and_the_chain_runs_across_them(tmp_path: Path) -> None:
    files, _ = three_days(tmp_path)
    assert [p.name for p in files] == ["2024-05-01.jsonl", "2024-05-02.jsonl", "2024-05-03.jsonl"]
    last_of_first = json.loads(lines_of(files[0])[-1])
    first_of_second = json.loads(lines_of(files[1])[0])
    assert first_of_second["prev"] == last_of_first["hash"]
    assert first_of_second["seq"] == 6
    report = verify_log(tmp_path)
    assert report.ok, report.problems
    assert (report.files, report.records, report.first_seq, report.last_seq) == (3, 15, 1, 15)


def test_an_event_spooled_for_days_goes_into_the_day_it_arrives(tmp_path: Path) -> None:
    clock = Clock()
    old = query_event("select 'late'", time=clock.now - timedelta(days=3))
    with AuditStore(tmp_path, clock=clock) as store:
        store.append([old])
    assert only_file(tmp_path).name == "2024-05-01.jsonl"
    found = search_log(tmp_path, since=clock.now - timedelta(days=4))
    assert [e.id for e in found] == [old.id]
    assert search_log(tmp_path, since=clock.now - timedelta(days=2)) == []


def test_a_clock_stepping_back_over_midnight_never_reopens_an_older_day(tmp_path: Path
                                                                        ) -> None:
    clock = Clock(datetime(2024, 5, 2, 0, 0, 5, tzinfo=UTC))
    with AuditStore(tmp_path, clock=clock) as store:
        store.append(numbered_events(2))
        clock.advance(seconds=-10)  # 2024-05-01 23:59:55
        store.append(numbered_events(2))
    with AuditStore(tmp_path, clock=clock) as store:  # also after a restart
        store.append(numbered_events(2))
    assert only_file(tmp_path).name == "2024-05-02.jsonl"
    assert verify_log(tmp_path).ok


def test_concurrent_appends_keep_one_chain(tmp_path: Path) -> None:
    batches = [numbered_events(10) for _ in range(100)]
    results: list[tuple[int, int]] = []
    store = AuditStore(tmp_path)
    barrier = threading.Barrier(20)

    def worker(mine: list[list]) -> None:
        barrier.wait()
        for batch in mine:
            results.append(store.append(batch, "agent-1"))
            results.append(store.append(batch[:3], "agent-1"))  # a re-send, concurrently

    threads = [threading.Thread(target=worker, args=(batches[i::20],)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert sum(a for a, _ in results) == 1000
    assert sum(d for _, d in results) == 300
    report = verify_log(tmp_path)
    assert report.ok, report.problems
    assert report.records == 1000 and report.last_seq == 1000
    stored = [e.id for e in search_log(tmp_path)]
    assert len(stored) == len(set(stored)) == 1000
    # Each batch's events stay together and in order.
    position = {event_id: i for i, event_id in enumerate(stored)}
    for batch in batches:
        places = [position[e.id] for e in batch]
        assert places == list(range(places[0], places[0] + 10))


def test_appends_from_coroutines_through_threads(tmp_path: Path) -> None:
    store = AuditStore(tmp_path)

    async def main() -> list[tuple[int, int]]:
        return await asyncio.gather(
            *(asyncio.to_thread(store.append, numbered_events(5)) for _ in range(40))
        )

    assert sum(a for a, _ in asyncio.run(main())) == 200
    store.close()
    assert verify_log(tmp_path).records == 200


def entries_of(events: list) -> list[tuple[str, bytes]]:
    return [(e.id, encode_event(e)) for e in events]


def test_the_event_loops_appends_chain_on_the_loop_and_share_the_chain_with_threads(
    tmp_path: Path,
) -> None:
    """append_encoded_async (the all-in-one's db agent): its batches and those of HTTP
    callers in worker threads land in one chain, each batch whole, re-sends recognised."""
    store = AuditStore(tmp_path)
    own = [numbered_events(10) for _ in range(30)]
    remote = [numbered_events(10) for _ in range(30)]
    written_in = set()

    persist = store._persist

    def watched(built: object) -> None:
        written_in.add(threading.current_thread() is threading.main_thread())
        persist(built)  # type: ignore[arg-type]

    store._persist = watched  # type: ignore[method-assign]

    async def main() -> list[tuple[int, int]]:
        loop_side = [store.append_encoded_async(entries_of(b), "agent-1") for b in own]
        thread_side = [asyncio.to_thread(store.append, b, "agent-2") for b in remote]
        again = [store.append_encoded_async(entries_of(b[:4]), "agent-1") for b in own[:5]]
        return list(await asyncio.gather(*loop_side, *thread_side)) + list(
            await asyncio.gather(*again)
        )

    results = asyncio.run(main())
    store.close()
    assert sum(a for a, _ in results) == 600 and sum(d for _, d in results) == 20
    assert written_in == {False}  # the write and fsync never ran on the loop's thread
    report = verify_log(tmp_path)
    assert report.ok, report.problems
    assert report.records == 600
    position = {e.id: i for i, e in enumerate(search_log(tmp_path))}
    for batch in own + remote:
        places = [position[e.id] for e in batch]
        assert places == list(range(places[0], places[0] + 10))


def test_a_large_loop_append_lets_the_event_loop_run_while_it_chains(tmp_path: Path) -> None:
    """The all-in-one's batches are up to 2,000 events (~6 ms of chaining): the chain is
    built a slice at a time, and the data path's callbacks run in between."""
    store = AuditStore(tmp_path)
    batch = entries_of(numbered_events(2000))
    ticks = 0
    ticks_at_write: list[int] = []
    persist = store._persist

    def watched(built: object) -> None:
        ticks_at_write.append(ticks)
        persist(built)  # type: ignore[arg-type]

    store._persist = watched  # type: ignore[method-assign]

    async def main() -> tuple[int, int]:
        nonlocal ticks
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        result = await store.append_encoded_async(batch, "agent-1")
        stop = True
        await task
        ticks_at_write[0] -= before
        return result

    assert asyncio.run(main()) == (2000, 0)
    store.close()
    assert ticks_at_write[0] >= 2000 // BUILD_SLICE - 1
    assert verify_log(tmp_path).records == 2000


def test_a_cancelled_loop_append_still_finishes_its_write_and_frees_the_store(
    tmp_path: Path,
) -> None:
    store = AuditStore(tmp_path)
    release = threading.Event()
    persist = store._persist

    def slow(built: object) -> None:
        release.wait(5)
        persist(built)  # type: ignore[arg-type]

    store._persist = slow  # type: ignore[method-assign]
    batch = numbered_events(3)

    async def main() -> None:
        task = asyncio.create_task(store.append_encoded_async(entries_of(batch), "a"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        # The next append waits for that write, then goes after it in the chain.
        assert await asyncio.to_thread(store.append, numbered_events(2), "a") == (2, 0)

    asyncio.run(main())
    store.close()
    report = verify_log(tmp_path)
    assert report.ok and report.records == 5
    assert [e.id for e in search_log(tmp_path)][:3] == [e.id for e in batch]


def test_a_loop_append_that_cannot_write_is_refused_and_frees_the_store(
    tmp_path: Path,
) -> None:
    store = AuditStore(tmp_path)
    store.close()
    with pytest.raises(AuditStoreError, match="closed"):
        asyncio.run(store.append_encoded_async(entries_of(numbered_events(1)), "a"))
    assert store._write_lock.acquire(blocking=False)

    broken = AuditStore(tmp_path / "full")

    def no_space(built: object) -> None:
        raise OSError(28, "No space left on device")

    broken._persist = no_space  # type: ignore[method-assign]
    with pytest.raises(AuditStoreError, match="No space left on device"):
        asyncio.run(broken.append_encoded_async(entries_of(numbered_events(1)), "a"))
    assert broken.last_seq == 0
    assert broken._write_lock.acquire(blocking=False)


def test_a_closed_store_refuses_appends(tmp_path: Path) -> None:
    store = AuditStore(tmp_path)
    store.close()
    with pytest.raises(AuditStoreError, match="closed"):
        store.append(numbered_events(1))


def test_text_that_is_not_unicode_is_refused_not_stored(tmp_path: Path) -> None:
    with AuditStore(tmp_path) as store, pytest.raises(ValueError, match="lone surrogate"):
        store.append([*numbered_events(1), query_event("select '\udc80'")])
    assert verify_log(tmp_path).records == 0


# -- tampering -----------------------------------------------------------------------------


def test_an_edited_line_is_found_with_its_file_and_line(tmp_path: Path) -> None:
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(5))
    path = only_file(tmp_path)
    lines = lines_of(path)
    record = json.loads(lines[2])
    record["event"]["query"] = "select 'nothing to see'"
    lines[2] = rewritten(record, rehash=False)
    write_lines(path, lines)
    report = verify_log(tmp_path)
    assert not report.ok
    first = report.problems[0]
    assert (first.path, first.line) == (path, 3)
    assert str(first).startswith(f"{path}:3: ")
    assert "hash does not match" in first.message
    assert report.problem_count == 1


def test_an_edit_that_recomputes_the_hash_breaks_the_next_link(tmp_path: Path) -> None:
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(5))
    path = only_file(tmp_path)
    lines = lines_of(path)
    record = json.loads(lines[1])
    record["event"]["user"] = "mallory"
    lines[1] = rewritten(record, rehash=True)
    write_lines(path, lines)
    report = verify_log(tmp_path)
    assert [(p.line, "does not link" in p.message) for p in report.problems] == [(3, True)]


def test_a_reformatted_line_is_an_edit(tmp_path: Path) -> None:
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(2))
    path = only_file(tmp_path)
    lines = lines_of(path)
    lines[0] = json.dumps(json.loads(lines[0]), sort_keys=True).encode() + b"\n"
    write_lines(path, lines)
    report = verify_log(tmp_path)
    assert [p.line for p in report.problems] == [1]
    assert "not in the form" in report.problems[0].message


def test_a_byte_changed_inside_the_event_is_found_by_the_hash(tmp_path: Path) -> None:
    # Same JSON values, other bytes: the hash covers the bytes as stored.
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(3))
    path = only_file(tmp_path)
    lines = lines_of(path)
    assert b'"user":"alice"' in lines[1]
    lines[1] = lines[1].replace(b'"user":"alice"', b'"user": "alice"')
    write_lines(path, lines)
    report = verify_log(tmp_path)
    assert [(p.line, p.message) for p in report.problems] == [
        (2, "its hash does not match its content: the record was altered")
    ]


def test_a_hash_written_in_another_form_is_an_edit(tmp_path: Path) -> None:
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(2))
    path = only_file(tmp_path)
    lines = lines_of(path)
    record = json.loads(lines[0])
    upper = record["hash"].upper().encode()
    lines[0] = lines[0].replace(record["hash"].encode(), upper)
    write_lines(path, lines)
    report = verify_log(tmp_path)
    assert [p.line for p in report.problems][:1] == [1]
    assert "not in the form" in report.problems[0].message


def test_a_log_of_the_earlier_format_still_verifies_and_is_continued(tmp_path: Path) -> None:
    clock = Clock()
    old = numbered_events(3)
    last = format1_log(tmp_path, old, "2024-05-01T11:00:00.000000Z")
    report = verify_log(tmp_path)
    assert report.ok and report.format1_records == 3
    assert "3 record(s) are in the format of earlier versions" in report.notes[0]
    new = numbered_events(2)
    with AuditStore(tmp_path, clock=clock) as store:
        assert (store.last_seq, store.last_hash, store.known_ids()) == (3, last, 3)
        assert store.append([old[0], *new]) == (2, 1)  # ids of the old format dedupe too
    lines = lines_of(only_file(tmp_path))
    assert [line[:9] for line in lines] == [b'{"event":'] * 3 + [b'{"seq":4,'] * 1 + [b'{"seq":5,']
    assert json.loads(lines[3])["prev"] == last
    report = verify_log(tmp_path)
    assert report.ok and report.records == 5 and report.format1_records == 3
    assert [e.id for e in search_log(tmp_path)] == [e.id for e in [*old, *new]]
    # An edit to a format-1 line is found the way that format was checked.
    record = json.loads(lines[1])
    record["event"]["query"] = "select 'other'"
    lines[1] = canonical_json(record) + b"\n"
    write_lines(only_file(tmp_path), lines)
    report = verify_log(tmp_path)
    assert [(p.line, p.message) for p in report.problems] == [
        (2, "its hash does not match its content: the record was altered")
    ]


def test_a_deleted_line_is_found(tmp_path: Path) -> None:
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(6))
    path = only_file(tmp_path)
    lines = lines_of(path)
    del lines[3]
    write_lines(path, lines)
    report = verify_log(tmp_path)
    assert [str(p) for p in report.problems] == [
        f"{path}:4: seq 5 follows seq 3 ({path.name}:3): 1 record(s) before this line were "
        "removed"
    ]


def test_a_deleted_last_line_is_found_against_head(tmp_path: Path) -> None:
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(4))
    path = only_file(tmp_path)
    write_lines(path, lines_of(path)[:-1])
    report = verify_log(tmp_path)
    assert [(p.path, p.line) for p in report.problems] == [(path, 3)]
    assert "ends at seq 3 but HEAD.json records seq 4" in report.problems[0].message


def test_a_removed_head_is_reported(tmp_path: Path) -> None:
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(2))
    (tmp_path / HEAD_FILE).unlink()
    report = verify_log(tmp_path)
    assert not report.ok and "HEAD.json is missing" in report.problems[0].message


def test_swapped_lines_are_found(tmp_path: Path) -> None:
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(5))
    path = only_file(tmp_path)
    lines = lines_of(path)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(path, lines)
    report = verify_log(tmp_path)
    assert [p.line for p in report.problems] == [2, 3, 4]
    assert report.problems[0].message.startswith("seq 3 follows seq 1")
    assert "reordered" in report.problems[1].message


def test_a_deleted_day_file_in_the_middle_is_found(tmp_path: Path) -> None:
    files, _ = three_days(tmp_path)
    files[1].unlink()
    report = verify_log(tmp_path)
    assert [str(p) for p in report.problems] == [
        f"{files[2]}:1: seq 11 follows seq 5 (the end of 2024-05-01.jsonl:5): 5 record(s) "
        "are missing: a day file between them was removed, or the end of the previous file "
        "was cut"
    ]


def test_a_deleted_oldest_day_file_is_found(tmp_path: Path) -> None:
    files, _ = three_days(tmp_path)
    files[0].unlink()
    report = verify_log(tmp_path)
    assert [str(p) for p in report.problems] == [
        f"{files[1]}:1: the log starts at seq 6: the 5 record(s) before it are missing and "
        "RETENTION.json does not account for them: the oldest day file(s) were removed or "
        "emptied"
    ]


def test_retention_removes_old_days_and_verify_accepts_it(tmp_path: Path) -> None:
    files, clock = three_days(tmp_path)
    assert prune_log(tmp_path, date(2024, 5, 3)) == files[:2]
    assert sorted(tmp_path.glob("*.jsonl")) == files[2:]
    report = verify_log(tmp_path)
    assert report.ok and report.first_seq == 11
    assert "removed by retention" in report.notes[0]
    assert prune_log(tmp_path, date(2024, 6, 1)) == []  # the newest file always stays
    with AuditStore(tmp_path, clock=clock) as store:
        assert store.last_seq == 15
        store.append(numbered_events(1))
    assert verify_log(tmp_path).ok


def test_a_record_moved_to_another_day_file_is_found(tmp_path: Path) -> None:
    files, _ = three_days(tmp_path)
    first, second = lines_of(files[0]), lines_of(files[1])
    write_lines(files[0], first[:-1])
    write_lines(files[1], [first[-1], *second])
    report = verify_log(tmp_path)
    assert [(p.path.name, p.line) for p in report.problems] == [("2024-05-02.jsonl", 1)]
    assert "moved between files" in report.problems[0].message


# -- crashes -------------------------------------------------------------------------------


def test_a_torn_last_line_is_cut_at_start_saved_and_never_chained_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, lost = numbered_events(3), numbered_events(2)
    with AuditStore(tmp_path) as store:
        store.append(first)
    path = only_file(tmp_path)
    good = path.read_bytes()
    # A crash in the middle of writing a batch: half a line, no newline, no HEAD update.
    record = json.loads(good.splitlines()[-1])
    torn = b'{"event":{"agent":"agent-1","client_addr":"127.0.0.1:5'
    path.write_bytes(good + torn)
    assert "unfinished line" in verify_log(tmp_path).notes[0]  # before the repair
    with caplog.at_level(logging.WARNING, logger="teleport.control.audit"):
        store = AuditStore(tmp_path)
    assert "unfinished write were cut" in caplog.text
    (repair,) = store.repairs
    assert (repair.path, repair.line, repair.nbytes) == (path, 4, len(torn))
    assert repair.saved_to.read_bytes() == torn
    assert path.read_bytes() == good
    assert store.last_seq == 3 and store.last_hash == record["hash"]
    # The sender never got an answer for that batch and sends it again: stored, chained.
    assert store.append(lost) == (2, 0)
    store.close()
    report = verify_log(tmp_path)
    assert report.ok and report.records == 5
    assert any(".torn-" in note for note in report.notes)


def test_an_unfinished_line_after_head_is_a_note_while_writing(tmp_path: Path) -> None:
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(2))
    path = only_file(tmp_path)
    path.write_bytes(path.read_bytes() + b'{"event":')
    report = verify_log(tmp_path)
    assert report.ok
    assert "unfinished line" in report.notes[0]


def test_records_removed_at_the_end_stay_visible_after_a_restart(tmp_path: Path) -> None:
    with AuditStore(tmp_path) as store:
        store.append(numbered_events(4))
    path = only_file(tmp_path)
    write_lines(path, lines_of(path)[:-2])
    with AuditStore(tmp_path) as store:
        assert store.last_seq == 4  # continues after what HEAD confirmed
        store.append(numbered_events(1))
    report = verify_log(tmp_path)
    assert [p.line for p in report.problems] == [3]
    assert "seq 5 follows seq 2" in report.problems[0].message


# -- search --------------------------------------------------------------------------------


def test_search_filters(tmp_path: Path) -> None:
    clock = Clock()
    t0 = clock.now
    early = query_event("select 'early'", time=t0 - timedelta(hours=5))
    alice = query_event("select 'a'", time=t0 - timedelta(hours=1))
    failed = query_event(
        "selec 1", user="carol", db_service="local",
        outcome=Outcome(status="error", sqlstate="42601", message="syntax error"), time=t0,
    )
    start, end = session_start(), session_end()
    with AuditStore(tmp_path, clock=clock) as store:
        store.append([early, alice, failed, start, end])

    def ids(**kw: object) -> list[str]:
        return [e.id for e in search_log(tmp_path, **kw)]  # type: ignore[arg-type]

    assert ids() == [early.id, alice.id, failed.id, start.id, end.id]
    assert ids(type="db.session.query") == [early.id, alice.id, failed.id]
    assert ids(type="db.session") == [early.id, alice.id, failed.id, start.id, end.id]
    assert ids(type="db.session.start") == [start.id]
    assert ids(type="db.sess") == []  # a prefix counts by whole dotted parts
    assert ids(user="carol") == [failed.id]
    assert ids(db="local") == [failed.id, start.id, end.id]
    assert ids(since=t0 - timedelta(hours=2), type="db.session.query") == [alice.id, failed.id]
    assert ids(until=t0 - timedelta(hours=2)) == [early.id]
    assert ids(since=datetime(2024, 5, 1, 10, 30), user="alice") == [alice.id]  # naive: UTC
    assert ids(limit=2) == [early.id, alice.id]
    assert ids(user="nobody") == []


# -- the endpoint --------------------------------------------------------------------------


def test_the_endpoint_stores_and_acknowledges(tmp_path: Path) -> None:
    endpoint = AuditEndpoint(tmp_path, sender="host-42")
    events = numbered_events(3)

    async def main() -> list[tuple[int, dict]]:
        await endpoint.start()
        out = []
        try:
            async with HttpClient(endpoint.url) as client:
                body = {"events": [e.model_dump(mode="json") for e in events]}
                for payload in (body, body, {"events": [{"type": "db.session.query"}]}):
                    r = await client.request("POST", AUDIT_PATH, json=payload)
                    out.append((r.status, r.json()))
                raw = json.dumps(body).replace("select", "\\udc80select").encode()
                cut = json.dumps(body).encode()[:-3]
                for payload in (raw, cut, b'{"events":[{"query":"\xff"}]}'):
                    r = await client.request("POST", AUDIT_PATH, body=payload,
                                             headers={"content-type": "application/json"})
                    out.append((r.status, r.json()))
        finally:
            await endpoint.stop()
        return out

    (s1, a1), (s2, a2), (s3, a3), (s4, a4), (s5, a5), (s6, a6) = asyncio.run(main())
    assert (s1, a1) == (200, {"accepted": 3, "duplicates": 0})
    assert (s2, a2) == (200, {"accepted": 0, "duplicates": 3})
    assert s3 == 400 and a3["error"]["code"] == "invalid_request"
    assert "events[0].db.session.query.cluster: Field required" in a3["error"]["message"]
    assert s4 == 400 and a4["error"]["code"] == "invalid_event"
    assert "lone surrogate" in a4["error"]["message"]
    assert (s5, a5["error"]["code"]) == (400, "malformed_json")
    assert a5["error"]["message"].startswith("the request body is not valid JSON: EOF while")
    assert (s6, a6["error"]["code"]) == (400, "malformed_json")
    assert "invalid unicode code point" in a6["error"]["message"]
    stored = [json.loads(line) for line in lines_of(only_file(tmp_path))]
    assert [r["from"] for r in stored] == ["host-42"] * 3


def test_a_body_of_joined_event_lines_is_validated_and_stored_once(tmp_path: Path) -> None:
    events = numbered_events(3)
    lines = [encode_event(e) + b"\n" for e in events]  # as the agent spools them
    with AuditStore(tmp_path) as store:
        assert store.append_body(encode_batch(lines), "agent-2") == (3, 0)
        assert store.append_body(encode_batch(lines[1:]), "agent-2") == (0, 2)
        extra = encode_batch([lines[0].replace(b'"query":', b'"secret":"x","query":')])
        with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
            store.append_body(extra)
        assert store.last_seq == 3
    stored = [json.loads(line) for line in lines_of(only_file(tmp_path))]
    assert [r["from"] for r in stored] == ["agent-2"] * 3
    assert [r["event"] for r in stored] == [json.loads(line) for line in lines]
    assert verify_log(tmp_path).ok


def test_the_endpoint_answers_503_when_the_store_cannot_write(tmp_path: Path) -> None:
    endpoint = AuditEndpoint(tmp_path)

    async def main() -> tuple[int, dict]:
        await endpoint.start()
        assert endpoint.store is not None
        endpoint.store.close()  # as if the disk went away under it
        try:
            async with HttpClient(endpoint.url) as client:
                body = {"events": [e.model_dump(mode="json") for e in numbered_events(1)]}
                r = await client.request("POST", AUDIT_PATH, json=body)
                return r.status, r.json()
        finally:
            await endpoint.stop()

    status, body = asyncio.run(main())
    assert status == 503 and body["error"]["code"] == "audit_store_unavailable"


def test_search_reads_a_stored_time_as_utc(tmp_path: Path) -> None:
    when = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)
    with AuditStore(tmp_path, clock=Clock()) as store:
        store.append([query_event(time=when)])
    (event,) = search_log(tmp_path)
    assert event.time == when

"""Event ids and the control plane's duplicate index: a process's ids are consecutive under one
prefix, the index holds them as ranges (memory grows with processes and gaps, not events),
and it answers exactly what a plain set of the ids added would answer."""

from __future__ import annotations

import json
import os
import uuid
from datetime import date, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.audit_ids import EventIdIndex
from control.audit_store import AuditStore, search_log, verify_log
from schemas.audit import new_event_id, split_event_id
from tests.audit.conftest import numbered_events

DAY = date(2026, 11, 22)
PREFIXES = ("0123abcd-0000-4000-8000-00", "ffffffff-1111-4222-8333-ab")


def event_id(prefix: str, number: int) -> str:
    return f"{prefix}{number:012x}"


def test_one_process_ids_are_consecutive_numbers_under_one_prefix() -> None:
    ids = [new_event_id() for _ in range(3)]
    split = [split_event_id(i) for i in ids]
    assert all(s is not None for s in split)
    prefixes = {s[0] for s in split if s is not None}
    numbers = [s[1] for s in split if s is not None]
    assert len(prefixes) == 1
    assert numbers == [numbers[0], numbers[0] + 1, numbers[0] + 2]
    assert split_event_id(str(uuid.uuid4())) is None
    assert split_event_id(ids[0].upper()) is None


def test_a_forked_child_draws_a_prefix_of_its_own() -> None:
    parent = split_event_id(new_event_id())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next id and leave at once
        os.write(write, new_event_id().encode())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    child = split_event_id(child_id)
    assert parent is not None and child is not None
    assert child[0] != parent[0]


def test_a_million_ids_of_one_process_take_one_entry() -> None:
    index = EventIdIndex()
    ids = [new_event_id() for _ in range(1_000_000)]
    for i in ids:
        index.add(i, DAY)
    assert len(index) == 1_000_000
    assert index.footprint() == 1
    assert ids[0] in index and ids[-1] in index
    assert new_event_id() not in index


def test_gaps_and_late_arrivals_are_exact_and_merge_when_filled() -> None:
    index = EventIdIndex()
    prefix = PREFIXES[0]
    for number in (1, 2, 3, 7, 8, 5):
        index.add(event_id(prefix, number), DAY)
    assert [n for n in range(10) if event_id(prefix, n) in index] == [1, 2, 3, 5, 7, 8]
    assert index.footprint() == 3  # 1-3, 5, 7-8
    index.add(event_id(prefix, 4), DAY)
    index.add(event_id(prefix, 6), DAY)
    assert index.footprint() == 1  # 1-8
    assert len(index) == 8


def test_ids_of_other_forms_are_kept_by_day_and_prefixes_by_their_last_day() -> None:
    index = EventIdIndex()
    old_uuid, new_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    index.add(old_uuid, DAY)
    index.add(new_uuid, DAY + timedelta(days=2))
    index.add(event_id(PREFIXES[0], 1), DAY)
    index.add(event_id(PREFIXES[1], 1), DAY)
    index.add(event_id(PREFIXES[1], 2), DAY + timedelta(days=2))  # still sending
    index.forget_before(DAY + timedelta(days=1))
    assert old_uuid not in index and new_uuid in index
    assert event_id(PREFIXES[0], 1) not in index
    # A prefix still in use keeps its older numbers: the window is a lower bound.
    assert event_id(PREFIXES[1], 1) in index and event_id(PREFIXES[1], 2) in index
    assert len(index) == 3


@given(
    st.lists(
        st.tuples(st.sampled_from(PREFIXES), st.integers(min_value=0, max_value=60)),
        max_size=200,
    )
)
def test_the_index_answers_as_a_set_of_the_ids_added(added: list[tuple[str, int]]) -> None:
    index = EventIdIndex()
    model: set[str] = set()
    for prefix, number in added:
        index.add(event_id(prefix, number), DAY)
        model.add(event_id(prefix, number))
    probes = {event_id(p, n) for p in PREFIXES for n in range(-1, 62) if n >= 0}
    assert {i for i in probes if i in index} == model
    assert len(index) == len(model)
    for prefix in PREFIXES:  # the ranges of a prefix are as few as its numbers allow
        numbers = sorted({n for p, n in added if p == prefix})
        runs = sum(1 for i, n in enumerate(numbers) if i == 0 or numbers[i - 1] != n - 1)
        held = index._ranges.get(prefix)
        assert (len(held.starts) if held else 0) == runs
    # Saved and read back (the store's checkpoint), it answers the same.
    again = EventIdIndex.from_json(json.loads(json.dumps(index.to_json())))
    assert {i for i in probes if i in again} == model and again.to_json() == index.to_json()


def test_other_ids_and_days_survive_saving() -> None:
    index = EventIdIndex()
    other = str(uuid.uuid4())
    index.add(other, DAY)
    index.add(event_id(PREFIXES[0], 7), DAY + timedelta(days=1))
    again = EventIdIndex.from_json(json.loads(json.dumps(index.to_json())))
    again.forget_before(DAY + timedelta(days=1))
    assert other not in again and event_id(PREFIXES[0], 7) in again


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20,
)


@given(_json | st.fixed_dictionaries({"ranges": _json, "other": _json})
       | st.fixed_dictionaries({"ranges": st.dictionaries(st.text(max_size=5), _json),
                                "other": st.dictionaries(st.text(max_size=12), _json)}))
def test_a_malformed_saved_index_is_a_value_error_never_a_crash(data: object) -> None:
    try:
        index = EventIdIndex.from_json(data)
    except ValueError:
        return
    # Whatever was accepted is a well-formed index.
    for held in index._ranges.values():
        bounds = [b for pair in zip(held.starts, held.ends, strict=True) for b in pair]
        assert bounds == sorted(bounds)


@pytest.mark.parametrize(
    ("ranges", "why"),
    [
        ({"starts": [3], "ends": [2]}, "sorted, disjoint and not empty"),
        ({"starts": [1, 2], "ends": [2, 3]}, "sorted, disjoint and not empty"),
        ({"starts": [1], "ends": []}, "as many range starts as ends"),
        ({"starts": [1.5], "ends": [2]}, "must be integers"),
    ],
)
def test_a_saved_index_with_bad_ranges_is_refused_naming_the_prefix(
    ranges: dict, why: str
) -> None:
    data = {"ranges": {PREFIXES[0]: {"last_day": DAY.isoformat(), **ranges}}, "other": {}}
    with pytest.raises(ValueError, match=why) as caught:
        EventIdIndex.from_json(data)
    assert PREFIXES[0] in str(caught.value)


def test_the_store_recognises_a_resent_batch_after_a_restart_from_ranges(tmp_path: Path) -> None:
    batch = numbered_events(3000)
    with AuditStore(tmp_path) as store:
        assert store.append(batch[:2000]) == (2000, 0)
        assert store.index_entries() == 1
    with AuditStore(tmp_path) as store:
        assert (store.known_ids(), store.index_entries()) == (2000, 1)
        assert store.append(batch[1500:]) == (1000, 500)
        assert store.index_entries() == 1
    assert [e.id for e in search_log(tmp_path)] == [e.id for e in batch]
    assert verify_log(tmp_path).ok

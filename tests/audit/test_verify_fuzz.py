"""Fuzzing `verify_log`: any change to any byte of the log (of the current format, and one
continued from the earlier format) is found, and no input, however
broken, makes it raise. Also: a store opened on a broken log starts and keeps chaining."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.audit_store import AuditStore, verify_log
from tests.audit.conftest import (
    Clock,
    format1_log,
    numbered_events,
    session_end,
    session_start,
)


@pytest.fixture(scope="module", params=["current", "continued from format 1"])
def pristine(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """Two days of records; or a day in the earlier format, then the current one."""
    directory = tmp_path_factory.mktemp("pristine")
    clock = Clock()
    if request.param != "current":
        format1_log(directory, [session_start(), *numbered_events(3)],
                    "2024-04-30T08:00:00.000000Z")
    with AuditStore(directory, clock=clock) as store:
        store.append([session_start(), *numbered_events(4)])
        clock.advance(days=1)
        store.append([*numbered_events(3), session_end()])
    report = verify_log(directory)
    assert report.ok and report.format1_records == (0 if request.param == "current" else 4)
    return directory


@contextlib.contextmanager
def copy_of(directory: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "audit"
        shutil.copytree(directory, target)
        yield target


def day_bytes(directory: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(directory.glob("*.jsonl"))]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_changed_byte_is_found(pristine: Path, data: st.DataObject) -> None:
    with copy_of(pristine) as directory:
        files = day_bytes(directory)
        path, content = files[data.draw(st.integers(0, len(files) - 1), label="file")]
        at = data.draw(st.integers(0, len(content) - 1), label="offset")
        new = (content[at] + data.draw(st.integers(1, 255), label="delta")) % 256
        path.write_bytes(content[:at] + bytes([new]) + content[at + 1:])
        report = verify_log(directory)
        assert not report.ok, (path.name, at, new)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_removed_or_inserted_span_is_found(pristine: Path, data: st.DataObject) -> None:
    with copy_of(pristine) as directory:
        files = day_bytes(directory)
        path, content = files[data.draw(st.integers(0, len(files) - 1), label="file")]
        start = data.draw(st.integers(0, len(content) - 1), label="start")
        if data.draw(st.booleans(), label="remove"):
            end = data.draw(st.integers(start + 1, len(content)), label="end")
            changed = content[:start] + content[end:]
        else:
            extra = data.draw(st.binary(min_size=1, max_size=200), label="inserted")
            changed = content[:start] + extra + content[start:]
        path.write_bytes(changed)
        assert not verify_log(directory).ok


@settings(max_examples=200, deadline=None)
@given(files=st.lists(st.binary(max_size=2000), min_size=1, max_size=3),
       head=st.one_of(st.none(), st.binary(max_size=200)))
def test_garbage_never_raises_and_the_store_still_opens(files: list[bytes], head: bytes | None
                                                       ) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for day, content in enumerate(files, 1):
            (directory / f"2024-05-0{day}.jsonl").write_bytes(content)
        if head is not None:
            (directory / "HEAD.json").write_bytes(head)
        verify_log(directory)
        clock = Clock()
        clock.advance(days=5)
        with AuditStore(directory, clock=clock) as store:
            assert store.append(numbered_events(2)) == (2, 0)
        report = verify_log(directory)
        assert report.records >= 2

"""The shipper's journal on a real directory: segments, what `release` deletes and keeps,
and what a later run takes back from an earlier one."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dataplane.audit.journal import Journal


def line(n: int) -> bytes:
    return b'{"id":"event-%04d","pad":"%s"}' % (n, b"x" * 40)


def segments(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.jsonl"))


def test_segments_go_only_once_every_event_in_them_is_done(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", segment_bytes=276)
    assert journal.take_leftovers(lambda lines: None) == 0
    for n in range(10):  # 69 bytes a line: a segment is sealed every 4 lines
        journal.append(line(n))
    assert len(segments(journal.directory)) == 3
    journal.release(3)  # the first segment still holds event 4
    assert len(segments(journal.directory)) == 3
    journal.release(4)
    assert segments(journal.directory) == ["00000000000000000002.jsonl",
                                           "00000000000000000003.jsonl"]
    journal.release(9)  # the open segment holds events 9 and 10
    assert segments(journal.directory) == ["00000000000000000003.jsonl"]
    journal.release(10)  # all done: the open one goes too
    assert segments(journal.directory) == []
    journal.append(line(10))  # and the next event starts a new segment
    assert segments(journal.directory) == ["00000000000000000004.jsonl"]
    journal.close()


def test_files_are_private(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    journal.take_leftovers(lambda lines: None)
    journal.append(line(1))
    journal.close()
    assert stat.S_IMODE(journal.directory.stat().st_mode) == 0o700
    (segment,) = journal.directory.glob("*.jsonl")
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600


def test_a_later_run_takes_the_complete_lines_an_earlier_one_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    earlier = Journal(tmp_path / "journal", segment_bytes=276)
    earlier.take_leftovers(lambda lines: None)
    for n in range(6):
        earlier.append(line(n))
    earlier.release(2)  # nothing deleted: the first segment holds events 1 to 4
    # killed: no close, and the last write cut short
    with (earlier.directory / "00000000000000000002.jsonl").open("ab") as f:
        f.write(b'{"id":"event-00')

    later = Journal(tmp_path / "journal", segment_bytes=276)
    taken: list[bytes] = []
    assert later.take_leftovers(taken.extend) == 6
    assert taken == [line(n) + b"\n" for n in range(6)]
    assert "unfinished line" in caplog.text
    assert segments(later.directory) == []
    later.append(line(100))  # numbered after what was there: nothing overwritten
    assert segments(later.directory) == ["00000000000000000003.jsonl"]


def test_leftovers_stay_when_they_could_not_be_stored(tmp_path: Path) -> None:
    earlier = Journal(tmp_path / "journal")
    earlier.take_leftovers(lambda lines: None)
    earlier.append(line(1))

    def full(lines: list[bytes]) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        Journal(tmp_path / "journal").take_leftovers(full)
    assert len(segments(tmp_path / "journal")) == 1
    taken: list[bytes] = []
    assert Journal(tmp_path / "journal").take_leftovers(taken.extend) == 1
    assert taken == [line(1) + b"\n"]

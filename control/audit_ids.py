"""`EventIdIndex`: the event ids the audit log holds within its duplicate window, in memory
that grows with the number of sending processes (and gaps in what they sent), not with the
number of events.

Agents and proxies name their events with `schemas.audit.new_event_id`: a random prefix
drawn once per process and a counter. One process's ids are therefore consecutive numbers
under one prefix, and they arrive nearly in order (its shipper keeps emission order). So the
index keeps, per prefix, the ranges of numbers stored: the next id of a process extends its
last range in constant time and memory. An id of any other form (a UUID, an id an older
version wrote) is kept as it is, under its arrival day.

Before this, every id of the window was a string in a set: about 130 bytes per event, some
11 GB per day of a 1,000-query-per-second load, and the control plane would run out of
memory within days.

Forgetting (`forget_before(day)`): a prefix goes once the last of its ids arrived before
`day`, an id of another form once its own day is before it. A prefix still in use keeps its
older numbers as well; the window is the least of what is recognised, never the most.
Exact: an id is reported as stored only if it was added.

Saving (`to_json`, `from_json`): the store checkpoints the index beside the log so that a
restart reads only what was written after the checkpoint. `from_json` checks the form
(types, sorted and disjoint ranges) and raises `ValueError` for anything else.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from datetime import date
from typing import Any

from schemas.audit import split_event_id


class _Ranges:
    """The numbers stored under one prefix: disjoint, sorted, inclusive ranges."""

    __slots__ = ("ends", "last_day", "starts")

    def __init__(self, number: int, day: date) -> None:
        self.starts = [number]
        self.ends = [number]
        self.last_day = day

    def __contains__(self, number: int) -> bool:
        if number > self.ends[-1]:  # the usual case: an id not seen yet
            return False
        index = bisect_right(self.starts, number) - 1
        return index >= 0 and number <= self.ends[index]

    def add(self, number: int) -> None:
        starts, ends = self.starts, self.ends
        if ends[-1] == number - 1:  # the usual case: the next id of the process
            ends[-1] = number
            return
        index = bisect_right(starts, number) - 1
        if index >= 0 and number <= ends[index]:
            return
        joins_left = index >= 0 and ends[index] == number - 1
        joins_right = index + 1 < len(starts) and starts[index + 1] == number + 1
        if joins_left and joins_right:
            ends[index] = ends[index + 1]
            del starts[index + 1], ends[index + 1]
        elif joins_left:
            ends[index] = number
        elif joins_right:
            starts[index + 1] = number
        else:
            starts.insert(index + 1, number)
            ends.insert(index + 1, number)

    def __len__(self) -> int:
        return sum(end - start + 1 for start, end in zip(self.starts, self.ends, strict=True))

    @classmethod
    def restored(cls, starts: list[int], ends: list[int], last_day: date) -> _Ranges:
        """Ranges as `to_json` saved them; ValueError unless sorted, disjoint, inclusive."""
        if not starts or len(starts) != len(ends):
            raise ValueError("a prefix needs as many range starts as ends, at least one")
        previous_end = -2
        for start, end in zip(starts, ends, strict=True):
            if type(start) is not int or type(end) is not int:
                raise ValueError("range bounds must be integers")
            if not previous_end + 1 < start <= end:
                raise ValueError("ranges must be sorted, disjoint and not empty")
            previous_end = end
        ranges = cls.__new__(cls)
        ranges.starts, ranges.ends, ranges.last_day = list(starts), list(ends), last_day
        return ranges


#: How the index files one id: (prefix, number) for an id `new_event_id` made, else the id.
Key = tuple[str, int] | str


def key_of(event_id: str) -> Key:
    """The `Key` of `event_id` (worked out once per id: the store looks it up, then adds it)."""
    split = split_event_id(event_id)
    return event_id if split is None else split


class EventIdIndex:
    """The ids of the events stored in the window (see the module docstring)."""

    def __init__(self) -> None:
        self._ranges: dict[str, _Ranges] = {}
        self._other: dict[date, set[str]] = {}

    def __contains__(self, event_id: str) -> bool:
        return self.has(key_of(event_id))

    def has(self, key: Key) -> bool:
        """Whether the id of `key` (`key_of`) is stored."""
        if type(key) is str:
            return any(key in ids for ids in self._other.values())
        prefix, number = key
        ranges = self._ranges.get(prefix)
        return ranges is not None and number in ranges

    def add(self, event_id: str, day: date) -> None:
        """Note `event_id` as stored on arrival `day`."""
        self.add_keys((key_of(event_id),), day)

    def add_keys(self, keys: Iterable[Key], day: date) -> None:
        """Note the ids of `keys` (`key_of`) as stored on arrival `day`."""
        all_ranges = self._ranges
        last_prefix: str | None = None
        last: _Ranges | None = None
        for key in keys:
            if type(key) is str:
                self._other.setdefault(day, set()).add(key)
                continue
            prefix, number = key
            if prefix != last_prefix:  # a batch's ids are mostly one process's
                if last is not None and last.last_day < day:
                    last.last_day = day
                last_prefix = prefix
                last = all_ranges.get(prefix)
                if last is None:
                    last = all_ranges[prefix] = _Ranges(number, day)
                    continue
            last.add(number)  # type: ignore[union-attr]
        if last is not None and last.last_day < day:
            last.last_day = day

    def forget_before(self, day: date) -> None:
        """Drop what only arrived before `day`."""
        for prefix in [p for p, ranges in self._ranges.items() if ranges.last_day < day]:
            del self._ranges[prefix]
        for old in [d for d in self._other if d < day]:
            del self._other[old]

    def __len__(self) -> int:
        """How many ids are held."""
        return sum(len(r) for r in self._ranges.values()) + sum(
            len(ids) for ids in self._other.values()
        )

    def to_json(self) -> dict[str, Any]:
        """The index as JSON-ready data (`from_json` reads it back)."""
        return {
            "ranges": {
                prefix: {"last_day": r.last_day.isoformat(), "starts": r.starts, "ends": r.ends}
                for prefix, r in self._ranges.items()
            },
            "other": {day.isoformat(): sorted(ids) for day, ids in self._other.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> EventIdIndex:
        """The index `to_json` gave; `ValueError` (naming what is wrong) for anything else."""
        if not isinstance(data, dict) or set(data) != {"ranges", "other"}:
            raise ValueError('the index must be an object with "ranges" and "other"')
        ranges, other = data["ranges"], data["other"]
        if not isinstance(ranges, dict) or not isinstance(other, dict):
            raise ValueError('"ranges" and "other" must be objects')
        index = cls()
        for prefix, held in ranges.items():
            if not isinstance(held, dict) or set(held) != {"last_day", "starts", "ends"}:
                raise ValueError(f"prefix {prefix!r}: needs last_day, starts and ends")
            starts, ends = held["starts"], held["ends"]
            if not isinstance(starts, list) or not isinstance(ends, list):
                raise ValueError(f"prefix {prefix!r}: starts and ends must be lists")
            try:
                last_day = date.fromisoformat(held["last_day"])
                index._ranges[prefix] = _Ranges.restored(starts, ends, last_day)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"prefix {prefix!r}: {exc}") from None
        for day, ids in other.items():
            if not isinstance(ids, list) or not all(type(i) is str for i in ids):
                raise ValueError(f"other ids of {day!r}: must be a list of strings")
            index._other[date.fromisoformat(day)] = set(ids)
        return index

    def footprint(self) -> int:
        """How many entries hold them: ranges and ids of other forms (memory grows with this,
        not with `len`)."""
        return sum(len(r.starts) for r in self._ranges.values()) + sum(
            len(ids) for ids in self._other.values()
        )

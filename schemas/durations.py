"""Durations as people write them in policy and on the command line: Go-style strings.

`90s`, `30m`, `12h`, `8760h`, `1h30m`, `1.5h`, `500ms`. Units: ns, us (µs), ms, s, m, h.
A bare number is refused: `12` could mean seconds or hours, and guessing would be a surprise.
"""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class DurationError(ValueError):
    """The text is not a duration; the message says what a valid one looks like."""


def parse_duration(text: str) -> timedelta:
    """Parse a Go-style duration such as `12h` or `1h30m` into a timedelta."""
    if not isinstance(text, str):
        raise DurationError(f"expected a duration such as 30m or 12h, got {text!r}")
    s = text.strip()
    if not s:
        raise DurationError("empty duration; write one such as 30m or 12h")
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            if re.fullmatch(r"\d+(\.\d+)?", s):
                raise DurationError(
                    f"duration {text!r} has no unit; write e.g. {s}s, {s}m or {s}h"
                )
            raise DurationError(
                f"invalid duration {text!r}; use a number and a unit (ns, us, ms, s, m, h), "
                "e.g. 30m, 12h or 1h30m"
            )
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return timedelta(seconds=total)


def format_duration(value: timedelta) -> str:
    """Format a timedelta the way parse_duration reads it, e.g. `12h`, `1h30m`, `45s`."""
    total = value.total_seconds()
    if total == 0:
        return "0s"
    sign = "-" if total < 0 else ""
    total = abs(total)
    hours, rest = divmod(int(total), 3600)
    minutes, seconds = divmod(rest, 60)
    frac = total - int(total)
    out = []
    if hours:
        out.append(f"{hours}h")
    if minutes:
        out.append(f"{minutes}m")
    if seconds or frac:
        if frac:
            out.append(f"{seconds + frac:.3f}".rstrip("0").rstrip(".") + "s")
        else:
            out.append(f"{seconds}s")
    return sign + "".join(out)

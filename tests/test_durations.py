from datetime import timedelta

import pytest

from schemas.durations import DurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("8760h", timedelta(hours=8760)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(hours=1, minutes=30)),
        ("500ms", timedelta(milliseconds=500)),
    ],
)
def test_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("12", "no unit"), ("", "empty"), ("12d", "invalid duration"), ("h", "invalid")],
)
def test_refused(text: str, fragment: str) -> None:
    with pytest.raises(DurationError, match=fragment):
        parse_duration(text)


@pytest.mark.parametrize("text", ["12h", "1h30m", "45s", "1m5s", "0s", "8760h"])
def test_round_trip(text: str) -> None:
    assert format_duration(parse_duration(text)) == text

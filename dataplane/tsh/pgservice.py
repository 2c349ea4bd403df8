"""Editing the libpq connection service file (`~/.pg_service.conf` or `$PGSERVICEFILE`).

`tsh db login` writes one section per database, `[<cluster>-<name>]`, so that
`psql "service=root-aurora"` finds the proxy and the certificate files; `tsh db logout`
removes it. The file is the user's: every other section, comment, blank line, line ending
(LF or CRLF) and trailing space is kept byte for byte, in its order.

The file is read as libpq reads it (`parseServiceFile` in libpq's fe-connect.c): lines end
at LF; a line whose first non-blank character is `[` starts a section named by what is
between `[` and `]`; `#` lines and blank lines are ignored; `key=value` lines belong to the
section above them, the value being the rest of the line with trailing blanks removed.

A section of ours is its header line and its lines up to the last `key=value` line before
the next header; comments and blank lines after that belong to what follows. Appended to a
non-empty file a section is preceded by one blank line (and, if the file did not end with a
line ending, by one), and removing it removes that blank line again: removing what was
added gives back the original bytes (plus the line ending a last line may have lacked).

The editing functions are pure (bytes in, bytes out); `ServiceFile` does the reading and
the atomic replacing. Nothing here writes a secret: the file holds paths, never keys.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from transport.files import write_atomic

_BLANKS = b" \t\r\n\v\f"
NEW_FILE_MODE = 0o600


class ServiceFileError(ValueError):
    """A value that cannot be written to a service file; the message says which and why."""


def service_file_path(env: Mapping[str, str] | None = None) -> Path:
    """Where libpq looks first: `$PGSERVICEFILE`, else `~/.pg_service.conf`."""
    env = os.environ if env is None else env
    given = env.get("PGSERVICEFILE")
    if given:
        return Path(given).expanduser()
    return Path(env.get("HOME") or Path.home()) / ".pg_service.conf"


# --- lines ----------------------------------------------------------------------------------


def split_lines(data: bytes) -> list[bytes]:
    """The lines of `data`, each with its LF (the last may have none). Only LF ends a line,
    as for libpq's fgets; a CR before it stays part of the line."""
    lines: list[bytes] = []
    start = 0
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            if start < len(data):
                lines.append(data[start:])
            return lines
        lines.append(data[start : end + 1])
        start = end + 1


def newline_of(data: bytes) -> bytes:
    """The line ending the file uses (that of its first line): CRLF or LF."""
    end = data.find(b"\n")
    return b"\r\n" if end > 0 and data[end - 1 : end] == b"\r" else b"\n"


def header_name(line: bytes) -> str | None:
    """The section a header line opens (text between `[` and `]`), or None if the line is
    not a header. A header without `]` opens a section no name matches (""), as in libpq."""
    text = line.strip(_BLANKS)
    if not text.startswith(b"["):
        return None
    end = text.find(b"]")
    if end < 0:
        return ""
    return text[1:end].decode("utf-8", "surrogateescape")


def _is_filler(line: bytes) -> bool:
    """A blank line or a comment: nothing libpq reads."""
    text = line.strip(_BLANKS)
    return not text or text.startswith(b"#")


def _is_blank(line: bytes) -> bool:
    return not line.strip(_BLANKS)


@dataclass(frozen=True)
class _Span:
    """A section in a list of lines: `header` index, `end` one past its last key line, and
    `start` (header, or the blank line just above it)."""

    start: int
    header: int
    end: int


def _spans(lines: Sequence[bytes], name: str) -> list[_Span]:
    spans = []
    headers = [i for i, line in enumerate(lines) if header_name(line) is not None]
    for n, h in enumerate(headers):
        if header_name(lines[h]) != name:
            continue
        limit = headers[n + 1] if n + 1 < len(headers) else len(lines)
        end = h + 1
        for i in range(h + 1, limit):
            if not _is_filler(lines[i]):
                end = i + 1
        start = h - 1 if h > 0 and _is_blank(lines[h - 1]) else h
        spans.append(_Span(start, h, end))
    return spans


# --- reading ---------------------------------------------------------------------------------


def section_names(data: bytes) -> list[str]:
    """The names of the sections in the file, in order (duplicates included)."""
    return [n for n in (header_name(line) for line in split_lines(data)) if n is not None]


def read_section(data: bytes, name: str) -> dict[str, str] | None:
    """The parameters of the first section called `name` (the one libpq uses), or None."""
    lines = split_lines(data)
    spans = _spans(lines, name)
    if not spans:
        return None
    params: dict[str, str] = {}
    for line in lines[spans[0].header + 1 : spans[0].end]:
        if _is_filler(line):
            continue
        text = line.strip(_BLANKS).decode("utf-8", "surrogateescape")
        key, sep, value = text.partition("=")
        if sep:
            params.setdefault(key.strip(), value)
    return params


# --- editing ---------------------------------------------------------------------------------


def _check(name: str, params: Sequence[tuple[str, str]]) -> None:
    if not name or any(c in name for c in "[]\r\n") or name != name.strip():
        raise ServiceFileError(f"{name!r} cannot be a service name in pg_service.conf")
    for key, value in params:
        if not key or any(c in key for c in "=\r\n#[") or key != key.strip():
            raise ServiceFileError(f"{key!r} cannot be a key in pg_service.conf")
        if any(c in value for c in "\r\n\0") or value != value.strip():
            raise ServiceFileError(
                f"the value of {key} ({value!r}) cannot be written to pg_service.conf: libpq "
                "reads a value up to the end of its line and drops blanks around it; use "
                "a path without line breaks or leading/trailing spaces (e.g. set "
                "TELEPORT_HOME)"
            )


def render_section(name: str, params: Sequence[tuple[str, str]], newline: bytes = b"\n") -> bytes:
    """`[name]` and one `key=value` line per parameter."""
    _check(name, params)
    out = [f"[{name}]".encode()]
    out += [f"{key}={value}".encode() for key, value in params]
    return b"".join(line + newline for line in out)


def upsert_section(data: bytes, name: str, params: Sequence[tuple[str, str]]) -> bytes:
    """`data` with section `name` holding exactly `params`: replaced where it is (later
    duplicates of it removed), or appended. Every other byte is kept."""
    newline = newline_of(data)
    section = render_section(name, params, newline)
    lines = split_lines(data)
    spans = _spans(lines, name)
    if spans:
        first, rest = spans[0], spans[1:]
        out = [*lines[: first.header], section]
        cursor = first.end
        for span in rest:
            out += lines[cursor : span.start]
            cursor = span.end
        out += lines[cursor:]
        return b"".join(out)
    if not data:
        return section
    prefix = data if data.endswith(b"\n") else data + newline
    return prefix + newline + section


def remove_sections(data: bytes, names: Iterable[str]) -> bytes:
    """`data` without the sections called any of `names` (and the blank line just above
    each, which appending put there). Every other byte is kept."""
    wanted = set(names)
    lines = split_lines(data)
    drop: list[_Span] = []
    for name in wanted:
        drop += _spans(lines, name)
    if not drop:
        return data
    drop.sort(key=lambda s: s.start)
    out: list[bytes] = []
    cursor = 0
    for span in drop:
        start = max(span.start, cursor)
        out += lines[cursor:start]
        cursor = max(cursor, span.end)
    out += lines[cursor:]
    return b"".join(out)


# --- the file --------------------------------------------------------------------------------


class ServiceFile:
    """One service file on disk. Writes replace it atomically (a reader sees the old or
    the new file, never half of one) and keep its permission bits; a symbolic link is
    followed and the file it points to is replaced."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def write(self, data: bytes) -> None:
        target = Path(os.path.realpath(self.path))
        try:
            mode = stat.S_IMODE(target.stat().st_mode)
        except FileNotFoundError:
            mode = NEW_FILE_MODE
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, data, mode)

    def upsert(self, name: str, params: Sequence[tuple[str, str]]) -> None:
        before = self.read()
        after = upsert_section(before, name, params)
        if after != before:
            self.write(after)

    def remove(self, names: Iterable[str]) -> bool:
        """Remove the sections; True if any was there."""
        if not self.path.exists():
            return False
        before = self.read()
        after = remove_sections(before, names)
        if after == before:
            return False
        self.write(after)
        return True

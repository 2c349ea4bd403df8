"""Header fields as both sides of this package see them: an ordered, case-insensitive view.

Rules for this module:
- Names are compared in lower case; the order and repetition of fields are kept.
- Values are text decoded as ISO-8859-1 (what RFC 9110 allows on the wire); nothing here
  interprets a value except the entity-tag comparison of `If-None-Match`.
- No I/O. Nothing here trusts a count from the wire; callers bound the header block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

HeaderInput = Mapping[str, str] | Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]]


class Headers:
    """Ordered header fields with case-insensitive lookup.

    `headers["Content-Type"]` returns the value, or the values of a repeated field joined by
    `", "` (how RFC 9110 combines them); `get_all` returns them one by one.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: HeaderInput | Headers | None = None) -> None:
        pairs: list[tuple[str, str]] = []
        if isinstance(fields, Headers):
            pairs = list(fields._fields)
        elif isinstance(fields, Mapping):
            pairs = [(str(k).lower(), str(v)) for k, v in fields.items()]
        elif fields is not None:
            for name, value in fields:
                pairs.append((_text(name).lower(), _text(value)))
        self._fields: tuple[tuple[str, str], ...] = tuple(pairs)

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.get_all(name)
        return ", ".join(values) if values else default

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for k, v in self._fields if k == key]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k == name.lower() for k, _ in self._fields)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._fields == other._fields

    def __hash__(self) -> int:
        return hash(self._fields)

    def __repr__(self) -> str:
        return f"Headers({list(self._fields)!r})"

    def with_fields(self, *fields: tuple[str, str]) -> Headers:
        """A copy with `fields` appended (names lower-cased)."""
        return Headers([*self._fields, *((k.lower(), v) for k, v in fields)])

    def without(self, *names: str) -> Headers:
        """A copy without any field named in `names`."""
        drop = {n.lower() for n in names}
        return Headers([(k, v) for k, v in self._fields if k not in drop])


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def head_size(start_line: Iterable[bytes], fields: Iterable[tuple[bytes, bytes]]) -> int:
    """About how many bytes a message head took on the wire (h11 bounds only heads that are
    still incomplete; one that arrives whole in one read is measured with this)."""
    return sum(len(part) + 1 for part in start_line) + sum(
        len(name) + len(value) + 4 for name, value in fields)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an `If-None-Match` value names `etag` (weak comparison, RFC 9110 13.1.2).

    `etag` is the entity-tag as sent in an `ETag` header, quotes included (`"17"` or
    `W/"17"`). `*` matches any current representation. A malformed list never matches.
    """
    if if_none_match is None:
        return False
    text = if_none_match.strip()
    if text == "*":
        return True
    wanted = _opaque(etag)
    if wanted is None:
        return False
    return any(_opaque(candidate) == wanted for candidate in _split_tags(text))


def _opaque(tag: str) -> str | None:
    tag = tag.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    if len(tag) < 2 or tag[0] != '"' or tag[-1] != '"' or '"' in tag[1:-1]:
        return None
    return tag[1:-1]


def _split_tags(text: str) -> Iterator[str]:
    # Entity-tags cannot contain '"' inside, but may contain ','; split outside quotes only.
    start = 0
    quoted = False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            yield text[start:i]
            start = i + 1
    yield text[start:]

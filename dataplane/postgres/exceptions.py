"""Exceptions of the wire-protocol code, split by who is at fault (the h11 habit).

- `RemoteProtocolError`: the peer sent bytes that are not valid PostgreSQL protocol 3.0. The
  caller should answer with a FATAL ErrorResponse (SQLSTATE in `.sqlstate`) and close.
- `LocalProtocolError`: our own code asked for something impossible (a string with a NUL
  byte, a number out of range, a method called in the wrong state). A bug on our side.

Both derive from `ProtocolError`, so a relay can catch one type. Messages say what was wrong
and where; they never include payload bytes beyond a short excerpt (payloads may hold
passwords). This module must never import anything with I/O.
"""

from __future__ import annotations

from dataplane.postgres.errors import FEATURE_NOT_SUPPORTED, PROTOCOL_VIOLATION


class ProtocolError(Exception):
    """Base class: the byte stream and the protocol disagree. `sqlstate` is what to report."""

    sqlstate: str = PROTOCOL_VIOLATION


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: bad type byte, bad length, truncated or malformed fields."""


class MessageTooLarge(RemoteProtocolError):
    """A length field announced a message larger than the configured limit."""

    def __init__(self, message_type: str, size: int, limit: int, sender: str = "peer") -> None:
        self.message_type = message_type
        self.size = size
        self.limit = limit
        super().__init__(
            f"{message_type} message of {size} bytes exceeds the limit of {limit} bytes "
            f"(sent by the {sender}); the stream is corrupt, or the limit is too low for it"
        )


class UnsupportedProtocolVersion(RemoteProtocolError):
    """A startup packet asked for a protocol other than 3.x (3.x with x > 0 is negotiated
    down to 3.0, as PostgreSQL does)."""

    sqlstate = FEATURE_NOT_SUPPORTED  # what PostgreSQL answers

    def __init__(self, major: int, minor: int) -> None:
        self.major = major
        self.minor = minor
        super().__init__(
            f"unsupported frontend protocol {major}.{minor}: this server supports 3.0 only; "
            "use a client built with libpq 7.4 or newer"
        )


class LocalProtocolError(ProtocolError):
    """We tried to send or do something the protocol does not allow; a bug in our code."""

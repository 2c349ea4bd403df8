"""The ALPN names a TLS ClientHello offers, read from its first record, sans-IO.

PostgreSQL 17 lets a client start TLS at once, without an SSLRequest (libpq's
`sslnegotiation=direct`, asyncpg's `direct_tls`, pgJDBC's `sslNegotiation=direct`); such a
client must offer the ALPN protocol "postgresql". That name is what tells it, on the web
port, from an HTTPS client of the API, before a byte is consumed: the listener peeks at the
first TLS record and hands the connection to the PostgreSQL frontend or to the API.

Only the first record is read: a ClientHello split over several records (no client here
does that; it would take a hello over 16 KiB) is read as offering nothing. Every length and
count comes from the wire and is checked against what is there; bytes this module cannot
read as a ClientHello offer nothing (the connection's owner then fails it properly).
"""

from __future__ import annotations

import struct

from dataplane.postgres.messages import ALPN_PROTOCOL

RECORD_HEADER = 5
MAX_FRAGMENT = 1 << 14  # TLSPlaintext.length may not exceed 2^14
_HANDSHAKE_RECORD = 0x16
_CLIENT_HELLO = 1
_ALPN_EXTENSION = 16
POSTGRESQL = ALPN_PROTOCOL.encode()


def record_size(head: bytes) -> int | None:
    """The bytes the first TLS record takes, header included, from its first 5 bytes; None
    while fewer are known. A declared length over the protocol's limit counts as the limit
    (the record is not a ClientHello this module reads, and nobody waits for more)."""
    if len(head) < RECORD_HEADER:
        return None
    (length,) = struct.unpack_from("!H", head, 3)
    return RECORD_HEADER + min(length, MAX_FRAGMENT)


def offered_alpn(data: bytes) -> tuple[bytes, ...] | None:
    """The ALPN protocol names of the ClientHello in the first TLS record of `data`, in the
    client's order: None while that record is incomplete, () when it offers none or is not a
    ClientHello."""
    size = record_size(data)
    if size is None or len(data) < size:
        return None
    declared = struct.unpack_from("!H", data, 3)[0]
    if data[0] != _HANDSHAKE_RECORD or declared > MAX_FRAGMENT:
        return ()
    try:
        return _alpn(memoryview(data)[RECORD_HEADER:size])
    except _Unreadable:
        return ()


class _Unreadable(Exception):
    pass


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise _Unreadable
        part = self.data[self.pos : end]
        self.pos = end
        return part

    def int(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def vector(self, length_width: int) -> memoryview:
        return self.take(self.int(length_width))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _alpn(fragment: memoryview) -> tuple[bytes, ...]:
    record = _Cursor(fragment)
    if record.int(1) != _CLIENT_HELLO:
        return ()
    hello = _Cursor(record.take(min(record.int(3), record.left)))  # what this record holds
    hello.take(2 + 32)  # legacy_version, random
    hello.vector(1)  # legacy_session_id
    hello.vector(2)  # cipher_suites
    hello.vector(1)  # legacy_compression_methods
    if hello.left == 0:
        return ()  # no extensions at all
    extensions = _Cursor(hello.vector(2))
    while extensions.left:
        kind = extensions.int(2)
        body = extensions.vector(2)
        if kind != _ALPN_EXTENSION:
            continue
        names = _Cursor(_Cursor(body).vector(2))
        offered = []
        while names.left:
            name = names.vector(1)
            if not name:
                raise _Unreadable  # RFC 7301: names are never empty
            offered.append(bytes(name))
        return tuple(offered)
    return ()

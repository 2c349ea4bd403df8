"""Message boundaries seen from beside a bulk copy, for the relay's audit and injection.

The proxy and the agent forward each received chunk with one write. `MessageScanner` is fed
the same chunk and walks the typed messages in it (after the startup phase) without getting
in the way:
- messages of the types in `capture` come back with their payload (at most `max_payload`
  bytes of it; a larger one comes back truncated, with its full size, and the rest is
  skipped, never buffered);
- messages of the types in `report` come back with payload None (only type and size);
- every other message (CopyData 'd', DataRow 'D' unless asked for) is skipped by arithmetic
  on its length field: its bytes are never copied or looked at.
`at_boundary` says whether the bytes fed so far end exactly at a message boundary, and
`bytes_to_boundary` how many more bytes finish the current message, so that a FATAL
ErrorResponse can be injected between two messages and never inside one.

Rules of this module: never buffer more than one message header (5 bytes) plus the captured
prefix (`max_payload`); never copy a skipped payload; trust a length field only after
checking it against `max_message_size`; do not validate type bytes (the endpoints do that,
and a relay should pass on message types it does not know). No I/O, no clocks.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from dataplane.postgres.codec import DEFAULT_MAX_MESSAGE_SIZE
from dataplane.postgres.exceptions import LocalProtocolError, MessageTooLarge, RemoteProtocolError

DEFAULT_MAX_PAYLOAD = 64 * 1024

_LENGTH = struct.Struct("!i")
_HEADER = struct.Struct("!Bi")
_SKIP, _REPORT, _CAPTURE = 0, 1, 2
_TYPE_BYTES = tuple(bytes([i]) for i in range(256))
_new = tuple.__new__  # builds a ScannedMessage without NamedTuple's slower Python-level __new__


class ScannedMessage(NamedTuple):
    """One message seen in the stream."""

    type_code: bytes  # the type byte, e.g. b"Q"
    payload: bytes | None  # the captured payload (a prefix if truncated), None if not captured
    size: int  # the full payload size announced by the length field

    @property
    def truncated(self) -> bool:
        return self.payload is not None and len(self.payload) < self.size


class MessageScanner:
    """Finds message boundaries in one direction of a relayed connection.

    `capture`: type bytes whose payloads to return, e.g. b"QPBECF" for a client's queries
    and statements, b"CEZ1235nsTGHWV" for a server's outcomes. `report`: type bytes to return
    without payload. A byte in both is captured.
    """

    __slots__ = (
        "_capture",
        "_capture_left",
        "_cur_mode",
        "_cur_size",
        "_cur_type",
        "_error",
        "_header",
        "_max_message_size",
        "_max_payload",
        "_modes",
        "_remaining",
        "side",
    )

    def __init__(
        self,
        capture: bytes = b"",
        *,
        report: bytes = b"",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        side: str = "peer",
    ) -> None:
        if max_payload < 0:
            raise LocalProtocolError(f"max_payload must be 0 or more, not {max_payload}")
        modes = bytearray(256)
        for code in report:
            modes[code] = _REPORT
        for code in capture:
            modes[code] = _CAPTURE
        self._modes = bytes(modes)
        self._max_payload = max_payload
        self._max_message_size = max_message_size
        self.side = side  # who sends these bytes, for error messages ("client", "server")
        self._header = bytearray()  # a partial header (1-4 bytes) at the end of the last chunk
        self._remaining = 0  # payload bytes of the current message not yet seen
        self._cur_type = 0
        self._cur_size = 0
        self._cur_mode = _SKIP
        self._capture: bytearray | None = None
        self._capture_left = 0
        self._error: RemoteProtocolError | None = None

    @property
    def at_boundary(self) -> bool:
        """True when the bytes fed so far end exactly between two messages."""
        return not self._remaining and not self._header

    @property
    def bytes_to_boundary(self) -> int | None:
        """Bytes still to come before the current message ends: 0 at a boundary, None while
        the current header is incomplete (its length is not known yet)."""
        if self._header:
            return None
        return self._remaining

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[ScannedMessage]:
        """Walk one chunk; return the captured and reported messages that end in it."""
        out: list[ScannedMessage] = []
        n = len(chunk)
        pos = 0
        if self._remaining or self._header or self._error is not None:
            if self._error is not None:
                raise self._error
            pos = self._resume(chunk, n, out)
            if pos >= n:
                return out
        # The hot loop: whole messages inside this chunk; skipped ones cost a header read.
        modes = self._modes
        limit = self._max_message_size
        max_payload = self._max_payload
        unpack = _HEADER.unpack_from  # type byte and length in one call: ~15% of the loop
        append = out.append
        while pos + 5 <= n:
            code, length = unpack(chunk, pos)
            if not 4 <= length <= limit:
                self._check(code, length)
            end = pos + 1 + length
            if end > n:
                self._begin(code, length, chunk, pos + 5, n, out)
                return out
            mode = modes[code]
            if mode:
                if mode == _CAPTURE:
                    stop = pos + 5 + max_payload
                    if stop > end:  # noqa: PLR1730 (faster than min() in the hot loop)
                        stop = end
                    append(
                        _new(
                            ScannedMessage,
                            (_TYPE_BYTES[code], bytes(chunk[pos + 5 : stop]), length - 4),
                        )
                    )
                else:
                    append(_new(ScannedMessage, (_TYPE_BYTES[code], None, length - 4)))
            pos = end
        if pos < n:
            self._header += chunk[pos:n]
        return out

    def _resume(
        self, chunk: bytes | bytearray | memoryview, n: int, out: list[ScannedMessage]
    ) -> int:
        """Finish the message or header left open by the last chunk; return where we are."""
        pos = 0
        if self._remaining:
            pos = self._continue(chunk, 0, n, out)
            if self._remaining:
                return n
        if self._header:
            need = 5 - len(self._header)
            if n - pos < need:
                self._header += chunk[pos:n]
                return n
            self._header += chunk[pos : pos + need]
            pos += need
            code = self._header[0]
            (length,) = _LENGTH.unpack_from(self._header, 1)
            self._header.clear()
            self._check(code, length)
            pos = self._begin(code, length, chunk, pos, n, out)
            if self._remaining:
                return n
        return pos

    def _check(self, code: int, length: int) -> None:
        if 4 <= length <= self._max_message_size:
            return
        if length < 4:
            self._error = RemoteProtocolError(
                f"message {_TYPE_BYTES[code]!r} from the {self.side} has length {length}; "
                "the length counts itself, so it is at least 4"
            )
            raise self._error
        if length > self._max_message_size:
            self._error = MessageTooLarge(
                repr(_TYPE_BYTES[code]), length, self._max_message_size, self.side
            )
            raise self._error

    def _begin(
        self,
        code: int,
        length: int,
        chunk: bytes | bytearray | memoryview,
        pos: int,
        n: int,
        out: list[ScannedMessage],
    ) -> int:
        """Start a message whose payload begins at `pos`; consume what of it the chunk holds."""
        self._cur_type = code
        self._cur_size = length - 4
        self._remaining = length - 4
        mode = self._cur_mode = self._modes[code]
        if mode == _CAPTURE:
            self._capture = bytearray()
            self._capture_left = self._max_payload
        return self._continue(chunk, pos, n, out)

    def _continue(
        self,
        chunk: bytes | bytearray | memoryview,
        pos: int,
        n: int,
        out: list[ScannedMessage],
    ) -> int:
        take = min(self._remaining, n - pos)
        capture = self._capture
        if capture is not None and self._capture_left:
            piece = min(take, self._capture_left)
            capture += chunk[pos : pos + piece]
            self._capture_left -= piece
        self._remaining -= take
        pos += take
        if not self._remaining:
            mode = self._cur_mode
            if mode == _CAPTURE:
                out.append(
                    ScannedMessage(
                        _TYPE_BYTES[self._cur_type], bytes(capture or b""), self._cur_size
                    )
                )
            elif mode == _REPORT:
                out.append(ScannedMessage(_TYPE_BYTES[self._cur_type], None, self._cur_size))
            self._capture = None
        return pos

"""Frames of the reverse tunnel, sans-IO: length-prefixed JSON, bytes in, typed frames out.

Wire format: a 4-byte big-endian unsigned length, then that many bytes of UTF-8 JSON (one
object with a "type" field). The length counts only the JSON, and is at most `MAX_FRAME`
(64 KiB); a larger length, or JSON that is not one of the frames below, is a
`FrameError`, after which the decoder is broken for good (the connection must be closed).

Control connection (one per agent and proxy), both ways:
    Hello (agent first: host id, served databases with labels), Labels (agent: updates),
    Heartbeat (both, every 5 s), Dial (proxy: open `count` more data connections).
Data connection (one per session, from the agent's warm pool):
    DataHello (agent first: "idle, ready for a session"), then the proxy sends SessionStart
    or CancelStart, the agent answers SessionAck; after an accepting SessionAck the
    connection carries raw PostgreSQL bytes both ways, no framing. `FrameDecoder` never
    reads past the frame asked for, so `take_unprocessed()` hands those raw bytes on.

Rules of this module: never trust a length from the wire (checked before anything is
buffered for it); never buffer more than one maximum frame plus one received chunk; no
sockets, clocks or asyncio. Client certificates travel base64-encoded (DER); nothing in a
frame is ever a private key or a password.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_FRAME = 64 * 1024
_LENGTH = struct.Struct("!I")

Name = Annotated[str, Field(min_length=1, max_length=255)]


class FrameError(Exception):
    """The peer sent bytes that are not a valid tunnel frame; close the connection."""


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServedDatabase(_Frame):
    """A database an agent serves, with its labels (static and dynamic) as of now."""

    name: Name
    protocol: Literal["postgres"] = "postgres"
    labels: dict[Annotated[str, Field(max_length=255)], Annotated[str, Field(max_length=1024)]] = (
        Field(default_factory=dict)
    )


class Hello(_Frame):
    """First frame of a control connection, agent to proxy."""

    type: Literal["hello"] = "hello"
    version: Literal[1] = 1
    host_id: Name
    databases: list[ServedDatabase] = Field(default_factory=list, max_length=1000)


class Labels(_Frame):
    """The agent's served databases changed (a database or a dynamic label)."""

    type: Literal["labels"] = "labels"
    databases: list[ServedDatabase] = Field(default_factory=list, max_length=1000)


class Heartbeat(_Frame):
    type: Literal["heartbeat"] = "heartbeat"


class Dial(_Frame):
    """Proxy to agent: the idle pool runs low, open `count` more data connections."""

    type: Literal["dial"] = "dial"
    count: int = Field(ge=1, le=256)


class DataHello(_Frame):
    """First frame of a data connection, agent to proxy: idle and ready for one session."""

    type: Literal["data-hello"] = "data-hello"
    host_id: Name


class BackendKey(_Frame):
    """The BackendKeyData of a session: the proxy's secret (its process id is replaced by the
    server's when the agent greets the client). Both unsigned 32-bit."""

    process_id: int = Field(ge=0, le=0xFFFFFFFF)
    secret_key: int = Field(ge=0, le=0xFFFFFFFF)


class SessionStart(_Frame):
    """Proxy to agent on a data connection: serve this client.

    `client_cert` is the DER of the certificate the client presented to the proxy, base64;
    the agent verifies it itself against the user CAs of its own bundle. `idle_timeout`
    is the proxy's `client_idle_timeout`, which the agent enforces (it sees the message
    boundaries a FATAL error must wait for, and audits the end).
    """

    type: Literal["session-start"] = "session-start"
    session_id: Name
    service: Name
    client_cert: Annotated[str, Field(max_length=32 * 1024)]
    startup: dict[Annotated[str, Field(max_length=1024)], Annotated[str, Field(max_length=10_000)]]
    client_addr: Annotated[str, Field(max_length=255)] = ""
    backend_key: BackendKey
    # The proxy's client_idle_timeout in seconds: the agent ends the session when the
    # client sends nothing for this long. None: never.
    idle_timeout: Annotated[float, Field(gt=0, le=366 * 86400)] | None = None

    def certificate_der(self) -> bytes:
        try:
            return base64.b64decode(self.client_cert, validate=True)
        except (binascii.Error, ValueError):
            raise FrameError("SessionStart.client_cert is not valid base64") from None

    @staticmethod
    def encode_certificate(der: bytes) -> str:
        return base64.b64encode(der).decode("ascii")


class SessionAck(_Frame):
    """Agent to proxy: the session is taken (ok), or refused; `retry` says another agent
    may still serve it (this one does not serve the database, or is shutting down)."""

    type: Literal["session-ack"] = "session-ack"
    ok: bool
    reason: Annotated[str, Field(max_length=4096)] = ""
    retry: bool = False


class CancelStart(_Frame):
    """Proxy to agent on a data connection: cancel the query of the session with this key."""

    type: Literal["cancel-start"] = "cancel-start"
    process_id: int = Field(ge=0, le=0xFFFFFFFF)
    secret_key: int = Field(ge=0, le=0xFFFFFFFF)


Frame = Annotated[
    Hello | Labels | Heartbeat | Dial | DataHello | SessionStart | SessionAck | CancelStart,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Frame] = TypeAdapter(Frame)


def encode_frame(frame: _Frame) -> bytes:
    """The wire bytes of one frame. Raises ValueError if it exceeds MAX_FRAME."""
    body = frame.model_dump_json().encode()
    if len(body) > MAX_FRAME:
        raise ValueError(
            f"{type(frame).__name__} frame of {len(body)} bytes exceeds the tunnel limit of "
            f"{MAX_FRAME} bytes"
        )
    return _LENGTH.pack(len(body)) + body


def decode_payload(body: bytes) -> Frame:
    """One frame from its JSON bytes (the part after the length)."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"tunnel frame is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError("tunnel frame is not a JSON object")
    kind = value.get("type")
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FrameError(
            f"invalid tunnel frame (type {str(kind)[:40]!r}): {where}: {first['msg']}"
        ) from None


class FrameDecoder:
    """Frames from one direction of a tunnel connection.

    `receive_data(chunk)`, then `next_frame()` until it returns None. The decoder reads
    exactly one frame per call and leaves what follows untouched: after the last frame
    of a data connection's handshake, `take_unprocessed()` returns the raw bytes.
    """

    __slots__ = ("_buf", "_error", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if len(self._buf) > self.max_frame + _LENGTH.size:
            raise FrameError(
                "the decoder already holds a full frame; call next_frame() before feeding more"
            )
        self._buf += data

    def next_frame(self) -> Frame | None:
        if self._error is not None:
            raise self._error
        buf = self._buf
        if len(buf) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(buf, 0)
        if length > self.max_frame:
            self._error = FrameError(
                f"tunnel frame of {length} bytes exceeds the limit of {self.max_frame} bytes: "
                "the peer is not a teleport-db tunnel endpoint, or is out of step"
            )
            raise self._error
        end = _LENGTH.size + length
        if len(buf) < end:
            return None
        body = bytes(buf[_LENGTH.size : end])
        del buf[:end]
        try:
            return decode_payload(body)
        except FrameError as exc:
            self._error = exc
            raise

    def take_unprocessed(self) -> bytes:
        """The bytes after the last frame returned (raw session bytes on a data connection)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

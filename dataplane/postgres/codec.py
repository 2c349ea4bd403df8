"""Bytes to messages and messages to bytes for PostgreSQL protocol 3.0, sans-IO.

Public face:
- `encode(message) -> bytes` for every message class in `messages.py`.
- `StartupDecoder`: the untyped first packet(s) of a connection (SSLRequest, GSSENCRequest,
  CancelRequest, StartupMessage). A StartupMessage may ask for protocol 3.x with x > 0
  and carry `_pq_.` options; the caller answers NegotiateProtocolVersion (3.0) as
  PostgreSQL does. Any other major version is `UnsupportedProtocolVersion`.
- `MessageDecoder(side)`: typed messages sent by `side` (FRONTEND: a client's messages, as a
  server reads them; BACKEND: a server's messages, as a client reads them).
  `receive_data(data)` then `next_message()` until it returns None; `receive_eof()` says
  the peer closed the connection (an empty `receive_data(b"")` is a no-op, so handing over
  an empty `take_unprocessed()` cannot end a stream by accident); `take_unprocessed()`
  hands the bytes after the last message to whoever goes on without the decoder.
- `decode_body(side, type_code, payload)`: one message from its type byte and payload, for
  callers that found the boundaries themselves (the relay's `MessageScanner`).

Rules of this module:
- Never trust a length or a count from the wire. Every length is checked against the
  configured limit before anything is buffered for it; every count is checked against the
  bytes that remain before a loop runs; nothing is preallocated from a wire number.
- A decoder holds at most one maximum-size message plus the chunk being fed. After an error
  it is broken for good and raises the same error again.
- Problems in the peer's bytes raise `RemoteProtocolError` (what, where, and which message);
  impossible requests from our own code raise `LocalProtocolError`. Nothing else escapes.
- No sockets, clocks or asyncio: the caller owns I/O.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Any

from dataplane.postgres import messages as m
from dataplane.postgres.exceptions import (
    LocalProtocolError,
    MessageTooLarge,
    RemoteProtocolError,
    UnsupportedProtocolVersion,
)

DEFAULT_MAX_MESSAGE_SIZE = 1 << 30  # 1 GiB, PostgreSQL's own ceiling for one message
DEFAULT_MAX_STARTUP_SIZE = 10_000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!ci")


class Side(enum.Enum):
    """Who sent the messages a decoder reads."""

    FRONTEND = "frontend"  # the client: psql, a driver
    BACKEND = "backend"  # the server: PostgreSQL

    @property
    def who(self) -> str:
        return "client" if self is Side.FRONTEND else "server"


FRONTEND = Side.FRONTEND
BACKEND = Side.BACKEND


# ============================================================================ encoding


def _cstr(text: str, what: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise LocalProtocolError(f"{what} contains a NUL byte, which the protocol cannot carry")
    return raw + b"\0"


def _i16(value: int) -> bytes:
    return _I16.pack(value)


def _i32(value: int) -> bytes:
    return _I32.pack(value)


def _u32(value: int) -> bytes:
    return _U32.pack(value)


def _i16_list(values: tuple[int, ...]) -> bytes:
    return _i16(len(values)) + b"".join(_I16.pack(v) for v in values)


def _value(value: bytes | None) -> bytes:
    if value is None:
        return b"\xff\xff\xff\xff"
    return _i32(len(value)) + bytes(value)


def _values(values: tuple[bytes | None, ...]) -> bytes:
    return _i16(len(values)) + b"".join(_value(v) for v in values)


def _fields(fields: Any, what: str) -> bytes:
    parts = []
    for code, text in fields.items():
        if len(code) != 1 or not 0 < ord(code) < 256:
            raise LocalProtocolError(
                f"{what} field code {code!r} must be one character between \\x01 and \\xff"
            )
        parts.append(bytes([ord(code)]) + _cstr(text, f"{what} field {code}"))
    return b"".join(parts) + b"\0"


def _kind(kind: str, what: str) -> bytes:
    if kind not in ("S", "P"):
        raise LocalProtocolError(
            f"{what} kind must be 'S' (statement) or 'P' (portal), not {kind!r}"
        )
    return kind.encode()


def _copy_response(msg: m.CopyInResponse | m.CopyOutResponse | m.CopyBothResponse) -> bytes:
    return struct.pack("!b", msg.format) + _i16_list(msg.column_formats)


def _startup(msg: m.StartupMessage) -> bytes:
    if not 0 <= msg.minor_version <= 0xFFFF:
        raise LocalProtocolError(
            f"StartupMessage minor version must be 0..65535, not {msg.minor_version}"
        )
    parts = [_i32(m.PROTOCOL_3_0 | msg.minor_version)]
    for name, value in msg.parameters.items():
        if not name:
            raise LocalProtocolError("StartupMessage parameter names must not be empty")
        parts.append(_cstr(name, "StartupMessage parameter name"))
        parts.append(_cstr(value, f"StartupMessage parameter {name!r}"))
    parts.append(b"\0")
    return b"".join(parts)


def _sasl_mechanisms(msg: m.AuthenticationSASL) -> bytes:
    parts = [_i32(10)]
    for mech in msg.mechanisms:
        if not mech:
            raise LocalProtocolError("AuthenticationSASL mechanism names must not be empty")
        parts.append(_cstr(mech, "SASL mechanism"))
    parts.append(b"\0")
    return b"".join(parts)


def _md5_salt(msg: m.AuthenticationMD5Password) -> bytes:
    if len(msg.salt) != 4:
        raise LocalProtocolError(
            f"AuthenticationMD5Password salt must be 4 bytes, not {len(msg.salt)}"
        )
    return _i32(5) + bytes(msg.salt)


def _sasl_initial(msg: m.SASLInitialResponse) -> bytes:
    return _cstr(msg.mechanism, "SASL mechanism") + _value(msg.data)


def _ready(msg: m.ReadyForQuery) -> bytes:
    if msg.status not in ("I", "T", "E"):
        raise LocalProtocolError(
            f"ReadyForQuery status must be 'I', 'T' or 'E', not {msg.status!r}"
        )
    return msg.status.encode()


def _row_description(msg: m.RowDescription) -> bytes:
    parts = [_i16(len(msg.fields))]
    for f in msg.fields:
        parts.append(_cstr(f.name, "RowDescription column name"))
        parts.append(
            struct.pack(
                "!IhIhih",
                f.table_oid,
                f.column_number,
                f.type_oid,
                f.type_size,
                f.type_modifier,
                f.format,
            )
        )
    return b"".join(parts)


def _negotiate(msg: m.NegotiateProtocolVersion) -> bytes:
    return (
        _i32(msg.newest_version)
        + _i32(len(msg.unrecognized_options))
        + b"".join(_cstr(o, "protocol option") for o in msg.unrecognized_options)
    )


_EMPTY = b""

_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    # startup packets (no type byte)
    m.StartupMessage: _startup,
    m.SSLRequest: lambda _: _i32(m.SSL_REQUEST_CODE),
    m.GSSENCRequest: lambda _: _i32(m.GSSENC_REQUEST_CODE),
    m.CancelRequest: lambda x: (
        _i32(m.CANCEL_REQUEST_CODE) + _u32(x.process_id) + _u32(x.secret_key)
    ),
    # frontend
    m.Query: lambda x: _cstr(x.query, "Query text"),
    m.Parse: lambda x: (
        _cstr(x.statement, "statement name")
        + _cstr(x.query, "Parse query text")
        + _i16(len(x.param_types))
        + b"".join(_u32(t) for t in x.param_types)
    ),
    m.Bind: lambda x: (
        _cstr(x.portal, "portal name")
        + _cstr(x.statement, "statement name")
        + _i16_list(x.param_formats)
        + _values(x.params)
        + _i16_list(x.result_formats)
    ),
    m.Execute: lambda x: _cstr(x.portal, "portal name") + _i32(x.max_rows),
    m.Describe: lambda x: _kind(x.kind, "Describe") + _cstr(x.name, "Describe name"),
    m.Close: lambda x: _kind(x.kind, "Close") + _cstr(x.name, "Close name"),
    m.Sync: lambda _: _EMPTY,
    m.Flush: lambda _: _EMPTY,
    m.Terminate: lambda _: _EMPTY,
    m.PasswordMessage: lambda x: _cstr(x.password, "password"),
    m.SASLInitialResponse: _sasl_initial,
    m.SASLResponse: lambda x: bytes(x.data),
    m.CopyData: lambda x: bytes(x.data),
    m.CopyDone: lambda _: _EMPTY,
    m.CopyFail: lambda x: _cstr(x.message, "CopyFail message"),
    m.FunctionCall: lambda x: (
        _u32(x.function_oid) + _i16_list(x.arg_formats) + _values(x.args) + _i16(x.result_format)
    ),
    # backend
    m.AuthenticationOk: lambda _: _i32(0),
    m.AuthenticationKerberosV5: lambda _: _i32(2),
    m.AuthenticationCleartextPassword: lambda _: _i32(3),
    m.AuthenticationMD5Password: _md5_salt,
    m.AuthenticationGSS: lambda _: _i32(7),
    m.AuthenticationGSSContinue: lambda x: _i32(8) + bytes(x.data),
    m.AuthenticationSSPI: lambda _: _i32(9),
    m.AuthenticationSASL: _sasl_mechanisms,
    m.AuthenticationSASLContinue: lambda x: _i32(11) + bytes(x.data),
    m.AuthenticationSASLFinal: lambda x: _i32(12) + bytes(x.data),
    m.ParameterStatus: lambda x: (
        _cstr(x.name, "parameter name") + _cstr(x.value, "parameter value")
    ),
    m.BackendKeyData: lambda x: _u32(x.process_id) + _u32(x.secret_key),
    m.ReadyForQuery: _ready,
    m.ErrorResponse: lambda x: _fields(x.fields, "ErrorResponse"),
    m.NoticeResponse: lambda x: _fields(x.fields, "NoticeResponse"),
    m.CommandComplete: lambda x: _cstr(x.tag, "command tag"),
    m.RowDescription: _row_description,
    m.DataRow: lambda x: _values(x.values),
    m.EmptyQueryResponse: lambda _: _EMPTY,
    m.ParseComplete: lambda _: _EMPTY,
    m.BindComplete: lambda _: _EMPTY,
    m.CloseComplete: lambda _: _EMPTY,
    m.NoData: lambda _: _EMPTY,
    m.PortalSuspended: lambda _: _EMPTY,
    m.ParameterDescription: lambda x: (
        _i16(len(x.type_oids)) + b"".join(_u32(t) for t in x.type_oids)
    ),
    m.CopyInResponse: _copy_response,
    m.CopyOutResponse: _copy_response,
    m.CopyBothResponse: _copy_response,
    m.NotificationResponse: lambda x: (
        _u32(x.process_id)
        + _cstr(x.channel, "notification channel")
        + _cstr(x.payload, "notification payload")
    ),
    m.NegotiateProtocolVersion: _negotiate,
    m.FunctionCallResponse: lambda x: _value(x.value),
}

_MAX_LENGTH = (1 << 31) - 1


def encode(message: m.Message) -> bytes:
    """The bytes of one message, ready to write. Raises LocalProtocolError if it cannot be sent."""
    cls = type(message)
    encoder = _ENCODERS.get(cls)
    if encoder is None:
        raise LocalProtocolError(f"{cls.__name__} is not a PostgreSQL protocol message")
    try:
        payload = encoder(message)
    except LocalProtocolError:
        raise
    except (struct.error, ValueError, TypeError, OverflowError, AttributeError) as exc:
        raise LocalProtocolError(f"cannot encode {cls.__name__}: {exc}") from None
    if len(payload) + 4 > _MAX_LENGTH:
        raise LocalProtocolError(f"{cls.__name__} of {len(payload) + 4} bytes is too large to send")
    code = cls.type_code
    if code is None:
        return _i32(len(payload) + 4) + payload
    return code + _i32(len(payload) + 4) + payload


# ============================================================================ decoding


class _Reader:
    """Reads fields from one message payload; every read is checked against what remains."""

    __slots__ = ("data", "name", "pos")

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.name = name
        self.pos = 0

    def fail(self, problem: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"malformed {self.name} message: {problem}")

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def need(self, size: int, what: str) -> None:
        if self.remaining() < size:
            raise self.fail(f"{what} needs {size} bytes but only {self.remaining()} remain")

    def byte(self, what: str) -> int:
        self.need(1, what)
        self.pos += 1
        return self.data[self.pos - 1]

    def i16(self, what: str) -> int:
        self.need(2, what)
        (value,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return value

    def i32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return value

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return value

    def take(self, size: int, what: str) -> bytes:
        self.need(size, what)
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def rest(self) -> bytes:
        data = self.data[self.pos :]
        self.pos = len(self.data)
        return data

    def cstr(self, what: str) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise self.fail(f"{what} is not terminated by a NUL byte")
        text = self.data[self.pos : end].decode("utf-8", "surrogateescape")
        self.pos = end + 1
        return text

    def count(self, what: str, min_item_size: int, wide: bool = False) -> int:
        """A count of items, each at least `min_item_size` bytes, that must fit what remains."""
        n = self.i32(f"number of {what}") if wide else self.i16(f"number of {what}")
        if n < 0:
            raise self.fail(f"negative number of {what} ({n})")
        if n * min_item_size > self.remaining():
            raise self.fail(
                f"declares {n} {what} but only {self.remaining()} bytes remain "
                f"(each needs at least {min_item_size})"
            )
        return n

    def i16s(self, what: str) -> tuple[int, ...]:
        n = self.count(what, 2)
        values = struct.unpack_from(f"!{n}h", self.data, self.pos)
        self.pos += 2 * n
        return values

    def u32s(self, what: str) -> tuple[int, ...]:
        n = self.count(what, 4)
        values = struct.unpack_from(f"!{n}I", self.data, self.pos)
        self.pos += 4 * n
        return values

    def value(self, what: str) -> bytes | None:
        size = self.i32(f"length of {what}")
        if size == -1:
            return None
        if size < -1:
            raise self.fail(f"length of {what} is {size}; only -1 (NULL) or 0 and above are valid")
        return self.take(size, what)

    def values(self, what: str) -> tuple[bytes | None, ...]:
        n = self.count(what, 4)
        return tuple(self.value(f"{what} {i + 1}") for i in range(n))

    def kind(self, what: str) -> str:
        k = self.byte(what)
        if k not in (0x53, 0x50):  # 'S', 'P'
            raise self.fail(f"{what} must be 'S' (statement) or 'P' (portal), not {bytes([k])!r}")
        return chr(k)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{self.remaining()} unexpected bytes after the last field")


def _error_fields(r: _Reader) -> dict[str, str]:
    fields: dict[str, str] = {}
    while True:
        code = r.byte("field code")
        if code == 0:
            return fields
        fields[chr(code)] = r.cstr(f"field {chr(code)!r}")


def _dec_query(r: _Reader) -> m.Query:
    return m.Query(r.cstr("query text"))


def _dec_parse(r: _Reader) -> m.Parse:
    name = r.cstr("statement name")
    query = r.cstr("query text")
    return m.Parse(name, query, r.u32s("parameter types"))


def _dec_bind(r: _Reader) -> m.Bind:
    portal = r.cstr("portal name")
    statement = r.cstr("statement name")
    formats = r.i16s("parameter format codes")
    params = r.values("parameter values")
    return m.Bind(portal, statement, formats, params, r.i16s("result format codes"))


def _dec_execute(r: _Reader) -> m.Execute:
    return m.Execute(r.cstr("portal name"), r.i32("row limit"))


def _dec_describe(r: _Reader) -> m.Describe:
    kind = r.kind("Describe kind")
    return m.Describe(kind, r.cstr("name"))  # type: ignore[arg-type]


def _dec_close(r: _Reader) -> m.Close:
    kind = r.kind("Close kind")
    return m.Close(kind, r.cstr("name"))  # type: ignore[arg-type]


def _dec_function_call(r: _Reader) -> m.FunctionCall:
    oid = r.u32("function OID")
    formats = r.i16s("argument format codes")
    args = r.values("arguments")
    return m.FunctionCall(oid, formats, args, r.i16("result format code"))


def _dec_password(r: _Reader) -> m.PasswordMessage:
    return m.PasswordMessage(r.cstr("password"))


def _dec_sasl_initial(r: _Reader) -> m.SASLInitialResponse:
    mech = r.cstr("SASL mechanism")
    return m.SASLInitialResponse(mech, r.value("initial response"))


def _dec_authentication(r: _Reader) -> m.Authentication:
    code = r.i32("authentication request code")
    if code == 0:
        return m.AuthenticationOk()
    if code == 2:
        return m.AuthenticationKerberosV5()
    if code == 3:
        return m.AuthenticationCleartextPassword()
    if code == 5:
        return m.AuthenticationMD5Password(r.take(4, "MD5 salt"))
    if code == 7:
        return m.AuthenticationGSS()
    if code == 8:
        return m.AuthenticationGSSContinue(r.rest())
    if code == 9:
        return m.AuthenticationSSPI()
    if code == 10:
        mechanisms = []
        while True:
            mech = r.cstr("SASL mechanism name")
            if not mech:
                return m.AuthenticationSASL(tuple(mechanisms))
            mechanisms.append(mech)
    if code == 11:
        return m.AuthenticationSASLContinue(r.rest())
    if code == 12:
        return m.AuthenticationSASLFinal(r.rest())
    raise r.fail(f"unknown authentication request code {code}")


def _dec_ready(r: _Reader) -> m.ReadyForQuery:
    status = r.byte("transaction status")
    if status not in (0x49, 0x54, 0x45):  # I, T, E
        raise r.fail(f"transaction status must be 'I', 'T' or 'E', not {bytes([status])!r}")
    return m.ReadyForQuery(chr(status))  # type: ignore[arg-type]


def _dec_row_description(r: _Reader) -> m.RowDescription:
    n = r.count("columns", 19)
    fields = []
    for _ in range(n):
        name = r.cstr("column name")
        r.need(18, f"column {name!r} description")
        table, attnum, oid, size, modifier, fmt = struct.unpack_from("!IhIhih", r.data, r.pos)
        r.pos += 18
        fields.append(m.FieldDescription(name, table, attnum, oid, size, modifier, fmt))
    return m.RowDescription(tuple(fields))


def _dec_copy_response(cls: type) -> Callable[[_Reader], Any]:
    def decode(r: _Reader) -> Any:
        fmt = r.byte("overall format")
        if fmt > 127:
            fmt -= 256
        return cls(fmt, r.i16s("column format codes"))

    return decode


def _dec_negotiate(r: _Reader) -> m.NegotiateProtocolVersion:
    version = r.i32("newest protocol version")
    n = r.count("unrecognized options", 1, wide=True)
    return m.NegotiateProtocolVersion(version, tuple(r.cstr("option name") for _ in range(n)))


_Decoder = Callable[[_Reader], Any]

_FRONTEND_DECODERS: dict[int, tuple[str, _Decoder]] = {
    ord("Q"): ("Query", _dec_query),
    ord("P"): ("Parse", _dec_parse),
    ord("B"): ("Bind", _dec_bind),
    ord("E"): ("Execute", _dec_execute),
    ord("D"): ("Describe", _dec_describe),
    ord("C"): ("Close", _dec_close),
    ord("S"): ("Sync", lambda _: m.Sync()),
    ord("H"): ("Flush", lambda _: m.Flush()),
    ord("X"): ("Terminate", lambda _: m.Terminate()),
    ord("d"): ("CopyData", lambda r: m.CopyData(r.rest())),
    ord("c"): ("CopyDone", lambda _: m.CopyDone()),
    ord("f"): ("CopyFail", lambda r: m.CopyFail(r.cstr("error message"))),
    ord("F"): ("FunctionCall", _dec_function_call),
    # 'p' is resolved by the decoder's expected_auth_response
}

_AUTH_RESPONSE_DECODERS: dict[type, tuple[str, _Decoder]] = {
    m.PasswordMessage: ("PasswordMessage", _dec_password),
    m.SASLInitialResponse: ("SASLInitialResponse", _dec_sasl_initial),
    m.SASLResponse: ("SASLResponse", lambda r: m.SASLResponse(r.rest())),
}

_BACKEND_DECODERS: dict[int, tuple[str, _Decoder]] = {
    ord("R"): ("Authentication", _dec_authentication),
    ord("S"): ("ParameterStatus", lambda r: m.ParameterStatus(r.cstr("name"), r.cstr("value"))),
    ord("K"): (
        "BackendKeyData",
        lambda r: m.BackendKeyData(r.u32("process id"), r.u32("secret key")),
    ),
    ord("Z"): ("ReadyForQuery", _dec_ready),
    ord("E"): ("ErrorResponse", lambda r: m.ErrorResponse(_error_fields(r))),
    ord("N"): ("NoticeResponse", lambda r: m.NoticeResponse(_error_fields(r))),
    ord("C"): ("CommandComplete", lambda r: m.CommandComplete(r.cstr("command tag"))),
    ord("T"): ("RowDescription", _dec_row_description),
    ord("D"): ("DataRow", lambda r: m.DataRow(r.values("column values"))),
    ord("I"): ("EmptyQueryResponse", lambda _: m.EmptyQueryResponse()),
    ord("1"): ("ParseComplete", lambda _: m.ParseComplete()),
    ord("2"): ("BindComplete", lambda _: m.BindComplete()),
    ord("3"): ("CloseComplete", lambda _: m.CloseComplete()),
    ord("n"): ("NoData", lambda _: m.NoData()),
    ord("s"): ("PortalSuspended", lambda _: m.PortalSuspended()),
    ord("t"): ("ParameterDescription", lambda r: m.ParameterDescription(r.u32s("parameter types"))),
    ord("G"): ("CopyInResponse", _dec_copy_response(m.CopyInResponse)),
    ord("H"): ("CopyOutResponse", _dec_copy_response(m.CopyOutResponse)),
    ord("W"): ("CopyBothResponse", _dec_copy_response(m.CopyBothResponse)),
    ord("A"): (
        "NotificationResponse",
        lambda r: m.NotificationResponse(r.u32("process id"), r.cstr("channel"), r.cstr("payload")),
    ),
    ord("v"): ("NegotiateProtocolVersion", _dec_negotiate),
    ord("V"): ("FunctionCallResponse", lambda r: m.FunctionCallResponse(r.value("result"))),
    ord("d"): ("CopyData", lambda r: m.CopyData(r.rest())),
    ord("c"): ("CopyDone", lambda _: m.CopyDone()),
}


def _lookup(side: Side, code: int, auth_response: type) -> tuple[str, _Decoder] | None:
    if side is Side.BACKEND:
        return _BACKEND_DECODERS.get(code)
    if code == 0x70:  # 'p'
        return _AUTH_RESPONSE_DECODERS[auth_response]
    return _FRONTEND_DECODERS.get(code)


def _unknown_type(side: Side, code: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"unknown message type {bytes([code])!r} from the {side.who}; the stream is not "
        "PostgreSQL protocol 3.0 or is out of step"
    )


def decode_body(
    side: Side,
    type_code: bytes,
    payload: bytes,
    auth_response: type[m.AuthResponse] = m.PasswordMessage,
) -> m.FrontendMessage | m.BackendMessage:
    """Decode one typed message from its type byte and its payload (the bytes after the length)."""
    if len(type_code) != 1:
        raise LocalProtocolError(f"a type code is one byte, not {type_code!r}")
    entry = _lookup(side, type_code[0], auth_response)
    if entry is None:
        raise _unknown_type(side, type_code[0])
    name, decoder = entry
    reader = _Reader(bytes(payload), name)
    message = decoder(reader)
    reader.end()
    return message


class MessageDecoder:
    """Typed messages from one direction of a connection, after the startup packet.

    `side` is who *sent* the bytes: FRONTEND for what a client sends (a server reads these),
    BACKEND for what a server sends (a client reads these).
    """

    def __init__(self, side: Side, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if not isinstance(side, Side):
            raise LocalProtocolError(f"side must be FRONTEND or BACKEND, not {side!r}")
        if not 4 <= max_message_size <= _MAX_LENGTH:
            raise LocalProtocolError(
                f"max_message_size must be 4..{_MAX_LENGTH}, not {max_message_size}"
            )
        self.side = side
        self.max_message_size = max_message_size
        # Which of PasswordMessage / SASLInitialResponse / SASLResponse a 'p' is; the caller
        # sets it from its authentication state before asking for the next message.
        self._auth_response: type[m.AuthResponse] = m.PasswordMessage
        self._buf = bytearray()
        self._eof = False
        self._error: Exception | None = None

    def expect_auth_response(self, kind: type[m.AuthResponse]) -> None:
        """Say how to decode the next 'p' message (it depends on the authentication method)."""
        if kind not in _AUTH_RESPONSE_DECODERS:
            raise LocalProtocolError(
                f"expected_auth_response must be PasswordMessage, SASLInitialResponse or "
                f"SASLResponse, not {kind!r}"
            )
        self._auth_response = kind

    @property
    def expected_auth_response(self) -> type[m.AuthResponse]:
        """How the next 'p' message is decoded; PasswordMessage until told otherwise."""
        return self._auth_response

    @expected_auth_response.setter
    def expected_auth_response(self, kind: type[m.AuthResponse]) -> None:
        self.expect_auth_response(kind)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf)

    @property
    def at_eof(self) -> bool:
        """The peer closed the connection and every message before that was returned."""
        return self._eof and not self._buf

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer (empty data is ignored; see `receive_eof`)."""
        if self._error is not None:
            raise self._error
        if not data:
            return
        if self._eof:
            raise LocalProtocolError("receive_data() called after receive_eof()")
        if len(self._buf) > self.max_message_size + 5:
            raise LocalProtocolError(
                "the decoder already holds more than one maximum-size message; call "
                "next_message() until it returns None before feeding more data"
            )
        self._buf += data

    def receive_eof(self) -> None:
        """The peer closed the connection: a message cut short is now an error."""
        self._eof = True

    def take_unprocessed(self) -> bytes:
        """The bytes received after the last message returned, and forget them: for a
        caller that stops decoding here and relays the rest (after a login, say)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_message(self) -> m.FrontendMessage | m.BackendMessage | None:
        """The next complete message, or None when more data is needed (or the stream ended)."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except (RemoteProtocolError, LocalProtocolError) as exc:
            self._error = exc
            raise

    def _next(self) -> m.FrontendMessage | m.BackendMessage | None:
        buf = self._buf
        have = len(buf)
        if have == 0:
            return None
        entry = _lookup(self.side, buf[0], self._auth_response)
        if entry is None:
            raise _unknown_type(self.side, buf[0])
        name, decoder = entry
        if have < 5:
            if self._eof:
                raise RemoteProtocolError(
                    f"the {self.side.who} closed the connection inside the header of a "
                    f"{name} message ({have} of 5 bytes)"
                )
            return None
        (length,) = _I32.unpack_from(buf, 1)
        if length < 4:
            raise RemoteProtocolError(
                f"{name} message from the {self.side.who} has length {length}; "
                "the length counts itself, so it is at least 4"
            )
        if length > self.max_message_size:
            raise MessageTooLarge(name, length, self.max_message_size, self.side.who)
        end = 1 + length
        if have < end:
            if self._eof:
                raise RemoteProtocolError(
                    f"the {self.side.who} closed the connection inside a {name} message "
                    f"({have - 1} of {length} bytes)"
                )
            return None
        payload = bytes(buf[5:end])
        del buf[:end]
        reader = _Reader(payload, name)
        message = decoder(reader)
        reader.end()
        return message  # type: ignore[no-any-return]


class StartupDecoder:
    """The untyped packets that open a connection, as a server (or the proxy) reads them.

    Returns SSLRequest / GSSENCRequest (the caller answers one byte and may call again),
    then a StartupMessage or a CancelRequest, after which it is `finished` and
    `take_unprocessed()` hands any bytes that followed to a `MessageDecoder(FRONTEND)`.

    Bytes that arrive together with an SSLRequest or GSSENCRequest, before the server's
    answer, are refused: they would be plain text that a man in the middle could have
    injected ahead of the TLS handshake (CVE-2021-23214).
    """

    def __init__(self, max_startup_size: int = DEFAULT_MAX_STARTUP_SIZE) -> None:
        self.max_startup_size = max_startup_size
        self._buf = bytearray()
        self._finished = False
        self._eof = False
        self._error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client (empty data is ignored; see `receive_eof`)."""
        if self._error is not None:
            raise self._error
        if not data:
            return
        if self._finished:
            raise LocalProtocolError(
                "startup is finished; feed further data to a MessageDecoder(FRONTEND)"
            )
        if self._eof:
            raise LocalProtocolError("receive_data() called after receive_eof()")
        if len(self._buf) > self.max_startup_size:
            raise LocalProtocolError(
                "the decoder already holds a full startup packet; call next_message() first"
            )
        self._buf += data

    def receive_eof(self) -> None:
        """The peer closed the connection: a message cut short is now an error."""
        self._eof = True

    def take_unprocessed(self) -> bytes:
        """Bytes received after the last packet returned (hand them to the next decoder)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_message(self) -> m.StartupPacket | None:
        if self._error is not None:
            raise self._error
        if self._finished:
            return None
        try:
            return self._next()
        except (RemoteProtocolError, LocalProtocolError) as exc:
            self._error = exc
            raise

    def _next(self) -> m.StartupPacket | None:
        buf = self._buf
        have = len(buf)
        if have < 4:
            if self._eof and have:
                raise RemoteProtocolError(
                    f"the client closed the connection inside a startup packet ({have} bytes)"
                )
            return None
        (length,) = _I32.unpack_from(buf, 0)
        if length < 8:
            raise RemoteProtocolError(
                f"invalid startup packet length {length}; a startup packet is at least 8 bytes"
            )
        if length > self.max_startup_size:
            raise MessageTooLarge("startup", length, self.max_startup_size, "client")
        if have < length:
            if self._eof:
                raise RemoteProtocolError(
                    f"the client closed the connection inside a startup packet "
                    f"({have} of {length} bytes)"
                )
            return None
        payload = bytes(buf[4:length])
        del buf[:length]
        reader = _Reader(payload, "startup packet")
        code = reader.i32("protocol version or request code")
        if code in (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE):
            packet: m.StartupPacket = (
                m.SSLRequest() if code == m.SSL_REQUEST_CODE else m.GSSENCRequest()
            )
            reader.name = type(packet).__name__
            reader.end()
            if buf:
                raise RemoteProtocolError(
                    f"the client sent {len(buf)} bytes after its {reader.name} without waiting "
                    "for the answer; refusing them, as they could have been injected before "
                    "encryption starts"
                )
            return packet
        if code == m.CANCEL_REQUEST_CODE:
            reader.name = "CancelRequest"
            packet = m.CancelRequest(reader.u32("process id"), reader.u32("secret key"))
            reader.end()
            self._finished = True
            return packet
        if code >> 16 != 3:
            raise UnsupportedProtocolVersion(code >> 16, code & 0xFFFF)
        # 3.x for any x: the server answers NegotiateProtocolVersion with the newest minor
        # it speaks (0) and goes on with that, as PostgreSQL does.
        reader.name = "StartupMessage"
        parameters: dict[str, str] = {}
        while True:
            name = reader.cstr("parameter name")
            if not name:
                break
            if name in parameters:
                raise reader.fail(f"parameter {name!r} is given twice")
            parameters[name] = reader.cstr(f"value of parameter {name!r}")
        reader.end()
        self._finished = True
        return m.StartupMessage(parameters, code & 0xFFFF)

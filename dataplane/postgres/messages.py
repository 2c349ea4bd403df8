"""The messages of PostgreSQL frontend/backend protocol 3.0, as frozen dataclasses.

Rules of this module:
- One class per message, named as in the PostgreSQL documentation ("Message Formats").
  Each typed message class carries its type byte in `type_code`; the untyped startup packets
  (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) have `type_code = None`.
- Text fields are `str`. The codec decodes them as UTF-8 with `surrogateescape`, so bytes in
  another client_encoding survive a decode/encode round trip unchanged.
- Binary values (parameters, column values, COPY data, SASL data) are `bytes`; SQL NULL is
  `None`. Lists are tuples, so messages stay immutable (dict fields excepted: treat them as
  read-only).
- This module holds data only: no parsing, no I/O. Encoding and decoding live in `codec.py`,
  which checks ranges and NUL bytes when it encodes.

Three frontend messages share type byte 'p' (PasswordMessage, SASLInitialResponse,
SASLResponse, and GSSResponse which we do not model); which one a 'p' is depends on the
authentication exchange, so `MessageDecoder.expect_auth_response` lets the caller say.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

PROTOCOL_3_0 = 196608  # (3 << 16) | 0
PROTOCOL_OPTION_PREFIX = "_pq_."
ALPN_PROTOCOL = "postgresql"  # TLS ALPN name of the protocol (PostgreSQL 17, direct TLS)
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

TEXT = 0
BINARY = 1

# ---------------------------------------------------------------- untyped startup packets


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The first packet of a session: protocol 3.`minor_version` (0 unless a newer client
    asks for more, e.g. libpq 18 with `max_protocol_version=3.2`) and parameters such as
    user, database, and protocol options (`_pq_.name`)."""

    type_code: ClassVar[bytes | None] = None
    parameters: Mapping[str, str] = field(default_factory=dict)
    minor_version: int = 0

    @property
    def protocol_options(self) -> tuple[str, ...]:
        """The `_pq_.` protocol options asked for (none is known to protocol 3.0)."""
        return tuple(name for name in self.parameters if name.startswith(PROTOCOL_OPTION_PREFIX))

    @property
    def user(self) -> str | None:
        return self.parameters.get("user")

    @property
    def database(self) -> str | None:
        """The database asked for; PostgreSQL defaults it to the user name when absent."""
        return self.parameters.get("database", self.parameters.get("user"))


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """Asks the server to switch to TLS; the answer is one byte, b'S' or b'N'."""

    type_code: ClassVar[bytes | None] = None


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """Asks for GSSAPI encryption; the answer is one byte, b'G' or b'N'."""

    type_code: ClassVar[bytes | None] = None


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Sent on a new connection to cancel the query running in another session."""

    type_code: ClassVar[bytes | None] = None
    process_id: int
    secret_key: int


# ---------------------------------------------------------------- frontend (client to server)


@dataclass(frozen=True, slots=True)
class Query:
    """Simple query protocol: one or more SQL statements as text."""

    type_code: ClassVar[bytes | None] = b"Q"
    query: str


@dataclass(frozen=True, slots=True)
class Parse:
    """Extended protocol: prepare `query` as statement `statement` ("" is the unnamed one)."""

    type_code: ClassVar[bytes | None] = b"P"
    statement: str
    query: str
    param_types: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Bind:
    """Extended protocol: bind parameter values to a statement, creating a portal."""

    type_code: ClassVar[bytes | None] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Execute:
    """Extended protocol: run a portal; `max_rows` 0 means no limit."""

    type_code: ClassVar[bytes | None] = b"E"
    portal: str = ""
    max_rows: int = 0


@dataclass(frozen=True, slots=True)
class Describe:
    """Describe a prepared statement (kind 'S') or a portal (kind 'P')."""

    type_code: ClassVar[bytes | None] = b"D"
    kind: Literal["S", "P"]
    name: str = ""


@dataclass(frozen=True, slots=True)
class Close:
    """Close a prepared statement (kind 'S') or a portal (kind 'P')."""

    type_code: ClassVar[bytes | None] = b"C"
    kind: Literal["S", "P"]
    name: str = ""


@dataclass(frozen=True, slots=True)
class Sync:
    type_code: ClassVar[bytes | None] = b"S"


@dataclass(frozen=True, slots=True)
class Flush:
    type_code: ClassVar[bytes | None] = b"H"


@dataclass(frozen=True, slots=True)
class Terminate:
    type_code: ClassVar[bytes | None] = b"X"


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """A cleartext password or an MD5 response ("md5" + 32 hex digits)."""

    type_code: ClassVar[bytes | None] = b"p"
    password: str

    def __repr__(self) -> str:  # never print a password
        return "PasswordMessage(password=<hidden>)"


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    """The first SASL message: the chosen mechanism and its initial data (None: no data)."""

    type_code: ClassVar[bytes | None] = b"p"
    mechanism: str
    data: bytes | None = None

    def __repr__(self) -> str:  # SASL data with the server's messages allows offline guessing
        size = "None" if self.data is None else f"<{len(self.data)} bytes>"
        return f"SASLInitialResponse(mechanism={self.mechanism!r}, data={size})"


@dataclass(frozen=True, slots=True)
class SASLResponse:
    """A later SASL message, e.g. SCRAM's client-final-message."""

    type_code: ClassVar[bytes | None] = b"p"
    data: bytes

    def __repr__(self) -> str:  # a SCRAM client proof allows offline password guessing
        return f"SASLResponse(data=<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class CopyData:
    """A piece of COPY data; sent by either side."""

    type_code: ClassVar[bytes | None] = b"d"
    data: bytes


@dataclass(frozen=True, slots=True)
class CopyDone:
    """The end of COPY data; sent by either side."""

    type_code: ClassVar[bytes | None] = b"c"


@dataclass(frozen=True, slots=True)
class CopyFail:
    """The client aborts a COPY FROM STDIN with this error message."""

    type_code: ClassVar[bytes | None] = b"f"
    message: str


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """The legacy fast-path function call."""

    type_code: ClassVar[bytes | None] = b"F"
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = TEXT


# ---------------------------------------------------------------- backend (server to client)


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    type_code: ClassVar[bytes | None] = b"R"


@dataclass(frozen=True, slots=True)
class AuthenticationKerberosV5:
    type_code: ClassVar[bytes | None] = b"R"


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    type_code: ClassVar[bytes | None] = b"R"


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    type_code: ClassVar[bytes | None] = b"R"
    salt: bytes  # exactly 4 bytes


@dataclass(frozen=True, slots=True)
class AuthenticationGSS:
    type_code: ClassVar[bytes | None] = b"R"


@dataclass(frozen=True, slots=True)
class AuthenticationGSSContinue:
    type_code: ClassVar[bytes | None] = b"R"
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationSSPI:
    type_code: ClassVar[bytes | None] = b"R"


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    """The server offers these SASL mechanisms, most preferred first."""

    type_code: ClassVar[bytes | None] = b"R"
    mechanisms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    type_code: ClassVar[bytes | None] = b"R"
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    type_code: ClassVar[bytes | None] = b"R"
    data: bytes


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    type_code: ClassVar[bytes | None] = b"S"
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """The key a client needs to cancel this session's queries (both unsigned 32-bit)."""

    type_code: ClassVar[bytes | None] = b"K"
    process_id: int
    secret_key: int


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """Status 'I' idle, 'T' in a transaction block, 'E' in a failed transaction block."""

    type_code: ClassVar[bytes | None] = b"Z"
    status: Literal["I", "T", "E"] = "I"


class _Fields:
    """Accessors shared by ErrorResponse and NoticeResponse; `fields` maps codes to text."""

    __slots__ = ()
    fields: Mapping[str, str]

    @property
    def severity(self) -> str | None:
        """The non-localized severity (V) when present, else the localized one (S)."""
        return self.fields.get("V", self.fields.get("S"))

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def message(self) -> str | None:
        return self.fields.get("M")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")

    def __str__(self) -> str:
        text = f"{self.severity}: {self.message} (SQLSTATE {self.sqlstate})"
        if self.detail:
            text += f"\nDETAIL: {self.detail}"
        if self.hint:
            text += f"\nHINT: {self.hint}"
        return text


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    """An error, its fields keyed by one-letter code (S, V, C, M, D, H, P, ...)."""

    type_code: ClassVar[bytes | None] = b"E"
    fields: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    type_code: ClassVar[bytes | None] = b"N"
    fields: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class CommandComplete:
    """The command tag, e.g. "SELECT 1", "INSERT 0 5", "COPY 10"."""

    type_code: ClassVar[bytes | None] = b"C"
    tag: str


@dataclass(frozen=True, slots=True)
class FieldDescription:
    """One column of a RowDescription."""

    name: str
    table_oid: int = 0
    column_number: int = 0
    type_oid: int = 0
    type_size: int = -1
    type_modifier: int = -1
    format: int = TEXT


@dataclass(frozen=True, slots=True)
class RowDescription:
    type_code: ClassVar[bytes | None] = b"T"
    fields: tuple[FieldDescription, ...]


@dataclass(frozen=True, slots=True)
class DataRow:
    type_code: ClassVar[bytes | None] = b"D"
    values: tuple[bytes | None, ...]


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    type_code: ClassVar[bytes | None] = b"I"


@dataclass(frozen=True, slots=True)
class ParseComplete:
    type_code: ClassVar[bytes | None] = b"1"


@dataclass(frozen=True, slots=True)
class BindComplete:
    type_code: ClassVar[bytes | None] = b"2"


@dataclass(frozen=True, slots=True)
class CloseComplete:
    type_code: ClassVar[bytes | None] = b"3"


@dataclass(frozen=True, slots=True)
class NoData:
    type_code: ClassVar[bytes | None] = b"n"


@dataclass(frozen=True, slots=True)
class PortalSuspended:
    type_code: ClassVar[bytes | None] = b"s"


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    type_code: ClassVar[bytes | None] = b"t"
    type_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CopyInResponse:
    """The server is ready for COPY FROM STDIN; `format` 0 text, 1 binary."""

    type_code: ClassVar[bytes | None] = b"G"
    format: int = TEXT
    column_formats: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class CopyOutResponse:
    type_code: ClassVar[bytes | None] = b"H"
    format: int = TEXT
    column_formats: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class CopyBothResponse:
    type_code: ClassVar[bytes | None] = b"W"
    format: int = TEXT
    column_formats: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    type_code: ClassVar[bytes | None] = b"A"
    process_id: int
    channel: str
    payload: str = ""


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    """The server speaks protocol `newest_version` at most and none of these `_pq_.` options.

    On the wire the version is a whole protocol number, (3 << 16) | minor, as PostgreSQL
    sends it (`PROTOCOL_3_0` for 3.0): libpq reads anything below 3.0 as a downgrade to a
    protocol it no longer speaks and gives up."""

    type_code: ClassVar[bytes | None] = b"v"
    newest_version: int
    unrecognized_options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FunctionCallResponse:
    type_code: ClassVar[bytes | None] = b"V"
    value: bytes | None


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest

AuthResponse = PasswordMessage | SASLInitialResponse | SASLResponse

FrontendMessage = (
    Query
    | Parse
    | Bind
    | Execute
    | Describe
    | Close
    | Sync
    | Flush
    | Terminate
    | PasswordMessage
    | SASLInitialResponse
    | SASLResponse
    | CopyData
    | CopyDone
    | CopyFail
    | FunctionCall
)

Authentication = (
    AuthenticationOk
    | AuthenticationKerberosV5
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationGSS
    | AuthenticationGSSContinue
    | AuthenticationSSPI
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
)

BackendMessage = (
    Authentication
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | ErrorResponse
    | NoticeResponse
    | CommandComplete
    | RowDescription
    | DataRow
    | EmptyQueryResponse
    | ParseComplete
    | BindComplete
    | CloseComplete
    | NoData
    | PortalSuspended
    | ParameterDescription
    | CopyInResponse
    | CopyOutResponse
    | CopyBothResponse
    | NotificationResponse
    | NegotiateProtocolVersion
    | FunctionCallResponse
    | CopyData
    | CopyDone
)

Message = StartupPacket | FrontendMessage | BackendMessage

"""PostgreSQL frontend/backend protocol 3.0, sans-IO: bytes in, message objects out, and back.

Never touches a socket, a clock, or asyncio. The public face:
- `messages`: one frozen dataclass per protocol message (StartupMessage, Query, DataRow, ...);
- `codec`: `encode(message)`, `StartupDecoder`, `MessageDecoder(FRONTEND | BACKEND)`,
  `decode_body`;
- `scanner`: `MessageScanner`, message boundaries beside a bulk copy (audit, injection);
- `auth`: `ClientAuthenticator`, logging in to a server (cleartext, MD5, SCRAM-SHA-256);
- `errors`: ErrorResponse builders and SQLSTATE constants;
- `exceptions`: `ProtocolError`, split into `RemoteProtocolError` / `LocalProtocolError`.
"""

from dataplane.postgres.auth import (
    AuthenticationError,
    AuthenticationRejected,
    ClientAuthenticator,
    PasswordRequired,
    ServerVerificationFailed,
    UnsupportedAuthentication,
)
from dataplane.postgres.codec import (
    BACKEND,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_STARTUP_SIZE,
    FRONTEND,
    MessageDecoder,
    Side,
    StartupDecoder,
    decode_body,
    encode,
)
from dataplane.postgres.errors import error_response, fatal, notice_response
from dataplane.postgres.exceptions import (
    LocalProtocolError,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
    UnsupportedProtocolVersion,
)
from dataplane.postgres.scanner import MessageScanner, ScannedMessage

__all__ = [
    "BACKEND",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_STARTUP_SIZE",
    "FRONTEND",
    "AuthenticationError",
    "AuthenticationRejected",
    "ClientAuthenticator",
    "LocalProtocolError",
    "MessageDecoder",
    "MessageScanner",
    "MessageTooLarge",
    "PasswordRequired",
    "ProtocolError",
    "RemoteProtocolError",
    "ScannedMessage",
    "ServerVerificationFailed",
    "Side",
    "StartupDecoder",
    "UnsupportedAuthentication",
    "UnsupportedProtocolVersion",
    "decode_body",
    "encode",
    "error_response",
    "fatal",
    "notice_response",
]

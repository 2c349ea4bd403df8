"""Logging in to a PostgreSQL server as a client, sans-IO: what the db agent does on the
client's behalf.

`ClientAuthenticator(user, password)` is fed the backend messages that arrive after the
StartupMessage and returns the frontend messages to send, until `done` (AuthenticationOk):
- AuthenticationOk straight away (trust, or certificate authentication over TLS): nothing;
- AuthenticationCleartextPassword: PasswordMessage with the password;
- AuthenticationMD5Password: "md5" + md5(md5(password + user) + salt), in hex;
- AuthenticationSASL with SCRAM-SHA-256 (RFC 5802, RFC 7677): client-first-message with a
  random nonce from `secrets`, then the client proof from the PBKDF2-salted password, then
  the server's signature in AuthenticationSASLFinal is checked and a wrong one fails.
  Channel binding (SCRAM-SHA-256-PLUS) is not implemented: we send the "n" GS2 flag, and a
  server that offers only SCRAM-SHA-256-PLUS is refused with a clear error.
Kerberos, GSSAPI and SSPI are refused with a clear error.

Rules of this module: never put a password, a salted password or a key in an exception
message, a repr or a log; compare signatures in constant time; never trust the server's
iteration count beyond `max_scram_iterations`; no I/O and no clocks.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import secrets
import stringprep
import unicodedata

from dataplane.postgres import messages as m
from dataplane.postgres.errors import (
    INVALID_AUTHORIZATION_SPECIFICATION,
    SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
)

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
DEFAULT_MAX_SCRAM_ITERATIONS = 1_000_000  # PostgreSQL's default is 4096


class AuthenticationError(Exception):
    """Logging in to the server failed; the message says why and what to do next."""

    sqlstate: str = SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION


class AuthenticationRejected(AuthenticationError):
    """The server answered with an ErrorResponse (e.g. 28P01 wrong password)."""

    def __init__(self, error: m.ErrorResponse) -> None:
        self.error = error
        self.sqlstate = error.sqlstate or INVALID_AUTHORIZATION_SPECIFICATION
        super().__init__(
            f"the server refused the login: {error.message} (SQLSTATE {error.sqlstate})"
        )


class PasswordRequired(AuthenticationError):
    """The server asks for a password and none is configured."""


class UnsupportedAuthentication(AuthenticationError):
    """The server asks for a method we do not implement (Kerberos, GSSAPI, SSPI, -PLUS)."""


class ServerVerificationFailed(AuthenticationError):
    """The server did not prove it knows the password (SCRAM), or broke the SCRAM exchange."""


class _State(enum.Enum):
    WAITING = "waiting for an authentication request"
    PASSWORD_SENT = "password sent"  # noqa: S105 (a state name, not a password)
    SCRAM_FIRST_SENT = "SCRAM client-first-message sent"
    SCRAM_FINAL_SENT = "SCRAM client-final-message sent"
    SCRAM_VERIFIED = "SCRAM server signature verified"
    DONE = "authenticated"


def saslprep(password: str) -> bytes:
    """The password bytes SCRAM hashes, prepared the way PostgreSQL prepares them.

    ASCII passwords are used as they are. Others go through SASLprep (RFC 4013: map, NFKC,
    prohibit, bidi check); a password SASLprep refuses is used as its raw UTF-8 bytes, which
    is what the server does too, so both sides always agree.
    """
    if password.isascii():
        return password.encode()
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    text = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_a1,
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    if not text or any(check(ch) for ch in text for check in prohibited):
        return password.encode("utf-8", "surrogateescape")
    if any(stringprep.in_table_d1(ch) for ch in text) and (
        any(stringprep.in_table_d2(ch) for ch in text)
        or not stringprep.in_table_d1(text[0])
        or not stringprep.in_table_d1(text[-1])
    ):
        return password.encode("utf-8", "surrogateescape")
    return text.encode("utf-8")


def md5_password(user: str, password: str, salt: bytes) -> str:
    """PostgreSQL's MD5 response: "md5" + hex(md5(hex(md5(password + user)) + salt))."""
    inner = hashlib.md5(password.encode() + user.encode(), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest()
    return "md5" + outer


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def _scram_name(user: str) -> str:
    return user.replace("=", "=3D").replace(",", "=2C")


class ClientAuthenticator:
    """Answers a server's authentication requests for one login.

    Feed it every backend message that arrives after the StartupMessage with `receive()` and
    send what it returns, until `done`. The messages after AuthenticationOk (ParameterStatus,
    BackendKeyData, ReadyForQuery) are the caller's. `method` says how we logged in:
    "trust" (no password asked: trust or certificate), "password", "md5" or "scram-sha-256".
    """

    def __init__(
        self,
        user: str,
        password: str | None,
        *,
        nonce: str | None = None,
        max_scram_iterations: int = DEFAULT_MAX_SCRAM_ITERATIONS,
    ) -> None:
        if nonce is not None and (
            not nonce or "," in nonce or not all(0x21 <= ord(c) <= 0x7E for c in nonce)
        ):
            raise ValueError("a SCRAM nonce is printable ASCII without commas")
        self.user = user
        self._password = password
        self._nonce = nonce
        self.max_scram_iterations = max_scram_iterations
        self.method: str | None = None
        self._state = _State.WAITING
        self._client_first_bare = ""
        self._server_signature = b""

    def __repr__(self) -> str:
        return (
            f"ClientAuthenticator(user={self.user!r}, method={self.method!r}, "
            f"state={self._state.value!r})"
        )

    @property
    def done(self) -> bool:
        """AuthenticationOk arrived (and, for SCRAM, the server proved itself)."""
        return self._state is _State.DONE

    def receive(self, message: m.BackendMessage) -> list[m.FrontendMessage]:
        """Take one backend message; return the frontend messages to send in answer."""
        if isinstance(message, m.ErrorResponse):
            raise AuthenticationRejected(message)
        if isinstance(message, m.NoticeResponse | m.NegotiateProtocolVersion):
            return []
        if self._state is _State.DONE:
            raise AuthenticationError(
                f"authentication is finished; {type(message).__name__} is for the caller"
            )
        if isinstance(message, m.AuthenticationOk):
            return self._ok()
        if isinstance(
            message,
            m.AuthenticationKerberosV5 | m.AuthenticationGSS | m.AuthenticationGSSContinue,
        ):
            raise self._unsupported("Kerberos/GSSAPI")
        if isinstance(message, m.AuthenticationSSPI):
            raise self._unsupported("SSPI")
        if isinstance(
            message,
            m.AuthenticationCleartextPassword | m.AuthenticationMD5Password | m.AuthenticationSASL,
        ):
            if self._state is not _State.WAITING:
                raise ServerVerificationFailed(
                    f"the server asked for authentication again ({type(message).__name__}) "
                    f"after {self._state.value}; refusing to go on"
                )
            password = self._need_password(message)
            if isinstance(message, m.AuthenticationCleartextPassword):
                self.method = "password"
                self._state = _State.PASSWORD_SENT
                return [m.PasswordMessage(password)]
            if isinstance(message, m.AuthenticationMD5Password):
                self.method = "md5"
                self._state = _State.PASSWORD_SENT
                return [m.PasswordMessage(md5_password(self.user, password, message.salt))]
            return [self._scram_first(message)]
        if isinstance(message, m.AuthenticationSASLContinue):
            if self._state is not _State.SCRAM_FIRST_SENT:
                raise ServerVerificationFailed(
                    f"unexpected AuthenticationSASLContinue after {self._state.value}"
                )
            return [self._scram_final(message.data)]
        if isinstance(message, m.AuthenticationSASLFinal):
            if self._state is not _State.SCRAM_FINAL_SENT:
                raise ServerVerificationFailed(
                    f"unexpected AuthenticationSASLFinal after {self._state.value}"
                )
            self._scram_verify(message.data)
            return []
        raise AuthenticationError(
            f"unexpected {type(message).__name__} from the server during authentication "
            f"({self._state.value})"
        )

    # ------------------------------------------------------------------ helpers

    def _ok(self) -> list[m.FrontendMessage]:
        if self._state in (_State.SCRAM_FIRST_SENT, _State.SCRAM_FINAL_SENT):
            raise ServerVerificationFailed(
                "the server accepted the login without finishing SCRAM, so it never proved "
                "it knows the password; refusing the connection (is something between us "
                "and the server impersonating it?)"
            )
        if self.method is None:
            self.method = "trust"
        self._state = _State.DONE
        return []

    def _unsupported(self, what: str) -> UnsupportedAuthentication:
        return UnsupportedAuthentication(
            f"the server asks database user {self.user!r} to authenticate with {what}, which "
            "is not supported; configure pg_hba.conf for this user with cert, scram-sha-256, "
            "md5 or password"
        )

    def _need_password(self, message: m.BackendMessage) -> str:
        if self._password is None:
            method = {
                m.AuthenticationCleartextPassword: "password",
                m.AuthenticationMD5Password: "md5",
            }.get(type(message), "SCRAM-SHA-256")
            raise PasswordRequired(
                f"the server asks for a password ({method}) for database user {self.user!r}, "
                "but none is configured; configure one for this database, or use certificate "
                "authentication (hostssl ... cert in pg_hba.conf)"
            )
        return self._password

    def _scram_first(self, message: m.AuthenticationSASL) -> m.SASLInitialResponse:
        if SCRAM_SHA_256 not in message.mechanisms:
            if SCRAM_SHA_256_PLUS in message.mechanisms:
                raise UnsupportedAuthentication(
                    "the server requires SCRAM-SHA-256-PLUS (channel binding), which is not "
                    "supported; allow plain scram-sha-256 for this user on the server"
                )
            offered = ", ".join(message.mechanisms) or "none"
            raise UnsupportedAuthentication(
                f"the server offers SASL mechanisms {offered}, none of which is supported "
                "(only SCRAM-SHA-256 is)"
            )
        self.method = "scram-sha-256"
        nonce = self._nonce or secrets.token_urlsafe(18)
        self._nonce = nonce
        self._client_first_bare = f"n={_scram_name(self.user)},r={nonce}"
        self._state = _State.SCRAM_FIRST_SENT
        return m.SASLInitialResponse(SCRAM_SHA_256, ("n,," + self._client_first_bare).encode())

    def _scram_final(self, data: bytes) -> m.SASLResponse:
        try:
            server_first = data.decode("ascii")
        except UnicodeDecodeError:
            raise ServerVerificationFailed(
                "the server's SCRAM server-first-message is not ASCII"
            ) from None
        parts = server_first.split(",")
        if parts and parts[0].startswith("m="):
            raise ServerVerificationFailed(
                "the server's SCRAM message asks for an unsupported extension (m=)"
            )
        if len(parts) < 3 or not (
            parts[0].startswith("r=") and parts[1].startswith("s=") and parts[2].startswith("i=")
        ):
            raise ServerVerificationFailed(
                "malformed SCRAM server-first-message: expected r=...,s=...,i=..."
            )
        nonce, salt_b64, iterations_text = parts[0][2:], parts[1][2:], parts[2][2:]
        if not nonce.startswith(self._nonce or "") or len(nonce) <= len(self._nonce or ""):
            raise ServerVerificationFailed(
                "the server's SCRAM nonce does not extend ours; refusing a replayed or "
                "forged exchange"
            )
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ServerVerificationFailed("the server's SCRAM salt is not valid base64") from None
        if not iterations_text.isdigit() or len(iterations_text) > 10:
            raise ServerVerificationFailed("the server's SCRAM iteration count is not a number")
        iterations = int(iterations_text)
        if not 1 <= iterations <= self.max_scram_iterations:
            raise ServerVerificationFailed(
                f"the server's SCRAM iteration count {iterations} is outside 1..."
                f"{self.max_scram_iterations}; raise max_scram_iterations if this is intended"
            )
        password = self._need_password(m.AuthenticationSASL((SCRAM_SHA_256,)))
        salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        final_bare = f"c=biws,r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first},{final_bare}".encode()
        signature = _hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        self._state = _State.SCRAM_FINAL_SENT
        return m.SASLResponse(f"{final_bare},p={base64.b64encode(proof).decode()}".encode())

    def _scram_verify(self, data: bytes) -> None:
        text = data.decode("ascii", "replace")
        if text.startswith("e="):
            raise ServerVerificationFailed(f"the server ended SCRAM with error {text[2:80]!r}")
        attribute = text.split(",")[0]
        if not attribute.startswith("v="):
            raise ServerVerificationFailed("malformed SCRAM server-final-message: expected v=...")
        try:
            signature = base64.b64decode(attribute[2:], validate=True)
        except (binascii.Error, ValueError):
            signature = b""
        if not hmac.compare_digest(signature, self._server_signature):
            raise ServerVerificationFailed(
                "the server's SCRAM signature is wrong: it does not know this user's password; "
                "refusing the connection (check that the agent talks to the right server)"
            )
        self._state = _State.SCRAM_VERIFIED

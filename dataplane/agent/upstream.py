"""The agent's connection to PostgreSQL: TLS, the db user's client certificate, the login.

`UpstreamConnector.connect(spec, db_user, db_name, parameters)`:
1. TCP to the database's `uri`, SSLRequest; a server that answers anything but `S` is
   refused (teleport-db never speaks plain text to a database);
2. TLS verify-full (verify-ca when the spec says so: the chain, not the host name) against
   the spec's `ca_cert_file`, else the db CAs that came with the client certificate, else
   the bundle's db CAs; the client certificate (CN = db user) from `DbClientCertsLike`;
3. StartupMessage with the user, the database and the client's other parameters;
4. `ClientAuthenticator` answers whatever the server asks (nothing for certificate
   authentication; cleartext, MD5 or SCRAM with the `password_provider`'s password);
5. collects ParameterStatus, BackendKeyData and the first ReadyForQuery.
A server ErrorResponse (unknown role, no such database, too many connections) comes back
unchanged in `UpstreamError.error`, for the client to see exactly what PostgreSQL said;
our own failures are FATAL errors that say what failed and what to check. For a database
with an AWS region (RDS/Aurora, IAM tokens from `dataplane.aws`), its settings are checked
before dialling, and a refused token comes back with what to check (`rds_iam`, the IAM
policy); the provider's problems (no AWS credentials, a wrong region) keep their hint.

`cancel(spec, db_user, key)` sends a CancelRequest the way libpq does, over TLS.

SSL contexts are cached per database and client certificate (building one costs far more
than a handshake). Never: fall back to plain text or to skipping verification, put a
password in an error or a log, or buffer more than `MAX_LOGIN_MESSAGE` per message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from dataplane.agent.interfaces import DbClientCertsLike, PasswordProvider
from dataplane.aws import AwsAuthError, explain_upstream_auth_failure, preflight
from dataplane.postgres import (
    BACKEND,
    ClientAuthenticator,
    MessageDecoder,
    PasswordRequired,
    ProtocolError,
    encode,
    fatal,
)
from dataplane.postgres import messages as m
from dataplane.postgres.auth import AuthenticationError, AuthenticationRejected
from dataplane.postgres.errors import (
    INVALID_AUTHORIZATION_SPECIFICATION,
    SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
)
from dataplane.relay import ConnectionClosed, Inbox
from dataplane.tls_transport import TlsHandshakeFailed, connect_tls
from schemas.bundle import Bundle, BundleDatabase
from transport.tls import client_context

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
CANCEL_TIMEOUT = 5.0
MAX_LOGIN_MESSAGE = 1024 * 1024
_CACHE_LIMIT = 256


class UpstreamError(Exception):
    """Connecting or logging in to the database failed. `error` is what the client sees."""

    def __init__(self, error: m.ErrorResponse, from_server: bool = False) -> None:
        super().__init__(error.message or "the database connection failed")
        self.error = error
        self.from_server = from_server


def split_uri(uri: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, `host` (port 5432), optionally `postgres://` in front."""
    text = uri.strip()
    for scheme in ("postgres://", "postgresql://"):
        if text.startswith(scheme):
            text = text[len(scheme) :].split("/", 1)[0].rsplit("@", 1)[-1]
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host or (port and not port.isdigit()):
        raise ValueError(f"database uri {uri!r} is not host:port")
    return host, int(port or 5432)


@dataclass
class Upstream:
    """A logged-in server connection, ready to relay."""

    transport: asyncio.Transport
    inbox: Inbox
    server_key: m.BackendKeyData | None
    greeting: list[m.ParameterStatus | m.NoticeResponse] = field(default_factory=list)
    status: str = "I"
    pending: bytes = b""
    method: str = ""
    opened_at: float = 0.0  # loop time of the login (kept connections: of their first)
    generation: int = 0  # the agent's ServerReuse.generation at the login


def _explained(spec: BundleDatabase, db_user: str, error: m.ErrorResponse) -> m.ErrorResponse:
    """An RDS/Aurora refusal of the IAM token, with what to check (rds_iam, the IAM policy)."""
    if spec.aws_region is None:
        return error
    explained = explain_upstream_auth_failure(spec.name, db_user, error, region=spec.aws_region)
    if explained is None:
        return error
    message, hint = explained
    return fatal(error.sqlstate or INVALID_AUTHORIZATION_SPECIFICATION, message, hint=hint)


def _fail(message: str, hint: str | None = None) -> UpstreamError:
    return UpstreamError(fatal(SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION, message, hint=hint))


class UpstreamConnector:
    """Opens logged-in connections to the databases an agent serves."""

    def __init__(
        self,
        db_certs: DbClientCertsLike,
        *,
        password_provider: PasswordProvider | None = None,
        bundle: Callable[[], Bundle | None] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.db_certs = db_certs
        self.password_provider = password_provider
        self._bundle = bundle  # () -> Bundle | None: the bundle's db CAs as a last resort
        self.connect_timeout = connect_timeout
        self._contexts: dict[tuple[object, ...], ssl.SSLContext] = {}

    async def ssl_context(self, spec: BundleDatabase, db_user: str) -> ssl.SSLContext:
        try:
            cert = await self.db_certs.get(db_user)
        except LookupError as exc:  # DbClientCertsLike: no usable certificate, and why
            raise _fail(
                str(exc),
                "start the control plane again; database users the agent already holds a "
                "certificate for keep working meanwhile",
            ) from None
        verify_full = spec.tls_mode != "verify-ca"
        if spec.ca_cert_file:
            cas: tuple[bytes | str, ...] = (spec.ca_cert_file,)
        elif cert.db_cas:
            cas = tuple(cert.db_cas)
        else:
            bundle: Bundle | None = self._bundle() if self._bundle else None
            cas = tuple(pem.encode() for pem in bundle.cas.db) if bundle else ()
        if not cas:
            raise _fail(
                f"no CA is known to verify database {spec.name!r}",
                "set ca_cert_file for this database, or make sure the bundle carries the "
                "cluster's db CA",
            )
        key = (spec.name, verify_full, cas, cert.cert_pem, cert.key_pem)
        ctx = self._contexts.get(key)
        if ctx is None:
            try:
                ctx = client_context(
                    list(cas),
                    cert.cert_pem,
                    cert.key_pem,
                    check_hostname=verify_full,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise _fail(
                    f"cannot set up TLS for database {spec.name!r}: {exc}",
                    "check ca_cert_file and the database client certificate",
                ) from None
            if len(self._contexts) >= _CACHE_LIMIT:
                self._contexts.pop(next(iter(self._contexts)))
            self._contexts[key] = ctx
        return ctx

    async def _open_tls(
        self, spec: BundleDatabase, db_user: str
    ) -> tuple[asyncio.Transport, Inbox]:
        loop = asyncio.get_running_loop()
        try:
            host, port = split_uri(spec.uri)
        except ValueError as exc:
            raise _fail(str(exc), "fix the database's uri") from None
        ctx = await self.ssl_context(spec, db_user)
        inbox = Inbox(limit=4 * MAX_LOGIN_MESSAGE)
        try:
            transport, _ = await loop.create_connection(lambda: inbox, host, port)
        except OSError as exc:
            raise _fail(
                f"could not connect to database {spec.name!r} at {spec.uri}: "
                f"{exc.strerror or exc}",
                "check that the database is running and reachable from the db agent",
            ) from None
        try:
            inbox.write(encode(m.SSLRequest()))
            answer = await inbox.receive()
            if answer[:1] != b"S":
                raise _fail(
                    f"database {spec.name!r} at {spec.uri} does not accept TLS",
                    "teleport-db connects to databases only over TLS: enable ssl on the server",
                )
            if len(answer) > 1:
                raise _fail(f"database {spec.name!r} sent bytes before the TLS handshake")
            try:
                tls = await connect_tls(transport, inbox, ctx, host)
            except TlsHandshakeFailed as exc:
                raise _fail(
                    f"TLS with database {spec.name!r} at {spec.uri} failed: {exc.reason}",
                    "check the database's certificate against ca_cert_file (or the cluster's "
                    "db CA) and its host name"
                    + ("" if spec.tls_mode == "verify-ca" else " (verify-full)"),
                ) from None
            inbox.transport = tls
            return tls, inbox
        except BaseException:
            transport.abort()
            raise

    async def connect(
        self,
        spec: BundleDatabase,
        db_user: str,
        db_name: str,
        parameters: Mapping[str, str],
    ) -> Upstream:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self._connect(spec, db_user, db_name, parameters)
        except TimeoutError:
            raise _fail(
                f"database {spec.name!r} at {spec.uri} did not complete the login within "
                f"{self.connect_timeout:g} s",
                "check that the database is up and not overloaded",
            ) from None
        except ConnectionClosed:
            raise _fail(
                f"database {spec.name!r} at {spec.uri} closed the connection during the login",
                "the server log says why (pg_hba.conf, certificate, max_connections)",
            ) from None
        except ProtocolError as exc:
            raise _fail(f"database {spec.name!r} broke the protocol during the login: {exc}") \
                from None

    async def _connect(
        self,
        spec: BundleDatabase,
        db_user: str,
        db_name: str,
        parameters: Mapping[str, str],
    ) -> Upstream:
        aws_problem = preflight(spec)  # RDS settings wrong: say so before dialling
        if aws_problem is not None:
            raise UpstreamError(aws_problem.error_response())
        transport, inbox = await self._open_tls(spec, db_user)
        try:
            startup = {"user": db_user, "database": db_name, **parameters}
            inbox.write(encode(m.StartupMessage(startup)))
            auth = ClientAuthenticator(db_user, None)
            reader = MessageDecoder(BACKEND, max_message_size=MAX_LOGIN_MESSAGE)
            up = Upstream(transport, inbox, None, opened_at=asyncio.get_running_loop().time())
            while True:
                message = await inbox.next_message(reader)
                if not auth.done:
                    try:
                        answers = auth.receive(message)
                    except PasswordRequired:
                        password = await self._password(spec, db_user)
                        auth = ClientAuthenticator(db_user, password)
                        answers = auth.receive(message)
                    if answers:
                        inbox.write(b"".join(encode(a) for a in answers))
                    continue
                if isinstance(message, m.ErrorResponse):
                    raise UpstreamError(message, from_server=True)
                if isinstance(message, m.ParameterStatus | m.NoticeResponse):
                    up.greeting.append(message)
                elif isinstance(message, m.BackendKeyData):
                    up.server_key = message
                elif isinstance(message, m.ReadyForQuery):
                    up.status = message.status
                    up.pending = reader.take_unprocessed() + inbox.take()
                    up.method = auth.method or ""
                    return up
                elif isinstance(message, m.NegotiateProtocolVersion):
                    continue
                else:
                    raise _fail(
                        f"database {spec.name!r} sent {type(message).__name__} during the login"
                    )
        except AuthenticationRejected as exc:
            transport.abort()
            raise UpstreamError(_explained(spec, db_user, exc.error), from_server=True) from None
        except AuthenticationError as exc:
            transport.abort()
            raise UpstreamError(
                fatal(exc.sqlstate, f"logging in to database {spec.name!r} failed: {exc}")
            ) from None
        except BaseException:
            transport.abort()
            raise

    async def _password(self, spec: BundleDatabase, db_user: str) -> str | None:
        if self.password_provider is None:
            return None
        try:
            return await self.password_provider(spec.name, db_user)
        except AwsAuthError as exc:  # no AWS credentials, a wrong region: message and hint
            raise UpstreamError(exc.error_response()) from None
        except Exception as exc:
            raise _fail(
                f"could not get a password for db user {db_user!r} on database {spec.name!r}: "
                f"{type(exc).__name__}",
                "check the agent's credentials for this database (for RDS: its IAM role)",
            ) from None

    async def cancel(self, spec: BundleDatabase, db_user: str, key: m.BackendKeyData) -> None:
        """Ask the server to cancel the query of the backend with `key` (best effort)."""
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                transport, inbox = await self._open_tls(spec, db_user)
                try:
                    inbox.write(encode(m.CancelRequest(key.process_id, key.secret_key)))
                    while True:  # the server closes the connection when done
                        await inbox.receive()
                except ConnectionClosed:
                    pass
                finally:
                    transport.close()
        except (TimeoutError, UpstreamError, OSError) as exc:
            logger.warning("cancel on database %s failed: %s", spec.name, exc)

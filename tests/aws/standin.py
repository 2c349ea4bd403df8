"""A small stand-in for an AWS RDS PostgreSQL endpoint with IAM authentication, for tests.

There is no AWS here. `RdsStandIn` plays the one part of RDS that the agent's IAM login
depends on, and relays everything else to a real PostgreSQL:

1. it listens on loopback, answers SSLRequest with `S` and completes TLS with a server
   certificate from a test CA (the "RDS root CA" the agent is given as `ca_cert_file`);
   a client that does not ask for TLS is refused, as RDS with `rds.force_ssl` does;
2. on a StartupMessage it asks for a cleartext password (AuthenticationCleartextPassword),
   as RDS does for a user granted `rds_iam`;
3. it checks the password with `tests.aws.iamtoken.verify_token`: a SigV4 token for ITS
   `host:port`, the StartupMessage's user, its region, service `rds-db`, signed by
   credentials it was told to trust (signature recomputed with botocore), not expired.
   A bad token gets what RDS answers: FATAL 28000 `PAM authentication failed for user
   "alice"`, and the connection is closed;
4. with a good token it logs in to the real PostgreSQL itself (TLS verify-full, the
   client certificate of that user from the test PKI), sends the client AuthenticationOk
   and the server's ParameterStatus, BackendKeyData and ReadyForQuery, then copies bytes
   both ways until one side closes. A CancelRequest is passed on to the real server.

Every login attempt is recorded in `attempts` (user, database, outcome: "accepted" or the
rejection reason), so tests say which check refused a token, not only that psql failed.

What it does not imitate: RDS's own IAM policy evaluation (whether the signing identity
is allowed `rds-db:connect` on that resource), `rds_iam` membership, and AWS clock-skew
rules beyond a 5-minute allowance. Test scaffolding only; never imported by the product.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from botocore.credentials import Credentials

from dataplane.postgres import (
    BACKEND,
    FRONTEND,
    ClientAuthenticator,
    MessageDecoder,
    ProtocolError,
    StartupDecoder,
    encode,
    fatal,
)
from dataplane.postgres import messages as m
from dataplane.postgres.auth import AuthenticationError, AuthenticationRejected
from dataplane.postgres.errors import INVALID_AUTHORIZATION_SPECIFICATION, PROTOCOL_VIOLATION
from tests.aws.iamtoken import TokenRejected, verify_token
from transport.tls import client_context, server_context

LOGIN_TIMEOUT = 15.0
CHUNK = 64 * 1024


@dataclass(frozen=True)
class RealPostgres:
    """The PostgreSQL behind the stand-in: where to dial, the name in its certificate, the
    CA that signs it, and each db user's client certificate files (cert, key)."""

    host: str
    port: int
    server_hostname: str
    ca_file: Path
    client_cert: Callable[[str], tuple[Path, Path]]


@dataclass(frozen=True)
class Attempt:
    """One login: `outcome` is "accepted", a `TokenRejected.reason`, or "no-tls"."""

    db_user: str
    database: str
    outcome: str
    detail: str = ""


class RdsStandIn:
    """An RDS-like endpoint at `hostname:port` (port chosen on `start()`) in `region`."""

    def __init__(
        self,
        *,
        cert_file: Path,
        key_file: Path,
        region: str,
        trusted: Iterable[Credentials],
        upstream: RealPostgres,
        hostname: str = "localhost",
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.region = region
        self.trusted = {c.access_key: c for c in trusted}
        self.upstream = upstream
        self.hostname = hostname
        self.now = now
        self.attempts: list[Attempt] = []
        self._server_ctx = server_context(str(cert_file), str(key_file))
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def endpoint(self) -> str:
        """`host:port` as a database's uri names it (and as tokens must be signed for)."""
        return f"{self.hostname}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> RdsStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- one connection

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # close() cancels the connections still open
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            async with asyncio.timeout(LOGIN_TIMEOUT):
                upstream = await self._login(reader, writer)
            if upstream is not None:
                await _relay(reader, writer, *upstream)
        except (OSError, ssl.SSLError, ProtocolError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()

    async def _login(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        startup = StartupDecoder()
        tls = False
        while True:
            packet = startup.next_message()
            if packet is None:
                data = await reader.read(CHUNK)
                if not data:
                    return None
                startup.receive_data(data)
                continue
            if isinstance(packet, m.SSLRequest) and not tls:
                writer.write(b"S")
                await writer.drain()
                await writer.start_tls(self._server_ctx)
                tls = True
            elif isinstance(packet, m.GSSENCRequest):
                writer.write(b"N")
                await writer.drain()
            elif isinstance(packet, m.CancelRequest):
                await self._cancel(packet)
                return None
            elif isinstance(packet, m.StartupMessage):
                break
            else:
                raise ProtocolError(f"unexpected {type(packet).__name__}")

        params = dict(packet.parameters)
        user = params.get("user", "")
        database = params.get("database", user)
        if not tls:
            self.attempts.append(Attempt(user, database, "no-tls"))
            await _refuse(
                writer,
                f'no pg_hba.conf entry for host "127.0.0.1", user "{user}", '
                f'database "{database}", SSL off',
            )
            return None

        writer.write(encode(m.AuthenticationCleartextPassword()))
        await writer.drain()
        frontend = MessageDecoder(FRONTEND)
        frontend.receive_data(startup.take_unprocessed())
        answer = frontend.next_message()
        while answer is None:
            data = await reader.read(CHUNK)
            if not data:
                return None
            frontend.receive_data(data)
            answer = frontend.next_message()
        if not isinstance(answer, m.PasswordMessage) or frontend.buffered:
            await _refuse(writer, "expected a password response", PROTOCOL_VIOLATION)
            return None
        try:
            verify_token(
                answer.password,
                host=self.hostname,
                port=self.port,
                db_user=user,
                region=self.region,
                trusted=self.trusted,
                now=self.now(),
            )
        except TokenRejected as exc:
            self.attempts.append(Attempt(user, database, exc.reason, exc.detail))
            await _refuse(writer, f'PAM authentication failed for user "{user}"')
            return None
        self.attempts.append(Attempt(user, database, "accepted"))
        return await self._upstream_login(params, writer)

    async def _open_upstream(
        self, ctx: ssl.SSLContext
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        up = self.upstream
        reader, writer = await asyncio.open_connection(up.host, up.port)
        try:
            writer.write(encode(m.SSLRequest()))
            await writer.drain()
            if await reader.readexactly(1) != b"S":
                raise ProtocolError("the real PostgreSQL does not accept TLS")
            await writer.start_tls(ctx, server_hostname=up.server_hostname)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def _upstream_login(
        self, params: dict[str, str], client: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        up = self.upstream
        user = params.get("user", "")
        cert, key = up.client_cert(user)
        ctx = client_context([str(up.ca_file)], str(cert), str(key))
        reader, writer = await self._open_upstream(ctx)
        writer.write(encode(m.StartupMessage(params)))
        await writer.drain()
        backend = MessageDecoder(BACKEND)
        auth = ClientAuthenticator(user, None)
        while True:
            message = backend.next_message()
            if message is None:
                data = await reader.read(CHUNK)
                if not data:
                    raise ConnectionResetError("the real PostgreSQL closed during the login")
                backend.receive_data(data)
                continue
            if not auth.done:
                try:
                    auth.receive(message)
                except AuthenticationRejected as exc:
                    client.write(encode(exc.error))  # what PostgreSQL said, as RDS relays it
                    await client.drain()
                    writer.close()
                    return None
                except AuthenticationError as exc:
                    await _refuse(client, f"the stand-in could not log in upstream: {exc}")
                    writer.close()
                    return None
                if auth.done:
                    client.write(encode(m.AuthenticationOk()))
                continue
            client.write(encode(message))
            if isinstance(message, m.ErrorResponse):
                await client.drain()
                writer.close()
                return None
            if isinstance(message, m.ReadyForQuery):
                while backend.buffered:
                    more = backend.next_message()
                    if more is None:
                        raise ProtocolError("a partial message followed ReadyForQuery")
                    client.write(encode(more))
                await client.drain()
                return reader, writer

    async def _cancel(self, request: m.CancelRequest) -> None:
        ctx = client_context([str(self.upstream.ca_file)])
        _, writer = await self._open_upstream(ctx)
        writer.write(encode(request))
        await writer.drain()
        writer.close()


async def _refuse(
    writer: asyncio.StreamWriter,
    message: str,
    sqlstate: str = INVALID_AUTHORIZATION_SPECIFICATION,
) -> None:
    writer.write(encode(fatal(sqlstate, message)))
    await writer.drain()


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    server_reader: asyncio.StreamReader,
    server_writer: asyncio.StreamWriter,
) -> None:
    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()

    tasks = [
        asyncio.ensure_future(copy(client_reader, server_writer)),
        asyncio.ensure_future(copy(server_reader, client_writer)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

"""The PostgreSQL engine of the db agent: authorize a forwarded session, log in, relay.

`PostgresEngine.serve(client, start)` runs one session handed over by a proxy (through the
tunnel, or in-process in the all-in-one):
1. refuse at once (`ack` with retry) what another agent might serve: no bundle in force,
   a database not served here, shutting down; otherwise accept (`ack`);
2. verify the client's certificate itself (`verify_identity` against the user CAs of the
   bundle in force, expiry, cluster), the route against the database and the startup
   (`resolve_target`), then RBAC with `schemas.rbac.decide` (labels static + dynamic,
   roles from the certificate). A refusal is a FATAL ErrorResponse, SQLSTATE 28000, whose
   message says what was denied and why;
3. log in to PostgreSQL (`UpstreamConnector`), or take a server connection an earlier
   session of the same person left clean (`ServerReuse`, dataplane/agent/reuse.py); a
   server error reaches the client unchanged;
4. greet the client as a server would (AuthenticationOk, the server's ParameterStatus,
   BackendKeyData with the server's process id and the proxy's secret, ReadyForQuery) in
   one write, and start the relay with scanners feeding the audit `SessionRecorder`.

`recheck(bundle)` re-decides every live session against a newly activated bundle and
terminates those no longer allowed; with `disconnect_expired_cert` a session also ends
when its certificate expires; with the proxy's `client_idle_timeout` (in SessionStart) a
session whose client sent nothing for that long ends (FATAL 57P05, audited).
`cancel(pid, secret)` cancels the running query of the session with that client key on
the real server, with the server's own key.

Never: relay a byte before the decision allowed the session, take a decision with
anything but `schemas.rbac.decide`, or tell a client with a wrong cancel key anything.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from dataplane.agent.audit import (
    CLIENT_CAPTURE,
    CLIENT_REPORT,
    SERVER_CAPTURE,
    SERVER_REPORT,
    SessionRecorder,
)
from dataplane.agent.interfaces import AuditSink, DatabasesLike
from dataplane.agent.reuse import ReuseKey, ServerReuse, reuse_key
from dataplane.agent.sessions import Session, SessionRegistry
from dataplane.agent.upstream import Upstream, UpstreamConnector, UpstreamError
from dataplane.postgres import MessageScanner, encode, fatal
from dataplane.postgres import messages as m
from dataplane.postgres.errors import (
    ADMIN_SHUTDOWN,
    IDLE_SESSION_TIMEOUT,
    INVALID_AUTHORIZATION_SPECIFICATION,
    TOO_MANY_CONNECTIONS,
)
from dataplane.relay import Inbox, Relay
from dataplane.tunnel.frames import BackendKey, FrameError, SessionStart
from dataplane.tunnel.hosts import BundleSourceLike, IdentityCache
from dataplane.tunnel.routing import TargetRefused, resolve_target, upstream_parameters
from schemas.bundle import Bundle, BundleDatabase
from schemas.durations import format_duration
from schemas.identity import (
    Identity,
    IdentityError,
    common_name,
    load_certificates,
    verify_identity,
)
from schemas.rbac import AccessRequest, decide

logger = logging.getLogger(__name__)

AckFn = Callable[[bool, str, bool], None]


class ClientSide:
    """The client end of a session at the agent: a tunnel data connection, or in the
    all-in-one the client's own TLS connection handed over by the proxy."""

    def __init__(
        self,
        transport: asyncio.Transport,
        inbox: Inbox,
        ack: AckFn,
        take_pending: Callable[[], bytes],
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self.transport = transport
        self.inbox = inbox
        self.ack = ack
        self.take_pending = take_pending
        self.on_end = on_end

    def refuse(self, error: m.ErrorResponse) -> None:
        if not self.transport.is_closing():
            self.transport.write(encode(error))
            self.transport.close()
        self.finish()

    def finish(self) -> None:
        """The session is over (or never started): tell whoever handed it over, once."""
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class PostgresEngine:
    """Serves PostgreSQL sessions for the databases of one agent."""

    protocol = "postgres"

    def __init__(
        self,
        *,
        host_id: str,
        bundles: BundleSourceLike,
        databases: DatabasesLike,
        connector: UpstreamConnector,
        audit: AuditSink | None,
        registry: SessionRegistry | None = None,
        now: Callable[[], datetime] | None = None,
        reuse: ServerReuse | None = None,
    ) -> None:
        self.host_id = host_id
        self.bundles = bundles
        self.databases = databases
        self.connector = connector
        self.audit = audit
        self.registry = registry if registry is not None else SessionRegistry()
        self.reuse = reuse if reuse is not None else ServerReuse(0)
        self._now = now or (lambda: datetime.now(UTC))
        self.closing = False
        self.identities = IdentityCache()
        self._ended = asyncio.Event()
        self._ended.set()

    # -- a new session --------------------------------------------------------------------------

    async def serve(self, client: ClientSide, start: SessionStart) -> None:
        bundle = self.bundles.current
        spec = self.databases.served().get(start.service)
        if self.closing:
            client.ack(False, f"db agent {self.host_id} is shutting down", True)
            return
        if bundle is None:
            client.ack(False, f"db agent {self.host_id} has no policy bundle in force yet", True)
            return
        if spec is None:
            client.ack(False, f"db agent {self.host_id} does not serve {start.service!r}", True)
            return
        client.ack(True, "", False)
        context: dict[str, Any] = {
            "cluster": bundle.cluster.name,
            "session_id": start.session_id,
            "user": "",
            "roles": [],
            "db_service": start.service,
            "db_name": start.startup.get("database", start.startup.get("user", "")),
            "db_user": start.startup.get("user", ""),
            "client_addr": start.client_addr,
            "agent": self.host_id,
        }

        def refuse(message: str, error: m.ErrorResponse | None = None) -> None:
            logger.info("session %s refused: %s", start.session_id, message)
            if self.audit is not None:
                SessionRecorder(self.audit, context).session_start(False, message)
            client.refuse(
                error or fatal(INVALID_AUTHORIZATION_SPECIFICATION, message)
            )

        now = self._now()
        try:
            der = start.certificate_der()
            identity = self.identities.verify(der, bundle.cas.user, now, "db")
        except (IdentityError, FrameError) as exc:
            context["user"] = _unverified_name(start)
            refuse(f"the client certificate was refused: {exc}")
            return
        context["user"] = identity.username
        context["roles"] = list(identity.roles)
        route = identity.route
        if route is None or route.service != start.service:
            refuse(
                f"the certificate of {identity.username!r} is for database "
                f"{route.service if route else '?'!r}, not {start.service!r}: run "
                f"`tsh db login {start.service}`"
            )
            return
        try:
            db_user, db_name = resolve_target(identity, start.startup)
        except TargetRefused as exc:
            refuse(str(exc))
            return
        context["db_user"], context["db_name"] = db_user, db_name
        decision = decide(bundle, self._request(identity, start.service, db_user, db_name))
        if not decision.allowed:
            refuse(
                f"access denied to {identity.username!r} for database {start.service!r} as db "
                f"user {db_user!r}, db name {db_name!r}: {decision.reason}"
            )
            return

        parameters = upstream_parameters(start.startup)
        key = reuse_key(spec, identity.username, db_user, db_name, parameters)
        try:
            upstream = await self._login(spec, key, db_user, db_name, parameters)
        except UpstreamError as exc:
            reason = str(exc.error) if exc.from_server else str(exc)
            refuse(f"could not log in to the database: {reason}", exc.error)
            return
        if client.transport.is_closing() or client.inbox.closed:
            upstream.transport.abort()
            refuse("the client left before the database login finished")
            return
        latest = self.bundles.current
        if latest is not None and latest is not bundle:
            # A bundle was activated during the login: its re-check did not see this session
            # yet, so decide again under it before the first byte is relayed.
            cas = self.identities.trusted(latest.cas.user) if latest.cas.user else []
            why = self._refusal(latest, cas, identity, der, self._now(), start.service,
                                db_user, db_name)
            if why is not None:
                upstream.transport.abort()
                refuse(
                    f"access denied to {identity.username!r} for database {start.service!r} "
                    f"as db user {db_user!r}, db name {db_name!r}: {why}"
                )
                return
            bundle = latest

        # The client's key: the server's process id (what pg_backend_pid() says, as on a
        # direct connection) with the proxy's secret, never the server's.
        server_pid = upstream.server_key.process_id if upstream.server_key else None
        client_key = BackendKey(
            process_id=server_pid if server_pid is not None else start.backend_key.process_id,
            secret_key=start.backend_key.secret_key,
        )
        greeting = [
            encode(m.AuthenticationOk()),
            *(encode(message) for message in upstream.greeting),
            encode(m.BackendKeyData(client_key.process_id, client_key.secret_key)),
            encode(m.ReadyForQuery(upstream.status)),  # type: ignore[arg-type]
        ]
        client.transport.write(b"".join(greeting))

        recorder = SessionRecorder(self.audit, context) if self.audit is not None else None
        if recorder is not None:
            recorder.session_start(True)
        relay = Relay(
            client.transport,
            upstream.transport,
            client_scanner=(
                MessageScanner(CLIENT_CAPTURE, report=CLIENT_REPORT, side="client")
                if recorder is not None
                else None
            ),
            server_scanner=MessageScanner(
                SERVER_CAPTURE if recorder is not None else b"",
                report=SERVER_REPORT if recorder is not None else b"",
                side="server",
            ),
            on_client_messages=recorder.client_messages if recorder is not None else None,
            on_server_messages=recorder.server_messages if recorder is not None else None,
        )
        session = Session(
            session_id=start.session_id,
            identity=identity,
            certificate=der,
            verified_at=now,
            service=start.service,
            spec=spec,
            db_user=db_user,
            db_name=db_name,
            client_addr=start.client_addr,
            client_key=client_key,
            server_key=upstream.server_key,
            relay=relay,
            recorder=recorder,
            started=asyncio.get_running_loop().time(),
        )
        session.on_end.append(lambda _session: client.finish())
        relay.on_closed = lambda reason: self._ended_session(session, reason)
        if self.reuse.enabled and recorder is not None:
            parameters_now = [g for g in upstream.greeting if isinstance(g, m.ParameterStatus)]
            relay.keep_server = lambda: self._keep_server(
                session, key, parameters_now, upstream.opened_at, upstream.generation
            )
            recorder.on_cluster_command = self.reuse.close_all
        self.registry.add(session)
        self._ended.clear()
        if bundle.cluster.disconnect_expired_cert:
            self._schedule_expiry(session)
        if start.idle_timeout is not None:
            session.idle_timeout = start.idle_timeout
            session.idle_since = asyncio.get_running_loop().time()
            session.idle_timer = asyncio.get_running_loop().call_later(
                start.idle_timeout / 4, self._idle_check, session
            )
        relay.start(
            client.take_pending(),
            upstream.pending,
            client_gone=client.inbox.closed,
            server_gone=upstream.inbox.closed,
        )

    async def _login(
        self, spec: BundleDatabase, key: ReuseKey, db_user: str, db_name: str,
        parameters: dict[str, str],
    ) -> Upstream:
        """A logged-in server connection: a kept one for `key`, else a new login. When the
        database has no connection slot left and we keep some, they are given back first."""
        taken = self.reuse.take(key) if self.reuse.enabled else None
        if taken is not None:
            transport, inbox, kept = taken
            return Upstream(
                transport, inbox, kept.server_key, list(kept.greeting),
                opened_at=kept.opened_at, generation=kept.generation,
            )
        freed = 0
        delay = 0.05
        while True:
            generation = self.reuse.generation
            try:
                upstream = await self.connector.connect(spec, db_user, db_name, parameters)
                upstream.generation = generation
                return upstream
            except UpstreamError as exc:
                full = exc.from_server and exc.error.sqlstate == TOO_MANY_CONNECTIONS
                freed += self.reuse.close_all() if full else 0
                if not full or not freed or delay > 0.5:
                    raise
            await asyncio.sleep(delay)  # the closed connections' server processes exit
            delay *= 2

    def _keep_server(
        self, session: Session, key: ReuseKey, parameters: list[m.ParameterStatus],
        opened_at: float, generation: int,
    ) -> bool:
        """The client ended cleanly: keep its server connection if its session is at rest."""
        recorder = session.recorder
        if session.ending or recorder is None or not recorder.at_rest:
            return False
        return self.reuse.give_back(
            key, session.relay.server, session.server_key, parameters, opened_at, generation
        )

    def _request(
        self, identity: Identity, service: str, db_user: str, db_name: str
    ) -> AccessRequest:
        return AccessRequest(
            username=identity.username,
            database=service,
            labels=dict(self.databases.labels(service)),
            db_user=db_user,
            db_name=db_name,
            cert_roles=list(identity.roles),
        )

    def _ended_session(self, session: Session, reason: str) -> None:
        self.registry.remove(session)
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
        if session.idle_timer is not None:
            session.idle_timer.cancel()
        if session.recorder is not None:
            recorder = session.recorder
            end_reason = session.ending or reason or "client disconnected"
            if not session.ending and recorder.client_terminated:
                end_reason = "client disconnected"
            elif not session.ending and recorder.fatal_from_server:
                end_reason = f"the server ended the session: {recorder.fatal_from_server}"
            session.recorder.session_end(
                session.relay.bytes_from_client, session.relay.bytes_from_server, end_reason
            )
        if not len(self.registry):
            self._ended.set()
        for callback in session.on_end:
            callback(session)

    # -- ending sessions ------------------------------------------------------------------------

    def terminate(
        self,
        session: Session,
        message: str,
        sqlstate: str = ADMIN_SHUTDOWN,
        hint: str | None = None,
    ) -> None:
        """End `session` with a FATAL error the client sees (at the next message boundary)."""
        if session.ending or session.relay.closed:
            return
        session.ending = message
        logger.info("terminating session %s of %s: %s", session.session_id,
                    session.identity.username, message)
        if session.recorder is not None and session.recorder.in_flight and session.server_key:
            # A running query would go on after we close; cancel it on the server.
            loop = asyncio.get_running_loop()
            task = loop.create_task(
                self.connector.cancel(session.spec, session.db_user, session.server_key)
            )
            _background.add(task)
            task.add_done_callback(_background.discard)
        session.relay.terminate(encode(fatal(sqlstate, message, hint=hint)), message)

    def _schedule_expiry(self, session: Session) -> None:
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
        loop = asyncio.get_running_loop()
        delay = (session.identity.expires - self._now()).total_seconds()
        session.expiry_timer = loop.call_later(max(0.0, delay), self._expired, session)

    def _expired(self, session: Session) -> None:
        self.terminate(
            session,
            f"the certificate of {session.identity.username!r} expired at "
            f"{_when(session.identity.expires)}, and the cluster disconnects sessions of "
            "expired certificates",
            INVALID_AUTHORIZATION_SPECIFICATION,
            "run `tsh db login` again and reconnect",
        )

    def _idle_check(self, session: Session) -> None:
        """The idle timer: end the session if the client sent nothing for idle_timeout.
        The relay only counts bytes, so the timer samples the count: when it moved, the
        client counts as silent from now, and the next look comes within a quarter of the
        timeout (a session ends between 1 and 1.25 timeouts after its last byte)."""
        timeout = session.idle_timeout
        session.idle_timer = None
        if timeout is None or session.ending or session.relay.closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if session.relay.bytes_from_client != session.idle_bytes:
            session.idle_bytes = session.relay.bytes_from_client
            session.idle_since = now
        idle = now - session.idle_since
        if idle < timeout:
            session.idle_timer = loop.call_later(
                min(timeout - idle, timeout / 4), self._idle_check, session
            )
            return
        self.terminate(
            session,
            f"terminating connection due to idle-session timeout: the client sent nothing "
            f"for {format_duration(timedelta(seconds=timeout))} (client_idle_timeout)",
            IDLE_SESSION_TIMEOUT,
            "reconnect to go on; ask the cluster admin to raise client_idle_timeout if "
            "sessions must stay idle longer",
        )

    def recheck(self, bundle: Bundle) -> int:
        """Re-decide every live session against `bundle`; returns how many were ended."""
        ended = 0
        cas = self.identities.trusted(bundle.cas.user) if bundle.cas.user else []
        for session in self.registry:
            if session.ending:
                continue
            why = self._still_allowed(session, bundle, cas)
            if why is not None:
                self.terminate(
                    session,
                    f"access to database {session.service!r} as db user {session.db_user!r} "
                    f"was revoked: {why}",
                    INVALID_AUTHORIZATION_SPECIFICATION,
                    f"the policy in force (commit {bundle.commit[:12]}, serial {bundle.serial}) "
                    "no longer allows this session",
                )
                ended += 1
                continue
            if bundle.cluster.disconnect_expired_cert:
                self._schedule_expiry(session)
            elif session.expiry_timer is not None:
                session.expiry_timer.cancel()
                session.expiry_timer = None
        return ended

    def _still_allowed(self, session: Session, bundle: Bundle, cas: list[Any]) -> str | None:
        """None if the session may go on under `bundle`, else why not. The chain must still
        lead to a user CA of the new bundle (a CA rotated out ends its sessions); expiry is
        checked separately, by policy."""
        return self._refusal(bundle, cas, session.identity, session.certificate,
                             session.verified_at, session.service, session.db_user,
                             session.db_name)

    def _refusal(self, bundle: Bundle, cas: list[Any], identity: Identity, certificate: bytes,
                 at: datetime, service: str, db_user: str, db_name: str) -> str | None:
        """Why `identity` (with `certificate`, verified as of `at`) may not use `service`
        as `db_user`/`db_name` under `bundle`, whose user CAs are `cas`; None if it may."""
        if bundle.cluster.name != identity.cluster:
            return f"the bundle in force is for cluster {bundle.cluster.name!r}"
        if service not in self.databases.served():
            return f"this agent no longer serves database {service!r}"
        try:
            verify_identity(certificate, cas, at, "db")
        except IdentityError as exc:
            return f"its certificate is no longer trusted: {exc}"
        decision = decide(bundle, self._request(identity, service, db_user, db_name))
        return None if decision.allowed else decision.reason

    async def cancel(self, process_id: int, secret_key: int) -> bool:
        """Cancel the query of the session with this client key; False (silently) if none."""
        session = self.registry.find_by_key(process_id, secret_key)
        if session is None or session.server_key is None:
            return False
        await self.connector.cancel(session.spec, session.db_user, session.server_key)
        return True

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Refuse new sessions and end the live ones (FATAL 57P01)."""
        self.closing = True
        for session in self.registry:
            self.terminate(session, f"the db agent {self.host_id} is shutting down")
        await self.reuse.shutdown()
        try:
            async with asyncio.timeout(timeout):
                await self._ended.wait()
        except TimeoutError:
            for session in self.registry:
                session.relay.client.abort()
                session.relay.server.abort()


_background: set[asyncio.Task[None]] = set()


def _unverified_name(start: SessionStart) -> str:
    """The name in a refused certificate, for the audit record only (never trusted)."""
    try:
        certs = load_certificates(start.certificate_der())
        name = common_name(certs[0]) if certs else None
    except (IdentityError, FrameError, ValueError):
        name = None
    return f"{name} (unverified)" if name else "(unverified)"


def new_session_id() -> str:
    return str(uuid.uuid4())

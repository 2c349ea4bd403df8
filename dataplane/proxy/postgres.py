"""The proxy's PostgreSQL side: TLS with the client, who it is, where its database is.

For a connection the listener classified as PostgreSQL:
1. startup packets, bounded (10,000 bytes) and timed (`startup_timeout`): SSLRequest is
   answered `S` and TLS starts with the proxy's host certificate, a client certificate
   required and checked against the user CAs of the bundle in force. The handshake runs
   over memory BIOs (`dataplane.tls_transport`) so that OpenSSL's alert reaches psql when
   it refuses the certificate (psql: "SSL error: tlsv1 alert unknown ca"). Before the first bundle
   there is no user CA: TLS then asks for no certificate, and the StartupMessage gets a
   FATAL "the proxy has no policy bundle yet ..." that psql prints (libpq would discard an
   ErrorResponse sent instead of `S`). GSSENCRequest is answered `N`; CancelRequest is
   routed (below); a StartupMessage outside TLS gets a FATAL "TLS is required"; one that
   asks for protocol 3.x (x > 0) or `_pq_.` options gets NegotiateProtocolVersion (3.0,
   none of the options) first, as from PostgreSQL, and the session goes on with 3.0. A
   client the listener saw start TLS at once (direct TLS, ALPN "postgresql") goes straight
   to the handshake (`handle_direct_tls`); the server context picks that ALPN protocol;
2. the client's certificate is verified (`verify_identity`: usage db, route, cluster,
   expiry, with messages a person can act on) and the StartupMessage's user and database
   checked against the route (`resolve_target`);
3. a fresh BackendKeyData is issued for the client (random, remembered for cancel);
4. the session goes to the in-process agent when it serves the database (all-in-one: the
   TLS transport itself is handed over, no tunnel), else to an agent through the tunnel:
   healthy ones in random order, the next one tried when one fails before the session
   starts; with none, FATAL "no agent is serving database X";
5. then bytes are relayed as they come (`dataplane.relay.Relay`), nothing parsed. The
   proxy's `client_idle_timeout` travels in SessionStart; the agent enforces it (it sees
   the message boundaries and audits the end).

A CancelRequest (a new plain connection, as libpq sends it) whose key the proxy issued goes
to the agent of that session, and the connection is closed once the server has been asked
(clients wait for that close before their next statement, as PostgreSQL closes it only
then). A key it did not issue may be another proxy's (behind a load balancer): it is passed
to every agent connected, within `FanOutLimit`, and only the agent holding a session with
that process id and secret cancels. A key nobody issued cancels nothing, and the client is
told nothing either way, as with PostgreSQL.

Never: relay a byte of a client whose certificate did not verify (nor of one whose TLS
asked for none), answer a cancel key, right or wrong, with anything but a close, drop the
alert of a failed handshake, or keep reading startup bytes past the limits.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from dataplane.postgres import (
    DEFAULT_MAX_STARTUP_SIZE,
    ProtocolError,
    StartupDecoder,
    encode,
    fatal,
)
from dataplane.postgres import messages as m
from dataplane.postgres.errors import (
    CANNOT_CONNECT_NOW,
    INVALID_AUTHORIZATION_SPECIFICATION,
    PROTOCOL_VIOLATION,
    SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
)
from dataplane.proxy.cancel import LOCAL, CancelKeys, FanOutLimit
from dataplane.relay import ConnectionClosed, Inbox, Relay
from dataplane.tls_transport import TlsHandshakeFailed, accept_tls
from dataplane.tunnel.frames import CancelStart, SessionStart
from dataplane.tunnel.hosts import (
    AuditSink,
    BundleSourceLike,
    IdentityCache,
    TlsContexts,
)
from dataplane.tunnel.routing import TargetRefused, resolve_target
from dataplane.tunnel.server import AgentLink, AgentUnavailable, SessionRefused, TunnelServer
from schemas.audit import SessionStartEvent
from schemas.identity import Identity, IdentityError
from transport.tls import peer_certificate

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 10.0
TLS_REQUIRED = (
    "TLS is required: connect with sslmode=verify-full and the files tsh db login wrote"
)
NO_BUNDLE = (
    "the proxy has no policy bundle yet (it is joining the cluster); try again in a few "
    "seconds"
)


class LocalAgentLike(Protocol):
    """The db agent of this same process (all-in-one), as the proxy sees it."""

    def serves(self, service: str) -> bool: ...

    async def accept_local(
        self,
        transport: asyncio.Transport,
        inbox: Inbox,
        start: SessionStart,
        pending: bytes = b"",
        on_end: Callable[[], None] | None = None,
    ) -> Any: ...  # an answer with .ok, .reason, .retry

    async def cancel(self, process_id: int, secret_key: int) -> bool: ...


class _HandshakeFailed(Exception):
    """The client's TLS handshake failed; the alert was sent, the socket is closing."""


class _Refused(Exception):
    """Refuse the client with this ErrorResponse."""

    def __init__(self, error: m.ErrorResponse, reason: str) -> None:
        super().__init__(reason)
        self.error = error


class PostgresFrontend:
    """Serves the PostgreSQL clients the listeners hand over."""

    def __init__(
        self,
        *,
        contexts: TlsContexts,
        bundles: BundleSourceLike,
        tunnel: TunnelServer | None,
        local_agent: LocalAgentLike | None = None,
        keys: CancelKeys | None = None,
        audit: AuditSink | None = None,
        host_id: str = "",
        startup_timeout: float = STARTUP_TIMEOUT,
        client_idle_timeout: float | None = None,
    ) -> None:
        self.contexts = contexts
        self.bundles = bundles
        self.tunnel = tunnel
        self.local_agent = local_agent
        self.keys = keys if keys is not None else CancelKeys()
        self.fan_out = FanOutLimit()
        self._fan_out_logged = 0.0
        self.audit = audit
        self.host_id = host_id
        self.startup_timeout = startup_timeout
        self.client_idle_timeout = (
            client_idle_timeout if client_idle_timeout and client_idle_timeout > 0 else None
        )
        self.relays: set[Relay] = set()
        self.identities = IdentityCache()

    # -- the connection ---------------------------------------------------------------------

    async def handle_direct_tls(self, sock: socket.socket, peer: str) -> None:
        """A client that starts TLS at once, without an SSLRequest (PostgreSQL 17's direct
        TLS: the listener saw the ALPN protocol "postgresql" in its ClientHello)."""
        await self.handle(sock, peer, direct_tls=True)

    async def handle(self, sock: socket.socket, peer: str, *, direct_tls: bool = False) -> None:
        loop = asyncio.get_running_loop()
        inbox = Inbox(limit=2 * DEFAULT_MAX_STARTUP_SIZE)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: inbox, sock)
        except OSError:
            sock.close()
            return
        try:
            async with asyncio.timeout(self.startup_timeout):
                transport, packet, decoder, verified = await self._startup(
                    transport, inbox, peer, direct_tls
                )
        except _HandshakeFailed:
            return  # the alert went out and the socket is closing: nothing more to say
        except TimeoutError:
            logger.info("PostgreSQL client %s did not finish its startup within %g s", peer,
                        self.startup_timeout)
            (inbox.transport or transport).abort()
            return
        except _Refused as exc:
            self._refuse(inbox, exc.error)
            return
        except ProtocolError as exc:
            self._refuse(inbox, fatal(exc.sqlstate, str(exc)))
            return
        except (ConnectionClosed, ssl.SSLError, OSError) as exc:
            logger.info("PostgreSQL client %s left during the startup: %s", peer, exc)
            (inbox.transport or transport).abort()
            return
        if isinstance(packet, m.CancelRequest):
            # Closed once the cancel has reached the server, as PostgreSQL does: clients
            # (libpq, asyncpg) wait for that close before they go on, so that the cancel
            # cannot land on their next statement.
            try:
                await self._cancel(packet, peer)
            finally:
                transport.close()
            return
        assert isinstance(packet, m.StartupMessage)
        try:
            await self._session(transport, inbox, decoder, packet, peer, verified)
        except _Refused as exc:
            self._refuse(inbox, exc.error)

    def _refuse(self, inbox: Inbox, error: m.ErrorResponse) -> None:
        transport = inbox.transport
        if transport is None or transport.is_closing():
            return
        transport.write(encode(error))
        transport.close()

    async def _startup(
        self, transport: asyncio.Transport, inbox: Inbox, peer: str, direct_tls: bool
    ) -> tuple[asyncio.Transport, m.StartupPacket, StartupDecoder, bool]:
        """The startup packets, TLS included (from the first byte when `direct_tls`):
        (transport, the StartupMessage or CancelRequest, the decoder holding what followed,
        whether the TLS asked for a client certificate verified against the user CAs of a
        bundle)."""
        decoder = StartupDecoder()
        tls = False
        verified = False
        if direct_tls:
            transport, verified = await self._start_tls(transport, inbox, peer)
            tls = True
        while True:
            packet = await inbox.next_message(decoder)
            if isinstance(packet, m.SSLRequest):
                if tls:
                    raise _Refused(
                        fatal(PROTOCOL_VIOLATION, "SSLRequest received inside TLS"),
                        "SSLRequest inside TLS",
                    )
                inbox.write(b"S")
                transport, verified = await self._start_tls(transport, inbox, peer)
                tls = True
            elif isinstance(packet, m.GSSENCRequest):
                inbox.write(b"N")
            elif isinstance(packet, m.CancelRequest):
                return transport, packet, decoder, verified
            else:
                if not tls:
                    message = TLS_REQUIRED if self.bundles.current is not None else NO_BUNDLE
                    raise _Refused(
                        fatal(INVALID_AUTHORIZATION_SPECIFICATION, message), message
                    )
                if packet.minor_version or packet.protocol_options:
                    # As PostgreSQL does: we speak 3.0 and none of the options; the client
                    # goes on with that or leaves.
                    inbox.write(encode(
                        m.NegotiateProtocolVersion(m.PROTOCOL_3_0, packet.protocol_options)
                    ))
                return transport, packet, decoder, verified

    async def _start_tls(
        self, transport: asyncio.Transport, inbox: Inbox, peer: str
    ) -> tuple[asyncio.Transport, bool]:
        """TLS with the client: (its transport, whether a client certificate was asked for
        and verified against the user CAs of a bundle)."""
        bundle = self.bundles.current
        # Before the first bundle there is no user CA to verify a client against; TLS
        # without a client certificate still lets the client read (inside TLS, where libpq
        # shows it) why it is refused. libpq discards an ErrorResponse sent instead of 'S'
        # (CVE-2024-10977) and says only "server sent an error response during SSL exchange".
        ctx = (
            self.contexts.postgres_server(bundle)
            if bundle is not None
            else self.contexts.postgres_server_without_bundle()
        )
        try:
            tls = await accept_tls(transport, inbox, ctx, inbox.take())
        except TlsHandshakeFailed as exc:
            logger.info("TLS with PostgreSQL client %s failed: %s", peer, exc.reason)
            raise _HandshakeFailed(exc.reason) from None
        return tls, bundle is not None

    # -- a session ---------------------------------------------------------------------------

    def _audit_refusal(self, identity: Identity | None, startup: dict[str, str], peer: str,
                       session_id: str, reason: str) -> None:
        if self.audit is None:
            return
        bundle = self.bundles.current
        route = identity.route if identity else None
        event = SessionStartEvent(
            cluster=bundle.cluster.name if bundle else "",
            session_id=session_id,
            user=identity.username if identity else "(unverified)",
            roles=list(identity.roles) if identity else [],
            db_service=route.service if route else "",
            db_name=startup.get("database", ""),
            db_user=startup.get("user", ""),
            client_addr=peer,
            agent=self.host_id,
            success=False,
            reason=reason,
        )
        try:
            self.audit.emit(event)
        except Exception:
            logger.exception("the audit sink refused an event")

    async def _session(
        self,
        transport: asyncio.Transport,
        inbox: Inbox,
        decoder: StartupDecoder,
        startup: m.StartupMessage,
        peer: str,
        verified: bool,
    ) -> None:
        session_id = str(uuid.uuid4())
        params = dict(startup.parameters)

        def refuse(message: str, identity: Identity | None = None,
                   sqlstate: str = INVALID_AUTHORIZATION_SPECIFICATION) -> _Refused:
            logger.info("PostgreSQL client %s refused: %s", peer, message)
            self._audit_refusal(identity, params, peer, session_id, message)
            return _Refused(fatal(sqlstate, message), message)

        bundle = self.bundles.current
        if bundle is None or not verified:
            raise refuse(NO_BUNDLE, sqlstate=CANNOT_CONNECT_NOW)
        der = peer_certificate(transport)
        if der is None:
            raise refuse(
                "no client certificate was presented: connect with sslcert/sslkey from "
                "`tsh db login`"
            )
        try:
            identity = self.identities.verify(der, bundle.cas.user, datetime.now(UTC), "db")
        except IdentityError as exc:
            raise refuse(f"the client certificate was refused: {exc}") from None
        try:
            resolve_target(identity, params)
        except TargetRefused as exc:
            raise refuse(str(exc), identity) from None
        assert identity.route is not None
        service = identity.route.service

        key = self.keys.issue(session_id)
        start = SessionStart(
            session_id=session_id,
            service=service,
            client_cert=SessionStart.encode_certificate(der),
            startup=params,
            client_addr=peer,
            backend_key=key,
            idle_timeout=self.client_idle_timeout,
        )
        try:
            placed = await self._place(transport, inbox, decoder, start, key)
        except BaseException:
            self.keys.forget(key)
            raise
        if not placed[0]:
            self.keys.forget(key)
            raise refuse(placed[1], identity, SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION)

    async def _place(
        self,
        transport: asyncio.Transport,
        inbox: Inbox,
        decoder: StartupDecoder,
        start: SessionStart,
        key: Any,
    ) -> tuple[bool, str]:
        """Give the session to an agent; (False, why) when none takes it."""
        service = start.service
        reasons: list[str] = []
        local = self.local_agent
        if local is not None and local.serves(service):
            answer = await local.accept_local(
                transport, inbox, start, decoder.take_unprocessed(),
                on_end=lambda: self.keys.forget(key),
            )
            if answer.ok:
                self.keys.bind(key, LOCAL)
                return True, ""
            if not answer.retry:
                return False, answer.reason
            reasons.append(answer.reason)
        links = self.tunnel.agents_for(service) if self.tunnel is not None else []
        for link in links:
            if transport.is_closing() or inbox.closed:
                return False, "the client left"
            try:
                opened = await self.tunnel.open_session(link, start)  # type: ignore[union-attr]
            except AgentUnavailable as exc:
                reasons.append(str(exc))
                continue
            except SessionRefused as exc:
                if exc.retry:
                    reasons.append(str(exc))
                    continue
                return False, str(exc)
            self.keys.bind(key, opened.host_id)
            relay = Relay(transport, opened.transport)
            self.relays.add(relay)

            def closed(_reason: str, relay: Relay = relay) -> None:
                self.relays.discard(relay)
                self.keys.forget(key)

            relay.on_closed = closed
            relay.start(
                decoder.take_unprocessed() + inbox.take(),
                opened.pending,
                client_gone=inbox.closed,
                server_gone=opened.gone,
            )
            return True, ""
        why = f" ({'; '.join(reasons)})" if reasons else ""
        return False, f"no agent is serving database {service!r}{why}"

    # -- cancel -----------------------------------------------------------------------------

    async def _cancel(self, request: m.CancelRequest, peer: str) -> None:
        target = self.keys.lookup(request.secret_key)
        cancel = CancelStart(process_id=request.process_id, secret_key=request.secret_key)
        if target is None:
            await self._cancel_anywhere(cancel, peer)
            return
        if target.host_id is None:
            logger.info("CancelRequest from %s for a session not yet placed; ignored", peer)
            return
        if target.host_id == LOCAL:
            if self.local_agent is not None:
                await self.local_agent.cancel(request.process_id, request.secret_key)
            return
        if self.tunnel is None:
            return
        for link in self.tunnel.agents():
            if link.host_id == target.host_id:
                await self._pass_cancel(link, cancel)
                return
        logger.info("CancelRequest for a session on agent %s, which is gone", target.host_id)

    async def _cancel_anywhere(self, cancel: CancelStart, peer: str) -> None:
        """A key this proxy did not issue: another proxy may have (`dataplane.proxy.cancel`),
        so every agent is asked, within the fan-out limit."""
        links = {link.host_id: link for link in self.tunnel.agents()} if self.tunnel else {}
        if not links:
            logger.info("CancelRequest from %s matches no session; ignored", peer)
            return
        now = time.monotonic()
        if not self.fan_out.allow(peer.rsplit(":", 1)[0], now):
            if now - self._fan_out_logged >= 10.0:
                self._fan_out_logged = now
                logger.warning(
                    "CancelRequests from %s (and others) with keys this proxy did not issue "
                    "come too often to pass to every agent; some are ignored", peer,
                )
            return
        logger.info("CancelRequest from %s has a key this proxy did not issue; passed to "
                    "the %d agent(s) connected, in case another proxy did", peer, len(links))
        await asyncio.gather(*(self._pass_cancel(link, cancel) for link in links.values()))

    async def _pass_cancel(self, link: AgentLink, cancel: CancelStart) -> None:
        assert self.tunnel is not None
        try:
            await self.tunnel.send_cancel(link, cancel)
        except AgentUnavailable as exc:
            logger.warning("could not pass a cancel to agent %s: %s", link.host_id, exc)

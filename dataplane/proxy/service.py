"""The proxy as a service: `ProxyService(...)`, `await start()`, `await stop()`.

Constructor (keyword-only):
    credentials     HostCredentialsLike   the proxy's host certificate and key (role proxy)
                                          and the host CAs (tunnel mTLS; psql verifies the
                                          proxy against the host CA)
    bundles         BundleSourceLike      the verified bundle in force: its user CAs verify
                                          client certificates (the TLS context follows it)
    web_addr        (host, port)          the web port: HTTPS API and PostgreSQL (3080)
    tunnel_addr     (host, port) | None   where agents dial in (3024); None: no tunnel
    postgres_addr   (host, port) | None   an optional PostgreSQL-only port
    api             async (socket, peer) -> None | None
                                          the in-process HTTPS API, handed each TLS socket
                                          with every byte unread (e.g. `HttpServer.
                                          accept_socket` with its SSL context)
    api_upstream    (host, port) | None   or: relay TLS connections as raw TCP to the
                                          control plane's API address
    local_agent     the in-process AgentService (all-in-one), or None
    audit           AuditSink | None      where refusals at the proxy are recorded
    tunnel_options  dict                  TunnelServer timing knobs, for tests
    client_idle_timeout  float | None     seconds: a session whose client sends nothing
                                          for this long is ended (by the agent, which
                                          audits it); None or 0: never

After `start()`, `web_address`, `tunnel_address` and `postgres_address` are the bound
addresses (port 0 picks a free one). `update_credentials` takes a renewed certificate.

Never: accept connections before start() or after stop(), or forward API connections
anywhere but to the configured API.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from dataplane.proxy.cancel import CancelKeys
from dataplane.proxy.listener import PeekListener
from dataplane.proxy.postgres import LocalAgentLike, PostgresFrontend
from dataplane.relay import Inbox, Relay
from dataplane.tunnel.accept import address_text
from dataplane.tunnel.hosts import AuditSink, BundleSourceLike, HostCredentialsLike, TlsContexts
from dataplane.tunnel.server import TunnelServer
from transport.http import HttpServer, Request, Response, error_response

logger = logging.getLogger(__name__)

Address = tuple[str, int]
ApiHandler = Callable[[socket.socket, str], Awaitable[None]]


class ApiForwarder:
    """Relays HTTPS API connections, bytes unread, as raw TCP to the control plane.

    When the control plane cannot be reached, the proxy finishes the TLS handshake itself
    (with its host certificate, which the cluster's clients already trust) and answers
    every request with 503 `control_plane_unreachable`, naming the address it tried: tsh
    prints that instead of a dropped connection it would have to guess about.
    """

    def __init__(self, upstream: Address, contexts: TlsContexts,
                 connect_timeout: float = 10.0) -> None:
        self.upstream = upstream
        self.contexts = contexts
        self.connect_timeout = connect_timeout
        self._unreachable = HttpServer(self._answer_unreachable)
        self._last_error = ""

    async def __call__(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        server_inbox = Inbox()
        try:
            async with asyncio.timeout(self.connect_timeout):
                server, _ = await loop.create_connection(lambda: server_inbox, *self.upstream)
        except (OSError, TimeoutError) as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else (
                exc.strerror or str(exc))
            self._last_error = reason
            logger.warning("cannot reach the control plane API at %s:%s for %s: %s",
                           *self.upstream, peer, reason)
            await self._unreachable.accept_socket(
                sock, ssl=self.contexts.web_server_without_upstream()
            )
            return
        client_inbox = Inbox()
        try:
            client, _ = await loop.connect_accepted_socket(lambda: client_inbox, sock)
        except OSError:
            server.abort()
            raise
        Relay(client, server).start(
            client_inbox.take(), server_inbox.take(),
            client_gone=client_inbox.closed, server_gone=server_inbox.closed,
        )

    async def _answer_unreachable(self, request: Request) -> Response:
        return error_response(
            503,
            "control_plane_unreachable",
            f"the control plane (auth service) at {address_text(self.upstream)} cannot be "
            f"reached from the proxy ({self._last_error}): logins, signups and new "
            "certificates wait until it is back; database sessions with certificates you "
            "already have keep working",
        )

    async def close(self) -> None:
        await self._unreachable.close()


class ProxyService:
    """The proxy: web port (API + PostgreSQL), optional PostgreSQL port, tunnel server."""

    def __init__(
        self,
        *,
        credentials: HostCredentialsLike,
        bundles: BundleSourceLike,
        web_addr: Address | None = ("0.0.0.0", 3080),  # noqa: S104 - a public listener
        tunnel_addr: Address | None = ("0.0.0.0", 3024),  # noqa: S104
        postgres_addr: Address | None = None,
        api: ApiHandler | None = None,
        api_upstream: Address | None = None,
        local_agent: LocalAgentLike | None = None,
        audit: AuditSink | None = None,
        tunnel_options: dict[str, float] | None = None,
        client_idle_timeout: float | None = None,
    ) -> None:
        if api is not None and api_upstream is not None:
            raise ValueError("give either api (in-process) or api_upstream (relay), not both")
        self.contexts = TlsContexts(credentials)
        self.bundles = bundles
        self.web_addr = web_addr
        self.tunnel_addr = tunnel_addr
        self.postgres_addr = postgres_addr
        self.keys = CancelKeys()
        self.tunnel = (
            TunnelServer(self.contexts, bundles, **(tunnel_options or {}))  # type: ignore[arg-type]
            if tunnel_addr is not None
            else None
        )
        self.frontend = PostgresFrontend(
            contexts=self.contexts,
            bundles=bundles,
            tunnel=self.tunnel,
            local_agent=local_agent,
            keys=self.keys,
            audit=audit,
            host_id=credentials.host_id,
            client_idle_timeout=client_idle_timeout,
        )
        self._api: ApiHandler | None = api or (
            ApiForwarder(api_upstream, self.contexts) if api_upstream is not None else None
        )
        self._listeners: list[PeekListener] = []
        self.web_address: Address | None = None
        self.tunnel_address: Address | None = None
        self.postgres_address: Address | None = None

    async def start(self) -> None:
        try:
            if self.tunnel is not None and self.tunnel_addr is not None:
                self.tunnel_address = await self.tunnel.listen(*self.tunnel_addr)
            if self.web_addr is not None:
                web = PeekListener(self.frontend.handle, self._api,
                                   on_postgres_tls=self.frontend.handle_direct_tls)
                self._listeners.append(web)
                self.web_address = await web.listen(*self.web_addr)
            if self.postgres_addr is not None:
                pg = PeekListener(self.frontend.handle, None,
                                  on_postgres_tls=self.frontend.handle_direct_tls)
                self._listeners.append(pg)
                self.postgres_address = await pg.listen(*self.postgres_addr)
        except BaseException:
            await self.stop()
            raise
        logger.info("proxy %s listening: web %s, tunnel %s, postgres %s",
                    self.contexts.credentials.host_id, self.web_address, self.tunnel_address,
                    self.postgres_address)

    async def stop(self) -> None:
        for listener in self._listeners:
            await listener.close()
        self._listeners.clear()
        if isinstance(self._api, ApiForwarder):
            await self._api.close()
        for relay in list(self.frontend.relays):
            relay.close("the proxy is stopping")
        if self.tunnel is not None:
            await self.tunnel.close()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def update_credentials(self, credentials: HostCredentialsLike) -> None:
        self.contexts.update_credentials(credentials)

"""The db agent as a service: `AgentService(...)`, `await start()`, `await stop()`.

Constructor (keyword-only):
    credentials      HostCredentialsLike   this host's certificate and key (role db) and the
                                           host CAs: the tunnel's mTLS
    bundles          BundleSourceLike      the verified bundle in force; each newly
                                           activated one re-checks the live sessions
    databases        DatabasesLike         the databases served, and their labels now
    db_certs         DbClientCertsLike     client certificates (CN = db user) for PostgreSQL
    audit            AuditSink | None      where audit events go (None: no audit)
    password_provider                      async (database, db_user) -> password | None
                                           (default: IAM tokens for databases with an AWS
                                           region, `dataplane.aws.RdsTokenProvider`)
    proxies          list of host:port     the proxies' tunnel addresses (`set_proxies`
                                           replaces it; give it to whoever learns the list)
    pool_size        int                   idle data connections kept per proxy (8)
    tunnel_options   dict                  ProxyLink timing knobs, for tests

For the all-in-one process the proxy calls `accept_local(...)` and `cancel(...)` directly:
no tunnel and no extra TLS. `labels_changed()` tells the proxies when dynamic labels
moved; `recheck(bundle)` is also callable directly; `update_credentials` takes a renewed
host certificate.

Never: serve before `start()`, or keep serving sessions after `stop()` returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dataplane.agent.engine import ClientSide, PostgresEngine
from dataplane.agent.interfaces import AuditSink, DatabasesLike, DbClientCertsLike, PasswordProvider
from dataplane.agent.reuse import SERVER_IDLE_TIMEOUT, ServerReuse
from dataplane.agent.sessions import SessionRegistry
from dataplane.agent.upstream import UpstreamConnector
from dataplane.aws import RdsTokenProvider
from dataplane.relay import Inbox
from dataplane.tunnel.client import DataConn, TunnelClient
from dataplane.tunnel.frames import CancelStart, ServedDatabase, SessionStart
from dataplane.tunnel.hosts import BundleSourceLike, HostCredentialsLike, TlsContexts
from schemas.bundle import Bundle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalAnswer:
    """How the agent answered a session handed over in-process."""

    ok: bool
    reason: str = ""
    retry: bool = False


class AgentService:
    """A db agent: serves sessions for its databases to the proxies it dials."""

    def __init__(
        self,
        *,
        credentials: HostCredentialsLike,
        bundles: BundleSourceLike,
        databases: DatabasesLike,
        db_certs: DbClientCertsLike,
        audit: AuditSink | None = None,
        password_provider: PasswordProvider | None = None,
        proxies: Sequence[str] = (),
        pool_size: int = 8,
        tunnel_options: dict[str, float] | None = None,
        server_idle_timeout: float = SERVER_IDLE_TIMEOUT,
    ) -> None:
        self.contexts = TlsContexts(credentials)
        self.bundles = bundles
        self.databases = databases
        self.audit = audit
        self.registry = SessionRegistry()
        if password_provider is None:
            password_provider = RdsTokenProvider(lambda name: databases.served().get(name))
        self.connector = UpstreamConnector(
            db_certs, password_provider=password_provider, bundle=lambda: self.bundles.current
        )
        self.engine = PostgresEngine(
            host_id=credentials.host_id,
            bundles=bundles,
            databases=databases,
            connector=self.connector,
            audit=audit,
            registry=self.registry,
            reuse=ServerReuse(server_idle_timeout),
        )
        self.tunnel = TunnelClient(
            self.contexts, bundles, self, pool_size=pool_size, link_options=tunnel_options
        )
        self._proxies = list(proxies)
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopped = False

    @property
    def host_id(self) -> str:
        return self.contexts.credentials.host_id

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.bundles.subscribe(self._bundle_activated)
        if self._proxies:
            self.tunnel.set_proxies(self._proxies)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.tunnel.close()
        await self.engine.shutdown()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def set_proxies(self, addresses: Sequence[str]) -> None:
        self._proxies = list(addresses)
        if self._started and not self._stopped:
            self.tunnel.set_proxies(self._proxies)

    def update_credentials(self, credentials: HostCredentialsLike) -> None:
        self.contexts.update_credentials(credentials)

    def labels_changed(self) -> None:
        self.tunnel.labels_changed()

    def _bundle_activated(self, bundle: Bundle) -> None:
        if not self._stopped:
            self.recheck(bundle)

    def recheck(self, bundle: Bundle) -> int:
        """Terminate the live sessions `bundle` no longer allows; returns how many."""
        return self.engine.recheck(bundle)

    # -- the tunnel's handler -------------------------------------------------------------------

    def served(self) -> list[ServedDatabase]:
        return [
            ServedDatabase(name=name, labels=dict(self.databases.labels(name)))
            for name in sorted(self.databases.served())
        ]

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a session failed to start", exc_info=task.exception())

    async def on_session(self, conn: DataConn, start: SessionStart) -> None:
        client = ClientSide(conn.transport, conn.inbox, conn.ack, conn.take_pending)
        self._spawn(self._serve(client, start))

    async def _serve(self, client: ClientSide, start: SessionStart) -> None:
        try:
            await self.engine.serve(client, start)
        except BaseException:
            client.transport.abort()
            client.finish()
            raise

    async def on_cancel(self, cancel: CancelStart) -> None:
        await self.engine.cancel(cancel.process_id, cancel.secret_key)

    # -- the all-in-one hand-over ---------------------------------------------------------------

    async def accept_local(
        self,
        transport: asyncio.Transport,
        inbox: Inbox,
        start: SessionStart,
        pending: bytes = b"",
        on_end: Callable[[], None] | None = None,
    ) -> LocalAnswer:
        """Take a client connection the proxy of this same process accepted (TLS done,
        StartupMessage read; `pending` are the bytes read after it). Returns once the agent
        has accepted or refused it; an accepted session then runs on its own, and
        `on_end()` is called when it ends."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[LocalAnswer] = loop.create_future()

        def ack(ok: bool, reason: str, retry: bool) -> None:
            if not answer.done():
                answer.set_result(LocalAnswer(ok, reason, retry))

        def take_pending() -> bytes:
            return pending + inbox.take()

        if self._stopped or not self._started:
            return LocalAnswer(False, f"db agent {self.host_id} is not running", True)
        client = ClientSide(transport, inbox, ack, take_pending, on_end=on_end)
        self._spawn(self._serve(client, start))
        return await answer

    def serves(self, service: str) -> bool:
        return not self._stopped and service in self.databases.served()

    async def cancel(self, process_id: int, secret_key: int) -> bool:
        return await self.engine.cancel(process_id, secret_key)

"""The agent's end of the reverse tunnel: dial out to every proxy and keep a warm pool there.

`TunnelClient` keeps one `ProxyLink` per proxy address it is given (`set_proxies`, called
again whenever the control plane's list changes). A link:
- dials the proxy with mTLS (our host certificate; the proxy must present a `proxy` host
  certificate of our cluster, host name checked), sends `Hello` with the databases we
  serve, then heartbeats every 5 s and `Labels` when they change; a proxy silent for 15 s
  is dead;
- keeps `pool_size` idle data connections (`DataHello`), dials a replacement whenever one
  is taken, and `count` more when the proxy sends `Dial`;
- hands each `SessionStart` / `CancelStart` to the `SessionHandler` (the agent);
- reconnects with exponential backoff and jitter, capped at `BACKOFF_CAP` so that a
  restarted proxy sees every agent back within 10 s;
- resumes the TLS session of its earlier connections to that proxy
  (`transport.tls.ResumingClientContext`): a data connection then costs about 60% of a
  full handshake.

Never: talk to a proxy whose certificate was not verified (chain, host name, role,
cluster), retry in a tight loop, or keep idle connections to a proxy whose control
connection is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Sequence
from typing import Protocol

from dataplane.relay import ConnectionClosed, Inbox
from dataplane.tls_transport import connect_tls
from dataplane.tunnel.frames import (
    CancelStart,
    DataHello,
    Dial,
    FrameDecoder,
    FrameError,
    Heartbeat,
    Hello,
    Labels,
    ServedDatabase,
    SessionAck,
    SessionStart,
    encode_frame,
)
from dataplane.tunnel.hosts import (
    BundleSourceLike,
    IdentityCache,
    PeerRejected,
    TlsContexts,
    host_cas,
    verify_host_peer,
)
from dataplane.tunnel.server import read_frame
from transport.tls import ResumingClientContext

logger = logging.getLogger(__name__)

POOL_SIZE = 8
HEARTBEAT_INTERVAL = 5.0
DEAD_AFTER = 15.0
CONNECT_TIMEOUT = 10.0
BACKOFF_START = 0.25
BACKOFF_CAP = 4.0
DATA_RETRY_DELAY = 0.5
REFILL_DELAY = 0.02  # s: how long a taken data connection's replacement waits, if others are idle
SESSION_REFRESH = 600.0  # take a newer TLS session ticket this often (they live 2 h)


def backoff_delay(attempt: int, start: float = BACKOFF_START, cap: float = BACKOFF_CAP) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, start * 2**attempt)."""
    ceiling = min(cap, start * (2 ** min(attempt, 30)))
    return ceiling * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not a secret


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` to (host, port); a clear ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"proxy address {address!r} must be host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not 0 < int(port) < 65536:
        raise ValueError(f"proxy address {address!r} must be host:port")
    return host, int(port)


class DataConn:
    """A data connection that received a SessionStart: answer it with `ack`, then relay."""

    def __init__(self, transport: asyncio.Transport, inbox: Inbox, decoder: FrameDecoder) -> None:
        self.transport = transport
        self.inbox = inbox
        self.decoder = decoder

    def ack(self, ok: bool, reason: str = "", retry: bool = False) -> None:
        with contextlib.suppress(ConnectionClosed):
            self.inbox.write(encode_frame(SessionAck(ok=ok, reason=reason, retry=retry)))
        if not ok:
            self.transport.close()

    def take_pending(self) -> bytes:
        return self.decoder.take_unprocessed() + self.inbox.take()


class SessionHandler(Protocol):
    """What the tunnel needs from the agent."""

    def served(self) -> list[ServedDatabase]: ...

    async def on_session(self, conn: DataConn, start: SessionStart) -> None:
        """Take the session: answer with `conn.ack` promptly (the proxy waits a short time
        for it), and run the session in a task of the handler's own, not this one (a
        link that goes down cancels its tasks; sessions outlive it)."""
        ...

    async def on_cancel(self, cancel: CancelStart) -> None: ...


class ProxyLink:
    """One agent's link to one proxy."""

    def __init__(
        self,
        address: str,
        contexts: TlsContexts,
        bundles: BundleSourceLike,
        handler: SessionHandler,
        *,
        pool_size: int = POOL_SIZE,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        dead_after: float = DEAD_AFTER,
        connect_timeout: float = CONNECT_TIMEOUT,
        backoff_start: float = BACKOFF_START,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        self.address = address
        self.host, self.port = split_address(address)
        self.contexts = contexts
        self.bundles = bundles
        self.handler = handler
        self.pool_size = pool_size
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.connect_timeout = connect_timeout
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.connected = asyncio.Event()
        self.identities = IdentityCache()
        self._ctx: ResumingClientContext | None = None
        self._ctx_key: tuple[object, ...] | None = None
        self._last_tls: ssl.SSLObject | None = None
        self._session_until = 0.0
        self.last_error = ""
        self._control: Inbox | None = None
        self._idle = 0
        self._dialing = 0
        self._extra = 0
        self._pool_changed = asyncio.Event()
        self._data_tasks: set[asyncio.Task[None]] = set()
        self._idle_transports: set[asyncio.Transport] = set()
        self._sent_databases: list[ServedDatabase] | None = None

    @property
    def idle(self) -> int:
        return self._idle

    # -- connecting --------------------------------------------------------------------------

    def _context(self) -> ResumingClientContext:
        """This link's client context, offering the TLS session of an earlier connection."""
        bundle = self.bundles.current
        key = self.contexts.tunnel_client_key(bundle)
        if self._ctx is None or self._ctx_key != key:
            self._ctx = self.contexts.tunnel_client(bundle)
            self._ctx_key = key
            self._last_tls = None
        last = self._last_tls
        now = time.monotonic()
        if last is not None and (self._ctx.session is None or now > self._session_until):
            session = last.session  # builds a new object: not on every dial
            if session is not None and session.has_ticket:
                self._ctx.session = session
                self._session_until = now + SESSION_REFRESH
        return self._ctx

    def _forget_session(self) -> None:
        if self._ctx is not None:
            self._ctx.session = None
        self._last_tls = None

    async def _dial(self) -> tuple[asyncio.Transport, Inbox]:
        loop = asyncio.get_running_loop()
        ctx = self._context()
        inbox = Inbox(limit=2 * 64 * 1024)
        async with asyncio.timeout(self.connect_timeout):
            raw, _ = await loop.create_connection(lambda: inbox, self.host, self.port)
            try:
                transport = await connect_tls(raw, inbox, ctx, self.host)
            except BaseException:
                raw.abort()
                raise
        try:
            creds = self.contexts.credentials
            trusted = host_cas(creds, self.bundles.current)
            verify_host_peer(transport, self.identities, trusted, "proxy", creds.cluster)
        except PeerRejected:
            self._forget_session()  # the next attempt does a full handshake
            transport.abort()
            raise
        self._last_tls = transport.get_extra_info("ssl_object")
        return transport, inbox

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the link up until `stop` is set."""
        attempt = 0
        while not stop.is_set():
            try:
                await self._connect_and_serve(stop)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, PeerRejected, ConnectionClosed, FrameError) as exc:
                message = str(exc) or type(exc).__name__
                if message != self.last_error:
                    logger.warning("tunnel to proxy %s: %s", self.address, message)
                self.last_error = message
            if stop.is_set():
                break
            delay = backoff_delay(attempt, self.backoff_start, self.backoff_cap)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()

    async def _connect_and_serve(self, stop: asyncio.Event) -> None:
        transport, inbox = await self._dial()
        databases = self.handler.served()
        self._sent_databases = databases
        creds = self.contexts.credentials
        inbox.write(encode_frame(Hello(host_id=creds.host_id, databases=databases)))
        self._control = inbox
        loop = asyncio.get_running_loop()
        pool = loop.create_task(self._keep_pool())
        beat = loop.create_task(self._heartbeats(inbox))
        stopper = loop.create_task(stop.wait())
        reader = loop.create_task(self._read_control(inbox))
        try:
            done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                reader.result()  # raises why the link ended
        finally:
            self.connected.clear()
            self._control = None
            for task in (pool, beat, stopper, reader):
                task.cancel()
            await asyncio.gather(pool, beat, stopper, reader, return_exceptions=True)
            for idle in list(self._idle_transports):
                idle.close()
            transport.abort()

    async def _read_control(self, inbox: Inbox) -> None:
        decoder = FrameDecoder()
        while True:
            try:
                async with asyncio.timeout(self.dead_after):
                    frame = await read_frame(inbox, decoder)
            except TimeoutError:
                raise ConnectionClosed(
                    f"the proxy was silent for {self.dead_after:g} s; reconnecting"
                ) from None
            if not self.connected.is_set():
                # Up once the proxy speaks (it answers Hello at once): in TLS 1.3 our
                # handshake ends before the proxy has checked our certificate.
                self.last_error = ""
                self.connected.set()
                logger.info("tunnel to proxy %s is up", self.address)
            if isinstance(frame, Dial):
                self._extra += frame.count
                self._pool_changed.set()
            elif not isinstance(frame, Heartbeat):
                raise FrameError(f"the proxy sent an unexpected {frame.type} frame")

    async def _heartbeats(self, inbox: Inbox) -> None:
        while not inbox.closed:
            await asyncio.sleep(self.heartbeat_interval)
            self._send_control(Heartbeat())
            self.check_labels()

    def _send_control(self, frame: Heartbeat | Labels) -> None:
        control = self._control
        if control is not None and not control.closed:
            with contextlib.suppress(ConnectionClosed):
                control.write(encode_frame(frame))

    def check_labels(self) -> None:
        """Send `Labels` if what we serve changed since we last said."""
        if self._control is None:
            return
        databases = self.handler.served()
        if databases != self._sent_databases:
            self._sent_databases = databases
            self._send_control(Labels(databases=databases))

    # -- the warm pool --------------------------------------------------------------------------

    async def _keep_pool(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self._idle + self._dialing < self.pool_size + self._extra:
                    self._dialing += 1
                    task = loop.create_task(self._data_connection())
                    self._data_tasks.add(task)
                    task.add_done_callback(self._data_tasks.discard)
                self._pool_changed.clear()
                await self._pool_changed.wait()
        finally:
            for task in list(self._data_tasks):
                task.cancel()

    async def _data_connection(self) -> None:
        """Dial one data connection, wait idle for a session, and hand it over."""
        try:
            transport, inbox = await self._dial()
            inbox.write(encode_frame(DataHello(host_id=self.contexts.credentials.host_id)))
        except (OSError, TimeoutError, PeerRejected, ConnectionClosed) as exc:
            logger.info("tunnel data connection to %s failed: %s", self.address, exc)
            await asyncio.sleep(DATA_RETRY_DELAY)
            return
        finally:
            self._dialing -= 1
            self._pool_changed.set()
        self._idle += 1
        self._idle_transports.add(transport)
        decoder = FrameDecoder()
        try:
            frame = await read_frame(inbox, decoder)
        except (ConnectionClosed, FrameError):
            transport.abort()  # the proxy closed it (or broke it) while idle: replaced
            return
        except asyncio.CancelledError:
            transport.abort()
            raise
        finally:
            self._idle_transports.discard(transport)
            self._idle -= 1
            if self._extra:
                self._extra -= 1
            if self._idle:
                # Others are still idle: dial the replacement once this session has had
                # its turn on the loop, not in front of its database login.
                asyncio.get_running_loop().call_later(REFILL_DELAY, self._pool_changed.set)
            else:
                self._pool_changed.set()
        if isinstance(frame, SessionStart):
            await self.handler.on_session(DataConn(transport, inbox, decoder), frame)
        elif isinstance(frame, CancelStart):
            try:
                await self.handler.on_cancel(frame)
            finally:
                transport.close()
        else:
            logger.warning("proxy %s sent %s on an idle data connection", self.address,
                           frame.type)
            transport.abort()


class TunnelClient:
    """All of an agent's proxy links: one per proxy address."""

    def __init__(
        self,
        contexts: TlsContexts,
        bundles: BundleSourceLike,
        handler: SessionHandler,
        *,
        pool_size: int = POOL_SIZE,
        link_options: dict[str, float] | None = None,
    ) -> None:
        self.contexts = contexts
        self.bundles = bundles
        self.handler = handler
        self.pool_size = pool_size
        self._options = link_options or {}
        self._links: dict[str, tuple[ProxyLink, asyncio.Event, asyncio.Task[None]]] = {}

    @property
    def links(self) -> list[ProxyLink]:
        return [entry[0] for entry in self._links.values()]

    def set_proxies(self, addresses: Sequence[str]) -> None:
        """Dial exactly these proxies (host:port each): new ones are added, gone ones closed."""
        wanted = list(dict.fromkeys(addresses))
        for address in wanted:
            split_address(address)  # refuse a bad address before touching anything
        for address in list(self._links):
            if address not in wanted:
                _, stop, _ = self._links.pop(address)
                stop.set()
        loop = asyncio.get_running_loop()
        for address in wanted:
            if address not in self._links:
                link = ProxyLink(
                    address, self.contexts, self.bundles, self.handler,
                    pool_size=self.pool_size, **self._options,  # type: ignore[arg-type]
                )
                stop = asyncio.Event()
                task = loop.create_task(link.run(stop))
                self._links[address] = (link, stop, task)

    def labels_changed(self) -> None:
        for link, _, _ in self._links.values():
            link.check_labels()

    async def wait_connected(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            for link, _, _ in list(self._links.values()):
                await link.connected.wait()

    async def close(self) -> None:
        entries = list(self._links.values())
        self._links.clear()
        for _, stop, _ in entries:
            stop.set()
        for _, _, task in entries:
            task.cancel()
        await asyncio.gather(*(task for _, _, task in entries), return_exceptions=True)


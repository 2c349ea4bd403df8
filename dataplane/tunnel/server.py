"""The proxy's end of the reverse tunnel: agents dial in, the proxy routes sessions to them.

Every db agent dials each proxy (default port 3024) with mTLS: both sides present host
certificates, the proxy requires the peer to be a `db` host of its cluster. An agent opens
- one control connection: `Hello` (its host id, the databases it serves with their labels),
  then `Labels` updates and `Heartbeat`s both ways every 5 s; 15 s of silence and the link
  is dead (the agent is no longer routable and its idle connections are dropped);
- a warm pool of data connections (`DataHello`), each carrying at most one session. To
  route one, the proxy takes an idle connection, sends `SessionStart`, and waits a short
  time for `SessionAck`; after an accepting ack the connection is a raw byte pipe. A
  connection that died while idle shows as a missing ack, and the next one is tried. When
  the pool is empty the proxy asks the agent to `Dial` more and waits for one.

Why one TLS connection per session rather than multiplexed streams: the relay stays a
plain byte copy (one write per received chunk, no framing, no per-stream windows to
implement), TCP does the flow control per session, and a slow client only ever stalls its
own connection. The handshake is paid ahead of time, off the session's path, by the warm
pool, and costs about 60% of a full one thanks to TLS session resumption. Measured with
`python -m tests.dataplane.bench_framing` (8 clients of request/response round trips over
real TLS on loopback): the same CPU per round trip either way (within the noise, about
25-33 us here), bulk copy about 10% faster per session, and with one client that stops
reading a large result, the others keep their full rate per session while a framed mux
without per-stream windows stalls all of them (0 round trips); adding per-stream windows
would cost a mux more frames and buffering on top.

Never: route to a peer whose certificate was not verified as a db host of this cluster,
trust a host id the certificate does not carry, or buffer frames beyond the frame limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dataplane.relay import ConnectionClosed, Inbox
from dataplane.tls_transport import accept_tls
from dataplane.tunnel.accept import Acceptor, bind_listener
from dataplane.tunnel.frames import (
    CancelStart,
    DataHello,
    Dial,
    Frame,
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

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5.0
DEAD_AFTER = 15.0
ACK_TIMEOUT = 2.0
IDLE_WAIT = 5.0
HANDSHAKE_TIMEOUT = 10.0
MAX_ACK_ATTEMPTS = 3
# How long a cancel may take to reach the server through the agent (which gives up after 5 s).
CANCEL_WAIT = 10.0


class AgentUnavailable(Exception):
    """No live data connection to this agent could be had in time."""


class SessionRefused(Exception):
    """The agent answered SessionStart with a refusal; `retry`: another agent may serve it."""

    def __init__(self, reason: str, retry: bool) -> None:
        super().__init__(reason)
        self.retry = retry


async def read_frame(inbox: Inbox, decoder: FrameDecoder) -> Frame:
    """The next frame of a connection (raises ConnectionClosed or FrameError)."""
    while True:
        frame = decoder.next_frame()
        if frame is not None:
            return frame
        decoder.receive_data(await inbox.receive())


@dataclass
class DataConnection:
    """A verified data connection from an agent, idle until a session takes it."""

    host_id: str
    transport: asyncio.Transport
    inbox: Inbox
    decoder: FrameDecoder = field(default_factory=FrameDecoder)

    @property
    def alive(self) -> bool:
        return not self.inbox.closed and not self.transport.is_closing()

    def abort(self) -> None:
        self.transport.abort()


@dataclass
class OpenedSession:
    """A data connection after an accepting SessionAck: raw bytes from here on."""

    transport: asyncio.Transport
    pending: bytes  # bytes the agent sent after its ack (already read)
    gone: bool  # the connection closed right after the ack
    host_id: str


class AgentLink:
    """What the proxy knows of one connected agent."""

    def __init__(self, host_id: str) -> None:
        self.host_id = host_id
        self.databases: dict[str, ServedDatabase] = {}
        self.control: Inbox | None = None
        self.idle: deque[DataConnection] = deque()
        self.waiters: deque[asyncio.Future[DataConnection]] = deque()
        self.last_heard = 0.0
        self.sessions = 0

    @property
    def routable(self) -> bool:
        control = self.control
        return control is not None and not control.closed

    def serves(self, service: str) -> bool:
        return self.routable and service in self.databases

    def idle_count(self) -> int:
        return sum(1 for conn in self.idle if conn.alive)

    def send(self, frame: Hello | Labels | Heartbeat | Dial) -> None:
        if self.control is not None and not self.control.closed:
            with contextlib.suppress(ConnectionClosed):
                self.control.write(encode_frame(frame))

    def offer(self, conn: DataConnection) -> None:
        """A new idle connection: to the first waiting session, else to the pool."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def drop_idle(self) -> None:
        while self.idle:
            self.idle.popleft().transport.close()

    def describe(self) -> dict[str, object]:
        return {
            "host_id": self.host_id,
            "databases": sorted(self.databases),
            "idle": self.idle_count(),
            "routable": self.routable,
        }


class TunnelServer:
    """Listens for agents, keeps their links, and opens sessions and cancels through them."""

    def __init__(
        self,
        contexts: TlsContexts,
        bundles: BundleSourceLike,
        *,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        dead_after: float = DEAD_AFTER,
        ack_timeout: float = ACK_TIMEOUT,
        idle_wait: float = IDLE_WAIT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.contexts = contexts
        self.bundles = bundles
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.ack_timeout = ack_timeout
        self.idle_wait = idle_wait
        self.handshake_timeout = handshake_timeout
        self._on_change = on_change
        self.identities = IdentityCache()
        self._links: dict[str, AgentLink] = {}
        self._acceptor: Acceptor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._controls: set[asyncio.Transport] = set()
        self._closed = False

    # -- listening -------------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        sock = bind_listener(host, port)
        self._acceptor = Acceptor(sock, self._on_socket)
        return self._acceptor.address

    async def close(self) -> None:
        self._closed = True
        if self._acceptor is not None:
            self._acceptor.close()
        for task in list(self._tasks):
            task.cancel()
        for link in self._links.values():
            link.drop_idle()
            for waiter in link.waiters:
                if not waiter.done():
                    waiter.cancel()
        for transport in list(self._controls):
            transport.abort()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._links.clear()

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_socket(self, sock: socket.socket, peer: str) -> None:
        if self._closed:
            sock.close()
            return
        self._spawn(self._handshake(sock, peer))

    # -- the agents ------------------------------------------------------------------------

    def agents(self) -> list[AgentLink]:
        return [link for link in self._links.values() if link.routable]

    def agents_for(self, service: str) -> list[AgentLink]:
        """Live agents serving `service`: those with idle connections first, random among
        equals (so load spreads and a dead one is not always tried first)."""
        found = [link for link in self._links.values() if link.serves(service)]
        random.shuffle(found)
        found.sort(key=lambda link: 0 if link.idle else 1)
        return found

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    async def _handshake(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        inbox = Inbox(limit=2 * 64 * 1024)
        try:
            ctx = self.contexts.tunnel_server(self.bundles.current)
            raw, _ = await loop.connect_accepted_socket(lambda: inbox, sock)
        except (OSError, ValueError) as exc:
            logger.info("tunnel connection from %s failed before its TLS handshake: %s",
                        peer, exc)
            sock.close()
            return
        try:
            async with asyncio.timeout(self.handshake_timeout):
                transport = await accept_tls(raw, inbox, ctx, inbox.take())
        except OSError as exc:  # TimeoutError and TlsHandshakeFailed are OSErrors
            logger.info("tunnel connection from %s failed its TLS handshake: %s", peer,
                        str(exc) or type(exc).__name__)
            raw.abort()
            return
        try:
            creds = self.contexts.credentials
            trusted = host_cas(creds, self.bundles.current)
            identity = verify_host_peer(transport, self.identities, trusted, "db", creds.cluster)
        except PeerRejected as exc:
            logger.warning("tunnel connection from %s refused: %s", peer, exc)
            transport.abort()
            return
        host_id = identity.host_id or ""
        decoder = FrameDecoder()
        try:
            async with asyncio.timeout(self.handshake_timeout):
                frame = await read_frame(inbox, decoder)
        except (TimeoutError, ConnectionClosed, FrameError) as exc:
            logger.info("tunnel connection from %s (%s) ended before its hello: %s",
                        peer, host_id, exc)
            transport.abort()
            return
        if isinstance(frame, Hello | DataHello) and frame.host_id != host_id:
            logger.warning(
                "tunnel connection from %s refused: it says it is %r but its certificate is "
                "for %r", peer, frame.host_id, host_id,
            )
            transport.abort()
            return
        if isinstance(frame, Hello):
            await self._serve_control(host_id, frame, transport, inbox, decoder, peer)
        elif isinstance(frame, DataHello):
            link = self._links.get(host_id)
            if link is None:
                link = self._links[host_id] = AgentLink(host_id)
            link.offer(DataConnection(host_id, transport, inbox, decoder))
        else:
            logger.warning("tunnel connection from %s sent %s first; closing", peer, frame.type)
            transport.abort()

    async def _serve_control(
        self,
        host_id: str,
        hello: Hello,
        transport: asyncio.Transport,
        inbox: Inbox,
        decoder: FrameDecoder,
        peer: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        link = self._links.get(host_id)
        if link is None:
            link = self._links[host_id] = AgentLink(host_id)
        if link.control is not None and link.control.transport is not None:
            # A reconnecting agent replaces its previous control connection.
            link.control.transport.abort()
        link.control = inbox
        link.databases = {db.name: db for db in hello.databases}
        link.last_heard = loop.time()
        self._controls.add(transport)
        logger.info("agent %s connected from %s serving %s", host_id, peer,
                    ", ".join(sorted(link.databases)) or "no database")
        self._changed()
        link.send(Heartbeat())  # at once: the agent counts its link up from our first frame
        beat = loop.create_task(self._heartbeats(link, transport))
        reason = "closed the connection"
        try:
            while True:
                try:
                    async with asyncio.timeout(self.dead_after):
                        frame = await read_frame(inbox, decoder)
                except TimeoutError:
                    reason = f"was silent for {self.dead_after:g} s"
                    break
                link.last_heard = loop.time()
                if isinstance(frame, Heartbeat):
                    continue
                if isinstance(frame, Labels):
                    link.databases = {db.name: db for db in frame.databases}
                    self._changed()
                    continue
                reason = f"sent an unexpected {frame.type} frame"
                break
        except ConnectionClosed:
            pass
        except FrameError as exc:
            reason = f"broke the tunnel protocol: {exc}"
        finally:
            beat.cancel()
            self._controls.discard(transport)
            transport.abort()
            if link.control is inbox:
                link.control = None
                link.drop_idle()
                logger.info("agent %s %s; no longer routing to it", host_id, reason)
                self._changed()

    async def _heartbeats(self, link: AgentLink, transport: asyncio.Transport) -> None:
        while not transport.is_closing():
            await asyncio.sleep(self.heartbeat_interval)
            link.send(Heartbeat())

    # -- sessions --------------------------------------------------------------------------

    async def _take_idle(self, link: AgentLink) -> DataConnection:
        while link.idle:
            conn = link.idle.popleft()
            if conn.alive:
                if not link.idle:
                    # The pool ran dry (a burst): ask for more than the one-for-one refill.
                    link.send(Dial(count=2))
                return conn
            conn.transport.close()
        if not link.routable:
            raise AgentUnavailable(f"agent {link.host_id} is not connected")
        waiter: asyncio.Future[DataConnection] = asyncio.get_running_loop().create_future()
        link.waiters.append(waiter)
        link.send(Dial(count=min(256, len(link.waiters))))
        try:
            async with asyncio.timeout(self.idle_wait):
                return await waiter
        except TimeoutError:
            raise AgentUnavailable(
                f"agent {link.host_id} offered no data connection within {self.idle_wait:g} s"
            ) from None
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                link.waiters.remove(waiter)

    async def open_session(self, link: AgentLink, start: SessionStart) -> OpenedSession:
        """Hand a session to `link`'s agent: raises AgentUnavailable or SessionRefused.

        A data connection that turns out closed (it died while idle) is replaced by the next
        idle one; an agent that does not acknowledge in time is given up on at once (it is
        stuck or gone: the caller tries another agent rather than wait again)."""
        data = encode_frame(start)
        for _ in range(MAX_ACK_ATTEMPTS):
            conn = await self._take_idle(link)
            conn.transport.write(data)
            try:
                async with asyncio.timeout(self.ack_timeout):
                    frame = await read_frame(conn.inbox, conn.decoder)
            except TimeoutError:
                conn.abort()
                raise AgentUnavailable(
                    f"agent {link.host_id} did not acknowledge within {self.ack_timeout:g} s"
                ) from None
            except (ConnectionClosed, FrameError) as exc:
                logger.info("a data connection to agent %s failed (%s); trying another",
                            link.host_id, exc)
                conn.abort()
                continue
            if not isinstance(frame, SessionAck):
                conn.abort()
                raise AgentUnavailable(f"agent {link.host_id} answered {frame.type}, not an ack")
            if not frame.ok:
                conn.transport.close()
                raise SessionRefused(frame.reason, frame.retry)
            pending = conn.decoder.take_unprocessed() + conn.inbox.take()
            link.sessions += 1
            return OpenedSession(conn.transport, pending, conn.inbox.closed, link.host_id)
        raise AgentUnavailable(f"agent {link.host_id} has no live data connection")

    async def send_cancel(
        self, link: AgentLink, cancel: CancelStart, wait: float = CANCEL_WAIT
    ) -> None:
        """Pass a CancelRequest to the agent of the session; returns when the agent has
        delivered it (it closes the data connection once the server closed the cancel
        connection), or after `wait` seconds."""
        conn = await self._take_idle(link)
        conn.transport.write(encode_frame(cancel))
        try:
            async with asyncio.timeout(wait):
                while True:  # the agent sends nothing: only its close is awaited
                    await conn.inbox.receive()
        except (ConnectionClosed, TimeoutError):
            pass
        finally:
            conn.transport.close()

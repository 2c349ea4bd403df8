"""Heartbeats: telling the control plane that this host is alive and what it serves.

Every `interval` seconds (10 by default; the control plane forgets a host after three
missed beats) a `POST /v1/heartbeat` carries the host id, its role, the serial of the
bundle it runs and, for a db agent, the databases it serves with their labels (static and
dynamic). `poke()` sends one at once, e.g. after a bundle was activated or a label
changed, so `tctl status` and `tsh db ls` catch up without waiting for the next beat.

The answer carries the reverse tunnel addresses of the cluster's proxies; when that list
changes, listeners are told (the tunnel dials every proxy in it). A failed heartbeat is
logged once per outage and retried at the next beat; it never stops the host serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from dataplane.cluster.api_client import ControlPlaneClient, ControlPlaneError
from dataplane.cluster.identity import HostRole
from schemas.api import DatabaseInfo, Heartbeat, HeartbeatAck

log = logging.getLogger("teleport.cluster.heartbeat")

DEFAULT_INTERVAL_S = 10.0

TunnelAddrsListener = Callable[[list[str]], None]


class Heartbeater:
    """Sends heartbeats; `tunnel_addrs` is the proxies' tunnel addresses as last heard."""

    def __init__(
        self,
        client: ControlPlaneClient,
        host_id: str,
        role: HostRole,
        *,
        serial: Callable[[], int],
        databases: Callable[[], Sequence[DatabaseInfo]] = tuple,
        tunnel_addrs: Sequence[str] = (),
        public_addr: str | None = None,
        tunnel_addr: str | None = None,
        interval: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.client = client
        self.host_id = host_id
        self.role: HostRole = role
        self.serial = serial
        self.databases = databases
        self.public_addr = public_addr
        self.tunnel_addr = tunnel_addr
        self.interval = interval
        self.tunnel_addrs: list[str] = list(tunnel_addrs)
        self.last_ack: HeartbeatAck | None = None
        self.sent = 0
        self._listeners: list[TunnelAddrsListener] = []
        self._poke = asyncio.Event()
        self._failing = False

    def on_tunnel_addrs(self, callback: TunnelAddrsListener) -> None:
        """`callback(addresses)` whenever the control plane's list of tunnel addresses
        changes (not called for the initial list, which `tunnel_addrs` holds)."""
        self._listeners.append(callback)

    def poke(self) -> None:
        """Send a heartbeat now rather than at the next interval."""
        self._poke.set()

    def build(self) -> Heartbeat:
        return Heartbeat(
            host_id=self.host_id,
            role=self.role,
            serial=self.serial(),
            databases=list(self.databases()),
            public_addr=self.public_addr,
            tunnel_addr=self.tunnel_addr,
        )

    async def beat(self) -> HeartbeatAck:
        """Send one heartbeat; raises ControlPlaneError when it did not get through."""
        ack = await self.client.heartbeat(self.build())
        self.sent += 1
        self.last_ack = ack
        if ack.tunnel_addrs != self.tunnel_addrs:
            log.info("proxies' tunnel addresses are now %s", ", ".join(ack.tunnel_addrs) or
                     "none")
            self.tunnel_addrs = list(ack.tunnel_addrs)
            for callback in list(self._listeners):
                try:
                    callback(list(self.tunnel_addrs))
                except Exception:
                    log.exception("a tunnel address listener failed")
        return ack

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._poke.clear()
            try:
                await self.beat()
            except ControlPlaneError as exc:
                if not self._failing:
                    log.warning("heartbeat to the control plane failed (%s); still serving, "
                                "retrying every %gs", exc, self.interval)
                    self._failing = True
            else:
                if self._failing:
                    log.info("heartbeats reach the control plane again")
                    self._failing = False
            waiters = {asyncio.create_task(stop.wait()), asyncio.create_task(self._poke.wait())}
            try:
                await asyncio.wait(waiters, timeout=self.interval,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter

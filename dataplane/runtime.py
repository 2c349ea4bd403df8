"""Assemble a proxy or a db agent from its configuration, ready to run.

`teleport-agent run --role=proxy|db` and `teleport start` (which adds the control plane and,
with both roles in one process, hands connections from the proxy to the agent in-process)
share this. Each role joins the cluster (or loads its earlier join) under
`<data_dir>/<role>/`, then runs its link to the control plane (renewal, bundle feed,
heartbeats, dynamic labels) beside its service. Agents ship audit events through a spool
under their data dir and refuse new sessions while it is full.

This module only composes: every rule lives in the module it composes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dataplane.agent import AgentService
from dataplane.agent.catalog import DatabaseCatalog
from dataplane.agent.interfaces import PasswordProvider
from dataplane.audit import AuditShipper, SendJson
from dataplane.cluster import ClusterLink
from dataplane.proxy import ProxyService
from schemas.config import DbService
from schemas.config import ProxyService as ProxyConfig
from schemas.durations import parse_duration
from schemas.policy.models import split_host_port
from transport.files import LockHeld, hold_lock

log = logging.getLogger("teleport.node")

# Audit batches of a db agent inside the control plane's process (see `build_agent`).
LOCAL_BATCH_EVENTS = 2000
LOCAL_BATCH_BYTES = 4 * 1024 * 1024

ApiHandler = Callable[[socket.socket, str], Awaitable[None]]


@dataclass
class JoinOptions:
    """How a data-plane role reaches and joins the cluster."""

    data_dir: Path
    auth_addr: str
    token: str | None = None
    ca_pin: str | None = None
    insecure_first_join: bool = False
    nodename: str | None = None


class NodeBusy(Exception):
    """Another process runs this role on the same data dir (it would take over its identity)."""


class AgentConfigError(Exception):
    """The agent's own databases cannot be served as configured; the message says which."""


def check_databases(config: DbService) -> None:
    """Fail at start, naming the database and file, rather than at the first connection."""
    for db in config.databases:
        if db.ca_cert_file and not os.access(db.ca_cert_file, os.R_OK):
            raise AgentConfigError(
                f"database {db.name!r}: ca_cert_file {db.ca_cert_file} "
                f"{'is not readable' if os.path.exists(db.ca_cert_file) else 'does not exist'}"
                " on this host; it must hold the CA that signed the database's certificate"
            )


def _claim(role_dir: Path, role: str) -> int:
    """Hold `<role_dir>/run.lock` while this process runs the role."""
    role_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        return hold_lock(role_dir / "run.lock")
    except LockHeld:
        raise NodeBusy(
            f"another {role} process is running with data dir {role_dir.parent}: two "
            "processes must not share one host identity; stop it or use another --data-dir"
        ) from None


async def _released_on_error(lock_fd: int, joining: Awaitable[ClusterLink]) -> ClusterLink:
    try:
        return await joining
    except BaseException:
        os.close(lock_fd)
        raise


@dataclass
class Node:
    """A running-to-be proxy or agent: its link to the control plane and its service."""

    role: str
    link: ClusterLink
    service: ProxyService | AgentService
    shipper: AuditShipper | None = None
    lock_fd: int | None = None
    extra: list[Callable[[asyncio.Event], Awaitable[None]]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        """Run the link, the service (and the audit shipper) until `stop`. Stopping goes in
        order: the service first, then the audit shipper delivers what it holds while the
        link to the control plane is still up, then the link."""
        link_stop = asyncio.Event()
        results: list[object] = []
        try:
            if self.shipper is not None:
                await self.shipper.start()
            link = asyncio.create_task(self.link.run(link_stop), name=f"{self.role}-link")
            work = [
                asyncio.create_task(self.service.run(stop), name=f"{self.role}-service"),
                *(asyncio.create_task(fn(stop)) for fn in self.extra),
            ]
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([link, stopper, *work], return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            results.extend(await asyncio.gather(*work, return_exceptions=True))
            stopper.cancel()
            if self.shipper is not None:
                delivered = await self.shipper.close(timeout=5.0)
                if not delivered:
                    log.warning("audit events not yet delivered stay in the spool for later")
            link_stop.set()
            results.extend(await asyncio.gather(link, return_exceptions=True))
        finally:
            link_stop.set()
            if self.lock_fd is not None:
                os.close(self.lock_fd)
                self.lock_fd = None
        for result in results:
            if isinstance(result, Exception):
                raise result


def _addr(text: str) -> tuple[str, int]:
    host, port = split_host_port(text)
    return host, port


def certificate_names(addrs: Sequence[str], nodename: str | None) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses a proxy's certificate must carry for psql's
    verify-full: localhost and this host, plus every public address people will type."""
    dns = ["localhost"]
    ips = ["127.0.0.1", "::1"]
    for host in [nodename or socket.gethostname(), *(split_host_port(a)[0] for a in addrs)]:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host and host not in dns:
                dns.append(host)
        else:
            if host not in ips and host not in ("0.0.0.0", "::"):  # noqa: S104
                ips.append(host)
    return dns, ips


async def build_proxy(
    join: JoinOptions,
    config: ProxyConfig,
    *,
    api: ApiHandler | None = None,
    local_agent: AgentService | None = None,
) -> Node:
    """A proxy: web port (API and PostgreSQL), tunnel port, optional PostgreSQL port. The
    API is served in-process by `api`, or relayed unopened to the auth server."""
    public = [*config.public_addr]
    if config.postgres_public_addr:
        public.append(config.postgres_public_addr)
    dns, ips = certificate_names(public, join.nodename)
    tunnel_public = tunnel_public_addr(config, join.nodename)
    lock_fd = _claim(join.data_dir / "proxy", "proxy")
    link = await _released_on_error(
        lock_fd,
        ClusterLink.connect(
            join.data_dir / "proxy",
            join.auth_addr,
            "proxy",
            token=join.token,
            ca_pin=join.ca_pin,
            insecure_first_join=join.insecure_first_join,
            dns_names=dns,
            ip_addresses=ips,
            nodename=join.nodename,
            public_addr=public[0]
            if public
            else public_addr(config.web_listen_addr, join.nodename),
            tunnel_addr=tunnel_public,
        ),
    )
    service = ProxyService(
        credentials=link.credentials,
        bundles=link.feed,
        web_addr=_addr(config.web_listen_addr),
        tunnel_addr=_addr(config.tunnel_listen_addr),
        postgres_addr=_addr(config.postgres_listen_addr) if config.postgres_listen_addr else None,
        api=api,
        api_upstream=None if api is not None else _addr(join.auth_addr),
        local_agent=local_agent,
        client_idle_timeout=idle_timeout(config),
    )
    link.renewer.subscribe(service.update_credentials)
    return Node("proxy", link, service, lock_fd=lock_fd)


def tunnel_public_addr(config: ProxyConfig, nodename: str | None) -> str:
    """Where agents dial this proxy's tunnel: what the proxy registers, what the control
    plane lists, and what an agent in the same process skips (it is handed sessions)."""
    return config.tunnel_public_addr or public_addr(config.tunnel_listen_addr, nodename)


def idle_timeout(config: ProxyConfig) -> float | None:
    """`proxy_service.client_idle_timeout` in seconds; None when unset or zero (never)."""
    if config.client_idle_timeout is None:
        return None
    seconds = parse_duration(config.client_idle_timeout).total_seconds()
    return seconds if seconds > 0 else None


async def build_agent(
    join: JoinOptions,
    config: DbService,
    *,
    password_provider: PasswordProvider | None = None,
    local_tunnel_addr: str | None = None,
    local_audit: Callable[[str], SendJson] | None = None,
) -> Node:
    """A db agent serving its configured databases and the bundle's selected ones; it dials
    every proxy the control plane lists (but `local_tunnel_addr`, its own process's proxy,
    which hands sessions over in-process)."""
    check_databases(config)
    catalog: DatabaseCatalog | None = None
    lock_fd = _claim(join.data_dir / "db", "db agent")
    link = await _released_on_error(
        lock_fd,
        ClusterLink.connect(
            join.data_dir / "db",
            join.auth_addr,
            "db",
            token=join.token,
            ca_pin=join.ca_pin,
            insecure_first_join=join.insecure_first_join,
            nodename=join.nodename,
            databases=config.databases,
            served=lambda: catalog.infos() if catalog is not None else [],
        ),
    )
    catalog = DatabaseCatalog(config.databases, config.resources, link.labels.labels)
    assert link.db_certs is not None
    # In the control plane's own process, batches go straight to its audit store:
    # `local_audit(host_id)` says how (no TLS leg that adds nothing). Nor is there a request
    # body limit to respect, so the batches are larger: each one costs the store a write, an
    # fsync and a new HEAD.json, about 1.5 ms of CPU here whatever its size. Measured with
    # pgbench -S -c 8 through teleport start, CPU of its process per transaction: batches
    # of ~300 events (192 KiB) 53-60 us, of up to 2,000 events 47-49 us (5,000: no better,
    # and chaining one on the event loop would hold the data path for ~15 ms).
    spool = join.data_dir / "db" / "audit-spool"
    if local_audit is not None:
        shipper = AuditShipper(
            local_audit(link.credentials.host_id), spool,
            batch_events=LOCAL_BATCH_EVENTS, batch_bytes=LOCAL_BATCH_BYTES,
        )
    else:
        shipper = AuditShipper(SendJson(link.client.send_audit_json), spool)
    agent = AgentService(
        credentials=link.credentials,
        bundles=link.feed,
        databases=catalog,
        db_certs=link.db_certs,
        audit=shipper,
        password_provider=password_provider,
        proxies=_without(link.heartbeat.tunnel_addrs, local_tunnel_addr),
        server_idle_timeout=(
            parse_duration(config.server_idle_timeout).total_seconds()
            if config.server_idle_timeout is not None
            else 0.0
        ),
    )

    def bundle_activated(bundle: object) -> None:
        # (the link pokes its heartbeat on every activation: the served list goes with it)
        if catalog is not None and catalog.bundle_activated(bundle):  # type: ignore[arg-type]
            agent.labels_changed()

    if link.feed.current is not None:
        catalog.bundle_activated(link.feed.current)
    link.feed.subscribe(bundle_activated)
    link.labels.subscribe(lambda _name, _labels: agent.labels_changed())
    link.heartbeat.on_tunnel_addrs(
        lambda addrs: agent.set_proxies(_without(addrs, local_tunnel_addr))
    )
    link.renewer.subscribe(agent.update_credentials)
    return Node("db", link, agent, shipper, lock_fd=lock_fd)


def _without(addrs: Sequence[str], own: str | None) -> list[str]:
    return [a for a in addrs if a != own]


def public_addr(listen_addr: str, nodename: str | None) -> str:
    """A listen address as others dial it: 0.0.0.0 / :: become this host's name."""
    host, port = split_host_port(listen_addr)
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
        host = nodename or socket.gethostname()
    return f"{host}:{port}"

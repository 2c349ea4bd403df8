"""`ClusterLink`: everything a proxy or db agent keeps with the control plane, wired together.

    link = await ClusterLink.connect(data_dir, "auth.example.com:3025", "db",
                                     token=..., ca_pin="sha256:...", databases=cfg.databases)
    agent = AgentService(credentials=link.credentials, bundles=link.feed,
                         db_certs=link.db_certs, labels=link.labels, ...)
    await link.run(stop)      # renewal, bundle feed, heartbeats, dynamic labels

It joins (or loads an earlier join), then runs, until `stop`: the credential renewer (which
swaps the API client's certificate), the bundle feed, dynamic labels (db role) and
heartbeats, which go out at once when a bundle is activated or a label changes. Each piece
keeps serving from what it has while the control plane is unreachable.

This module only composes; every rule lives in the module it composes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dataplane.cluster.api_client import ControlPlaneClient
from dataplane.cluster.bundles import BundleFeed
from dataplane.cluster.dbcerts import DbClientCerts
from dataplane.cluster.heartbeat import DEFAULT_INTERVAL_S, Heartbeater
from dataplane.cluster.identity import CredentialRenewer, HostCredentials, HostRole, join
from dataplane.cluster.labels import DynamicLabels
from schemas.api import BUNDLE_WAIT_DEFAULT_S, DatabaseInfo
from schemas.config import DatabaseConfig


@dataclass
class ClusterLink:
    data_dir: Path
    client: ControlPlaneClient
    renewer: CredentialRenewer
    feed: BundleFeed
    heartbeat: Heartbeater
    labels: DynamicLabels
    db_certs: DbClientCerts | None

    @property
    def credentials(self) -> HostCredentials:
        """The current credentials (they change on renewal: `renewer.subscribe`)."""
        return self.renewer.credentials

    @classmethod
    async def connect(
        cls,
        data_dir: Path,
        auth_addr: str,
        role: HostRole,
        *,
        token: str | None = None,
        ca_pin: str | None = None,
        insecure_first_join: bool = False,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        nodename: str | None = None,
        databases: Sequence[DatabaseConfig] = (),
        served: Callable[[], Sequence[DatabaseInfo]] | None = None,
        public_addr: str | None = None,
        tunnel_addr: str | None = None,
        heartbeat_interval: float = DEFAULT_INTERVAL_S,
        poll_wait: float = BUNDLE_WAIT_DEFAULT_S,
    ) -> ClusterLink:
        """Join (or load the earlier join) and build the pieces; nothing runs yet.

        `databases`: the db agent's own configured databases (their dynamic labels run
        here); `served`: what heartbeats report, when the agent serves more than those (by
        bundle label selectors); by default the configured databases with their labels.
        Raises `JoinError` with a message to print.
        """
        creds = await join(
            data_dir, auth_addr, token, role, ca_pin=ca_pin, dns_names=dns_names,
            ip_addresses=ip_addresses, insecure_first_join=insecure_first_join,
            nodename=nodename,
        )
        client = ControlPlaneClient(auth_addr, creds.api_context())
        renewer = CredentialRenewer(data_dir, creds, client)
        feed = BundleFeed(data_dir, creds.cluster, creds.bundle_keys, client,
                          poll_wait=poll_wait)
        labels = DynamicLabels(databases)
        heartbeat = Heartbeater(
            client, creds.host_id, role,
            serial=lambda: feed.serial,
            databases=served or labels.database_infos,
            tunnel_addrs=creds.tunnel_addrs,
            public_addr=public_addr,
            tunnel_addr=tunnel_addr,
            interval=heartbeat_interval,
        )
        feed.subscribe(lambda _bundle: heartbeat.poke())
        labels.subscribe(lambda _name, _labels: heartbeat.poke())
        db_certs = DbClientCerts(client, trusted_db_cas=creds.db_cas) if role == "db" else None
        return cls(Path(data_dir), client, renewer, feed, heartbeat, labels, db_certs)

    async def run(self, stop: asyncio.Event) -> None:
        """Run renewal, the bundle feed, labels and heartbeats until `stop`; then close.
        If one of them fails (a bug: they handle outages themselves), the others are
        stopped and its exception is raised."""
        runners = [self.renewer.run, self.feed.run, self.labels.run, self.heartbeat.run]
        tasks = [asyncio.create_task(r(stop)) for r in runners]
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [stopper, *tasks]:
                task.cancel()
            results = await asyncio.gather(stopper, *tasks, return_exceptions=True)
            await self.client.aclose()
        for result in results:
            if isinstance(result, Exception):
                raise result

"""Fixtures of the data-path tests: a real PostgreSQL (TLS, cert auth, the db CA of a real
cluster), real CAs, signed bundles, and proxies and agents on event loops of their own.

- `pki`, `signing_key` (session): the cluster's CAs and the bundle signing key.
- `pg` (session): PostgreSQL over TLS only, its server certificate from the db CA; roles
  alice, bob, carol (certificate authentication) and sam (SCRAM password, `SAM_PASSWORD`);
  databases main, metrics and bench (pgbench, scale 1).
- `path` (session): `DataPath`, a proxy and an agent on separate uvloop threads talking
  over the real tunnel (mTLS, host certificates), serving the databases `pg` (labels
  env=prod) and `pgdev` (env=dev, same server); the bundle `base_bundle` in force.
  Tests that change the bundle put the base one back when done (`path.restore()`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control.ca import certificate_pem
from dataplane.agent import AgentService, MemoryAuditSink, StaticDatabases
from dataplane.proxy import ProxyService
from launcher.embedded_postgres import EmbeddedPostgres, HostRule, ServerTLS, free_tcp_port
from schemas.bundle import Bundle, BundleDatabase
from tests.dataplane.support import (
    DbCerts,
    Feed,
    LoopThread,
    Pki,
    UserCert,
    conninfo_for,
    make_bundle,
    role,
    sign,
    write_private,
)
from tests.fixtures.pg import conninfo, run_pgbench
from transport.tls import new_private_key, private_key_pem

SAM_PASSWORD = "correct horse battery staple"
FAST_TUNNEL = {"heartbeat_interval": 0.5, "dead_after": 2.0}
FAST_LINK = {"heartbeat_interval": 0.5, "dead_after": 2.0, "backoff_start": 0.05,
             "backoff_cap": 0.5}


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("dp-pki"))


@pytest.fixture(scope="session")
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@dataclass
class Pg:
    server: EmbeddedPostgres
    pki: Pki
    base: Path
    _files: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def uri(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_files(self, user: str) -> tuple[Path, Path]:
        """A db-CA client certificate for `user`, as files (for direct connections)."""
        if user not in self._files:
            key = new_private_key()
            cert = self.pki.cas.db.issue_db_client(key.public_key(), user, timedelta(hours=4))
            crt, key_file = self.base / f"direct-{user}.crt", self.base / f"direct-{user}.key"
            crt.write_bytes(certificate_pem(cert))
            write_private(key_file, private_key_pem(key))
            self._files[user] = (crt, key_file)
        return self._files[user]

    def direct(self, user: str, dbname: str, **extra: Any) -> str:
        crt, key = self.client_files(user)
        return conninfo(
            host="localhost", hostaddr="127.0.0.1", port=self.port, user=user, dbname=dbname,
            sslmode="verify-full", sslrootcert=str(self.pki.db_ca_file), sslcert=str(crt),
            sslkey=str(key), gssencmode="disable", connect_timeout=10, **extra,
        )  # fmt: skip


@pytest.fixture(scope="session")
def pg(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pg]:
    base = tmp_path_factory.mktemp("dp-pg")
    crt, key, ca = pki.db_server_files(base / "tls")
    server = EmbeddedPostgres.temporary(
        port=free_tcp_port(), tls=ServerTLS(crt, key, ca), fsync=False, max_connections=300,
        host_rules=(HostRule("scram-sha-256", users=("sam",)), HostRule("cert")),
    )
    try:
        server.start()
        for name in ("alice", "bob", "carol"):
            server.create_role(name)
        server.create_role("sam", password=SAM_PASSWORD)
        for name in ("main", "metrics"):
            server.create_database(name)
        server.create_database("bench", owner="alice")
        out = Pg(server, pki, base)
        done = run_pgbench(out.direct("alice", "bench"), ["-i", "-s", "1", "-q"], timeout=120)
        assert done.returncode == 0, done.stderr
        server.psql_admin("GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;", "bench")
        yield out
    finally:
        server.destroy()


def databases_for(pg: Pg) -> list[BundleDatabase]:
    return [
        BundleDatabase(name="pg", uri=pg.uri, labels={"env": "prod"}),
        BundleDatabase(name="pgdev", uri=pg.uri, labels={"env": "dev"}),
    ]


def base_bundle(pki: Pki, serial: int, **changes: Any) -> Bundle:
    options: dict[str, Any] = {
        "roles": [
            role("admin", deny={"db_users": ["postgres"]}),
            role("dev", {"env": ["dev"]}, db_users=["{{internal.db_users}}"]),
            role("no-metrics", deny={"db_names": ["metrics"]}),
        ],
        "users": {"alice": ["admin"], "bob": ["admin", "no-metrics"], "carol": ["dev"]},
        "traits": {"carol": {"db_users": ["carol"]}},
    }
    options.update(changes)
    return make_bundle(pki, serial=serial, **options)


class Node:
    """A proxy or an agent on its own loop thread, with its own bundle feed."""

    def __init__(self, name: str, key: Ed25519PrivateKey) -> None:
        self.thread = LoopThread(name)
        self.feed = Feed(key)
        self.service: Any = None

    def activate(self, data: bytes) -> Bundle:
        return self.thread.call(self.feed.activate, data)

    def stop(self) -> None:
        if self.service is not None:
            with contextlib.suppress(Exception):
                self.thread.run(self.service.stop(), timeout=20)
        self.thread.stop()


class DataPath:
    """A proxy and agents over the real tunnel, all with real certificates and bundles."""

    def __init__(self, pki: Pki, pg: Pg, key: Ed25519PrivateKey) -> None:
        self.pki = pki
        self.pg = pg
        self.key = key
        self.serial = 1
        self.nodes: list[Node] = []
        self.audit = MemoryAuditSink()
        self.proxy: Node | None = None
        self.agents: list[Node] = []
        self.bundle_bytes = b""

    # -- bundles -----------------------------------------------------------------------

    def next_bundle(self, **changes: Any) -> bytes:
        self.serial += 1
        return sign(base_bundle(self.pki, self.serial, **changes), self.key)

    def publish(self, data: bytes) -> None:
        """Activate a signed bundle on every node (each verifies it)."""
        self.bundle_bytes = data
        for node in self.nodes:
            node.activate(data)

    def restore(self) -> None:
        self.publish(self.next_bundle())

    # -- nodes --------------------------------------------------------------------------

    def start_proxy(self, host_id: str = "proxy-1", **options: Any) -> ProxyService:
        node = Node(host_id, self.key)
        if self.bundle_bytes:
            node.activate(self.bundle_bytes)
        creds = self.pki.host(host_id, "proxy")

        settings: dict[str, Any] = {
            "web_addr": ("127.0.0.1", 0),
            "tunnel_addr": ("127.0.0.1", 0),
            "audit": self.audit,
            "tunnel_options": FAST_TUNNEL,
            **options,
        }

        async def start() -> ProxyService:
            service = ProxyService(credentials=creds, bundles=node.feed, **settings)
            await service.start()
            return service

        node.service = node.thread.run(start())
        self.nodes.append(node)
        self.proxy = node
        return node.service  # type: ignore[no-any-return]

    def start_agent(
        self, host_id: str = "agent-1", databases: list[BundleDatabase] | None = None,
        *, wait: bool = True, proxies: list[str] | None = None, **options: Any,
    ) -> AgentService:
        """An agent dialling our proxy (or `proxies`); `wait`: until the proxy routes to it."""
        node = Node(host_id, self.key)
        if self.bundle_bytes:
            node.activate(self.bundle_bytes)
        creds = self.pki.host(host_id, "db")
        proxy = self.proxy_service
        tunnels = proxies or [f"127.0.0.1:{proxy.tunnel_address[1]}"]
        options.setdefault("tunnel_options", FAST_LINK)
        options.setdefault("pool_size", 4)

        async def start() -> AgentService:
            service = AgentService(
                credentials=creds,
                bundles=node.feed,
                databases=StaticDatabases(databases or databases_for(self.pg)),
                db_certs=DbCerts(self.pki.cas),
                audit=self.audit,
                proxies=tunnels,
                **options,
            )
            await service.start()
            if wait:
                await service.tunnel.wait_connected(10)
            return service

        node.service = node.thread.run(start())
        self.nodes.append(node)
        self.agents.append(node)
        if wait:
            self.wait_routable(host_id)
        return node.service  # type: ignore[no-any-return]

    @property
    def proxy_service(self) -> ProxyService:
        assert self.proxy is not None
        return self.proxy.service  # type: ignore[no-any-return]

    def wait_routable(self, host_id: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            links = self.proxy.thread.call(self.proxy_service.tunnel.agents)  # type: ignore[union-attr]
            if any(link.host_id == host_id and link.idle for link in links):
                return
            time.sleep(0.02)
        raise AssertionError(f"agent {host_id} did not become routable within {timeout} s")

    def stop_node(self, node: Node) -> None:
        node.stop()
        self.nodes.remove(node)
        if node in self.agents:
            self.agents.remove(node)

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()

    # -- clients --------------------------------------------------------------------------

    @property
    def web_port(self) -> int:
        address = self.proxy_service.web_address
        assert address is not None
        return address[1]

    def cert(self, username: str, service: str = "pg", db_user: str | None = None,
             db_name: str | None = None, **kw: Any) -> UserCert:
        roles = {"alice": ["admin"], "bob": ["admin", "no-metrics"], "carol": ["dev"]}
        return self.pki.route_cert(
            username, kw.pop("roles", roles.get(username, [])), service, db_user, db_name, **kw
        )

    def dsn(self, cert: UserCert | None, user: str, dbname: str, **extra: Any) -> str:
        return conninfo_for(self.web_port, cert, self.pki.host_ca_file, user, dbname, **extra)


@pytest.fixture(scope="session")
def path(pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey) -> Iterator[DataPath]:
    dp = DataPath(pki, pg, signing_key)
    dp.bundle_bytes = dp.next_bundle()
    try:
        dp.start_proxy()
        dp.start_agent()
        yield dp
    finally:
        dp.close()

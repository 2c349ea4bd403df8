"""Test scaffolding for the data path: real CAs, real signed bundles, real PostgreSQL.

- `Pki`: the cluster's three CAs from `control.ca` (real), and what they issue: host
  credentials for proxies and agents, route certificates for users (written as files psql
  reads, keys 0600), PostgreSQL's server certificate.
- `DbCerts`: database client certificates (CN = db user) issued by the real db CA, cached:
  what `dataplane.cluster.DbClientCerts` does with the control plane, done locally here.
- `Feed`: a bundle source fed with *signed bundle bytes*, verified by
  `schemas.bundle.verify_bundle` before activation, like the agent's real feed.
- `make_bundle` / `sign`: a bundle of roles, users and databases signed with Ed25519.
- `LoopThread`: a uvloop event loop in a thread (a proxy or an agent runs on each).
- `conninfo_for`: libpq connection strings for psql through the proxy.

Never used outside tests/.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import uvloop
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from control.ca import ClusterCAs, certificate_pem
from schemas.bundle import (
    Bundle,
    BundleCAs,
    BundleCluster,
    BundleConditions,
    BundleDatabase,
    BundleRole,
    BundleUser,
    key_id,
    sign_bundle,
    verify_bundle,
)
from schemas.identity import IDENTITY_OID, Identity, Route, decode_identity
from tests.fixtures.pg import conninfo
from transport.tls import new_private_key, private_key_pem

CLUSTER = "example"
T = TypeVar("T")


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


@dataclass(frozen=True)
class HostCreds:
    """Host credentials in the shape of `dataplane.cluster.HostCredentials`."""

    cluster: str
    host_id: str
    role: str
    cert_pem: bytes
    key_pem: bytes
    host_cas: tuple[bytes, ...]
    user_cas: tuple[bytes, ...] = ()
    db_cas: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class UserCert:
    """A certificate psql presents: files, and the identity it carries."""

    cert_file: Path
    key_file: Path
    identity: Identity


@dataclass(frozen=True)
class DbCert:
    cert_pem: bytes
    key_pem: bytes
    db_cas: tuple[bytes, ...]
    expires: datetime


class Pki:
    """The real CAs of a test cluster (and files of what they issue) under `base`."""

    def __init__(self, base: Path, cluster: str = CLUSTER) -> None:
        self.base = base
        self.cluster = cluster
        self.data_dir = base / "data"
        self.cas = ClusterCAs.load_or_create(self.data_dir, cluster)
        self.host_ca_file = base / "host-ca.crt"
        self.host_ca_file.write_bytes(self.cas.host.certificate_pem())
        self.db_ca_file = base / "db-ca.crt"
        self.db_ca_file.write_bytes(self.cas.db.certificate_pem())
        self._n = 0

    def host(self, host_id: str, role: str, ttl: timedelta = timedelta(hours=2)) -> HostCreds:
        key = new_private_key()
        cert = self.cas.host.issue_host(
            key.public_key(), host_id, role,  # type: ignore[arg-type]
            dns_names=["localhost"], ip_addresses=["127.0.0.1"], ttl=ttl,
        )
        return HostCreds(
            cluster=self.cluster,
            host_id=host_id,
            role=role,
            cert_pem=certificate_pem(cert),
            key_pem=private_key_pem(key),
            host_cas=(self.cas.host.certificate_pem(),),
            user_cas=(self.cas.user.certificate_pem(),),
            db_cas=(self.cas.db.certificate_pem(),),
        )

    def login_identity(
        self, username: str, roles: Sequence[str], expires: datetime | None = None
    ) -> Identity:
        return Identity(
            username=username,
            roles=tuple(roles),
            cluster=self.cluster,
            usage="user",
            expires=expires or datetime.now(UTC) + timedelta(hours=12),
        )

    def _files(self, stem: str) -> tuple[Path, Path]:
        self._n += 1
        directory = self.base / "certs"
        directory.mkdir(exist_ok=True)
        return directory / f"{stem}-{self._n}.crt", directory / f"{stem}-{self._n}.key"

    def route_cert(
        self,
        username: str,
        roles: Sequence[str],
        service: str,
        db_user: str | None = None,
        db_name: str | None = None,
        *,
        ttl: timedelta = timedelta(hours=1),
        now: datetime | None = None,
        cas: ClusterCAs | None = None,
    ) -> UserCert:
        """A `tsh db login` certificate for `service` (route db_user / db_name optional)."""
        ca = (cas or self.cas).user
        key = new_private_key()
        login = self.login_identity(
            username, roles, (now or datetime.now(UTC)) + timedelta(hours=12)
        )
        route = Route(service=service, db_user=db_user, db_name=db_name)
        cert = ca.issue_route(key.public_key(), login, route, ttl, now=now)
        crt, key_file = self._files(f"{username}-{service}")
        crt.write_bytes(certificate_pem(cert))
        write_private(key_file, private_key_pem(key))
        ext = cert.extensions.get_extension_for_oid(IDENTITY_OID)
        return UserCert(crt, key_file, decode_identity(ext.value.value))  # type: ignore[attr-defined]

    def login_cert(self, username: str, roles: Sequence[str]) -> UserCert:
        """A `tsh login` certificate (usage user, no route): not for databases."""
        key = new_private_key()
        identity = self.login_identity(username, roles)
        cert = self.cas.user.issue_user(key.public_key(), identity, timedelta(hours=1))
        crt, key_file = self._files(f"{username}-login")
        crt.write_bytes(certificate_pem(cert))
        write_private(key_file, private_key_pem(key))
        return UserCert(crt, key_file, identity)

    def db_server_files(self, directory: Path) -> tuple[Path, Path, Path]:
        """PostgreSQL's server certificate (db CA) for localhost / 127.0.0.1."""
        directory.mkdir(parents=True, exist_ok=True)
        key = new_private_key()
        cert = self.cas.db.issue_db_server(
            key.public_key(), ["localhost", "127.0.0.1"], timedelta(days=2)
        )
        crt, key_file, ca = directory / "server.crt", directory / "server.key", directory / "ca.crt"
        crt.write_bytes(certificate_pem(cert))
        write_private(key_file, private_key_pem(key))
        ca.write_bytes(self.cas.db.certificate_pem())
        return crt, key_file, ca


class DbCerts:
    """Database client certificates from the real db CA, cached per db user."""

    def __init__(self, cas: ClusterCAs, ttl: timedelta = timedelta(hours=1)) -> None:
        self.cas = cas
        self.ttl = ttl
        self._cache: dict[str, DbCert] = {}
        self.issued = 0

    async def get(self, db_user: str) -> DbCert:
        cert = self._cache.get(db_user)
        if cert is None or cert.expires - datetime.now(UTC) < self.ttl / 3:
            key = new_private_key()
            issued = self.cas.db.issue_db_client(key.public_key(), db_user, self.ttl)
            cert = DbCert(
                certificate_pem(issued),
                private_key_pem(key),
                (self.cas.db.certificate_pem(),),
                issued.not_valid_after_utc,
            )
            self._cache[db_user] = cert
            self.issued += 1
        return cert


class Feed:
    """A bundle source that activates only signed bundles that verify (as the agent's does)."""

    def __init__(
        self, signing_key: Ed25519PrivateKey | Ed25519PublicKey, cluster: str = CLUSTER
    ) -> None:
        public = (
            signing_key.public_key()
            if isinstance(signing_key, Ed25519PrivateKey)
            else signing_key
        )
        self.keys = {key_id(public): public}
        self.cluster = cluster
        self.current: Bundle | None = None
        self._subscribers: list[Callable[[Bundle], None]] = []

    def subscribe(self, callback: Callable[[Bundle], None]) -> None:
        self._subscribers.append(callback)

    def activate(self, data: bytes) -> Bundle:
        bundle = verify_bundle(
            data,
            self.keys,
            self.cluster,
            self.current.serial if self.current else 0,
            datetime.now(UTC),
        )
        self.current = bundle
        for callback in self._subscribers:
            callback(bundle)
        return bundle


def role(
    name: str,
    allow_labels: Mapping[str, Sequence[str]] | None = None,
    db_users: Sequence[str] = ("*",),
    db_names: Sequence[str] = ("*",),
    deny: Mapping[str, Any] | None = None,
) -> BundleRole:
    return BundleRole(
        name=name,
        allow=BundleConditions(
            db_labels={k: list(v) for k, v in (allow_labels or {"*": ["*"]}).items()},
            db_users=list(db_users),
            db_names=list(db_names),
        ),
        deny=BundleConditions(**(deny or {})),
    )


def make_bundle(
    pki: Pki,
    *,
    serial: int,
    roles: Iterable[BundleRole],
    users: Mapping[str, Sequence[str]],
    databases: Iterable[BundleDatabase] = (),
    traits: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    disconnect_expired_cert: bool = False,
    extra_user_cas: Sequence[bytes] = (),
) -> Bundle:
    now = datetime.now(UTC)
    return Bundle(
        cluster=BundleCluster(
            name=pki.cluster,
            certificate_ttl_seconds=3600,
            max_session_ttl_seconds=12 * 3600,
            disconnect_expired_cert=disconnect_expired_cert,
        ),
        serial=serial,
        commit=f"{serial:040x}",
        issued_at=now - timedelta(seconds=5),
        expires_at=now + timedelta(days=1),
        roles={r.name: r for r in roles},
        users={
            name: BundleUser(
                name=name,
                roles=list(user_roles),
                traits={k: list(v) for k, v in (traits or {}).get(name, {}).items()},
            )
            for name, user_roles in users.items()
        },
        databases={db.name: db for db in databases},
        cas=BundleCAs(
            user=[pki.cas.user.certificate_pem().decode(), *(c.decode() for c in extra_user_cas)],
            host=[pki.cas.host.certificate_pem().decode()],
            db=[pki.cas.db.certificate_pem().decode()],
        ),
    )


def sign(bundle: Bundle, key: Ed25519PrivateKey) -> bytes:
    return sign_bundle(bundle, key)


class LoopThread:
    """A uvloop event loop running in a thread; `run(coro)` waits for a result."""

    def __init__(self, name: str) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        async def wrapper() -> T:
            return fn(*args)

        return self.run(wrapper(), timeout)

    def stop(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(drain(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def conninfo_for(
    port: int,
    cert: UserCert | None,
    root_ca: Path,
    user: str,
    dbname: str,
    *,
    sslmode: str = "verify-full",
    **extra: str | int,
) -> str:
    params: dict[str, str | int] = {
        "host": "localhost",
        "hostaddr": "127.0.0.1",
        "port": port,
        "user": user,
        "dbname": dbname,
        "sslmode": sslmode,
        "sslrootcert": str(root_ca),
        "gssencmode": "disable",
        "connect_timeout": 10,
    }
    if cert is not None:
        params["sslcert"] = str(cert.cert_file)
        params["sslkey"] = str(cert.key_file)
    params.update(extra)
    return conninfo(**params)


def client_hello(alpn: list[str] | None) -> bytes:
    """The first flight of a real TLS client (Python's OpenSSL) offering `alpn`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="db")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a TLS client finished its handshake alone")

"""Client certificates a db agent presents to PostgreSQL: CN = the database user.

For each database user the agent makes an ECDSA P-256 key here (it never leaves the
process: no file, no log) and asks the control plane to sign it (`POST /v1/certs/db-client`,
db CA). The certificate is cached and reused until 2/3 of its lifetime has passed; then the
next session fetches a new one. Concurrent sessions for one user share one request.

While the control plane is unreachable, a cached certificate that is still valid is used
(the sessions keep working; a warning says so); with none, the session fails with a
message saying why. When the control plane answers "no" (4xx), nothing cached is used:
that is a decision, not an outage.

`DbClientCert.client_context()` builds the TLS client context for PostgreSQL once per
certificate and CA choice and caches it: building one writes the key to a temporary 0600
file (the ssl module loads keys only from files), which is not done per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dataplane.cluster.api_client import (
    ControlPlaneClient,
    ControlPlaneRefused,
    ControlPlaneUnavailable,
)
from schemas.api import DbClientCertRequest
from schemas.identity import IdentityError, common_name, load_certificates
from transport import tls

log = logging.getLogger("teleport.cluster.dbcerts")

#: A cached certificate is replaced once this fraction of its lifetime has passed.
REFRESH_FRACTION = 2 / 3
#: A certificate this close to its expiry is not handed out, even during an outage (or a
#: tenth of its lifetime, when that is shorter).
EXPIRY_MARGIN = timedelta(seconds=5)


class DbCertError(LookupError):
    """No usable client certificate for a database user; the message says why (a
    LookupError, as `dataplane.agent.interfaces.DbClientCertsLike` asks)."""


@dataclass(frozen=True)
class DbClientCert:
    """A signed client certificate for one database user, with its key (never in repr)."""

    db_user: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    db_cas: tuple[bytes, ...]
    expires: datetime
    received: datetime
    _contexts: dict[tuple[object, ...], ssl.SSLContext] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def refresh_at(self) -> datetime:
        return self.received + (self.expires - self.received) * REFRESH_FRACTION

    def usable(self, now: datetime | None = None) -> bool:
        """Still valid for a new connection (not within EXPIRY_MARGIN of expiring)."""
        margin = min(EXPIRY_MARGIN, (self.expires - self.received) / 10)
        return (now or datetime.now(UTC)) < self.expires - margin

    def client_context(
        self, cas: Sequence[tls.CertSource] | None = None, *, check_hostname: bool = True
    ) -> ssl.SSLContext:
        """A TLS client context presenting this certificate, verifying PostgreSQL against
        `cas` (default: the cluster's db CA); `check_hostname` False is verify-ca.
        Built once per (cas, check_hostname) and cached on this certificate."""
        chosen: Sequence[tls.CertSource] = self.db_cas if cas is None else cas
        cache_key = (
            tuple(c if isinstance(c, bytes) else os.fspath(c) for c in chosen),
            check_hostname,
        )
        ctx = self._contexts.get(cache_key)
        if ctx is None:
            ctx = tls.client_context(chosen, self.cert_pem, self.key_pem,
                                     check_hostname=check_hostname)
            self._contexts[cache_key] = ctx
        return ctx


class DbClientCerts:
    """Per-database-user client certificates from the control plane, cached."""

    def __init__(
        self,
        client: ControlPlaneClient,
        *,
        ttl: timedelta | None = None,
        trusted_db_cas: Sequence[bytes] = (),
        max_entries: int = 1024,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.trusted_db_cas = [c for pem in trusted_db_cas for c in load_certificates(pem)]
        self.max_entries = max_entries
        self._cache: dict[str, DbClientCert] = {}
        self._inflight: dict[str, asyncio.Task[DbClientCert]] = {}
        self.requests = 0

    def cached(self, db_user: str) -> DbClientCert | None:
        return self._cache.get(db_user)

    async def get(self, db_user: str) -> DbClientCert:
        """A certificate for `db_user`: cached if fresh, else fetched (one request shared by
        concurrent callers); during an outage, a cached one still valid. DbCertError if none."""
        if not db_user:
            raise DbCertError("no database user given")
        entry = self._cache.get(db_user)
        now = datetime.now(UTC)
        if entry is not None and now < entry.refresh_at:
            return entry
        task = self._inflight.get(db_user)
        if task is None:
            task = asyncio.create_task(self._fetch(db_user), name=f"db-cert-{db_user}")
            self._inflight[db_user] = task
            task.add_done_callback(lambda t, user=db_user: self._done(user, t))
        try:
            # shield: one caller giving up does not cancel the request the others wait for
            return await asyncio.shield(task)
        except ControlPlaneUnavailable as exc:
            entry = self._cache.get(db_user)
            if entry is not None and entry.usable():
                log.warning(
                    "the control plane is unreachable (%s); using the cached certificate for "
                    "database user %s, valid until %s", exc, db_user,
                    f"{entry.expires:%H:%M:%S} UTC",
                )
                return entry
            raise DbCertError(
                f"cannot get a client certificate for database user {db_user!r}: the control "
                f"plane is unreachable ({exc}) and no valid certificate is cached"
            ) from None
        except ControlPlaneRefused as exc:
            raise DbCertError(
                f"the control plane refused a client certificate for database user "
                f"{db_user!r}: {exc}"
            ) from None

    def _done(self, db_user: str, task: asyncio.Task[DbClientCert]) -> None:
        if self._inflight.get(db_user) is task:
            del self._inflight[db_user]
        if not task.cancelled():
            task.exception()  # retrieved here so an error nobody awaited is not reported

    async def _fetch(self, db_user: str) -> DbClientCert:
        key = tls.new_private_key()
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        self.requests += 1
        answer = await self.client.db_client_cert(
            DbClientCertRequest(
                db_user=db_user,
                public_key=public_pem,
                ttl_seconds=int(self.ttl.total_seconds()) if self.ttl else None,
            )
        )
        received = datetime.now(UTC)
        cert_pem = answer.cert.encode()
        db_cas = tuple(pem.encode() for pem in answer.db_ca)
        cert = self._check(db_user, key, cert_pem, db_cas, received)
        entry = DbClientCert(
            db_user=db_user,
            cert_pem=cert_pem,
            key_pem=tls.private_key_pem(key),
            db_cas=db_cas,
            expires=cert.not_valid_after_utc,
            received=received,
        )
        self._store(entry)
        log.info("got a client certificate for database user %s, valid until %s", db_user,
                 f"{entry.expires:%Y-%m-%d %H:%M:%S} UTC")
        return entry

    def _check(self, db_user: str, key: ec.EllipticCurvePrivateKey, cert_pem: bytes,
               db_cas: tuple[bytes, ...], now: datetime) -> x509.Certificate:
        where = f"the client certificate for database user {db_user!r}"
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            issuers = [c for pem in db_cas for c in load_certificates(pem)]
        except (ValueError, IdentityError) as exc:
            raise ControlPlaneUnavailable(f"{where} cannot be read: {exc}",
                                          self.client.base_url) from None
        problems = []
        if common_name(cert) != db_user:
            problems.append(f"its CN is {common_name(cert)!r}")
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            problems.append("it is not for the key made here")
        if not now < cert.not_valid_after_utc:
            problems.append("it has already expired")
        trusted = self.trusted_db_cas or issuers
        if not any(_signed_by(cert, ca) for ca in trusted):
            problems.append("it is not signed by the cluster's db CA")
        if problems:
            raise ControlPlaneUnavailable(f"{where} is not usable: {'; '.join(problems)}",
                                          self.client.base_url)
        return cert

    def _store(self, entry: DbClientCert) -> None:
        self._cache[entry.db_user] = entry
        if len(self._cache) <= self.max_entries:
            return
        now = datetime.now(UTC)
        for user, cert in list(self._cache.items()):
            if not cert.usable(now):
                del self._cache[user]
        while len(self._cache) > self.max_entries:
            oldest = min(self._cache, key=lambda u: self._cache[u].received)
            del self._cache[oldest]


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:
        return False
    with contextlib.suppress(InvalidSignature, ValueError, TypeError):
        cert.verify_directly_issued_by(ca)
        return True
    return False

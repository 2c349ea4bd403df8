"""What the proxy and the db agent need from their surroundings, and how they trust each other.

The data-plane services take their collaborators as constructor arguments typed by the
small Protocols below, so that tests (and the all-in-one launcher) can pass real CAs and
real signed bundles without the control plane:
- `HostCredentialsLike`: this host's identity (host id, cluster, certificate and key PEM)
  and the host CAs it trusts; `dataplane.cluster.HostCredentials` fits it.
- `BundleSourceLike`: the verified bundle in force (`current`), and `subscribe(callback)`
  to hear of each newly activated one; `dataplane.cluster.BundleFeed` fits it.
- `AuditSink.emit(event)`: where audit events go (the agent's sessions, the proxy's
  refusals); it must not block.

`TlsContexts` builds the SSL contexts of both planes' data path from those: the tunnel's
server and client sides (mTLS with host certificates) and the proxy's PostgreSQL side
(client certificates required, verified against the *bundle's* user CAs, rebuilt when they
change). `verify_host_peer` checks, after a tunnel handshake, that the peer is a host of the
expected role (proxy or db) of our cluster. `IdentityCache` keeps `verify_identity` results
for certificates seen again (every tunnel connection, every reconnecting psql).

This module never turns verification off, never logs a key, and builds no context from
anything but the given credentials and the bundle in force.
"""

from __future__ import annotations

import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from cryptography import x509

from dataplane.postgres.messages import ALPN_PROTOCOL
from schemas.audit import AuditEvent, EncodedEvent
from schemas.bundle import Bundle
from schemas.identity import (
    HostRole,
    Identity,
    IdentityError,
    Usage,
    load_certificates,
    verify_identity,
)
from transport.tls import (
    ResumingClientContext,
    peer_certificate,
    resuming_client_context,
    server_context,
)

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME. The PostgreSQL-facing TLS layer lets an expired
# client certificate through the handshake so that the proxy can answer with a postgres
# error that says so (a TLS alert would only say "certificate expired" in OpenSSL's words);
# `schemas.identity.verify_identity` then refuses it, always, before anything is used.
_NO_CHECK_TIME = 0x200000


@runtime_checkable
class HostCredentialsLike(Protocol):
    """This host's credentials from joining the cluster (read-only)."""

    @property
    def cluster(self) -> str: ...

    @property
    def host_id(self) -> str: ...

    @property
    def cert_pem(self) -> bytes: ...

    @property
    def key_pem(self) -> bytes: ...

    @property
    def host_cas(self) -> tuple[bytes, ...]: ...


@runtime_checkable
class BundleSourceLike(Protocol):
    """The verified policy bundle in force."""

    @property
    def current(self) -> Bundle | None: ...

    def subscribe(self, callback: Callable[[Bundle], None]) -> None: ...


@runtime_checkable
class AuditSink(Protocol):
    """Where audit events go; `emit` must not block (queue and return). An event comes as
    a model or, from a session's data path, already written (`EncodedEvent`)."""

    def emit(self, event: AuditEvent | EncodedEvent) -> None: ...


class PeerRejected(Exception):
    """The other end of a tunnel connection is not the host it must be."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def certificates(pems: Sequence[bytes] | Sequence[str]) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    for pem in pems:
        data = pem.encode() if isinstance(pem, str) else pem
        out.extend(load_certificates(data))
    return out


def host_cas(credentials: HostCredentialsLike, bundle: Bundle | None) -> list[bytes]:
    """Host CAs trusted on the tunnel: those from joining, plus the bundle's (rotation)."""
    out = [bytes(pem) for pem in credentials.host_cas]
    if bundle is not None:
        out.extend(pem.encode() for pem in bundle.cas.host if pem.encode() not in out)
    return out


class IdentityCache:
    """`verify_identity` results by certificate bytes and trusted CAs.

    The same certificates come back again and again (a user's psql reconnecting, an agent's
    every tunnel connection); a full path validation costs a quarter of a millisecond. A
    result is reused only for the very same DER bytes, the same trusted CA set and usage,
    and only inside the validity windows of the certificate and of every trusted CA (so
    expiry is never missed). Failures are not cached. Bounded (LRU).
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[object, ...], tuple[Identity, datetime, datetime]] = (
            OrderedDict()
        )
        self._cas: dict[tuple[object, ...], list[x509.Certificate]] = {}

    def trusted(self, pems: Sequence[bytes] | Sequence[str]) -> list[x509.Certificate]:
        key = tuple(pems)
        cas = self._cas.get(key)
        if cas is None:
            if len(self._cas) > 64:
                self._cas.clear()
            cas = self._cas[key] = certificates(pems)
        return cas

    def verify(
        self,
        der: bytes,
        pems: Sequence[bytes] | Sequence[str],
        now: datetime,
        usage: Usage,
    ) -> Identity:
        key = (der, tuple(pems), usage)
        entry = self._entries.get(key)
        if entry is not None:
            identity, start, end = entry
            if start <= now <= end:
                self._entries.move_to_end(key)
                return identity
        cas = self.trusted(pems)
        identity = verify_identity(der, cas, now, usage)
        leaf = x509.load_der_x509_certificate(der)
        start = max([leaf.not_valid_before_utc, *(ca.not_valid_before_utc for ca in cas)])
        end = min([identity.expires, *(ca.not_valid_after_utc for ca in cas)])
        self._entries[key] = (identity, start, end)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return identity


def verify_host_peer(
    transport: Any,
    cache: IdentityCache,
    trusted: Sequence[bytes],
    role: HostRole,
    cluster: str,
    now: datetime | None = None,
) -> Identity:
    """The identity of the host at the other end of `transport`, which must hold a host
    certificate of `role` in `cluster`; raises PeerRejected with the reason otherwise."""
    der = peer_certificate(transport)
    if der is None:
        raise PeerRejected("the peer presented no certificate")
    try:
        identity = cache.verify(der, trusted, now or utcnow(), "host")
    except IdentityError as exc:
        raise PeerRejected(f"the peer's host certificate was refused: {exc}") from None
    if identity.host_role != role:
        raise PeerRejected(
            f"the peer {identity.host_id!r} is a {identity.host_role} host, not a {role} host"
        )
    if identity.cluster != cluster:
        raise PeerRejected(
            f"the peer {identity.host_id!r} belongs to cluster {identity.cluster!r}, not "
            f"{cluster!r}"
        )
    return identity


class TlsContexts:
    """The SSL contexts of the data path, rebuilt only when what they are built from changes.

    Building a context writes the key to a private temporary file and parses PEM: far too
    slow per connection, so contexts are cached and swapped atomically (a connection in a
    handshake keeps the context it started with).
    """

    def __init__(self, credentials: HostCredentialsLike) -> None:
        self._lock = threading.Lock()
        self._credentials = credentials
        self._cache: dict[str, tuple[object, ssl.SSLContext]] = {}

    @property
    def credentials(self) -> HostCredentialsLike:
        return self._credentials

    def update_credentials(self, credentials: HostCredentialsLike) -> None:
        """New host credentials (a renewed certificate): contexts are rebuilt on next use."""
        with self._lock:
            self._credentials = credentials
            self._cache.clear()

    def _get(self, name: str, key: object, build: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
        ctx = build()
        with self._lock:
            self._cache[name] = (key, ctx)
        return ctx

    def tunnel_server(self, bundle: Bundle | None) -> ssl.SSLContext:
        """The proxy's side of the tunnel: present the host certificate, require one."""
        creds = self._credentials
        cas = host_cas(creds, bundle)
        def build() -> ssl.SSLContext:
            ctx = server_context(creds.cert_pem, creds.key_pem, cas, "required")
            # An agent resumes with the ticket of one connection for minutes (tunnel
            # client's SESSION_REFRESH): one ticket per connection, not OpenSSL's two.
            ctx.num_tickets = 1
            return ctx

        return self._get("tunnel-server", (id(creds), tuple(cas)), build)

    def tunnel_client(self, bundle: Bundle | None) -> ResumingClientContext:
        """The agent's side of the tunnel: verify the proxy (host name too), present ours.

        A new context per call (one per proxy link: each keeps the TLS session of its own
        proxy, `ResumingClientContext.session`); the caller keeps it while
        `tunnel_client_key` stays the same."""
        creds = self._credentials
        cas = host_cas(creds, bundle)
        return resuming_client_context(cas, creds.cert_pem, creds.key_pem)

    def tunnel_client_key(self, bundle: Bundle | None) -> tuple[object, ...]:
        """Changes when `tunnel_client` would build a different context."""
        creds = self._credentials
        return (id(creds), tuple(host_cas(creds, bundle)))

    def postgres_server(self, bundle: Bundle) -> ssl.SSLContext:
        """The proxy's PostgreSQL side: a client certificate, when presented, must chain to a
        user CA of the bundle in force. OpenSSL leaves two checks to the proxy, which then
        answers with a postgres error psql prints instead of a bare TLS failure: that there
        is a certificate at all (optional here, required by the frontend) and expiry
        (`verify_identity` refuses it with the date and what to run)."""
        creds = self._credentials
        user_cas = tuple(pem.encode() for pem in bundle.cas.user)
        if not user_cas:
            raise ValueError(
                f"the bundle in force (serial {bundle.serial}) carries no user CA, so no client "
                "certificate can be verified"
            )

        def build() -> ssl.SSLContext:
            ctx = server_context(creds.cert_pem, creds.key_pem, list(user_cas), "optional")
            ctx.verify_flags = ssl.VerifyFlags(int(ctx.verify_flags) | _NO_CHECK_TIME)
            _postgres_tls(ctx)
            return ctx

        return self._get("postgres-server", (id(creds), user_cas), build)

    def postgres_server_without_bundle(self) -> ssl.SSLContext:
        """The proxy's PostgreSQL side before the first bundle: TLS with the host
        certificate, no client certificate asked for (there is no user CA to verify one
        against). Only for telling the client, inside TLS where libpq shows it, that the
        proxy cannot serve it yet: nothing is relayed on such a connection."""
        creds = self._credentials

        def build() -> ssl.SSLContext:
            ctx = server_context(creds.cert_pem, creds.key_pem)
            _postgres_tls(ctx)
            return ctx

        return self._get("postgres-server-without-bundle", id(creds), build)

    def web_server_without_upstream(self) -> ssl.SSLContext:
        """The proxy's web port answering by itself (the control plane it relays the API to
        is unreachable): TLS with the host certificate, no client certificate asked for."""
        return self.postgres_server_without_bundle()


def _postgres_tls(ctx: ssl.SSLContext) -> None:
    """What the proxy's PostgreSQL side adds to a server context: the ALPN protocol
    "postgresql" chosen when offered (libpq 17 and later offer it, and require it back when
    they start TLS at once, `sslnegotiation=direct`), and no session tickets."""
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    _no_tickets(ctx)


def _no_tickets(ctx: ssl.SSLContext) -> None:
    """libpq never resumes a TLS session: issuing tickets (two per connection in TLS 1.3)
    would be work for nothing. PostgreSQL turns them off too."""
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET

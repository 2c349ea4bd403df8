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
expected role (proxy or db) of our cluster.

This module never turns verification off, never logs a key, and builds no context from
anything but the given credentials and the bundle in force.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from cryptography import x509

from schemas.audit import AuditEvent
from schemas.bundle import Bundle
from schemas.identity import HostRole, Identity, IdentityError, load_certificates, verify_identity
from transport.tls import client_context, peer_chain, server_context

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
    """Where audit events go; `emit` must not block (queue and return)."""

    def emit(self, event: AuditEvent) -> None: ...


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


def verify_host_peer(
    transport: Any,
    trusted: Sequence[x509.Certificate],
    role: HostRole,
    cluster: str,
    now: datetime | None = None,
) -> Identity:
    """The identity of the host at the other end of `transport`, which must hold a host
    certificate of `role` in `cluster`; raises PeerRejected with the reason otherwise."""
    chain = peer_chain(transport)
    if not chain:
        raise PeerRejected("the peer presented no certificate")
    try:
        identity = verify_identity(chain, trusted, now or utcnow(), "host")
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
        return self._get(
            "tunnel-server",
            (id(creds), tuple(cas)),
            lambda: server_context(creds.cert_pem, creds.key_pem, cas, "required"),
        )

    def tunnel_client(self, bundle: Bundle | None) -> ssl.SSLContext:
        """The agent's side of the tunnel: verify the proxy (host name too), present ours."""
        creds = self._credentials
        cas = host_cas(creds, bundle)
        return self._get(
            "tunnel-client",
            (id(creds), tuple(cas)),
            lambda: client_context(cas, creds.cert_pem, creds.key_pem),
        )

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
            return ctx

        return self._get("postgres-server", (id(creds), user_cas), build)

"""A proxy's or db agent's identity in the cluster: joining, its host certificate, renewal.

Join (once per data dir)
    `join()` trades a join token for a host certificate (host CA, ECDSA P-256 key made
    here), the cluster's CA certificates and the bundle verification keys. Before the first
    join the host CA is not known yet, so the control plane's TLS certificate cannot be
    verified the usual way. The host CA is read from `GET /v1/ping` on an unverified
    connection that carries nothing secret; its sha256 fingerprint must equal the operator's
    `ca_pin` (as `ping` and `tctl status` print it); only then is the token sent, on a new
    connection that verifies the control plane against that CA. Without a pin the join is
    refused unless `insecure_first_join` is set (trust on first use, logged loudly). After
    the join every connection verifies the host CA obtained at join.

Files, under `<data_dir>/host/` (0700)
    `<role>.pem`   the private key then the certificate, PEM, 0600 from creation, replaced
                   atomically on renewal (key and certificate never disagree on disk)
    `<role>.json`  cluster, host id, role, the CA certificates, bundle keys, tunnel
                   addresses, the control plane address and the names asked for at join
    A joined data dir needs no token again: `join()` loads the files when they hold a
    certificate that has not expired.

Peers
    Contexts built here can check the identity inside the peer's certificate during the
    TLS handshake (`require_host_peer`): chain to the host CA, cluster, host role. Agents
    talk to the API only when its certificate says host role `auth`.

This module never logs, prints or returns a private key in a message, and never sends the
join token on a connection whose server it has not verified.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import socket
import ssl
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from dataplane.cluster._backoff import Backoff, sleep_or_stop
from dataplane.cluster.api_client import (
    ControlPlaneClient,
    ControlPlaneError,
    ControlPlaneRefused,
    parse_auth_addr,
    ping_unverified,
)
from schemas.api import HostCert, HostCertRequest, JoinRequest, JoinResponse
from schemas.bundle import public_key_from_b64, public_key_to_b64
from schemas.identity import (
    Identity,
    IdentityError,
    fingerprint,
    load_certificates,
    verify_identity,
)
from transport import tls
from transport.files import ensure_dir, write_private

log = logging.getLogger("teleport.cluster.identity")

HOST_DIR = "host"
HostRole = Literal["proxy", "db"]
PeerRole = Literal["auth", "proxy", "db"]
CAChoice = Literal["host", "user", "db"]
#: A host certificate is renewed when this fraction of its lifetime has passed.
RENEW_FRACTION = 2 / 3
API_PEER_ROLES: tuple[PeerRole, ...] = ("auth",)

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


class JoinError(Exception):
    """Joining failed; the message says why and what to do (it is printed as it is)."""


class CredentialsError(Exception):
    """The files under `<data_dir>/host/` cannot be used; the message names the file."""


# --- the credentials ---------------------------------------------------------------------


@dataclass(frozen=True)
class HostCredentials:
    """What a joined proxy or db agent presents and trusts. The key is never in repr()."""

    cluster: str
    host_id: str
    role: HostRole
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    expires: datetime
    user_cas: tuple[bytes, ...]
    host_cas: tuple[bytes, ...]
    db_cas: tuple[bytes, ...]
    bundle_keys: Mapping[str, Ed25519PublicKey]
    not_before: datetime
    auth_addr: str = ""
    tunnel_addrs: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()

    @property
    def renew_at(self) -> datetime:
        """When to renew: `RENEW_FRACTION` of the way from notBefore to notAfter."""
        return self.not_before + (self.expires - self.not_before) * RENEW_FRACTION

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires

    def cas(self, which: CAChoice) -> tuple[bytes, ...]:
        return {"host": self.host_cas, "user": self.user_cas, "db": self.db_cas}[which]

    def server_context(
        self,
        client_auth: tls.ClientAuth = "required",
        client_cas: CAChoice = "host",
        *,
        peer_roles: Collection[PeerRole] = (),
    ) -> ssl.SSLContext:
        """A TLS server context presenting this host's certificate; client certificates are
        verified against the `client_cas` CA(s). With `peer_roles` (host CA, client_auth
        required), the handshake also fails unless the client is a host of this cluster with
        one of those roles."""
        ctx = tls.server_context(self.cert_pem, self.key_pem, self.cas(client_cas), client_auth)
        if peer_roles:
            if client_cas != "host" or client_auth != "required":
                raise ValueError("peer_roles needs client_cas='host' and client_auth='required'")
            require_host_peer(ctx, self.host_cas, self.cluster, peer_roles)
        return ctx

    def client_context(
        self,
        server_cas: CAChoice = "host",
        check_hostname: bool = True,
        *,
        peer_roles: Collection[PeerRole] = (),
    ) -> ssl.SSLContext:
        """A TLS client context presenting this host's certificate and verifying the server
        against the `server_cas` CA(s) (and its name unless `check_hostname` is False). With
        `peer_roles`, the server must also be a host of this cluster with one of those roles."""
        ctx = tls.client_context(
            self.cas(server_cas), self.cert_pem, self.key_pem, check_hostname=check_hostname
        )
        if peer_roles:
            if server_cas != "host":
                raise ValueError("peer_roles needs server_cas='host'")
            require_host_peer(ctx, self.host_cas, self.cluster, peer_roles)
        return ctx

    def api_context(self) -> ssl.SSLContext:
        """For the control plane's API: host CA, the peer's certificate must say host role
        `auth`. Not its name: agents reach it through a proxy address as often as directly,
        and the role in the certificate is the stronger check."""
        return self.client_context("host", check_hostname=False, peer_roles=API_PEER_ROLES)


# --- checking the peer's identity inside the handshake -----------------------------------


def _verification_error(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(ssl.SSL_ERROR_SSL, message)
    exc.verify_message = message
    exc.verify_code = 0
    exc.reason = "PEER_IDENTITY_REFUSED"
    exc.library = "teleport-db"
    return exc


def require_host_peer(
    ctx: ssl.SSLContext,
    host_cas: Sequence[bytes],
    cluster: str,
    roles: Collection[PeerRole],
) -> ssl.SSLContext:
    """Make every handshake on `ctx` also verify the peer's teleport-db host identity.

    After OpenSSL has verified the chain, the peer's leaf is checked with
    `schemas.identity.verify_identity` (host usage, host CA, validity) and must name
    `cluster` and one of `roles`; otherwise the handshake fails with
    `ssl.SSLCertVerificationError` saying why. Works on asyncio and uvloop transports
    (both create their SSLObject through `ctx.sslobject_class`).
    """
    trusted = [cert for pem in host_cas for cert in load_certificates(pem)]
    allowed = frozenset(roles)
    if not trusted or not allowed:
        raise ValueError("require_host_peer needs the host CA(s) and at least one role")
    wanted = " or ".join(sorted(allowed))

    class _HostPeerSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            der = self.getpeercert(binary_form=True)
            if not der:
                raise _verification_error("the peer presented no certificate")
            try:
                identity = verify_identity(
                    [x509.load_der_x509_certificate(der)], trusted, datetime.now(UTC), "host"
                )
            except IdentityError as exc:
                raise _verification_error(f"the peer's host certificate is refused: {exc}"
                                          ) from None
            if identity.cluster != cluster:
                raise _verification_error(
                    f"the peer belongs to cluster {identity.cluster!r}, not {cluster!r}"
                )
            if identity.host_role not in allowed:
                raise _verification_error(
                    f"the peer is a {identity.host_role} host ({identity.host_id}), not "
                    f"{wanted}: check the address"
                )

    ctx.sslobject_class = _HostPeerSSLObject
    return ctx


# --- files ---------------------------------------------------------------------------


class _HostState(BaseModel):
    """`<data_dir>/host/<role>.json`."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    cluster: str
    host_id: str
    role: HostRole
    auth_addr: str
    user_ca: list[str]
    host_ca: list[str]
    db_ca: list[str]
    bundle_keys: dict[str, str]
    tunnel_addrs: list[str] = []
    dns_names: list[str] = []
    ip_addresses: list[str] = []
    joined_at: datetime


def host_dir(data_dir: Path) -> Path:
    return Path(data_dir) / HOST_DIR


def credential_paths(data_dir: Path, role: HostRole) -> tuple[Path, Path]:
    """(`<role>.pem`, `<role>.json`) under `<data_dir>/host/`."""
    directory = host_dir(data_dir)
    return directory / f"{role}.pem", directory / f"{role}.json"


def _split_pem(data: bytes, path: Path) -> tuple[bytes, bytes]:
    key = cert = None
    for match in _PEM_BLOCK.finditer(data):
        kind = match.group(1)
        if kind.endswith(b"PRIVATE KEY") and key is None:
            key = match.group(0)
        elif kind == b"CERTIFICATE" and cert is None:
            cert = match.group(0)
    if key is None or cert is None:
        raise CredentialsError(
            f"{path} must hold a private key and a certificate (PEM); it is damaged: remove "
            "the data dir's host/ folder and join again with a token"
        )
    return key, cert


def _read_private(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777
        if mode & 0o077:
            raise CredentialsError(
                f"{path} holds a private key but is readable by others (mode {mode:o}); "
                f"run `chmod 600 {path}`"
            )
        return f.read()


def _public_key_pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _check_certificate(
    cert_pem: bytes,
    key: ec.EllipticCurvePrivateKey,
    host_cas: Sequence[bytes],
    *,
    cluster: str,
    host_id: str | None,
    role: HostRole,
    where: str,
    error: type[Exception],
) -> tuple[Identity, x509.Certificate]:
    """The host certificate chains to the host CA, names this cluster, host and role, and
    is for `key`. Checked inside its validity window: expiry is the caller's concern."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        trusted = [c for pem in host_cas for c in load_certificates(pem)]
        moment = min(datetime.now(UTC), cert.not_valid_after_utc - timedelta(seconds=1))
        moment = max(moment, cert.not_valid_before_utc)
        identity = verify_identity([cert], trusted, moment, "host")
    except (ValueError, IdentityError) as exc:
        raise error(f"{where}: the host certificate is not valid: {exc}") from None
    if identity.cluster != cluster:
        raise error(f"{where}: the host certificate is for cluster {identity.cluster!r}, "
                    f"not {cluster!r}")
    if identity.host_role != role:
        raise error(f"{where}: the host certificate is for role {identity.host_role}, "
                    f"not {role}")
    if host_id is not None and identity.host_id != host_id:
        raise error(f"{where}: the host certificate is for host {identity.host_id!r}, "
                    f"not {host_id!r}")
    mine = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if mine != theirs:
        raise error(f"{where}: the host certificate is not for this host's key")
    return identity, cert


def _build(state: _HostState, key_pem: bytes, cert_pem: bytes, where: str,
           error: type[Exception]) -> HostCredentials:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise error(f"{where}: the private key cannot be read: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise error(f"{where}: the private key is not ECDSA P-256")
    host_cas = tuple(pem.encode() for pem in state.host_ca)
    _, cert = _check_certificate(
        cert_pem, key, host_cas, cluster=state.cluster, host_id=state.host_id,
        role=state.role, where=where, error=error,
    )
    try:
        keys = {kid: public_key_from_b64(b64) for kid, b64 in state.bundle_keys.items()}
    except ValueError as exc:
        raise error(f"{where}: a bundle verification key is not valid: {exc}") from None
    if not keys:
        raise error(f"{where}: no bundle verification key; join again")
    return HostCredentials(
        cluster=state.cluster,
        host_id=state.host_id,
        role=state.role,
        cert_pem=cert_pem,
        key_pem=key_pem,
        expires=cert.not_valid_after_utc,
        not_before=cert.not_valid_before_utc,
        user_cas=tuple(pem.encode() for pem in state.user_ca),
        host_cas=host_cas,
        db_cas=tuple(pem.encode() for pem in state.db_ca),
        bundle_keys=keys,
        auth_addr=state.auth_addr,
        tunnel_addrs=tuple(state.tunnel_addrs),
        dns_names=tuple(state.dns_names),
        ip_addresses=tuple(state.ip_addresses),
    )


def load_credentials(data_dir: Path, role: HostRole | None = None) -> HostCredentials | None:
    """The credentials of a joined data dir, or None when it has not joined (as `role`).

    With `role` None, the one role this data dir joined as. Expired credentials are
    returned too (see `HostCredentials.expired`); damaged or inconsistent files raise
    `CredentialsError` naming the file.
    """
    roles: list[HostRole] = [role] if role is not None else ["db", "proxy"]
    found = [r for r in roles if credential_paths(data_dir, r)[1].exists()]
    if not found:
        return None
    if len(found) > 1:
        raise CredentialsError(
            f"{host_dir(data_dir)} holds credentials for roles {' and '.join(found)}: say "
            "which role to load"
        )
    pem_path, json_path = credential_paths(data_dir, found[0])
    try:
        state = _HostState.model_validate_json(json_path.read_bytes())
    except OSError as exc:
        raise CredentialsError(f"cannot read {json_path}: {exc.strerror}") from None
    except ValidationError as exc:
        raise CredentialsError(
            f"{json_path} is damaged ({exc.error_count()} problem(s)); remove the data dir's "
            "host/ folder and join again with a token"
        ) from None
    if not pem_path.exists():
        raise CredentialsError(
            f"{pem_path} is missing (the join did not finish); remove {json_path} and join "
            "again with a token"
        )
    key_pem, cert_pem = _split_pem(_read_private(pem_path), pem_path)
    return _build(state, key_pem, cert_pem, str(pem_path), CredentialsError)


def save_credentials(data_dir: Path, creds: HostCredentials, joined_at: datetime | None = None
                     ) -> None:
    """Write both files: the JSON first, then the key and certificate (0600)."""
    pem_path, json_path = credential_paths(data_dir, creds.role)
    ensure_dir(host_dir(data_dir))
    if joined_at is None:
        try:
            joined_at = _HostState.model_validate_json(json_path.read_bytes()).joined_at
        except (OSError, ValidationError):
            joined_at = datetime.now(UTC)
    state = _HostState(
        cluster=creds.cluster,
        host_id=creds.host_id,
        role=creds.role,
        auth_addr=creds.auth_addr,
        user_ca=[pem.decode() for pem in creds.user_cas],
        host_ca=[pem.decode() for pem in creds.host_cas],
        db_ca=[pem.decode() for pem in creds.db_cas],
        bundle_keys={
            kid: public_key_to_b64(key) for kid, key in sorted(creds.bundle_keys.items())
        },
        tunnel_addrs=list(creds.tunnel_addrs),
        dns_names=list(creds.dns_names),
        ip_addresses=list(creds.ip_addresses),
        joined_at=joined_at,
    )
    write_private(json_path, state.model_dump_json(indent=1).encode() + b"\n")
    _write_pem(pem_path, creds)


def _write_pem(path: Path, creds: HostCredentials) -> None:
    write_private(path, creds.key_pem + creds.cert_pem)


# --- joining -------------------------------------------------------------------------


def normalize_pin(pin: str) -> str:
    """`sha256:<hex>` (also accepted: bare hex, `SHA256:`, hex with colons) to `sha256:<hex>`."""
    text = pin.strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:") :]
    text = text.replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise JoinError(
            f"the CA pin {pin!r} is not sha256:<64 hex digits>; copy it from `tctl status` "
            "on the control plane"
        )
    return "sha256:" + text


async def join(
    data_dir: Path,
    auth_addr: str,
    token: str | None,
    role: HostRole,
    *,
    ca_pin: str | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    insecure_first_join: bool = False,
    nodename: str | None = None,
    timeout: float = 10.0,
) -> HostCredentials:
    """Join the cluster at `auth_addr` as `role`, or load the credentials of an earlier join.

    A data dir with a current certificate for `role` is loaded and nothing is sent (the
    token, if given, is not used). Otherwise the token is required and is sent only to a
    control plane verified against `ca_pin` (or, with `insecure_first_join`, against the
    host CA it presents). Raises `JoinError` with a message to print.
    """
    data_dir = Path(data_dir)
    try:
        existing = load_credentials(data_dir, role)
    except CredentialsError as exc:
        raise JoinError(str(exc)) from None
    if existing is not None and ca_pin:
        pin = normalize_pin(ca_pin)
        joined_with = {ca_fingerprint(pem) for pem in existing.host_cas}
        if pin not in joined_with:
            raise JoinError(
                f"{data_dir} joined cluster {existing.cluster!r}, whose host CA is "
                f"{', '.join(sorted(joined_with))}, not --ca-pin {pin}: to join another "
                f"cluster, remove {host_dir(data_dir)} first"
            )
    if existing is not None and not existing.expired():
        if token:
            log.info("this data dir already joined cluster %s as host %s; the join token is "
                     "not used", existing.cluster, existing.host_id)
        return existing
    if not token:
        if existing is not None:
            raise JoinError(
                f"the host certificate in {credential_paths(data_dir, role)[0]} expired at "
                f"{existing.expires:%Y-%m-%d %H:%M:%S} UTC; give a new join token (--token) "
                "to join again"
            )
        raise JoinError(
            f"{data_dir} has not joined a cluster yet: give a join token (--token, from "
            "`tctl tokens add --type=db` or auth_service.tokens) and --auth-server"
        )
    try:
        base = parse_auth_addr(auth_addr)
    except ValueError as exc:
        raise JoinError(str(exc)) from None
    pin = normalize_pin(ca_pin) if ca_pin else None
    if pin is None and not insecure_first_join:
        raise JoinError(
            f"refusing to send the join token to {base} without verifying who answers: give "
            "--ca-pin sha256:... (the host CA fingerprint `tctl status` prints), or, on a "
            "network you trust, allow trust on first use with --insecure-first-join"
        )

    try:
        ping = await ping_unverified(auth_addr, timeout)
    except ControlPlaneError as exc:
        raise JoinError(f"cannot reach the control plane to join: {exc}") from None
    try:
        host_ca_certs = load_certificates(ping.host_ca.encode())
    except IdentityError as exc:
        raise JoinError(f"{base} sent a host CA that cannot be read: {exc}") from None
    if len(host_ca_certs) != 1:
        raise JoinError(f"{base} sent {len(host_ca_certs)} host CA certificates; expected one")
    presented = fingerprint(host_ca_certs[0])
    if pin is not None:
        if presented != pin:
            raise JoinError(
                f"the control plane at {base} presents host CA {presented}, which does not "
                f"match --ca-pin {pin}: the address is wrong, the cluster was re-created, or "
                "someone is in between. The token was not sent."
            )
    else:
        log.warning(
            "INSECURE FIRST JOIN: trusting the host CA %s that %s presented, WITHOUT a pin. "
            "Anyone able to intercept this connection could have taken the join token. "
            "Compare this fingerprint with `tctl status` on the control plane, and pin it "
            "(--ca-pin) from now on.", presented, base,
        )
    host_ca_pem = ping.host_ca.encode()

    key = tls.new_private_key()
    previous_id = existing.host_id if existing is not None else None
    request = JoinRequest(
        token=token,
        role=role,
        host_id=previous_id,
        nodename=nodename if nodename is not None else socket.gethostname(),
        public_key=_public_key_pem(key.public_key()),
        dns_names=list(dns_names),
        ip_addresses=list(ip_addresses),
    )
    ctx = tls.client_context([host_ca_pem], check_hostname=False)
    require_host_peer(ctx, [host_ca_pem], ping.cluster, API_PEER_ROLES)
    async with ControlPlaneClient(auth_addr, ctx, timeout=timeout) as client:
        try:
            answer = await client.join(request)
        except ControlPlaneRefused as exc:
            raise JoinError(f"the control plane at {base} refused to join this host as "
                            f"{role}: {exc}") from None
        except ControlPlaneError as exc:
            raise JoinError(f"joining through {base} failed: {exc}") from None
    creds = _from_join(answer, key, role, auth_addr, host_ca_pem, ping.cluster,
                       dns_names, ip_addresses, base)
    save_credentials(data_dir, creds, joined_at=datetime.now(UTC))
    log.info("joined cluster %s as %s host %s (certificate valid until %s)", creds.cluster,
             role, creds.host_id, f"{creds.expires:%Y-%m-%d %H:%M:%S} UTC")
    return creds


def _from_join(
    answer: JoinResponse,
    key: ec.EllipticCurvePrivateKey,
    role: HostRole,
    auth_addr: str,
    pinned_host_ca: bytes,
    cluster: str,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    base: str,
) -> HostCredentials:
    where = f"the join answer from {base}"
    if answer.cluster != cluster:
        raise JoinError(f"{where} is for cluster {answer.cluster!r}, but ping said {cluster!r}")
    pinned = _der(pinned_host_ca)
    if not any(_der(pem.encode()) == pinned for pem in answer.host_ca):
        raise JoinError(f"{where} does not include the host CA that was verified; refusing it")
    state = _HostState(
        cluster=answer.cluster,
        host_id=answer.host_id,
        role=role,
        auth_addr=auth_addr,
        user_ca=answer.user_ca,
        host_ca=answer.host_ca,
        db_ca=answer.db_ca,
        bundle_keys=answer.bundle_keys,
        tunnel_addrs=answer.tunnel_addrs,
        dns_names=list(dns_names),
        ip_addresses=list(ip_addresses),
        joined_at=datetime.now(UTC),
    )
    return _build(state, tls.private_key_pem(key), answer.cert.encode(), where, JoinError)


def _der(pem: bytes) -> bytes:
    return b"".join(
        c.public_bytes(serialization.Encoding.DER) for c in load_certificates(pem)
    )


def ca_fingerprint(pem: bytes) -> str:
    """`sha256:<hex>` of a PEM CA certificate, as `ping`, `tctl status` and pins write it."""
    return fingerprint(load_certificates(pem)[0])


# --- renewal -------------------------------------------------------------------------


CredentialsListener = Callable[[HostCredentials], None]


class CredentialRenewer:
    """Renews the host certificate at 2/3 of its life with a new key; tells listeners.

    The renewal request authenticates with the current certificate; the answer is checked
    like a join answer (host CA, cluster, host id, role, our new key) before the files are
    replaced. While the control plane is unreachable, retries back off (but never sleep
    past the expiry); an expired certificate is logged as an error: the host must rejoin.
    """

    def __init__(
        self,
        data_dir: Path,
        credentials: HostCredentials,
        client: ControlPlaneClient,
        *,
        retry: Backoff | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self._creds = credentials
        self.client = client
        self._listeners: list[CredentialsListener] = []
        self._retry = retry or Backoff(first=2.0, cap=60.0)

    @property
    def credentials(self) -> HostCredentials:
        return self._creds

    def subscribe(self, listener: CredentialsListener) -> None:
        """`listener(new_credentials)` runs after each renewal (rebuild TLS contexts)."""
        self._listeners.append(listener)

    async def renew(self) -> HostCredentials:
        """Renew now; raises ControlPlaneError or CredentialsError and changes nothing then."""
        old = self._creds
        key = tls.new_private_key()
        answer: HostCert = await self.client.renew_host_cert(
            HostCertRequest(
                public_key=_public_key_pem(key.public_key()),
                dns_names=list(old.dns_names),
                ip_addresses=list(old.ip_addresses),
            )
        )
        where = "the renewed host certificate"
        if answer.host_id != old.host_id:
            raise CredentialsError(f"{where} is for host {answer.host_id!r}, not {old.host_id!r}")
        cert_pem = answer.cert.encode()
        _, cert = _check_certificate(
            cert_pem, key, old.host_cas, cluster=old.cluster, host_id=old.host_id,
            role=old.role, where=where, error=CredentialsError,
        )
        new = dataclasses.replace(
            old,
            cert_pem=cert_pem,
            key_pem=tls.private_key_pem(key),
            expires=cert.not_valid_after_utc,
            not_before=cert.not_valid_before_utc,
        )
        ensure_dir(host_dir(self.data_dir))
        _write_pem(credential_paths(self.data_dir, new.role)[0], new)
        self._creds = new
        self.client.set_ssl_context(new.api_context())
        log.info("renewed the host certificate of %s; valid until %s", new.host_id,
                 f"{new.expires:%Y-%m-%d %H:%M:%S} UTC")
        for listener in list(self._listeners):
            try:
                listener(new)
            except Exception:
                log.exception("a listener failed to take the renewed host certificate")
        return new

    async def run(self, stop: asyncio.Event) -> None:
        expired_logged = False
        while not stop.is_set():
            now = datetime.now(UTC)
            wait = (self._creds.renew_at - now).total_seconds()
            if wait > 0 and await sleep_or_stop(stop, wait):
                return
            try:
                await self.renew()
            except (ControlPlaneError, CredentialsError) as exc:
                now = datetime.now(UTC)
                if self._creds.expired(now):
                    if not expired_logged:
                        log.error(
                            "the host certificate of %s expired at %s and could not be renewed "
                            "(%s); this host can no longer reach the cluster: join again with "
                            "a new token", self._creds.host_id,
                            f"{self._creds.expires:%Y-%m-%d %H:%M:%S} UTC", exc,
                        )
                        expired_logged = True
                    delay = self._retry.cap
                else:
                    left = (self._creds.expires - now).total_seconds()
                    delay = min(self._retry.next(), max(1.0, left / 2))
                    log.warning("renewing the host certificate failed (%s); retrying in %.0fs, "
                                "it expires in %.0fs", exc, delay, left)
                if await sleep_or_stop(stop, delay):
                    return
            else:
                self._retry.reset()
                expired_logged = False

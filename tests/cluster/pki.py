"""Host credentials made directly with the real CAs of `control/ca.py` (no join needed)."""

from __future__ import annotations

from datetime import timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control.ca import ClusterCAs
from dataplane.cluster.identity import HostCredentials, PeerRole
from schemas.bundle import key_id
from transport import tls


def credentials(
    cas: ClusterCAs,
    role: PeerRole,
    host_id: str,
    *,
    ttl: timedelta = timedelta(hours=1),
    signing_key: Ed25519PrivateKey | None = None,
    dns_names: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
) -> HostCredentials:
    """HostCredentials for a host of `role` ("auth" too: the control plane's own)."""
    key = tls.new_private_key()
    cert = cas.host.issue_host(key.public_key(), host_id, role, dns_names=dns_names,
                               ip_addresses=ip_addresses, ttl=ttl)
    signing = signing_key or Ed25519PrivateKey.generate()
    return HostCredentials(
        cluster=cas.cluster,
        host_id=host_id,
        role=role,  # type: ignore[arg-type]
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=tls.private_key_pem(key),
        expires=cert.not_valid_after_utc,
        not_before=cert.not_valid_before_utc,
        user_cas=(cas.user.certificate_pem(),),
        host_cas=(cas.host.certificate_pem(),),
        db_cas=(cas.db.certificate_pem(),),
        bundle_keys={key_id(signing.public_key()): signing.public_key()},
        dns_names=dns_names,
        ip_addresses=ip_addresses,
    )

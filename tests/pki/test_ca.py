"""The CAs on disk (creation, modes, reloading, refusals) and what each issues."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control.ca import CA_KINDS, CAError, CertificateAuthority, ClusterCAs, load_ca_certificate
from schemas.identity import IDENTITY_OID, Route, ca_kind
from transport.tls import new_private_key

from .conftest import CLUSTER, login_identity

HOUR = timedelta(hours=1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: a file written with a wide mode and chmod-ed later would show it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_first_start_creates_three_cas_with_private_modes(tmp_path: Path, open_umask: None) -> None:
    cas = ClusterCAs.load_or_create(tmp_path, CLUSTER)
    ca_dir = tmp_path / "ca"
    assert mode(ca_dir) == 0o700
    assert sorted(p.name for p in ca_dir.iterdir()) == [
        "db.crt",
        "db.key",
        "host.crt",
        "host.key",
        "user.crt",
        "user.key",
    ]
    for kind in CA_KINDS:
        assert mode(ca_dir / f"{kind}.key") == 0o600
        assert mode(ca_dir / f"{kind}.crt") == 0o644
        cert = cas[kind].certificate
        assert ca_kind(cert.subject) == (CLUSTER, kind)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == 0
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        assert cert.not_valid_after_utc - cert.not_valid_before_utc > timedelta(days=3600)
    assert len({cas[k].fingerprint for k in CA_KINDS}) == 3


def test_second_start_loads_the_same_cas(tmp_path: Path) -> None:
    first = ClusterCAs.load_or_create(tmp_path, CLUSTER)
    again = ClusterCAs.load_or_create(tmp_path, CLUSTER)
    loaded = ClusterCAs.load(tmp_path)
    assert first.fingerprints() == again.fingerprints() == loaded.fingerprints()
    assert all(v.startswith("sha256:") and len(v) == 7 + 64 for v in first.fingerprints().values())
    # A certificate issued before the restart verifies with the reloaded CA.
    cert = first.user.issue_user(new_private_key().public_key(), login_identity(), HOUR)
    cert.verify_directly_issued_by(loaded.user.certificate)


def test_ca_of_another_cluster_name_is_refused(tmp_path: Path) -> None:
    ClusterCAs.load_or_create(tmp_path, CLUSTER)
    with pytest.raises(CAError, match=r"belongs to cluster 'example'.*configured as 'other'"):
        ClusterCAs.load_or_create(tmp_path, "other")


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    ClusterCAs.load_or_create(tmp_path, CLUSTER)
    key = tmp_path / "ca" / "user.key"
    key.chmod(0o644)
    with pytest.raises(CAError, match=r"mode 0644.*chmod 600"):
        CertificateAuthority.load(tmp_path, "user")


def test_orphan_key_gets_a_certificate_missing_key_is_an_error(tmp_path: Path) -> None:
    cas = ClusterCAs.load_or_create(tmp_path, CLUSTER)
    (tmp_path / "ca" / "host.crt").unlink()
    with pytest.raises(CAError, match=r"host.crt is missing"):
        CertificateAuthority.load(tmp_path, "host")
    again = CertificateAuthority.load_or_create(tmp_path, "host", CLUSTER)
    assert again.certificate.public_key() == cas.host.certificate.public_key()
    (tmp_path / "ca" / "db.key").unlink()
    with pytest.raises(CAError, match=r"db.key is missing: restore the key"):
        CertificateAuthority.load_or_create(tmp_path, "db", CLUSTER)


def test_missing_ca_is_not_created_by_load(tmp_path: Path) -> None:
    with pytest.raises(CAError, match=r"no user CA in .*start the auth service"):
        CertificateAuthority.load(tmp_path, "user")
    with pytest.raises(CAError, match="no host CA certificate"):
        load_ca_certificate(tmp_path, "host")
    assert not (tmp_path / "ca").exists()


def test_issued_certificates_start_a_minute_early_and_end_at_ttl(cas: ClusterCAs) -> None:
    start = datetime.now(UTC).replace(microsecond=0)
    cert = cas.user.issue_user(new_private_key().public_key(), login_identity(), HOUR, now=start)
    assert cert.not_valid_before_utc == start - timedelta(minutes=1)
    assert cert.not_valid_after_utc == start + HOUR
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign


def test_ttl_beyond_the_ca_and_wrong_ca_are_refused(cas: ClusterCAs) -> None:
    key = new_private_key().public_key()
    with pytest.raises(CAError, match="outlive the user CA"):
        cas.user.issue_user(key, login_identity(), timedelta(days=4000))
    with pytest.raises(CAError, match="positive"):
        cas.user.issue_user(key, login_identity(), timedelta(0))
    with pytest.raises(CAError, match="signed by the user CA, not the host CA"):
        cas.host.issue_user(key, login_identity(), HOUR)
    with pytest.raises(CAError, match="signed by the db CA"):
        cas.user.issue_db_client(key, "alice", HOUR)
    with pytest.raises(CAError, match="cluster 'elsewhere'"):
        cas.user.issue_user(key, login_identity(cluster="elsewhere"), HOUR)


def test_only_p256_public_keys_are_signed(cas: ClusterCAs) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    for key in (p384, rsa_key):
        with pytest.raises(CAError, match="only ECDSA P-256"):
            cas.db.issue_db_client(key, "alice", HOUR)  # type: ignore[arg-type]
    p256 = new_private_key().public_key()
    as_pem = p256.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cert = cas.db.issue_db_client(as_pem, "alice", HOUR)
    assert cert.public_key() == p256
    with pytest.raises(CAError, match="could not read the public key"):
        cas.db.issue_db_client(b"-----BEGIN PUBLIC KEY-----\nnope\n", "alice", HOUR)


def test_db_server_certificate(cas: ClusterCAs) -> None:
    cert = cas.db.issue_db_server(
        new_private_key().public_key(), ["db.example.com,10.1.2.3", "localhost"], 8760 * HOUR
    )
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "db.example.com"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["db.example.com", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_oid(IDENTITY_OID)
    with pytest.raises(CAError, match="neither an IP address nor a DNS name"):
        cas.db.issue_db_server(new_private_key().public_key(), ["bad host!"], HOUR)
    with pytest.raises(CAError, match="at least one host"):
        cas.db.issue_db_server(new_private_key().public_key(), [" , "], HOUR)


def test_db_client_certificate_names_the_database_user(cas: ClusterCAs) -> None:
    cert = cas.db.issue_db_client(new_private_key().public_key(), "report_reader", HOUR)
    assert cert.subject.rfc4514_string() == "CN=report_reader"
    assert cert.issuer == cas.db.certificate.subject
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(cas.db.certificate)


def test_route_needs_a_live_login(cas: ClusterCAs) -> None:
    past = login_identity(expires=datetime.now(UTC) - HOUR)
    with pytest.raises(CAError, match=r"expired .*tsh login"):
        cas.user.issue_route(new_private_key().public_key(), past, Route(service="a"), HOUR)

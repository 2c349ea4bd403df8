"""Identity in certificates: round trips for each usage, and every way a certificate is refused."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas.identity
from control.ca import CertificateAuthority, ClusterCAs
from schemas.identity import (
    IDENTITY_OID,
    PROJECT_OID_ARC,
    Identity,
    IdentityError,
    Route,
    VerifiedIdentities,
    decode_identity,
    encode_identity,
    identity_extension,
    verify_identity,
)
from transport.tls import new_private_key

from .conftest import CLUSTER, login_identity

HOUR = timedelta(hours=1)


def now() -> datetime:
    return datetime.now(UTC)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def craft(
    ca: CertificateAuthority,
    identity: Identity | None,
    *,
    cn: str = "alice",
    not_after: datetime | None = None,
    critical: bool = False,
    raw_extension: bytes | None = None,
    eku: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> x509.Certificate:
    """A certificate signed with the CA's real key but built by hand, to test the reader."""
    key = new_private_key()
    end = not_after or (identity.expires if identity else now() + HOUR)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - HOUR)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if raw_extension is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(IDENTITY_OID, raw_extension), critical=critical
        )
    elif identity is not None:
        builder = builder.add_extension(identity_extension(identity), critical=critical)
    return builder.sign(ca._key, hashes.SHA256())


# --- round trips -------------------------------------------------------------------------


def test_oid_is_under_the_documented_uuid_arc() -> None:
    assert PROJECT_OID_ARC.startswith("2.25.")
    assert int(PROJECT_OID_ARC.removeprefix("2.25.")) < 2**128
    assert IDENTITY_OID.dotted_string == PROJECT_OID_ARC + ".1"


def test_user_certificate_round_trip(cas: ClusterCAs) -> None:
    key = new_private_key()
    cert = cas.user.issue_user(key.public_key(), login_identity(), 2 * HOUR)
    got = verify_identity([cert], [cas.user.certificate, cas.host.certificate], now(), "user")
    assert got.username == "alice"
    assert got.roles == ("dba", "dev")
    assert got.traits == {"db_users": ("alice", "readonly"), "team": ("payments",)}
    assert got.cluster == CLUSTER
    assert got.usage == "user"
    assert got.route is None and got.host_id is None
    # The CA set the expiry from the TTL, and it is exactly the certificate's notAfter.
    assert got.expires == cert.not_valid_after_utc
    assert timedelta(hours=1, minutes=59) < got.expires - now() <= 2 * HOUR
    ext = cert.extensions.get_extension_for_oid(IDENTITY_OID)
    assert ext.critical is False


def test_database_route_round_trip_from_pem_bytes(cas: ClusterCAs) -> None:
    key = new_private_key()
    login = login_identity()
    route = Route(service="aurora", db_user="alice", db_name="metrics")
    cert = cas.user.issue_route(key.public_key(), login, route, HOUR)
    got = verify_identity(pem(cert), [cas.user.certificate], now(), "db")
    assert got.usage == "db"
    assert got.route == Route(
        service="aurora", protocol="postgres", db_user="alice", db_name="metrics"
    )
    assert got.roles == login.roles and got.traits == login.traits
    got_der = verify_identity(der(cert), [cas.user.certificate], now(), "db")
    assert got_der == got


def test_route_never_outlives_the_login(cas: ClusterCAs) -> None:
    login = login_identity(expires=now() + timedelta(minutes=10))
    cert = cas.user.issue_route(new_private_key().public_key(), login, Route(service="a"), 8 * HOUR)
    assert cert.not_valid_after_utc == login.expires
    assert verify_identity([cert], [cas.user.certificate], now(), "db").expires == login.expires


def test_host_certificate_round_trip(cas: ClusterCAs) -> None:
    cert = cas.host.issue_host(
        new_private_key().public_key(),
        "agent-7",
        "db",
        dns_names=["agent-7.internal"],
        ip_addresses=["10.0.0.7"],
        ttl=HOUR,
    )
    got = verify_identity([cert], [cas.host.certificate], now(), "host")
    assert (got.username, got.host_id, got.host_role, got.usage) == (
        "agent-7",
        "agent-7",
        "db",
        "host",
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_encoding_is_versioned_canonical_json_in_a_der_utf8string() -> None:
    identity = login_identity(expires=datetime(2030, 1, 2, 3, 4, 5, 999, tzinfo=UTC))
    value = encode_identity(identity)
    assert value[0] == 0x0C
    text = value[3:] if value[1] == 0x81 else value[4:] if value[1] == 0x82 else value[2:]
    assert text.startswith(b'{"cluster":"example","expires":"2030-01-02T03:04:05Z"')
    assert b'"v":1' in text and b" " not in text
    assert decode_identity(value) == identity


def test_identity_fields_must_fit_the_usage() -> None:
    with pytest.raises(ValueError, match="needs a route"):
        login_identity(usage="db")
    with pytest.raises(ValueError, match="must not carry a database route"):
        login_identity(route=Route(service="x"))
    with pytest.raises(ValueError, match="host_id and host_role"):
        login_identity(usage="host")
    with pytest.raises(ValueError, match="time zone"):
        login_identity(expires=datetime(2030, 1, 1))


def test_roles_and_traits_may_be_given_as_lists() -> None:
    identity = login_identity(roles=["dba"], traits={"db_users": ["alice"]})
    assert identity.roles == ("dba",) and identity.traits == {"db_users": ("alice",)}
    with pytest.raises(ValueError, match="roles"):
        login_identity(roles="dba")
    with pytest.raises(ValueError, match="roles"):
        login_identity(roles=[""])


# --- tampering and misuse ----------------------------------------------------------------


def test_bit_flip_in_the_extension_breaks_the_signature(cas: ClusterCAs) -> None:
    cert = cas.user.issue_user(new_private_key().public_key(), login_identity(), HOUR)
    data = der(cert)
    assert data.count(b'"dba"') == 1
    forged = x509.load_der_x509_certificate(data.replace(b'"dba"', b'"dbb"'))
    assert decode_identity(
        forged.extensions.get_extension_for_oid(IDENTITY_OID).value.value  # type: ignore[attr-defined]
    ).roles == ("dbb", "dev")
    with pytest.raises(IdentityError, match="signature check failed"):
        verify_identity([forged], [cas.user.certificate], now(), "user")


def test_bit_flip_in_the_signature(cas: ClusterCAs) -> None:
    cert = cas.user.issue_user(new_private_key().public_key(), login_identity(), HOUR)
    data = bytearray(der(cert))
    data[-1] ^= 0x01  # last byte of the ECDSA signature's s
    forged = x509.load_der_x509_certificate(bytes(data))
    with pytest.raises(IdentityError, match="signature check failed"):
        verify_identity([forged], [cas.user.certificate], now(), "user")


def test_certificate_from_another_ca_with_the_same_name(
    cas: ClusterCAs, other_cas: ClusterCAs
) -> None:
    assert other_cas.user.certificate.subject == cas.user.certificate.subject
    cert = other_cas.user.issue_user(new_private_key().public_key(), login_identity(), HOUR)
    with pytest.raises(IdentityError, match="not signed by its key"):
        verify_identity([cert], [cas.user.certificate], now(), "user")


def test_expired(cas: ClusterCAs) -> None:
    cert = cas.user.issue_user(new_private_key().public_key(), login_identity(), HOUR)
    with pytest.raises(IdentityError, match=r"certificate expired at .*tsh login"):
        verify_identity([cert], [cas.user.certificate], now() + 2 * HOUR, "user")


def test_not_yet_valid(cas: ClusterCAs) -> None:
    cert = cas.user.issue_user(
        new_private_key().public_key(), login_identity(), HOUR, now=now() + 3 * HOUR
    )
    with pytest.raises(IdentityError, match=r"not valid before .*clock"):
        verify_identity([cert], [cas.user.certificate], now(), "user")


@pytest.mark.parametrize(
    ("issued", "wanted", "message"),
    [
        ("user", "db", "not a database certificate: run `tsh db login"),
        ("db", "user", "for database access .* not for the cluster API"),
    ],
)
def test_wrong_usage(cas: ClusterCAs, issued: str, wanted: str, message: str) -> None:
    key = new_private_key().public_key()
    if issued == "user":
        cert = cas.user.issue_user(key, login_identity(), HOUR)
    else:
        cert = cas.user.issue_route(key, login_identity(), Route(service="aurora"), HOUR)
    with pytest.raises(IdentityError, match=message):
        verify_identity([cert], [cas.user.certificate], now(), wanted)  # type: ignore[arg-type]


def test_ca_certificate_used_as_a_leaf(cas: ClusterCAs) -> None:
    with pytest.raises(IdentityError, match="is a CA certificate"):
        verify_identity([cas.user.certificate], [cas.user.certificate], now(), "user")


def test_chain_to_the_wrong_kind_of_ca(cas: ClusterCAs) -> None:
    host_cert = cas.host.issue_host(new_private_key().public_key(), "p1", "proxy", ttl=HOUR)
    both = [cas.user.certificate, cas.host.certificate]
    with pytest.raises(IdentityError, match=r"not signed by the cluster's user CA.*host CA"):
        verify_identity([host_cert], both, now(), "user")
    user_cert = cas.user.issue_user(new_private_key().public_key(), login_identity(), HOUR)
    with pytest.raises(IdentityError, match="not trusted here"):
        verify_identity([user_cert], [cas.host.certificate], now(), "host")
    # A db-CA client certificate (for PostgreSQL) is never a teleport-db identity.
    db_client = cas.db.issue_db_client(new_private_key().public_key(), "alice", HOUR)
    with pytest.raises(IdentityError, match="not signed by the cluster's user CA"):
        verify_identity([db_client], [cas.user.certificate, cas.db.certificate], now(), "user")


def test_certificate_without_identity(cas: ClusterCAs) -> None:
    cert = craft(cas.user, None)
    with pytest.raises(IdentityError, match="carries no teleport-db identity"):
        verify_identity([cert], [cas.user.certificate], now(), "user")


def test_critical_identity_extension_is_refused(cas: ClusterCAs) -> None:
    cert = craft(cas.user, login_identity(), critical=True)
    with pytest.raises(IdentityError):
        verify_identity([cert], [cas.user.certificate], now(), "user")


def test_expiry_must_match_not_after(cas: ClusterCAs) -> None:
    identity = login_identity()
    cert = craft(cas.user, identity, not_after=identity.expires + timedelta(seconds=1))
    with pytest.raises(IdentityError, match="does not match the encoded expiry"):
        verify_identity([cert], [cas.user.certificate], now(), "user")


def test_common_name_must_be_the_user(cas: ClusterCAs) -> None:
    cert = craft(cas.user, login_identity(), cn="mallory")
    with pytest.raises(IdentityError, match="CN 'mallory' does not match"):
        verify_identity([cert], [cas.user.certificate], now(), "user")


def test_certificate_must_be_for_client_authentication(cas: ClusterCAs) -> None:
    server_only = craft(cas.user, login_identity(), eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    with pytest.raises(IdentityError, match="path validation"):
        verify_identity([server_only], [cas.user.certificate], now(), "user")
    # Control: the same hand-made certificate with clientAuth is accepted.
    good = craft(cas.user, login_identity())
    assert verify_identity([good], [cas.user.certificate], now(), "user").username == "alice"


def test_identity_for_another_cluster(cas: ClusterCAs) -> None:
    cert = craft(cas.user, login_identity(cluster="elsewhere"))
    with pytest.raises(IdentityError, match="for cluster 'elsewhere'"):
        verify_identity([cert], [cas.user.certificate], now(), "user")


def test_unknown_layout_version(cas: ClusterCAs) -> None:
    value = encode_identity(login_identity()).replace(b'"v":1', b'"v":2')
    cert = craft(cas.user, None, raw_extension=value)
    with pytest.raises(IdentityError, match="layout version 2"):
        verify_identity([cert], [cas.user.certificate], now(), "user")


def test_no_certificate_and_garbage(cas: ClusterCAs) -> None:
    with pytest.raises(IdentityError, match="no certificate"):
        verify_identity([], [cas.user.certificate], now(), "user")
    with pytest.raises(IdentityError, match="could not read"):
        verify_identity(b"\x30\x03junk", [cas.user.certificate], now(), "user")


def test_key_other_than_p256_is_refused(cas: ClusterCAs) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    identity = login_identity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
        .issuer_name(cas.user.certificate.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now() - HOUR)
        .not_valid_after(identity.expires)
        .add_extension(identity_extension(identity), critical=False)
        .sign(cas.user._key, hashes.SHA256())
    )
    with pytest.raises(IdentityError, match="P-256"):
        verify_identity([cert], [cas.user.certificate], now(), "user")


# --- the extension parser never trusts a length ------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_refuses_arbitrary_bytes_cleanly(data: bytes) -> None:
    with contextlib.suppress(IdentityError):
        decode_identity(data)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=20,
    )
)
def test_decoder_refuses_arbitrary_json_cleanly(value: object) -> None:
    body = json.dumps(value).encode()
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x82]) + n.to_bytes(2, "big")
    with contextlib.suppress(IdentityError):
        decode_identity(b"\x0c" + length + body)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x0c",
        b"\x04\x02{}",  # OCTET STRING, not UTF8String
        b"\x0c\x05{}",  # length longer than the content
        b"\x0c\x01{}",  # trailing bytes
        b"\x0c\x81\x02{}",  # non-minimal length
        b"\x0c\x84\xff\xff\xff\xff",  # 4 GiB claimed
        b"\x0c\x80",  # indefinite length
    ],
)
def test_decoder_checks_der_lengths(value: bytes) -> None:
    with pytest.raises(IdentityError):
        decode_identity(value)


def test_oversized_extension_is_refused() -> None:
    body = b'{"v":1,"x":"' + b"a" * 20000 + b'"}'
    with pytest.raises(IdentityError, match="more than"):
        decode_identity(b"\x0c\x82" + len(body).to_bytes(2, "big") + body)


# -- VerifiedIdentities: a certificate seen again is not verified again ---------------------


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the full checks `VerifiedIdentities` runs from now on."""
    calls = [0]
    real = schemas.identity.verify_identity

    def counted(*args: object) -> Identity:
        calls[0] += 1
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(schemas.identity, "verify_identity", counted)
    return calls


def host_cert(cas: ClusterCAs, ttl: timedelta = HOUR) -> bytes:
    return der(cas.host.issue_host(new_private_key().public_key(), "agent-7", "db", ttl=ttl))


def test_a_certificate_seen_again_is_recognised_without_the_full_check(
    cas: ClusterCAs, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting(monkeypatch)
    cache = VerifiedIdentities()
    cert = host_cert(cas)
    first = cache.verify(cert, [cas.host.certificate], now(), "host")
    again = cache.verify(cert, [cas.host.certificate], now() + HOUR / 2, "host")
    assert again == first and first.host_id == "agent-7" and calls == [1]
    # Another usage, or other trusted CAs, is another question: checked in full.
    with pytest.raises(IdentityError, match="not signed by the cluster's user CA"):
        cache.verify(cert, [cas.user.certificate, cas.host.certificate], now(), "user")
    assert calls == [2]


def test_a_recognised_certificate_still_expires(cas: ClusterCAs) -> None:
    cache = VerifiedIdentities()
    cert = host_cert(cas)
    cache.verify(cert, [cas.host.certificate], now(), "host")
    with pytest.raises(IdentityError, match=r"certificate expired at .*rejoin or renew"):
        cache.verify(cert, [cas.host.certificate], now() + 2 * HOUR, "host")
    with pytest.raises(IdentityError, match=r"not valid before .*clock"):
        cache.verify(cert, [cas.host.certificate], now() - 2 * HOUR, "host")


def test_a_refused_certificate_is_refused_every_time(
    cas: ClusterCAs, other_cas: ClusterCAs, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting(monkeypatch)
    cache = VerifiedIdentities()
    stranger = host_cert(other_cas)
    for _ in range(2):
        with pytest.raises(IdentityError, match="not signed by its key"):
            cache.verify(stranger, [cas.host.certificate], now(), "host")
    assert calls == [2]
    # A forged copy of a recognised certificate is other bytes: checked, refused.
    good = bytearray(host_cert(cas))
    cache.verify(bytes(good), [cas.host.certificate], now(), "host")
    good[-1] ^= 0x01
    with pytest.raises(IdentityError, match="signature check failed"):
        cache.verify(bytes(good), [cas.host.certificate], now(), "host")


def test_the_cache_holds_at_most_its_size(cas: ClusterCAs, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting(monkeypatch)
    cache = VerifiedIdentities(size=2)
    certs = [host_cert(cas) for _ in range(3)]
    for cert in certs:
        cache.verify(cert, [cas.host.certificate], now(), "host")
    assert len(cache._held) == 2 and calls == [3]
    cache.verify(certs[0], [cas.host.certificate], now(), "host")  # the oldest was dropped
    cache.verify(certs[2], [cas.host.certificate], now(), "host")  # still held
    assert calls == [4]

"""Bundle signing and verification: every refusal names its reason, and nothing refused is used."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.bundle import (
    Bundle,
    BundleCluster,
    BundleRejected,
    BundleRole,
    RejectReason,
    key_id,
    public_key_from_b64,
    public_key_to_b64,
    sign_bundle,
    verify_bundle,
)

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def make_bundle(serial: int = 7, cluster: str = "root", **kw: object) -> Bundle:
    fields: dict[str, object] = {
        "cluster": BundleCluster(
            name=cluster, certificate_ttl_seconds=43200, max_session_ttl_seconds=108000
        ),
        "serial": serial,
        "commit": "a" * 40,
        "issued_at": NOW - timedelta(minutes=1),
        "expires_at": NOW + timedelta(hours=24),
        "roles": {"dba": BundleRole(name="dba")},
    }
    fields.update(kw)
    return Bundle.model_validate(fields)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def trusted(key: Ed25519PrivateKey) -> dict:
    return {key_id(key.public_key()): key.public_key()}


def refused(data: bytes, keys: dict, **kw: object) -> BundleRejected:
    args = {"cluster": "root", "min_serial": 5, "now": NOW}
    args.update(kw)
    with pytest.raises(BundleRejected) as info:
        verify_bundle(data, keys, **args)  # type: ignore[arg-type]
    return info.value


def test_valid_bundle_round_trips(key: Ed25519PrivateKey) -> None:
    bundle = make_bundle()
    got = verify_bundle(sign_bundle(bundle, key), trusted(key), "root", 5, NOW)
    assert got == bundle


def test_same_serial_is_accepted(key: Ed25519PrivateKey) -> None:
    assert verify_bundle(sign_bundle(make_bundle(5), key), trusted(key), "root", 5, NOW).serial == 5


def test_bad_signature(key: Ed25519PrivateKey) -> None:
    envelope = json.loads(sign_bundle(make_bundle(), key))
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["roles"]["dba"]["allow"] = {"db_users": ["*"], "db_names": ["*"]}
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    err = refused(json.dumps(envelope).encode(), trusted(key))
    assert err.reason is RejectReason.BAD_SIGNATURE
    assert "altered" in str(err)


def test_signature_by_another_key_with_the_trusted_key_id(key: Ed25519PrivateKey) -> None:
    forged = json.loads(sign_bundle(make_bundle(), Ed25519PrivateKey.generate()))
    forged["key_id"] = key_id(key.public_key())
    err = refused(json.dumps(forged).encode(), trusted(key))
    assert err.reason is RejectReason.BAD_SIGNATURE


def test_unknown_key(key: Ed25519PrivateKey) -> None:
    err = refused(sign_bundle(make_bundle(), Ed25519PrivateKey.generate()), trusted(key))
    assert err.reason is RejectReason.UNKNOWN_KEY
    assert "not trusted" in str(err)


def test_wrong_cluster(key: Ed25519PrivateKey) -> None:
    err = refused(sign_bundle(make_bundle(cluster="other"), key), trusted(key))
    assert err.reason is RejectReason.WRONG_CLUSTER
    assert "'other'" in str(err)


def test_lower_serial_is_a_rollback(key: Ed25519PrivateKey) -> None:
    err = refused(sign_bundle(make_bundle(serial=4), key), trusted(key))
    assert err.reason is RejectReason.ROLLBACK
    assert "serial 4" in str(err) and "serial 5" in str(err)


def test_expired(key: Ed25519PrivateKey) -> None:
    data = sign_bundle(make_bundle(), key)
    err = refused(data, trusted(key), now=NOW + timedelta(hours=25))
    assert err.reason is RejectReason.EXPIRED


def test_issued_in_the_future(key: Ed25519PrivateKey) -> None:
    data = sign_bundle(make_bundle(issued_at=NOW + timedelta(hours=1)), key)
    assert refused(data, trusted(key)).reason is RejectReason.NOT_YET_VALID


@pytest.mark.parametrize("cut", [0, 1, 10, 100, -2])
def test_truncated(key: Ed25519PrivateKey, cut: int) -> None:
    data = sign_bundle(make_bundle(), key)
    err = refused(data[:cut], trusted(key))
    assert err.reason is RejectReason.GARBLED


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe garbage", b"[]", b'{"format": "something-else"}', b"null"],
)
def test_garbled(key: Ed25519PrivateKey, data: bytes) -> None:
    assert refused(data, trusted(key)).reason is RejectReason.GARBLED


def test_garbled_payload_base64(key: Ed25519PrivateKey) -> None:
    envelope = json.loads(sign_bundle(make_bundle(), key))
    envelope["payload"] = "***"
    assert refused(json.dumps(envelope).encode(), trusted(key)).reason is RejectReason.GARBLED


def test_signed_payload_that_is_not_a_bundle(key: Ed25519PrivateKey) -> None:
    payload = b'{"hello": "world"}'
    envelope = {
        "format": "teleport-db-bundle/1",
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(payload)).decode(),
        "payload": base64.b64encode(payload).decode(),
    }
    assert refused(json.dumps(envelope).encode(), trusted(key)).reason is RejectReason.GARBLED


@pytest.mark.parametrize("value", [None, ""])
def test_no_signature(key: Ed25519PrivateKey, value: object) -> None:
    envelope = json.loads(sign_bundle(make_bundle(), key))
    if value is None:
        del envelope["signature"]
    else:
        envelope["signature"] = value
    err = refused(json.dumps(envelope).encode(), trusted(key))
    assert err.reason is RejectReason.NO_SIGNATURE


def test_content_digest_ignores_serial_and_times() -> None:
    a = make_bundle(serial=1)
    b = make_bundle(serial=9, issued_at=NOW, expires_at=NOW + timedelta(days=2))
    assert a.content_digest() == b.content_digest()
    assert a.content_digest() != make_bundle(roles={}).content_digest()


def test_public_key_text_round_trip(key: Ed25519PrivateKey) -> None:
    pub = public_key_from_b64(public_key_to_b64(key.public_key()))
    assert key_id(pub) == key_id(key.public_key())

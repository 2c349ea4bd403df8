"""The signed bundle: a policy commit compiled into what the data plane enforces.

The control plane compiles a valid policy commit into a `Bundle` (normalized roles, users,
databases, the cluster settings, the CA certificates), signs its canonical encoding with
Ed25519 and publishes it. Agents and proxies verify it here before using it; a bundle that
fails any check is never used, and the reason is named.

File format (UTF-8 JSON, one object):

    {"format": "teleport-db-bundle/1",
     "key_id": "<16 hex: sha256 of the raw Ed25519 public key, first 8 bytes>",
     "signature": "<base64 Ed25519 signature over the payload bytes>",
     "payload": "<base64 of the canonical JSON of the Bundle>"}

Canonical JSON: the pydantic JSON dump with sorted keys, no insignificant whitespace,
UTF-8. The signature covers exactly the payload bytes, so the envelope's own formatting does
not matter. This module never reads files or clocks: callers pass `now`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = "teleport-db-bundle/1"
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
# Bundles issued this far in the future (clock skew between control plane and agent) are
# still accepted; beyond it the control plane's clock, or the bundle, is wrong.
ALLOWED_CLOCK_SKEW = timedelta(minutes=5)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BundleConditions(_Frozen):
    """An allow or deny block of a role, normalized: label values are always lists."""

    db_labels: dict[str, list[str]] = Field(default_factory=dict)
    db_names: list[str] = Field(default_factory=list)
    db_users: list[str] = Field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.db_labels or self.db_names or self.db_users)


class BundleRole(_Frozen):
    name: str
    allow: BundleConditions = Field(default_factory=BundleConditions)
    deny: BundleConditions = Field(default_factory=BundleConditions)
    max_session_ttl_seconds: int | None = None


class BundleUser(_Frozen):
    name: str
    roles: list[str]
    traits: dict[str, list[str]] = Field(default_factory=dict)


class BundleDatabase(_Frozen):
    name: str
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    protocol: str = "postgres"
    uri: str
    ca_cert_file: str | None = None
    aws_region: str | None = None
    tls_mode: str = "verify-full"


class BundleCluster(_Frozen):
    name: str
    certificate_ttl_seconds: int
    max_session_ttl_seconds: int
    disconnect_expired_cert: bool = False


class BundleCAs(_Frozen):
    """PEM certificates of the cluster's CAs; lists so that a rotation can carry two."""

    user: list[str] = Field(default_factory=list)
    host: list[str] = Field(default_factory=list)
    db: list[str] = Field(default_factory=list)


class Bundle(_Frozen):
    cluster: BundleCluster
    serial: int = Field(ge=1)
    commit: str
    issued_at: datetime
    expires_at: datetime
    roles: dict[str, BundleRole] = Field(default_factory=dict)
    users: dict[str, BundleUser] = Field(default_factory=dict)
    databases: dict[str, BundleDatabase] = Field(default_factory=dict)
    cas: BundleCAs = Field(default_factory=BundleCAs)

    def content_digest(self) -> str:
        """sha256 of the canonical encoding without serial and times: equal for equal policy."""
        data = self.model_dump(mode="json", exclude={"serial", "issued_at", "expires_at"})
        return hashlib.sha256(canonical_json(data)).hexdigest()


class RejectReason(StrEnum):
    GARBLED = "garbled"
    NO_SIGNATURE = "no-signature"
    UNKNOWN_KEY = "unknown-key"
    BAD_SIGNATURE = "bad-signature"
    WRONG_CLUSTER = "wrong-cluster"
    ROLLBACK = "rollback"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"


class BundleRejected(Exception):
    """The bundle must not be used. `reason` is machine-readable, `str()` is for people."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """The bundle verification key as handed to agents at join: base64 of the raw 32 bytes."""
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))


def public_key_to_b64(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign_bundle(bundle: Bundle, private_key: Ed25519PrivateKey) -> bytes:
    payload = canonical_json(bundle.model_dump(mode="json"))
    envelope = {
        "format": FORMAT,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(payload)).decode(),
        "payload": base64.b64encode(payload).decode(),
    }
    return json.dumps(envelope, indent=1).encode() + b"\n"


def _b64(envelope: Mapping[str, Any], field: str) -> bytes:
    value = envelope.get(field)
    if not isinstance(value, str) or not value:
        if field == "signature":
            raise BundleRejected(RejectReason.NO_SIGNATURE, "the bundle carries no signature")
        raise BundleRejected(RejectReason.GARBLED, f"the bundle has no {field}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BundleRejected(
            RejectReason.GARBLED, f"the bundle's {field} is not valid base64"
        ) from None


def parse_unverified(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Split the envelope; nothing here is trusted until `verify_bundle` says so."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleRejected(
            RejectReason.GARBLED,
            f"the bundle is {len(data)} bytes, over the limit of {MAX_BUNDLE_BYTES}",
        )
    try:
        envelope = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleRejected(
            RejectReason.GARBLED, f"the bundle is not valid JSON (truncated or garbled): {exc}"
        ) from None
    if not isinstance(envelope, dict):
        raise BundleRejected(RejectReason.GARBLED, "the bundle is not a JSON object")
    if envelope.get("format") != FORMAT:
        raise BundleRejected(
            RejectReason.GARBLED,
            f"unknown bundle format {envelope.get('format')!r}; expected {FORMAT!r}",
        )
    return envelope, _b64(envelope, "payload")


def verify_bundle_signature(
    data: bytes, trusted_keys: Mapping[str, Ed25519PublicKey], cluster: str
) -> Bundle:
    """Check envelope, signature, key id, payload and cluster, but not serial or times.

    For reading bundles the control plane itself kept (to show, diff or re-sign them);
    anything that will be enforced goes through `verify_bundle`.
    """
    envelope, payload = parse_unverified(data)
    signature = _b64(envelope, "signature")
    kid = envelope.get("key_id")
    if not isinstance(kid, str) or kid not in trusted_keys:
        known = ", ".join(sorted(trusted_keys)) or "none"
        raise BundleRejected(
            RejectReason.UNKNOWN_KEY,
            f"the bundle is signed with key {kid!r}, which is not trusted (trusted: {known})",
        )
    try:
        trusted_keys[kid].verify(signature, payload)
    except InvalidSignature:
        raise BundleRejected(
            RejectReason.BAD_SIGNATURE,
            f"the bundle's signature does not verify with key {kid}: it was altered",
        ) from None
    try:
        bundle = Bundle.model_validate_json(payload)
    except ValidationError as exc:
        raise BundleRejected(
            RejectReason.GARBLED, f"the signed payload is not a valid bundle: {exc}"
        ) from None
    if bundle.cluster.name != cluster:
        raise BundleRejected(
            RejectReason.WRONG_CLUSTER,
            f"the bundle is for cluster {bundle.cluster.name!r}, not {cluster!r}",
        )
    return bundle


def verify_bundle(
    data: bytes,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    cluster: str,
    min_serial: int,
    now: datetime,
) -> Bundle:
    """Verify a bundle file completely; return it, or raise BundleRejected naming why.

    Checks, in order: envelope and encoding, signature present, key id trusted, signature
    valid, payload well-formed, cluster name, serial not lower than `min_serial` (no
    rollback), issued-at not in the future, expires-at not passed (no freeze).
    """
    bundle = verify_bundle_signature(data, trusted_keys, cluster)
    if bundle.serial < min_serial:
        raise BundleRejected(
            RejectReason.ROLLBACK,
            f"the bundle has serial {bundle.serial}, lower than serial {min_serial} in force "
            "(a rollback is never accepted)",
        )
    now = _aware(now)
    if _aware(bundle.issued_at) > now + ALLOWED_CLOCK_SKEW:
        raise BundleRejected(
            RejectReason.NOT_YET_VALID,
            f"the bundle was issued at {bundle.issued_at.isoformat()}, in the future "
            f"(now {now.isoformat()}): check the clocks",
        )
    if _aware(bundle.expires_at) <= now:
        raise BundleRejected(
            RejectReason.EXPIRED,
            f"the bundle expired at {bundle.expires_at.isoformat()} (serial {bundle.serial}); "
            "the control plane re-signs bundles before they expire, so it may be down",
        )
    return bundle


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)

"""Who a certificate speaks for: the identity encoded in teleport-db X.509 certificates.

Every hop of the system authenticates with a short-lived certificate issued by one of the
cluster's three CAs (user, host, db). What the data plane enforces (user, roles, traits,
cluster, expiry, usage, database route; for hosts the host id and role) travels inside the
certificate, in one extension described here, and is trusted only after `verify_identity`
has checked the chain to the right CA.

OID arc
    The project's arc is the UUID OID `2.25.26664299783540093368439086102455587800`
    (from uuid4 140f5b7a-a116-41f6-b017-5f504e8d13d8, generated once for this project).
    `<arc>.1` is the identity extension. Nothing else is assigned yet; new numbers are
    added below the arc, never reused.

Identity extension (`<arc>.1`, always NON-critical)
    Non-critical so that OpenSSL verifiers that do not know it (libpq, PostgreSQL, curl)
    still accept the certificate. The extnValue holds one DER UTF8String (tag 0x0C, definite
    minimal length, nothing after it) whose text is canonical JSON (UTF-8, sorted keys, no
    whitespace), at most `MAX_EXTENSION_BYTES` long:

        {"v": 1, "username": "alice", "roles": ["dba"], "traits": {"db_users": ["alice"]},
         "cluster": "example", "usage": "db", "expires": "2030-01-01T12:00:00Z",
         "route": {"service": "aurora", "protocol": "postgres", "db_user": "alice",
                   "db_name": "postgres"},
         "host_id": null, "host_role": null}

    `v` is the layout version; a reader refuses a version it does not know. `expires` is
    RFC 3339 UTC with whole seconds and must equal the certificate's notAfter.

Certificates
    - Subject CN = `username` (for host certificates the CA sets username = host id).
    - CA certificates: subject O = cluster name, OU = `teleport-db <kind> CA` (kind: user,
      host or db), CN = `<cluster> <kind> CA`; `ca_subject` / `ca_kind` build and read them.
    - Usages and the CA that must sign them: `user` (from `tsh login`) and `db` (a database
      route, from `tsh db login`) come from the user CA; `host` (control plane, proxies, db
      agents) from the host CA. Database client certificates that the agent presents to
      PostgreSQL (db CA, CN = database user) carry no identity and are not read here.

This module is part of the contract both planes share: it never reads files, opens sockets
or reads the clock (callers pass `now`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.bundle import canonical_json

PROJECT_OID_ARC = "2.25.26664299783540093368439086102455587800"
IDENTITY_OID = x509.ObjectIdentifier(f"{PROJECT_OID_ARC}.1")
IDENTITY_VERSION = 1
# An identity is a few hundred bytes; this bound keeps a hostile certificate from making
# us parse megabytes of JSON.
MAX_EXTENSION_BYTES = 16 * 1024

Usage = Literal["user", "db", "host"]
HostRole = Literal["auth", "proxy", "db"]
CAKind = Literal["user", "host", "db"]

# Which CA must have signed a certificate of each usage.
CA_FOR_USAGE: dict[str, CAKind] = {"user": "user", "db": "user", "host": "host"}
_CA_OU_PREFIX = "teleport-db "
_CA_OU_SUFFIX = " CA"

_USAGE_WORDS = {
    "user": "a login certificate (from tsh login)",
    "db": "a database certificate (from tsh db login)",
    "host": "a host certificate (for a cluster service)",
}

Name = Annotated[str, Field(min_length=1, max_length=255)]
# Lists are accepted (and kept as tuples): role and trait lists come from JSON and YAML.
Names = Annotated[tuple[Name, ...], Strict(False)]
Values = Annotated[tuple[str, ...], Strict(False)]


class IdentityError(Exception):
    """The certificate must not be trusted; the message says why and what to do."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Route(_Frozen):
    """The database a `db` certificate is for. db_user / db_name are the defaults psql uses;
    the agent still checks the user and database of each connection against RBAC."""

    service: Name
    protocol: Literal["postgres"] = "postgres"
    db_user: Name | None = None
    db_name: Name | None = None


class Identity(_Frozen):
    """What a teleport-db certificate asserts about its holder."""

    username: Name
    roles: Names = ()
    traits: dict[Name, Values] = Field(default_factory=dict)
    cluster: Name
    usage: Usage
    expires: datetime
    route: Route | None = None
    host_id: Name | None = None
    host_role: HostRole | None = None

    @field_validator("expires")
    @classmethod
    def _utc_whole_seconds(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("expires must carry a time zone (use UTC)")
        return value.astimezone(UTC).replace(microsecond=0)

    @model_validator(mode="after")
    def _fields_fit_usage(self) -> Identity:
        if self.usage == "db" and self.route is None:
            raise ValueError("a db certificate needs a route (the database service it is for)")
        if self.usage != "db" and self.route is not None:
            raise ValueError(f"a {self.usage} certificate must not carry a database route")
        if self.usage == "host":
            if self.host_id is None or self.host_role is None:
                raise ValueError("a host certificate needs host_id and host_role")
        elif self.host_id is not None or self.host_role is not None:
            raise ValueError(f"a {self.usage} certificate must not carry host_id/host_role")
        return self


# --- the extension ------------------------------------------------------------------------


def _der_utf8string(data: bytes) -> bytes:
    n = len(data)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return b"\x0c" + length + data


def _parse_der_utf8string(value: bytes) -> bytes:
    """The content of exactly one DER UTF8String; every length is checked against the buffer."""
    if len(value) > MAX_EXTENSION_BYTES + 4:
        raise IdentityError(
            f"identity extension is {len(value)} bytes, more than the {MAX_EXTENSION_BYTES} "
            "allowed: the certificate was not issued by teleport-db"
        )
    if len(value) < 2 or value[0] != 0x0C:
        raise IdentityError("identity extension is not a DER UTF8String")
    first = value[1]
    pos = 2
    if first < 0x80:
        n = first
    else:
        count = first & 0x7F
        if count == 0 or count > 2 or pos + count > len(value):
            raise IdentityError("identity extension has an invalid DER length")
        raw = value[pos : pos + count]
        pos += count
        n = int.from_bytes(raw, "big")
        if raw[0] == 0 or n < 0x80:
            raise IdentityError("identity extension has a non-minimal DER length")
    if pos + n != len(value):
        raise IdentityError("identity extension length does not match its content")
    return value[pos:]


def _format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode_identity(identity: Identity) -> bytes:
    """The extnValue bytes of the identity extension (see the module docstring)."""
    body: dict[str, Any] = identity.model_dump(mode="json")
    body["expires"] = _format_time(identity.expires)
    body["v"] = IDENTITY_VERSION
    data = canonical_json(body)
    if len(data) > MAX_EXTENSION_BYTES:
        raise ValueError(
            f"identity encodes to {len(data)} bytes, more than {MAX_EXTENSION_BYTES}: "
            "too many roles or traits"
        )
    return _der_utf8string(data)


def decode_identity(value: bytes) -> Identity:
    """Parse extnValue bytes back into an Identity. Does NOT check any signature."""
    text = _parse_der_utf8string(value)
    try:
        body = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IdentityError(f"identity extension is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise IdentityError("identity extension is not a JSON object")
    version = body.pop("v", None)
    if version != IDENTITY_VERSION:
        raise IdentityError(
            f"identity extension has layout version {version!r}; this build reads only "
            f"version {IDENTITY_VERSION}: upgrade this component"
        )
    expires = body.get("expires")
    if not isinstance(expires, str) or not expires.endswith("Z"):
        raise IdentityError("identity extension has no valid expiry")
    try:
        datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ")
        return Identity.model_validate_json(canonical_json(body))
    except (ValueError, ValidationError) as exc:
        raise IdentityError(f"identity extension does not hold a valid identity: {exc}") from None


def identity_extension(identity: Identity) -> x509.UnrecognizedExtension:
    """The extension to add (non-critical) to a certificate carrying `identity`."""
    return x509.UnrecognizedExtension(IDENTITY_OID, encode_identity(identity))


# --- CA names and fingerprints ------------------------------------------------------------


def ca_subject(cluster: str, kind: CAKind) -> x509.Name:
    """The subject (and issuer) name of the cluster's CA of `kind`."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
            x509.NameAttribute(
                NameOID.ORGANIZATIONAL_UNIT_NAME, f"{_CA_OU_PREFIX}{kind}{_CA_OU_SUFFIX}"
            ),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} {kind} CA"),
        ]
    )


def ca_kind(name: x509.Name) -> tuple[str, CAKind] | None:
    """(cluster, kind) of a teleport-db CA name, or None for any other name."""
    try:
        orgs = name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        units = name.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    except ValueError:
        return None
    if len(orgs) != 1 or len(units) != 1:
        return None
    unit = str(units[0].value)
    if not (unit.startswith(_CA_OU_PREFIX) and unit.endswith(_CA_OU_SUFFIX)):
        return None
    kind = unit[len(_CA_OU_PREFIX) : -len(_CA_OU_SUFFIX)]
    if kind not in ("user", "host", "db"):
        return None
    return str(orgs[0].value), kind  # type: ignore[return-value]


def fingerprint(cert: x509.Certificate) -> str:
    """`sha256:<hex>` of the certificate's DER: what `ping` publishes for each CA."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if len(attrs) == 1 else None


# --- verification -------------------------------------------------------------------------


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """PEM (one or more certificates) or DER (one certificate) to certificate objects."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise IdentityError(f"could not read the certificate: {exc}") from None


def _describe_ca(name: x509.Name) -> str:
    found = ca_kind(name)
    if found is None:
        return f"'{name.rfc4514_string()}' (not a teleport-db CA)"
    cluster, kind = found
    return f"the {kind} CA of cluster '{cluster}'"


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _wrong_usage(expected: str, actual: str, identity: Identity) -> str:
    what = _USAGE_WORDS[actual]
    if expected == "db" and actual == "user":
        return (
            f"this is {what}, not a database certificate: run `tsh db login <database>` "
            "and connect with the certificate it writes"
        )
    if expected == "user" and actual == "db":
        service = identity.route.service if identity.route else "?"
        return (
            f"this certificate is for database access (to '{service}'), not for the cluster "
            "API: use the certificate from `tsh login`"
        )
    return f"this is {what}, not {_USAGE_WORDS[expected]}: present the right certificate"


def _ee_policy() -> ExtensionPolicy:
    # Web PKI defaults, except that user certificates carry no subjectAltName: they name a
    # person (CN), not a host. Our own extension must never be critical.
    return ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )


def verify_identity(
    chain: Sequence[x509.Certificate] | bytes,
    trusted_cas: Sequence[x509.Certificate],
    now: datetime,
    usage: Usage,
) -> Identity:
    """Verify `chain` (leaf first) to one of `trusted_cas` at `now` and return its identity.

    Checks: the leaf is not a CA; it was signed by a trusted CA (name and signature), of the
    kind its usage needs (user CA for user/db, host CA for host); both are inside their
    validity windows; basic constraints, key usage, extended key usage (clientAuth) and
    the path to the CA (no intermediates) per the Web PKI profile of
    `cryptography.x509.verification`; the identity extension is present, non-critical and
    valid; the cluster matches the CA's; the subject CN is the username; notAfter equals the
    encoded expiry; the usage is `usage`. Any failure raises IdentityError.
    """
    certs = load_certificates(bytes(chain)) if isinstance(chain, bytes | bytearray) else list(chain)
    if not certs:
        raise IdentityError("no certificate was presented")
    if not trusted_cas:
        raise IdentityError("no trusted CA is configured for this check")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    leaf = certs[0]
    needed_kind = CA_FOR_USAGE[usage]

    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise IdentityError(
                f"'{leaf.subject.rfc4514_string()}' is a CA certificate, not a "
                f"{usage} certificate: present the certificate issued to you, not the CA's"
            )
    except x509.ExtensionNotFound:
        pass
    except (x509.DuplicateExtension, ValueError) as exc:
        raise IdentityError(f"the certificate's extensions are malformed: {exc}") from None

    # Find the issuing CA ourselves first, so that failures get a reason a person can use.
    named = [ca for ca in trusted_cas if ca.subject == leaf.issuer]
    if not named:
        trusted = ", ".join(sorted({_describe_ca(ca.subject) for ca in trusted_cas}))
        raise IdentityError(
            f"the certificate was issued by {_describe_ca(leaf.issuer)}, which is not trusted "
            f"here (trusted: {trusted}); {usage} certificates must come from the cluster's "
            f"{needed_kind} CA"
        )
    issuer = None
    for ca in named:
        try:
            leaf.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError):
            continue
        issuer = ca
        break
    if issuer is None:
        raise IdentityError(
            f"signature check failed: the certificate names {_describe_ca(leaf.issuer)} as "
            "issuer but was not signed by its key (altered, or signed by another CA with the "
            "same name); get a new certificate from this cluster"
        )
    issuer_kind = ca_kind(issuer.subject)
    if issuer_kind is None or issuer_kind[1] != needed_kind:
        raise IdentityError(
            f"not signed by the cluster's {needed_kind} CA: issued by "
            f"{_describe_ca(issuer.subject)}; {usage} certificates must come from the "
            f"{needed_kind} CA"
        )
    renew = {
        "user": "run `tsh login` again",
        "db": "run `tsh db login` again",
        "host": "the service must rejoin or renew its certificate",
    }[usage]
    for cert, label, hint in (
        (leaf, "certificate", renew),
        (issuer, f"the issuing CA ({_describe_ca(issuer.subject)})", "the CA must be rotated"),
    ):
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if now < start:
            raise IdentityError(
                f"{label} is not valid before {_when(start)} (now {_when(now)}): "
                "check this host's clock"
            )
        if now > end:
            raise IdentityError(f"{label} expired at {_when(end)}; {hint}")

    key = leaf.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"):
        raise IdentityError("the certificate's key is not ECDSA P-256, which teleport-db requires")

    try:
        verifier = (
            PolicyBuilder()
            .store(Store([issuer]))
            .time(now)
            .max_chain_depth(0)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_ee_policy()
            )
            .build_client_verifier()
        )
        verifier.verify(leaf, [])
    except VerificationError as exc:
        raise IdentityError(f"certificate rejected by path validation: {exc}") from None

    try:
        ext = leaf.extensions.get_extension_for_oid(IDENTITY_OID)
    except x509.ExtensionNotFound:
        raise IdentityError(
            "the certificate carries no teleport-db identity: it was not issued by "
            "tsh login, tsh db login or a cluster join"
        ) from None
    if ext.critical:
        raise IdentityError("the identity extension is marked critical; it must not be")
    if not isinstance(ext.value, x509.UnrecognizedExtension):
        raise IdentityError("the identity extension could not be read")
    identity = decode_identity(ext.value.value)

    if identity.cluster != issuer_kind[0]:
        raise IdentityError(
            f"the certificate is for cluster '{identity.cluster}' but was signed by the CA "
            f"of cluster '{issuer_kind[0]}'"
        )
    if common_name(leaf) != identity.username:
        raise IdentityError(
            f"subject CN {common_name(leaf)!r} does not match the identity's user "
            f"{identity.username!r}"
        )
    if leaf.not_valid_after_utc != identity.expires:
        raise IdentityError(
            f"notAfter {_when(leaf.not_valid_after_utc)} does not match the encoded expiry "
            f"{_when(identity.expires)}"
        )
    if identity.usage != usage:
        raise IdentityError(_wrong_usage(usage, identity.usage, identity))
    return identity


class VerifiedIdentities:
    """`verify_identity` for callers that see the same certificate again and again (a host's
    audit batches and heartbeats, a user's API calls), without redoing the signature and
    path checks each time.

    A success is kept by (the certificate's bytes, the trusted CAs, the usage), with the
    time window in which it holds: the latest notBefore and the earliest notAfter of the
    certificate and of the trusted CAs. A hit inside that window returns the identity; the
    other checks are functions of the bytes and the CAs alone. Outside it, or on a miss, the
    full check runs again (and says why it fails). Failures are never kept. At most `size`
    entries, the oldest dropped first. Thread-safe.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._held: dict[tuple[bytes, tuple[x509.Certificate, ...], str],
                         tuple[Identity, datetime, datetime]] = {}  # fmt: skip

    def verify(
        self, der: bytes, trusted_cas: Sequence[x509.Certificate], now: datetime, usage: Usage
    ) -> Identity:
        key = (bytes(der), tuple(trusted_cas), usage)
        with self._lock:
            held = self._held.get(key)
        if held is not None:
            identity, start, end = held
            if start <= now <= end:
                return identity
        identity = verify_identity(key[0], trusted_cas, now, usage)
        leaf = load_certificates(key[0])[0]
        start = max(c.not_valid_before_utc for c in (leaf, *trusted_cas))
        end = min(c.not_valid_after_utc for c in (leaf, *trusted_cas))
        with self._lock:
            self._held.pop(key, None)
            while len(self._held) >= self.size:
                del self._held[next(iter(self._held))]
            self._held[key] = (identity, start, end)
        return identity

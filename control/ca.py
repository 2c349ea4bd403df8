"""The cluster's certificate authorities: user, host and db.

- user CA: user certificates (`tsh login`) and database route certificates (`tsh db login`,
  `tctl auth sign --user`), which psql presents to the proxy and the agent verifies.
- host CA: host certificates of the control plane's HTTPS API, proxies and db agents
  (serverAuth and clientAuth: mTLS on the reverse tunnel, the proxy's server certificate).
- db CA: the PostgreSQL server's certificate (`tctl auth sign --format=db`) and the client
  certificates (CN = database user) db agents present to PostgreSQL; `db.crt` is both
  PostgreSQL's `ssl_ca_file` and what agents verify the server against.

On disk, under `<data_dir>/ca/` (mode 0700): `{user,host,db}.key` (PKCS#8 PEM, ECDSA P-256,
0600 from creation) and `{user,host,db}.crt` (self-signed, path length 0, ten years). They
are created at first start. A key without its certificate (a crash between the two writes)
gets a new certificate for the same key; a certificate without its key is an error.

Issued certificates start 1 minute in the past (clock skew) and end at `now + ttl`, never
after the CA itself. The CA signs public keys its requesters generated: it never sees or
makes their private keys (`tctl auth sign` makes one locally on the auth host, in tctl).

This module never logs or returns a CA private key, and never loads a key file that others
can read.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from schemas.identity import (
    CAKind,
    HostRole,
    Identity,
    Route,
    ca_kind,
    ca_subject,
    fingerprint,
    identity_extension,
)
from transport.files import write_atomic, write_private
from transport.tls import new_private_key, private_key_pem

CA_KINDS: tuple[CAKind, ...] = ("user", "host", "db")
CA_VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(minutes=1)
_DNS_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"^(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*\.?$")

PublicKeyInput = ec.EllipticCurvePublicKey | bytes


class CAError(Exception):
    """A CA could not be loaded, created or asked to sign; the message says what to do."""


def _now(now: datetime | None) -> datetime:
    value = now if now is not None else datetime.now(UTC)
    if value.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return value.astimezone(UTC).replace(microsecond=0)


def load_public_key(public_key: PublicKeyInput) -> ec.EllipticCurvePublicKey:
    """A requester's public key (object, PEM or DER SubjectPublicKeyInfo); ECDSA P-256 only."""
    key: object = public_key
    if isinstance(public_key, bytes):
        try:
            if public_key.lstrip().startswith(b"-----BEGIN"):
                key = serialization.load_pem_public_key(public_key)
            else:
                key = serialization.load_der_public_key(public_key)
        except ValueError as exc:
            raise CAError(f"could not read the public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CAError("only ECDSA P-256 public keys are accepted; generate the key with P-256")
    return key


def split_hosts(hosts: Iterable[str]) -> list[str]:
    """`--host` values, each possibly comma-separated, as a list without blanks or repeats."""
    out: list[str] = []
    for item in hosts:
        for part in item.split(","):
            name = part.strip()
            if name and name not in out:
                out.append(name)
    return out


def _subject_alt_names(names: Iterable[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        if not name.isascii() or len(name) > 253 or not _DNS_NAME.match(name):
            raise CAError(
                f"{name!r} is neither an IP address nor a DNS name (letters, digits, '-', "
                "'.'; internationalized names in their xn-- form)"
            )
        sans.append(x509.DNSName(name.rstrip(".").lower()))
    return sans


def _read_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise CAError(f"cannot read CA key {path}: {exc.strerror}") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            raise CAError(
                f"CA key {path} has mode {mode:04o}: it must be readable by its owner only; "
                f"run `chmod 600 {path}` and check who could have copied it"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CAError(f"CA key {path} is not a readable unencrypted PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CAError(f"CA key {path} is not an ECDSA P-256 key")
    return key


def _read_certificate(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read CA certificate {path}: {exc.strerror}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CAError(f"CA certificate {path} is not a PEM certificate: {exc}") from None


def _replace(identity: Identity, **changes: object) -> Identity:
    """A copy of `identity` with `changes`, validated again (model_copy would not)."""
    fields = {name: getattr(identity, name) for name in Identity.model_fields}
    return Identity(**{**fields, **changes})  # type: ignore[arg-type]


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_ca_certificate(data_dir: str | os.PathLike[str], kind: CAKind) -> x509.Certificate:
    """Only the certificate of the CA of `kind` (no private key needed): for export."""
    _, cert_path = CertificateAuthority.paths(data_dir, kind)
    if not cert_path.exists():
        raise CAError(
            f"no {kind} CA certificate at {cert_path}: start the auth service once to create "
            "the CAs, or pass the right --data-dir"
        )
    cert = _read_certificate(cert_path)
    found = ca_kind(cert.subject)
    if found is None or found[1] != kind:
        raise CAError(f"{cert_path} does not hold the {kind} CA certificate")
    return cert


class CertificateAuthority:
    """One CA: its certificate (public) and its private key (never leaves this object)."""

    def __init__(
        self, certificate: x509.Certificate, private_key: ec.EllipticCurvePrivateKey
    ) -> None:
        found = ca_kind(certificate.subject)
        if found is None:
            raise CAError(
                f"'{certificate.subject.rfc4514_string()}' is not a teleport-db CA certificate"
            )
        if certificate.public_key() != private_key.public_key():
            raise CAError(f"the {found[1]} CA's certificate and private key do not match")
        self.cluster, self.kind = found
        self.certificate = certificate
        self._key = private_key

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self.kind} of {self.cluster!r} {self.fingerprint}>"

    # -- creating and loading --------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        kind: CAKind,
        cluster: str,
        now: datetime | None = None,
        private_key: ec.EllipticCurvePrivateKey | None = None,
    ) -> CertificateAuthority:
        """A new CA in memory (self-signed, path length 0, valid for ten years)."""
        start = _now(now)
        key = private_key or new_private_key()
        name = ca_subject(cluster, kind)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - CLOCK_SKEW)
            .not_valid_after(start + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @staticmethod
    def paths(data_dir: str | os.PathLike[str], kind: CAKind) -> tuple[Path, Path]:
        """(key path, certificate path) of the CA of `kind` in `data_dir`."""
        ca_dir = Path(data_dir) / "ca"
        return ca_dir / f"{kind}.key", ca_dir / f"{kind}.crt"

    @classmethod
    def load(cls, data_dir: str | os.PathLike[str], kind: CAKind) -> CertificateAuthority:
        """Load an existing CA; never creates one."""
        key_path, cert_path = cls.paths(data_dir, kind)
        if not key_path.exists() and not cert_path.exists():
            raise CAError(
                f"no {kind} CA in {key_path.parent}: start the auth service once "
                "(`teleport start --roles=auth`) to create the CAs, or pass the right "
                "--data-dir"
            )
        if not key_path.exists():
            raise CAError(
                f"{cert_path} exists but its key {key_path} is missing: restore the key from "
                "a backup (a new key would invalidate every certificate issued so far)"
            )
        key = _read_private_key(key_path)
        if not cert_path.exists():
            raise CAError(
                f"{key_path} exists but {cert_path} is missing; start the auth service once "
                "to recreate the certificate for that key"
            )
        ca = cls(_read_certificate(cert_path), key)
        if ca.kind != kind:
            raise CAError(f"{cert_path} holds the {ca.kind} CA, not the {kind} CA")
        return ca

    @classmethod
    def load_or_create(
        cls,
        data_dir: str | os.PathLike[str],
        kind: CAKind,
        cluster: str,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """Load the CA of `kind`, creating it (or the certificate for an orphan key) if absent.

        Refuses a CA that belongs to another cluster name.
        """
        key_path, cert_path = cls.paths(data_dir, kind)
        ca_dir = key_path.parent
        try:
            ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(ca_dir, 0o700)
        except OSError as exc:
            raise CAError(f"cannot create the CA directory {ca_dir}: {exc.strerror}") from None
        if cert_path.exists() and key_path.exists():
            ca = cls.load(data_dir, kind)
        elif key_path.exists():
            ca = cls.generate(kind, cluster, now, private_key=_read_private_key(key_path))
            write_atomic(cert_path, certificate_pem(ca.certificate))
        elif cert_path.exists():
            return cls.load(data_dir, kind)  # raises: the key is missing
        else:
            ca = cls.generate(kind, cluster, now)
            write_private(key_path, private_key_pem(ca._key))
            write_atomic(cert_path, certificate_pem(ca.certificate))
        if ca.cluster != cluster:
            raise CAError(
                f"the {kind} CA in {ca_dir} belongs to cluster '{ca.cluster}', but this auth "
                f"service is configured as '{cluster}': fix cluster_name in teleport.yaml "
                "or use the data dir of that cluster"
            )
        return ca

    # -- public parts ------------------------------------------------------------------------

    def certificate_pem(self) -> bytes:
        return certificate_pem(self.certificate)

    @property
    def fingerprint(self) -> str:
        """`sha256:<hex of the DER>`, as `ping` publishes it."""
        return fingerprint(self.certificate)

    # -- issuing ---------------------------------------------------------------------------

    def _require(self, kind: CAKind, what: str) -> None:
        if self.kind != kind:
            raise CAError(f"{what} are signed by the {kind} CA, not the {self.kind} CA")

    def _validity(self, ttl: timedelta, now: datetime | None) -> tuple[datetime, datetime]:
        start = _now(now)
        if ttl <= timedelta(0):
            raise CAError(f"certificate TTL must be positive, got {ttl}")
        end = (start + ttl).replace(microsecond=0)
        if end > self.certificate.not_valid_after_utc:
            raise CAError(
                f"a certificate valid until {end:%Y-%m-%d %H:%M} UTC would outlive the "
                f"{self.kind} CA (valid until "
                f"{self.certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC); use a shorter TTL"
            )
        return start - CLOCK_SKEW, end

    def _sign(
        self,
        public_key: PublicKeyInput,
        common_name: str,
        not_before: datetime,
        not_after: datetime,
        usages: Sequence[x509.ObjectIdentifier],
        *,
        sans: Sequence[x509.GeneralName] = (),
        identity: Identity | None = None,
    ) -> x509.Certificate:
        key = load_public_key(public_key)
        try:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        except ValueError as exc:
            raise CAError(f"cannot use {common_name!r} as a certificate name: {exc}") from None
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), False)
        if identity is not None:
            builder = builder.add_extension(identity_extension(identity), critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def issue_user(
        self,
        public_key: PublicKeyInput,
        identity: Identity,
        ttl: timedelta,
        *,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """A login certificate (usage user) for `identity`; expiry is set to now + ttl."""
        self._require("user", "user certificates")
        if identity.usage != "user":
            raise CAError(f"issue_user needs a user identity, got usage {identity.usage!r}")
        self._check_cluster(identity)
        not_before, not_after = self._validity(ttl, now)
        return self._sign(
            public_key,
            identity.username,
            not_before,
            not_after,
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            identity=_replace(identity, expires=not_after),
        )

    def issue_route(
        self,
        public_key: PublicKeyInput,
        identity: Identity,
        route: Route,
        ttl: timedelta,
        *,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """A database certificate (usage db) carrying `route` for the user of `identity`.

        `identity` is the user's login identity (usage user). The certificate ends at now +
        ttl or at the login's expiry, whichever is sooner: it never outlives the login.
        """
        self._require("user", "database certificates")
        if identity.usage != "user":
            raise CAError(
                f"a database certificate is derived from a login identity, got {identity.usage!r}"
            )
        self._check_cluster(identity)
        not_before, not_after = self._validity(ttl, now)
        not_after = min(not_after, identity.expires)
        if not_after <= not_before + CLOCK_SKEW:
            raise CAError(
                f"the login of {identity.username!r} expired at "
                f"{identity.expires:%Y-%m-%d %H:%M:%S} UTC; run `tsh login` again"
            )
        db_identity = _replace(identity, usage="db", route=route, expires=not_after)
        return self._sign(
            public_key,
            identity.username,
            not_before,
            not_after,
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            identity=db_identity,
        )

    def issue_host(
        self,
        public_key: PublicKeyInput,
        host_id: str,
        host_role: HostRole,
        *,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        ttl: timedelta,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """A host certificate (serverAuth and clientAuth) for a cluster service."""
        self._require("host", "host certificates")
        not_before, not_after = self._validity(ttl, now)
        identity = Identity(
            username=host_id,
            cluster=self.cluster,
            usage="host",
            expires=not_after,
            host_id=host_id,
            host_role=host_role,
        )
        return self._sign(
            public_key,
            host_id,
            not_before,
            not_after,
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            sans=_subject_alt_names([*dns_names, *ip_addresses]),
            identity=identity,
        )

    def issue_db_server(
        self,
        public_key: PublicKeyInput,
        hosts: Sequence[str],
        ttl: timedelta,
        *,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """PostgreSQL's server certificate: serverAuth, one SAN per host (comma lists split)."""
        self._require("db", "database server certificates")
        names = split_hosts(hosts)
        if not names:
            raise CAError("give at least one host name the agent connects to (--host)")
        not_before, not_after = self._validity(ttl, now)
        return self._sign(
            public_key,
            names[0],
            not_before,
            not_after,
            [ExtendedKeyUsageOID.SERVER_AUTH],
            sans=_subject_alt_names(names),
        )

    def issue_db_client(
        self,
        public_key: PublicKeyInput,
        db_user: str,
        ttl: timedelta,
        *,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """A client certificate for PostgreSQL's `cert` auth: clientAuth, CN = database user."""
        self._require("db", "database client certificates")
        if not db_user:
            raise CAError("a database client certificate needs a database user name")
        not_before, not_after = self._validity(ttl, now)
        return self._sign(
            public_key, db_user, not_before, not_after, [ExtendedKeyUsageOID.CLIENT_AUTH]
        )

    def _check_cluster(self, identity: Identity) -> None:
        if identity.cluster != self.cluster:
            raise CAError(
                f"identity is for cluster '{identity.cluster}', this CA signs for '{self.cluster}'"
            )


@dataclass(frozen=True)
class ClusterCAs:
    """The three CAs of one cluster."""

    user: CertificateAuthority
    host: CertificateAuthority
    db: CertificateAuthority

    def __getitem__(self, kind: CAKind) -> CertificateAuthority:
        if kind not in CA_KINDS:
            raise KeyError(kind)
        return getattr(self, kind)

    @property
    def cluster(self) -> str:
        return self.user.cluster

    def fingerprints(self) -> Mapping[CAKind, str]:
        return {kind: self[kind].fingerprint for kind in CA_KINDS}

    @classmethod
    def load(cls, data_dir: str | os.PathLike[str]) -> ClusterCAs:
        cas = cls(*(CertificateAuthority.load(data_dir, k) for k in CA_KINDS))
        if len({ca.cluster for ca in (cas.user, cas.host, cas.db)}) != 1:
            raise CAError(f"the CAs in {Path(data_dir) / 'ca'} belong to different clusters")
        return cas

    @classmethod
    def load_or_create(
        cls, data_dir: str | os.PathLike[str], cluster: str, now: datetime | None = None
    ) -> ClusterCAs:
        return cls(
            *(CertificateAuthority.load_or_create(data_dir, k, cluster, now) for k in CA_KINDS)
        )


def host_ca_pin(data_dir: str | os.PathLike[str]) -> str:
    """`sha256:<hex>` of the host CA: what `--ca-pin` checks before a token or password
    is sent (`tctl status`, `tctl tokens add` and `tctl users add` print it)."""
    return fingerprint(load_ca_certificate(data_dir, "host"))

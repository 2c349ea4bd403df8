"""What every API handler shares: settings, CAs, stores, inventory, bundle, limits, clock.

Also the two checks most handlers start with: who is calling (`user_identity`,
`host_identity`: the TLS client certificate verified with `schemas.identity.verify_identity`
against the user CA or the host CA; a certificate verified before is recognised by its bytes
until it or the CA expires, `schemas.identity.VerifiedIdentities`), and which policy is in
force (`bundle`).

Never trusts anything about the caller that the certificate chain has not proven.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from control.api.bundlefeed import BundleFeed
from control.ca import ClusterCAs
from control.inventory import Inventory
from control.settings import ApiSettings, ControlSettings
from control.tokens import TokenStore
from control.users import PhantomLockouts, SecretsStore
from schemas.bundle import Bundle
from schemas.identity import Identity, IdentityError, VerifiedIdentities
from transport.http import ApiError, Request
from transport.ratelimit import TokenBuckets


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class ApiState:
    data_dir: Path
    settings: ControlSettings
    cas: ClusterCAs
    secrets: SecretsStore
    tokens: TokenStore
    inventory: Inventory
    bundles: BundleFeed
    bundle_keys: dict[str, str]  # key id -> base64 of the raw Ed25519 public key
    login_by_user: TokenBuckets
    login_by_addr: TokenBuckets
    phantoms: PhantomLockouts
    clock: Callable[[], datetime] = utc_now
    monotonic: Callable[[], float] = time.monotonic
    user_ca_pem: str = field(init=False)
    host_ca_pem: str = field(init=False)
    db_ca_pem: str = field(init=False)
    _verified: VerifiedIdentities = field(init=False, default_factory=VerifiedIdentities)

    def __post_init__(self) -> None:
        self.user_ca_pem = self.cas.user.certificate_pem().decode()
        self.host_ca_pem = self.cas.host.certificate_pem().decode()
        self.db_ca_pem = self.cas.db.certificate_pem().decode()

    @property
    def cluster(self) -> str:
        return self.settings.cluster_name

    @property
    def api(self) -> ApiSettings:
        return self.settings.api

    def now(self) -> datetime:
        return self.clock()

    # -- the policy in force -----------------------------------------------------------

    def bundle(self) -> Bundle:
        """The bundle in force, or 503 when there is none (or it has expired)."""
        self.bundles.refresh()
        current = self.bundles.current
        if current is None:
            raise ApiError(
                503,
                "no_policy",
                "the control plane has no valid policy in force yet; run `tctl status` on "
                "the auth host to see why",
            )
        if current.bundle.expires_at <= self.now():
            raise ApiError(
                503,
                "policy_expired",
                f"the policy bundle in force (serial {current.serial}) has expired and was "
                "not re-signed; run `tctl status` on the auth host",
            )
        return current.bundle

    # -- callers -------------------------------------------------------------------------

    def _certificate(self, request: Request, what: str) -> bytes:
        if request.peer_cert is None:
            raise ApiError(401, "no_certificate", f"this endpoint needs {what}")
        return request.peer_cert

    def user_identity(self, request: Request) -> Identity:
        """The login identity of the person calling (a `tsh login` certificate)."""
        der = self._certificate(
            request, "your login certificate: run `tsh login` and try again"
        )
        try:
            return self._verified.verify(der, [self.cas.user.certificate], self.now(), "user")
        except IdentityError as exc:
            raise ApiError(401, "bad_certificate", str(exc)) from None

    def host_identity(self, request: Request, role: str | None = None) -> Identity:
        """The identity of the proxy or agent calling (its host certificate); with `role`,
        a host of another role is refused with 403."""
        der = self._certificate(
            request, "a host certificate: only joined proxies and db agents may call it"
        )
        try:
            identity = self._verified.verify(der, [self.cas.host.certificate], self.now(),
                                             "host")
        except IdentityError as exc:
            raise ApiError(401, "bad_certificate", str(exc)) from None
        if role is not None and identity.host_role != role:
            raise ApiError(
                403,
                "wrong_host_role",
                f"only {role} hosts may call this endpoint; this is a {identity.host_role} "
                f"host ({identity.host_id})",
            )
        return identity

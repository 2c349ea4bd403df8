"""API endpoints for people: ping, login, signup, the databases they may see, route certs.

- `login`: password (scrypt, `control.users`), TOTP when enrolled or required, lockout, rate
  limits per user name and per client address. An unknown user and a wrong password get
  the same answer, cost the same scrypt, and lock out the same way. The user must exist in
  the bundle in force, which also gives the roles and traits. Certificate TTL = the
  smallest of the request, the cluster's certificate_ttl and the roles' max_session_ttl.
- `databases`: what agents serve (heartbeats), filtered with `schemas.rbac.database_visible`.
- `certs/db`: a route certificate only when `schemas.rbac.decide` allows that database, db
  user and db name (403 with the decision's reason otherwise); never outlives the login.

Blocking work (scrypt, the secrets file) runs in worker threads. Never logs a password,
TOTP code, token or key.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version

from cryptography.hazmat.primitives.asymmetric import ec

from control.api.state import ApiState
from control.ca import CAError, certificate_pem, load_public_key
from control.users import (
    BAD_CREDENTIALS,
    LoginRefused,
    SignupRefused,
    totp_uri,
    verify_password,
)
from schemas.api import (
    CAFingerprints,
    DatabaseCert,
    DatabaseCertRequest,
    DatabaseEntry,
    DatabaseList,
    LoginRequest,
    LoginResponse,
    Ping,
    SignupChallenge,
    SignupRequest,
    SignupResponse,
    SignupStart,
)
from schemas.bundle import Bundle
from schemas.identity import Identity, Route
from schemas.rbac import (
    AccessRequest,
    allowed_values,
    database_visible,
    decide,
    effective_roles,
    max_session_ttl_seconds,
)
from transport.http import (
    ApiError,
    Handler,
    Request,
    Response,
    error_response,
    json_response,
)

log = logging.getLogger("teleport.control.api")

_REFUSAL_STATUS = {
    "bad_credentials": 401,
    "bad_totp": 401,
    "second_factor_required": 401,
    "account_locked": 403,
    "second_factor_not_enrolled": 403,
}


def product_version() -> str:
    try:
        return version("teleport-db")
    except PackageNotFoundError:
        return "0+unknown"


def public_key_of(text: str, field: str = "public_key") -> ec.EllipticCurvePublicKey:
    try:
        return load_public_key(text.encode("utf-8"))
    except CAError as exc:
        raise ApiError(400, "invalid_request", f"invalid request: {field}: {exc}") from None


def peer_host(request: Request) -> str:
    return request.peer[0] if request.peer else "unknown"


def rate_limited(state: ApiState, request: Request, user: str | None) -> Response | None:
    """429 when the client address (or the user name) has tried too often; else spend one
    attempt of each and return None."""
    now = state.monotonic()
    addr_key = peer_host(request)
    waits = [state.login_by_addr.wait_time(addr_key, now)]
    if user is not None:
        waits.append(state.login_by_user.wait_time(user, now))
    wait = max((w for w in waits if w is not None), default=None)
    if wait is not None:
        seconds = max(1, int(wait + 0.999))
        response = error_response(
            429, "rate_limited", f"too many attempts; wait {seconds}s before trying again"
        )
        response.headers.append(("retry-after", str(seconds)))
        return response
    state.login_by_addr.take(addr_key, now)
    if user is not None:
        state.login_by_user.take(user, now)
    return None


class PeopleApi:
    def __init__(self, state: ApiState) -> None:
        self.state = state

    def routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("GET", "/v1/ping"): self.ping,
            ("POST", "/v1/login"): self.login,
            ("POST", "/v1/signup/start"): self.signup_start,
            ("POST", "/v1/signup"): self.signup,
            ("GET", "/v1/databases"): self.databases,
            ("POST", "/v1/certs/db"): self.db_cert,
        }

    # -- anyone ------------------------------------------------------------------------

    async def ping(self, request: Request) -> Response:
        s = self.state
        now = s.now()
        proxy_addrs = list(s.api.proxy_addrs)
        proxy_addrs += [a for a in s.inventory.proxy_addrs(now) if a not in proxy_addrs]
        tunnel_addrs = list(s.api.tunnel_addrs)
        tunnel_addrs += [a for a in s.inventory.tunnel_addrs(now) if a not in tunnel_addrs]
        fingerprints = s.cas.fingerprints()
        return json_response(
            Ping(
                cluster=s.cluster,
                version=product_version(),
                proxy_addrs=proxy_addrs,
                tunnel_addrs=tunnel_addrs,
                ca_fingerprints=CAFingerprints(
                    user=fingerprints["user"], host=fingerprints["host"], db=fingerprints["db"]
                ),
                host_ca=s.host_ca_pem,
                second_factor=s.api.second_factor,
            )
        )

    async def login(self, request: Request) -> Response:
        s = self.state
        body = request.json(LoginRequest)
        limited = rate_limited(s, request, body.user)
        if limited is not None:
            return limited
        public_key = public_key_of(body.public_key)
        bundle = s.bundle()
        now = s.now()
        user = bundle.users.get(body.user)
        try:
            if user is None:
                s.phantoms.check(body.user, now)
                await asyncio.to_thread(verify_password, body.password, None)
                s.phantoms.fail(body.user, now)
                raise LoginRefused("bad_credentials", BAD_CREDENTIALS)
            await asyncio.to_thread(
                s.secrets.check_login,
                body.user,
                body.password,
                body.totp,
                s.api.second_factor,
                now,
            )
        except LoginRefused as exc:
            log.info("login of %r from %s refused: %s", body.user, peer_host(request), exc.code)
            raise ApiError(_REFUSAL_STATUS.get(exc.code, 401), exc.code, str(exc)) from None

        limit = min(
            bundle.cluster.certificate_ttl_seconds,
            max_session_ttl_seconds(bundle, user.roles),
        )
        ttl = min(body.ttl_seconds or limit, limit)
        identity = Identity(
            username=user.name,
            roles=tuple(user.roles),
            traits={k: tuple(v) for k, v in user.traits.items()},
            cluster=s.cluster,
            usage="user",
            expires=now + timedelta(seconds=ttl),
        )
        try:
            cert = s.cas.user.issue_user(public_key, identity, timedelta(seconds=ttl), now=now)
        except CAError as exc:
            raise ApiError(400, "cannot_issue", str(exc)) from None
        log.info("login of %r from %s: certificate for %ds", user.name, peer_host(request), ttl)
        return json_response(
            LoginResponse(
                username=user.name,
                cluster=s.cluster,
                roles=list(user.roles),
                cert=certificate_pem(cert).decode(),
                expires=cert.not_valid_after_utc,
                user_ca=[s.user_ca_pem],
                host_ca=[s.host_ca_pem],
            )
        )

    async def signup_start(self, request: Request) -> Response:
        s = self.state
        body = request.json(SignupStart)
        limited = rate_limited(s, request, None)
        if limited is not None:
            return limited
        try:
            name, secret = await asyncio.to_thread(
                s.secrets.signup_start, body.token, s.api.second_factor, body.enroll_totp, s.now()
            )
        except SignupRefused as exc:
            raise _signup_error(exc) from None
        return json_response(
            SignupChallenge(
                user=name,
                second_factor=s.api.second_factor,
                totp_secret=secret,
                totp_uri=totp_uri(secret, name, s.cluster) if secret else None,
            )
        )

    async def signup(self, request: Request) -> Response:
        s = self.state
        body = request.json(SignupRequest)
        limited = rate_limited(s, request, None)
        if limited is not None:
            return limited
        try:
            name, enrolled = await asyncio.to_thread(
                s.secrets.signup_finish,
                body.token,
                body.password,
                body.totp,
                s.api.second_factor,
                s.now(),
            )
        except SignupRefused as exc:
            raise _signup_error(exc) from None
        log.info("user %r set a password at signup (TOTP %s)", name, "on" if enrolled else "off")
        return json_response(SignupResponse(user=name, totp_enrolled=enrolled))

    # -- logged-in users -----------------------------------------------------------------

    def _caller(self, request: Request) -> tuple[Identity, Bundle]:
        identity = self.state.user_identity(request)
        bundle = self.state.bundle()
        user, roles, why = effective_roles(bundle, identity.username, identity.roles)
        if user is None or not roles:
            raise ApiError(403, "access_denied", why)
        return identity, bundle

    async def databases(self, request: Request) -> Response:
        s = self.state
        identity, bundle = self._caller(request)
        now = s.now()
        entries: list[DatabaseEntry] = []
        for name, served in s.inventory.databases(now).items():
            visible = [
                sd
                for sd in served
                if database_visible(bundle, identity.username, identity.roles, name, sd.info.labels)
            ]
            if not visible:
                continue
            info = visible[0].info
            entries.append(
                DatabaseEntry(
                    **info.model_dump(),
                    allowed_db_users=allowed_values(
                        bundle, identity.username, identity.roles, info.labels, "db_users"
                    ),
                    allowed_db_names=allowed_values(
                        bundle, identity.username, identity.roles, info.labels, "db_names"
                    ),
                )
            )
        return json_response(DatabaseList(databases=entries))

    def _route_allowed(
        self, identity: Identity, bundle: Bundle, body: DatabaseCertRequest, served: list
    ) -> str:
        """Refuse early what RBAC refuses: the whole route when db user and db name are
        given; otherwise the database itself (the agent decides the rest at connection)."""
        if body.db_user is None or body.db_name is None:
            for sd in served:
                if database_visible(
                    bundle, identity.username, identity.roles, body.service, sd.info.labels
                ):
                    return "database allowed; db user and db name chosen at connection"
            raise ApiError(
                403,
                "access_denied",
                f"access denied: no role of {identity.username!r} allows database "
                f"{body.service!r}",
            )
        decisions = [
            decide(
                bundle,
                AccessRequest(
                    username=identity.username,
                    database=body.service,
                    labels=sd.info.labels,
                    db_user=body.db_user,
                    db_name=body.db_name,
                    cert_roles=identity.roles,
                ),
            )
            for sd in served
        ]
        allowed = next((d for d in decisions if d.allowed), None)
        if allowed is None:
            log.info(
                "route certificate for %r to %s refused: %s",
                identity.username,
                body.service,
                decisions[0].reason,
            )
            raise ApiError(403, "access_denied", f"access denied: {decisions[0].reason}")
        return allowed.reason

    async def db_cert(self, request: Request) -> Response:
        s = self.state
        identity, bundle = self._caller(request)
        body = request.json(DatabaseCertRequest)
        public_key = public_key_of(body.public_key)
        now = s.now()
        served = s.inventory.databases(now).get(body.service)
        if not served:
            raise ApiError(
                404,
                "no_such_database",
                f"no agent serves database {body.service!r} right now; `tsh db ls` lists "
                "the databases that are online",
            )
        allowed_reason = self._route_allowed(identity, bundle, body, served)
        remaining = int((identity.expires - now).total_seconds())
        ttl = min(body.ttl_seconds or remaining, remaining)
        if ttl <= 0:
            raise ApiError(401, "login_expired", "your login has expired; run `tsh login`")
        route = Route(
            service=body.service,
            protocol="postgres",
            db_user=body.db_user,
            db_name=body.db_name,
        )
        try:
            cert = s.cas.user.issue_route(
                public_key, identity, route, timedelta(seconds=ttl), now=now
            )
        except CAError as exc:
            raise ApiError(400, "cannot_issue", str(exc)) from None
        log.info(
            "route certificate for %r to %s as %s/%s (%s)",
            identity.username,
            body.service,
            body.db_user or "(any)",
            body.db_name or "(any)",
            allowed_reason,
        )
        return json_response(
            DatabaseCert(
                cert=certificate_pem(cert).decode(),
                expires=cert.not_valid_after_utc,
                host_ca=[s.host_ca_pem],
            )
        )


def _signup_error(exc: SignupRefused) -> ApiError:
    if exc.code in ("invalid_signup_token", "expired_signup_token"):
        return ApiError(401, exc.code, str(exc))
    return ApiError(400, exc.code, f"invalid request: {exc.field}: {exc}")

"""API endpoints for proxies and db agents: join, certificate renewal, db client
certificates, the bundle long poll, heartbeats.

- `join`: a join token (static or dynamic, `control.tokens`) and a public key give a host
  certificate for role proxy or db, the CA certificates, the bundle verification key and the
  tunnel addresses. The certificate is made before the token is spent, so a request that
  cannot be served never uses up a single-use token.
- `certs/host`: a new host certificate for the same host id and role, for a host that
  presents a valid one.
- `certs/db-client`: a db CA client certificate, CN = the database user, short TTL; only to
  an authenticated host of role db.
- `bundle`: the signed bundle in force, at once when newer than `after` (or the ETag of
  `If-None-Match` differs), else after waiting up to `wait` seconds for a publish; 304 when
  none came. Waiting is event-driven (`control.api.bundlefeed`).
- `heartbeat`: records the host in the inventory; the host id and role must be the
  certificate's.

Never accepts a host claim that its certificate does not prove, and never logs a token.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from datetime import timedelta

from control.api.bundlefeed import PublishedBundle
from control.api.people import peer_host, public_key_of, rate_limited
from control.api.state import ApiState
from control.ca import CAError, certificate_pem
from control.inventory import InventoryFull
from control.tokens import JoinRefused
from schemas.api import (
    BUNDLE_WAIT_DEFAULT_S,
    BUNDLE_WAIT_MAX_S,
    DbClientCert,
    DbClientCertRequest,
    Heartbeat,
    HeartbeatAck,
    HostCert,
    HostCertRequest,
    JoinRequest,
    JoinResponse,
)
from transport.http import ApiError, Handler, Request, Response, json_response

log = logging.getLogger("teleport.control.api")

HOST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _int_arg(request: Request, name: str, low: int, high: int | None) -> int | None:
    text = request.arg(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ApiError(
            400, "bad_query", f"invalid request: {name}: {text[:20]!r} is not a whole number"
        ) from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(400, "bad_query", f"invalid request: {name}: must be {bound}")
    return value


class HostsApi:
    def __init__(self, state: ApiState) -> None:
        self.state = state

    def routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("POST", "/v1/join"): self.join,
            ("POST", "/v1/certs/host"): self.host_cert,
            ("POST", "/v1/certs/db-client"): self.db_client_cert,
            ("GET", "/v1/bundle"): self.bundle,
            ("POST", "/v1/heartbeat"): self.heartbeat,
        }

    def _tunnel_addrs(self) -> list[str]:
        s = self.state
        addrs = list(s.api.tunnel_addrs)
        return addrs + [a for a in s.inventory.tunnel_addrs(s.now()) if a not in addrs]

    async def join(self, request: Request) -> Response:
        s = self.state
        body = request.json(JoinRequest)
        limited = rate_limited(s, request, None)
        if limited is not None:
            return limited
        host_id = body.host_id or str(uuid.uuid4())
        if not HOST_ID.match(host_id):
            raise ApiError(
                400,
                "invalid_request",
                "invalid request: host_id: use letters, digits, '.', '_' and '-' (at most "
                "128), starting with a letter or digit; or leave it out to get a new one",
            )
        public_key = public_key_of(body.public_key)
        now = s.now()
        ttl = timedelta(seconds=s.api.host_cert_ttl_seconds)
        try:
            cert = s.cas.host.issue_host(
                public_key,
                host_id,
                body.role,
                dns_names=body.dns_names,
                ip_addresses=body.ip_addresses,
                ttl=ttl,
                now=now,
            )
        except CAError as exc:
            raise ApiError(400, "invalid_request", f"invalid request: {exc}") from None
        try:
            use = await asyncio.to_thread(s.tokens.use, body.token, body.role, now)
        except JoinRefused as exc:
            log.info("join as %s from %s refused: %s", body.role, peer_host(request), exc.code)
            raise ApiError(exc.status, exc.code, str(exc)) from None
        log.info(
            "host %s joined as %s from %s with %s token %s",
            host_id,
            body.role,
            peer_host(request),
            use.kind,
            use.id,
        )
        return json_response(
            JoinResponse(
                host_id=host_id,
                cert=certificate_pem(cert).decode(),
                expires=cert.not_valid_after_utc,
                cluster=s.cluster,
                user_ca=[s.user_ca_pem],
                host_ca=[s.host_ca_pem],
                db_ca=[s.db_ca_pem],
                bundle_keys=dict(s.bundle_keys),
                tunnel_addrs=self._tunnel_addrs(),
            )
        )

    async def host_cert(self, request: Request) -> Response:
        s = self.state
        identity = s.host_identity(request)
        body = request.json(HostCertRequest)
        public_key = public_key_of(body.public_key)
        assert identity.host_id is not None and identity.host_role is not None
        try:
            cert = s.cas.host.issue_host(
                public_key,
                identity.host_id,
                identity.host_role,
                dns_names=body.dns_names,
                ip_addresses=body.ip_addresses,
                ttl=timedelta(seconds=s.api.host_cert_ttl_seconds),
                now=s.now(),
            )
        except CAError as exc:
            raise ApiError(400, "invalid_request", f"invalid request: {exc}") from None
        log.info("host %s (%s) renewed its certificate", identity.host_id, identity.host_role)
        return json_response(
            HostCert(
                host_id=identity.host_id,
                cert=certificate_pem(cert).decode(),
                expires=cert.not_valid_after_utc,
            )
        )

    async def db_client_cert(self, request: Request) -> Response:
        s = self.state
        identity = s.host_identity(request, role="db")
        body = request.json(DbClientCertRequest)
        public_key = public_key_of(body.public_key)
        limit = s.api.db_client_cert_ttl_seconds
        ttl = min(body.ttl_seconds or limit, limit)
        try:
            cert = s.cas.db.issue_db_client(
                public_key, body.db_user, timedelta(seconds=ttl), now=s.now()
            )
        except CAError as exc:
            raise ApiError(400, "invalid_request", f"invalid request: db_user: {exc}") from None
        log.debug("db client certificate for %r to host %s", body.db_user, identity.host_id)
        return json_response(
            DbClientCert(
                cert=certificate_pem(cert).decode(),
                expires=cert.not_valid_after_utc,
                db_ca=[s.db_ca_pem],
            )
        )

    async def bundle(self, request: Request) -> Response:
        s = self.state
        s.host_identity(request)
        after = _int_arg(request, "after", 0, None)
        wait = _int_arg(request, "wait", 0, BUNDLE_WAIT_MAX_S)
        if wait is None:
            wait = BUNDLE_WAIT_DEFAULT_S
        if_none_match = request.headers.get("if-none-match")

        def newer(published: PublishedBundle) -> bool:
            if after is None and if_none_match is None:
                return True
            if after is not None and published.serial > after:
                return True
            return if_none_match is not None and not request.etag_matches(published.etag)

        published = await s.bundles.wait_for(newer, float(wait))
        if published is None:
            current = s.bundles.current
            if current is None:
                raise ApiError(
                    503,
                    "no_policy",
                    "the control plane has no bundle to serve yet; retry in a moment",
                )
            return Response(304, [("etag", current.etag)])
        return Response(
            200,
            [
                ("content-type", "application/json"),
                ("etag", published.etag),
                ("cache-control", "no-store"),
            ],
            published.data,
        )

    async def heartbeat(self, request: Request) -> Response:
        s = self.state
        identity = s.host_identity(request)
        body = request.json(Heartbeat)
        if body.host_id != identity.host_id or body.role != identity.host_role:
            raise ApiError(
                403,
                "wrong_host",
                f"the heartbeat is for {body.role} host {body.host_id!r}, but the "
                f"certificate is of {identity.host_role} host {identity.host_id!r}",
            )
        try:
            s.inventory.heartbeat(body, s.now())
        except InventoryFull as exc:
            raise ApiError(503, "inventory_full", str(exc)) from None
        current = s.bundles.current
        return json_response(
            HeartbeatAck(
                tunnel_addrs=self._tunnel_addrs(), serial=current.serial if current else 0
            )
        )

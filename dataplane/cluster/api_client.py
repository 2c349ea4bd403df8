"""The data plane's client of the control plane's API: typed calls over mTLS.

Proxies and db agents call the endpoints of `schemas/api.py` that hosts use: ping, join,
host certificate renewal, db client certificates, the bundle long poll and heartbeats. Each
call returns the response model or raises one of two errors, because callers act on the
difference:

- `ControlPlaneUnavailable`: no answer (refused, timed out, TLS failed), a 5xx, or 429.
  Temporary as far as the caller can tell: retry later and keep serving from what is
  cached while it is valid.
- `ControlPlaneRefused`: the control plane answered and said no (400-499 except 429), e.g.
  a wrong join token or a host not allowed a certificate. Retrying will not help.

Requests run on a small pool of kept-alive connections, so one slow call (a certificate
being signed) never queues behind another; the bundle long poll has a connection of its own.
This module never logs request or response bodies (they hold tokens and certificates) and
never turns certificate verification off: the one unverified request, `ping_unverified`,
exists only for the first join and carries no secret (see `identity.join`).
"""

from __future__ import annotations

import logging
import ssl
from typing import TypeVar
from urllib.parse import urlsplit

import pydantic

from schemas.api import (
    API_PREFIX,
    BUNDLE_WAIT_MAX_S,
    AuditAck,
    DbClientCert,
    DbClientCertRequest,
    Heartbeat,
    HeartbeatAck,
    HostCert,
    HostCertRequest,
    JoinRequest,
    JoinResponse,
    Ping,
)
from schemas.bundle import MAX_BUNDLE_BYTES
from transport.http import ClientResponse, HttpClient, HttpError, api_error
from transport.tls import MINIMUM_VERSION

log = logging.getLogger("teleport.cluster.api")

DEFAULT_AUTH_PORT = 3025
Model = TypeVar("Model", bound=pydantic.BaseModel)


class ControlPlaneError(Exception):
    """A call to the control plane failed; `str()` says what happened and what to check."""

    def __init__(self, message: str, address: str) -> None:
        super().__init__(message)
        self.address = address


class ControlPlaneUnavailable(ControlPlaneError):
    """No usable answer: the control plane is down, unreachable, overloaded or failing."""


class ControlPlaneRefused(ControlPlaneError):
    """The control plane answered with a 4xx: the request itself is not accepted."""

    def __init__(self, message: str, address: str, status: int, code: str) -> None:
        super().__init__(message, address)
        self.status = status
        self.code = code


def parse_auth_addr(auth_addr: str) -> str:
    """`host:port`, `host` or `https://host:port` to the API's base URL (https only)."""
    text = auth_addr.strip()
    if not text:
        raise ValueError("the control plane's address is empty; give host:port")
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    if parts.scheme != "https":
        raise ValueError(
            f"{auth_addr!r}: the control plane is reached over https only; give host:port"
        )
    try:
        port = parts.port or DEFAULT_AUTH_PORT
    except ValueError:
        raise ValueError(f"{auth_addr!r} has an invalid port; give host:port") from None
    if not parts.hostname or parts.path.strip("/") or parts.query:
        raise ValueError(f"{auth_addr!r} is not host:port (e.g. auth.example.com:3025)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"https://{host}:{port}"


def unverified_context() -> ssl.SSLContext:
    """TLS that does not check the server: ONLY for `ping_unverified` before the first join,
    to learn the host CA whose fingerprint is then compared to the pin."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ControlPlaneClient:
    """Calls to one control plane address with one TLS context (the host's certificate).

    `set_ssl_context` swaps the context after a certificate renewal: connections opened
    from then on use it, kept-alive ones are closed when they are next released.
    """

    def __init__(
        self,
        auth_addr: str,
        ssl_context: ssl.SSLContext,
        *,
        timeout: float = 10.0,
        pool_size: int = 4,
    ) -> None:
        self.base_url = parse_auth_addr(auth_addr)
        self.timeout = timeout
        self.pool_size = pool_size
        self._ssl = ssl_context
        self._generation = 0
        self._idle: list[tuple[int, HttpClient]] = []
        self._busy: set[HttpClient] = set()
        self._poll: tuple[int, HttpClient] | None = None
        self._closed = False

    # --- the endpoints -------------------------------------------------------------------

    async def ping(self) -> Ping:
        return await self._call("GET", "/ping", Ping)

    async def join(self, request: JoinRequest) -> JoinResponse:
        return await self._call("POST", "/join", JoinResponse, request)

    async def renew_host_cert(self, request: HostCertRequest) -> HostCert:
        return await self._call("POST", "/certs/host", HostCert, request)

    async def db_client_cert(self, request: DbClientCertRequest) -> DbClientCert:
        return await self._call("POST", "/certs/db-client", DbClientCert, request)

    async def heartbeat(self, beat: Heartbeat) -> HeartbeatAck:
        return await self._call("POST", "/heartbeat", HeartbeatAck, beat)

    async def send_audit_json(self, body: bytes) -> AuditAck:
        """Deliver audit events already encoded: `body` is the JSON of an AuditBatch
        (the shipper joins the events' JSON, each serialized once), posted as it is. A
        refusal (4xx) raises ControlPlaneRefused with `status`."""
        return await self._call("POST", "/audit/events", AuditAck, raw=body)

    async def fetch_bundle(self, after: int, wait: float) -> bytes | None:
        """The bundle file if the control plane has one with a serial above `after`, waiting
        up to `wait` seconds for it (long poll); None when none came in that time."""
        wait = max(0, min(int(wait), BUNDLE_WAIT_MAX_S))
        if self._poll is None or self._poll[0] != self._generation:
            if self._poll is not None:
                await self._poll[1].aclose()
            self._poll = (self._generation, self._new_http(MAX_BUNDLE_BYTES))
        client = self._poll[1]
        response = await self._send(
            client, "GET", "/bundle", None, {"after": after, "wait": wait}, wait + self.timeout
        )
        if response.status == 304:
            return None
        self._check(response)
        if response.status != 200 or not response.body:
            raise ControlPlaneUnavailable(
                f"{response.url} answered {response.status} without a bundle", self.base_url
            )
        return response.body

    # --- plumbing ------------------------------------------------------------------------

    def set_ssl_context(self, ssl_context: ssl.SSLContext) -> None:
        self._ssl = ssl_context
        self._generation += 1

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for _, client in idle:
            await client.aclose()
        for client in list(self._busy):
            await client.aclose()
        if self._poll is not None:
            await self._poll[1].aclose()
            self._poll = None

    async def __aenter__(self) -> ControlPlaneClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _new_http(self, max_response_bytes: int = 4 * 1024 * 1024) -> HttpClient:
        return HttpClient(
            self.base_url,
            ssl_context=self._ssl,
            timeout=self.timeout,
            max_response_bytes=max_response_bytes,
        )

    async def _call(
        self,
        method: str,
        path: str,
        model: type[Model],
        body: pydantic.BaseModel | None = None,
        *,
        raw: bytes | None = None,
    ) -> Model:
        if self._closed:
            raise ControlPlaneUnavailable("the control plane client is closed", self.base_url)
        generation = self._generation
        client = None
        while self._idle:
            gen, candidate = self._idle.pop()
            if gen == generation:
                client = candidate
                break
            await candidate.aclose()
        if client is None:
            client = self._new_http()
        self._busy.add(client)
        reusable = False
        try:
            response = await self._send(client, method, path, body, None, self.timeout, raw)
            self._check(response)
            try:
                result = response.json(model)
            except HttpError as exc:
                raise ControlPlaneUnavailable(str(exc), self.base_url) from None
            reusable = True
            return result
        finally:
            self._busy.discard(client)
            if (
                reusable
                and not self._closed
                and generation == self._generation
                and len(self._idle) < self.pool_size
            ):
                self._idle.append((generation, client))
            else:
                await client.aclose()

    async def _send(
        self,
        client: HttpClient,
        method: str,
        path: str,
        body: pydantic.BaseModel | None,
        params: dict[str, str | int] | None,
        timeout: float,
        raw: bytes | None = None,
    ) -> ClientResponse:
        headers = {"content-type": "application/json"} if raw is not None else None
        try:
            return await client.request(
                method, API_PREFIX + path, json=body, body=raw, params=params,
                headers=headers, timeout=timeout,
            )
        except HttpError as exc:
            raise ControlPlaneUnavailable(str(exc), self.base_url) from None

    def _check(self, response: ClientResponse) -> None:
        if response.status < 400:
            return
        error = api_error(response)
        if response.status >= 500 or response.status == 429:
            raise ControlPlaneUnavailable(
                f"{response.url}: the control plane could not answer now (HTTP "
                f"{response.status}): {error.message}",
                self.base_url,
            )
        raise ControlPlaneRefused(error.message, self.base_url, response.status, error.code)


async def ping_unverified(auth_addr: str, timeout: float = 10.0) -> Ping:
    """GET /v1/ping without checking the server's certificate (see `unverified_context`).

    Used once, before the first join, to read the host CA so that it can be checked
    against the operator's pin. Nothing secret is sent on this connection.
    """
    base_url = parse_auth_addr(auth_addr)
    async with HttpClient(base_url, ssl_context=unverified_context(), timeout=timeout) as http:
        try:
            response = await http.request("GET", API_PREFIX + "/ping")
        except HttpError as exc:
            raise ControlPlaneUnavailable(str(exc), base_url) from None
        if response.status >= 400:
            error = api_error(response)
            raise ControlPlaneUnavailable(
                f"{base_url} answered ping with HTTP {response.status}: {error.message}; is "
                "this the control plane's (or a proxy's) address?",
                base_url,
            )
        try:
            return response.json(Ping)
        except HttpError as exc:
            raise ControlPlaneUnavailable(str(exc), base_url) from None

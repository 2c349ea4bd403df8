"""`ApiServer`: the control plane's HTTPS API on `transport.http.HttpServer`.

TLS 1.2+ (`transport.tls.server_context`) with a host certificate the host CA issues to the
control plane itself at start (SANs: localhost, 127.0.0.1, ::1, the node name, the hosts of
the configured auth and proxy public addresses; the proxy forwards API connections to us
unopened, so clients see this certificate through it). Client certificates are optional at
the TLS layer (verified there against the user and host CAs when presented) and checked
again per endpoint, with the identity they carry, by `control.api.state`.

The server certificate is renewed in place at two thirds of its life: new handshakes get the
new one through the SNI callback, connections already open keep theirs.

Routes are `(method, path) -> handler`; `add_route` lets another part of the control plane
(the audit store) serve its endpoint on the same server. A maintenance task forgets silent
hosts and writes `<data_dir>/run/agents.json`; the bound address is written to
`<data_dir>/run/api.json`.

Never logs request bodies, tokens, passwords or keys.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from control.api.bundlefeed import BundleFeed
from control.api.hosts import HostsApi
from control.api.people import PeopleApi
from control.api.state import ApiState, utc_now
from control.audit_store import AuditStore, audit_events_handler
from control.bundles import BundleStore
from control.ca import CAError, ClusterCAs, certificate_pem
from control.inventory import Inventory, read_agents, write_agents
from control.settings import ControlSettings
from control.tokens import TokenStore
from control.users import LockoutPolicy, PhantomLockouts, SecretsStore
from schemas.bundle import key_id
from schemas.policy.models import split_host_port
from transport import tls
from transport.files import ensure_dir, write_atomic
from transport.http import ApiError, Handler, HttpServer, Request, Response, ServerLimits
from transport.ratelimit import TokenBuckets

log = logging.getLogger("teleport.control.api")

API_FILE = Path("run") / "api.json"
SERVER_CERT_TTL = timedelta(days=30)
API_HOST_ID = "auth"


def host_of(address: str) -> str:
    """The host part of `host:port` (brackets of an IPv6 address removed), else the text."""
    try:
        return split_host_port(address)[0]
    except ValueError:
        return address.strip().strip("[]")


class ApiServer:
    def __init__(
        self,
        data_dir: Path,
        settings: ControlSettings,
        cas: ClusterCAs,
        bundle_key: Ed25519PublicKey,
        *,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.settings = settings
        api = settings.api
        raw = bundle_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        lockout = LockoutPolicy(api.lockout_failures, api.lockout_seconds)
        self.state = ApiState(
            data_dir=self.data_dir,
            settings=settings,
            cas=cas,
            secrets=SecretsStore(self.data_dir, lockout),
            tokens=TokenStore(self.data_dir, api.static_tokens),
            inventory=Inventory(interval=timedelta(seconds=api.heartbeat_interval_seconds)),
            bundles=BundleFeed(
                BundleStore(self.data_dir / "bundles"), bundle_key, settings.cluster_name
            ),
            bundle_keys={key_id(bundle_key): base64.b64encode(raw).decode()},
            login_by_user=TokenBuckets(api.login_burst_per_user, api.login_refill_per_user_seconds),
            login_by_addr=TokenBuckets(api.login_burst_per_addr, api.login_refill_per_addr_seconds),
            phantoms=PhantomLockouts(lockout),
            clock=clock,
            monotonic=monotonic,
        )
        written = read_agents(self.data_dir)
        if written is not None:
            restored = self.state.inventory.restore(written, self.state.now())
            if restored:
                log.info("%d proxies and agents of the last run are listed until they "
                         "heartbeat again (forgotten in %ds if they do not)", restored,
                         self.state.inventory.forget_after.total_seconds())
        self.routes: dict[tuple[str, str], Handler] = {}
        self.routes.update(PeopleApi(self.state).routes())
        self.routes.update(HostsApi(self.state).routes())
        # POST /v1/audit/events: any joined host (agents, and proxies for their refusals).
        self.audit = AuditStore(self.data_dir / "audit")
        self.routes[("POST", "/v1/audit/events")] = audit_events_handler(
            self.audit, lambda request: self.state.host_identity(request).host_id
        )
        self.http = HttpServer(
            self._dispatch,
            ServerLimits(
                max_header_bytes=api.max_header_bytes,
                max_body_bytes=api.max_body_bytes,
                header_timeout=api.header_timeout_seconds,
                body_timeout=api.body_timeout_seconds,
            ),
        )
        self.address: tuple[str, int] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._current_ssl: ssl.SSLContext | None = None
        self._cert_renew_at: datetime | None = None
        self._maintenance: asyncio.Task[None] | None = None

    # -- routes ------------------------------------------------------------------------

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve `handler` at `method path` (e.g. the audit store's POST /v1/audit/events)."""
        key = (method.upper(), path)
        if key in self.routes:
            raise ValueError(f"{method} {path} is already served")
        self.routes[key] = handler

    async def _dispatch(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((method, request.path))
        if handler is not None:
            return await handler(request)
        allowed = sorted(m for m, p in self.routes if p == request.path)
        if allowed:
            response = ApiError(
                405,
                "method_not_allowed",
                f"{request.path} accepts {', '.join(allowed)}, not {request.method}",
            ).to_response()
            response.headers.append(("allow", ", ".join(allowed)))
            return response
        raise ApiError(
            404, "not_found", f"no API endpoint {request.path}; see schemas/api.py for the list"
        )

    # -- reconciler hook -----------------------------------------------------------------

    def on_publish(self, serial: int, data: bytes) -> None:
        """`Reconciler.on_publish`: called from the reconcile worker thread."""
        self.state.bundles.publish_threadsafe(serial, data)

    # -- TLS -----------------------------------------------------------------------------

    def _server_names(self) -> list[str]:
        api = self.settings.api
        names = ["localhost", "127.0.0.1", "::1"]
        for candidate in [api.nodename, *map(host_of, [*api.public_addrs, *api.proxy_addrs])]:
            if candidate and candidate not in names and not _unspecified(candidate):
                names.append(candidate)
        return names

    def _new_server_context(self) -> ssl.SSLContext:
        key = tls.new_private_key()
        now = self.state.now()
        names = self._server_names()
        dns = [n for n in names if not _is_ip(n)]
        ips = [n for n in names if _is_ip(n)]
        try:
            cert = self.state.cas.host.issue_host(
                key.public_key(),
                API_HOST_ID,
                "auth",
                dns_names=dns,
                ip_addresses=ips,
                ttl=SERVER_CERT_TTL,
                now=now,
            )
        except CAError as exc:
            raise ValueError(
                f"cannot make the API's certificate: {exc}; check nodename and the public "
                "addresses in teleport.yaml"
            ) from None
        self._cert_renew_at = now + SERVER_CERT_TTL * 2 / 3
        # The host CA follows the leaf, so that a host joining with only a CA pin can check
        # the chain it is shown against the pin before trusting anything.
        return tls.server_context(
            certificate_pem(cert) + self.state.cas.host.certificate_pem(),
            tls.private_key_pem(key),
            client_cas=[
                self.state.cas.user.certificate_pem(),
                self.state.cas.host.certificate_pem(),
            ],
            client_auth="optional",
        )

    def _pick_context(
        self, sslobj: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        current = self._current_ssl
        if current is not None and sslobj.context is not current:
            sslobj.context = current

    def ssl_context(self) -> ssl.SSLContext:
        """The context to listen with (also for sockets handed over by `accept_socket`)."""
        if self._ssl is None:
            self._ssl = self._new_server_context()
            self._current_ssl = self._ssl
            self._ssl.sni_callback = self._pick_context
        return self._ssl

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Listen on `settings.api_addr`; returns the bound address."""
        if not self.settings.api_addr:
            raise ValueError("the API has no listen address (api_addr)")
        host, port = split_host_port(self.settings.api_addr)
        self.state.bundles.bind(asyncio.get_running_loop())
        context = self.ssl_context()
        self.address = await self.http.listen(host, port, ssl=context)
        shown = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        ensure_dir(self.data_dir / API_FILE.parent)
        write_atomic(
            self.data_dir / API_FILE,
            json.dumps({"addr": f"{shown}:{self.address[1]}", "pid": os.getpid()}).encode(),
        )
        self._maintenance = asyncio.create_task(self._maintain(), name="api-maintenance")
        log.info("API listening on https://%s:%d", shown, self.address[1])
        return self.address

    async def accept_socket(self, sock: socket.socket) -> None:
        """Serve a connection another listener (the proxy's web port) accepted."""
        await self.http.accept_socket(sock, ssl=self.ssl_context())

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        await self.http.close()
        await asyncio.to_thread(self.audit.close)
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / API_FILE).unlink()

    async def _maintain(self) -> None:
        inventory = self.state.inventory
        last_write = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = self.state.now()
            inventory.expire(now)
            mono = time.monotonic()
            if inventory.dirty or mono - last_write >= inventory.interval.total_seconds():
                try:
                    await asyncio.to_thread(write_agents, self.data_dir, inventory, now)
                except OSError as exc:
                    log.warning("cannot write %s: %s", self.data_dir / "run/agents.json", exc)
                last_write = mono
            if self._cert_renew_at is not None and now >= self._cert_renew_at:
                try:
                    self._current_ssl = self._new_server_context()
                    log.info("renewed the API's server certificate")
                except (ValueError, ssl.SSLError) as exc:
                    log.error("cannot renew the API's server certificate: %s", exc)


def _unspecified(name: str) -> bool:
    """0.0.0.0 or :: (a listen-everywhere address is no name to put in a certificate)."""
    try:
        return ipaddress.ip_address(name).is_unspecified
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def read_api_address(data_dir: Path) -> str | None:
    """The address a running API bound (`host:port`), from `<data_dir>/run/api.json`."""
    try:
        return str(json.loads((Path(data_dir) / API_FILE).read_text())["addr"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None

"""`tsh` talking to the cluster: HTTPS to the proxy's web port (which hands API connections
to the control plane unopened), with the bodies of `schemas/api.py`.

Trust in the proxy, in the order `tsh login` uses it:
- a host CA pinned by an earlier login (the profile's `host-ca.pem`), plus the system store;
- otherwise the system trust store alone;
- `--ca-pin=sha256:...`: the host CA that `ping` returns must have that fingerprint (what
  `tctl status` prints as "CA pin"); it is pinned, then everything else is verified with it;
- `--insecure`: the host CA that `ping` returns is accepted as is (trust on first use, for
  test setups) and pinned; tsh says so on stderr. Only that one `ping` goes over a TLS
  connection whose certificate is not verified: it carries no credential.

Every certificate the cluster gives us is checked before it is saved: the chain to the
cluster's user CA, the validity window, the usage, and that it is for our own public key.

Never sends a private key; never logs a password, TOTP code, signup token or key.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from dataplane.tsh.errors import TshError, UsageError
from schemas.api import (
    DatabaseCert,
    DatabaseCertRequest,
    DatabaseList,
    LoginRequest,
    LoginResponse,
    Ping,
    SignupChallenge,
    SignupRequest,
    SignupResponse,
    SignupStart,
)
from schemas.identity import (
    Identity,
    IdentityError,
    Usage,
    load_certificates,
    verify_identity,
)
from transport import tls
from transport.http import HttpTlsError, request_sync

DEFAULT_PROXY_PORT = 3080
REQUEST_TIMEOUT = 30.0
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)$")
Model = TypeVar("Model", bound=BaseModel)


# --- addresses -----------------------------------------------------------------------------


def parse_proxy(text: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets; the port defaults to 3080) -> (host, port)."""
    value = text.strip()
    if value.startswith(("https://", "http://")):
        value = value.split("://", 1)[1].rstrip("/")
    host, port_text = value, ""
    if value.startswith("["):
        close = value.find("]")
        if close > 0:
            host, rest = value[: close + 1], value[close + 1 :]
            if rest.startswith(":"):
                port_text = rest[1:]
            elif rest:
                host = value  # invalid; reported below
    elif ":" in value:
        host, port_text = value.rsplit(":", 1)
    if not _HOST.match(host) or (port_text and not port_text.isdigit()):
        raise UsageError(
            f"--proxy={text!r} is not a proxy address: write HOST:PORT, e.g. "
            "--proxy=teleport.example.com:3080"
        )
    port = int(port_text) if port_text else DEFAULT_PROXY_PORT
    if not 0 < port < 65536:
        raise UsageError(f"--proxy={text!r}: the port must be between 1 and 65535")
    return host.strip("[]"), port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- trust ---------------------------------------------------------------------------------


def unverified_context() -> ssl.SSLContext:
    """For the one `ping` of `--insecure` / `--ca-pin` only: TLS 1.2+, certificate unchecked.
    Nothing secret is ever sent over it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def verified_context(
    pinned_cas: bytes | None,
    cert: bytes | None = None,
    key: bytes | None = None,
    *,
    system: bool = True,
) -> ssl.SSLContext:
    """Verify the proxy against `pinned_cas` (PEM) and, with `system`, the system store;
    present `cert`/`key` when given."""
    if pinned_cas:
        ctx = tls.client_context([pinned_cas], cert, key)
        if system:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return ctx
    if cert is not None or key is not None:
        raise ValueError("a client certificate goes only to a proxy whose host CA is pinned")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def check_certificate(
    cert_pem: str,
    user_cas: Sequence[str] | bytes,
    key: ec.EllipticCurvePrivateKey,
    usage: Usage,
    now: datetime,
) -> Identity:
    """Verify a certificate the cluster issued us: chain to the user CA, validity, usage,
    and that it certifies our own key."""
    cas_pem = user_cas if isinstance(user_cas, bytes) else "".join(user_cas).encode()
    try:
        cas = load_certificates(cas_pem)
        identity = verify_identity(cert_pem.encode(), cas, now, usage)
    except IdentityError as exc:
        raise TshError(f"the cluster sent a certificate tsh cannot trust: {exc}") from None
    leaf = x509.load_pem_x509_certificate(cert_pem.encode())
    if leaf.public_key() != key.public_key():
        raise TshError(
            "the cluster sent a certificate for another key than the one tsh generated; "
            "nothing was saved: log in again, and report this to your administrator"
        )
    return identity


# --- the API -------------------------------------------------------------------------------


class ProxyClient:
    """Typed calls to the cluster's API through the proxy at `host:port`."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.timeout = timeout
        self.base_url = f"https://{join_host_port(host, port)}"

    def _call(self, method: str, path: str, model: type[Model], body: Any = None) -> Model:
        response = request_sync(
            self.base_url,
            method,
            path,
            json=body,
            ssl_context=self.context,
            timeout=self.timeout,
        )
        return response.raise_for_error().json(model)

    def ping(self) -> Ping:
        return self._call("GET", "/v1/ping", Ping)

    def login(self, request: LoginRequest) -> LoginResponse:
        return self._call("POST", "/v1/login", LoginResponse, request)

    def signup_start(self, request: SignupStart) -> SignupChallenge:
        return self._call("POST", "/v1/signup/start", SignupChallenge, request)

    def signup(self, request: SignupRequest) -> SignupResponse:
        return self._call("POST", "/v1/signup", SignupResponse, request)

    def databases(self) -> DatabaseList:
        return self._call("GET", "/v1/databases", DatabaseList)

    def db_cert(self, request: DatabaseCertRequest) -> DatabaseCert:
        return self._call("POST", "/v1/certs/db", DatabaseCert, request)


def untrusted_hint(error: HttpTlsError, proxy: str, pinned: bool) -> TshError:
    """The message for a proxy whose certificate did not verify."""
    if pinned:
        advice = (
            "it does not verify against the host CA pinned at your last login nor the system "
            "trust store. If the cluster was re-created, run `tsh logout` and log in again "
            "with --ca-pin=<the CA pin `tctl status` prints> (or --insecure on a test setup)"
        )
    else:
        advice = (
            "it does not verify against the system trust store. Give the proxy a certificate "
            "from a public CA, or log in with --ca-pin=<the CA pin `tctl status` prints on "
            "the auth host>, or, on a test setup only, with --insecure"
        )
    return TshError(f"{error}\nThe proxy {proxy} is not trusted: {advice}.", 2)

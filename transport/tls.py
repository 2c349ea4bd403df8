"""TLS for every hop: SSLContext builders, the peer's certificates, ECDSA P-256 keys.

Both planes build their contexts here so that every socket gets the same rules: TLS 1.2 or
newer, forward-secret AEAD cipher suites only (TLS 1.3 suites are OpenSSL's, all AEAD), no
compression, no renegotiation, certificates always verified (clients always verify the
server against the CA files they are given; `check_hostname` is on unless the caller asks
for verify-ca).

`resuming_client_context` builds a client context that offers a TLS session of an earlier
connection on every new one (`ResumingClientContext.session`), for asyncio and uvloop
transports alike: a resumed handshake skips the certificate signatures and chain checks.

Certificates and keys are given as PEM `bytes` (content) or as a `str`/`os.PathLike` (a file
path). The ssl module loads keys only from files, so PEM content is written to a fresh 0700
temporary directory as 0600 files, loaded, and deleted before the builder returns.

The peer's certificate (`peer_certificate`) is its leaf only (all that Python before 3.13
gives): the caller passes it to `schemas.identity.verify_identity` with its CA bundle, which
looks up the issuing CA by the leaf's issuer name and checks the signature itself.

This module never logs certificates or keys, never turns verification off, and never
accepts a protocol older than TLS 1.2.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

CertSource = bytes | str | os.PathLike[str]
ClientAuth = Literal["none", "optional", "required"]
_Context = TypeVar("_Context", bound=ssl.SSLContext)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AES-GCM or ChaCha20-Poly1305.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1"


# --- private keys --------------------------------------------------------------------------


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key: the only key type teleport-db issues certificates for."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_der(key: ec.EllipticCurvePrivateKey | bytes) -> bytes:
    """The key (or an unencrypted PEM key) as unencrypted PKCS#8 DER: the form the
    PostgreSQL JDBC driver reads."""
    if isinstance(key, bytes):
        loaded = serialization.load_pem_private_key(key, None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError("not an ECDSA private key")
        key = loaded
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- contexts -----------------------------------------------------------------------------


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE


def _load_cert_chain(ctx: ssl.SSLContext, cert: CertSource, key: CertSource) -> None:
    if not isinstance(cert, bytes) and not isinstance(key, bytes):
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
        return
    tmpdir = tempfile.mkdtemp(prefix="teleport-db-tls-")  # created 0700
    try:
        paths = []
        for name, source in (("cert.pem", cert), ("key.pem", key)):
            if isinstance(source, bytes):
                path = os.path.join(tmpdir, name)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(source)
                paths.append(path)
            else:
                paths.append(os.fspath(source))
        ctx.load_cert_chain(paths[0], paths[1])
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _load_cas(ctx: ssl.SSLContext, cas: Sequence[CertSource]) -> None:
    for ca in cas:
        if isinstance(ca, bytes):
            ctx.load_verify_locations(cadata=ca.decode("ascii"))
        else:
            ctx.load_verify_locations(cafile=os.fspath(ca))


def server_context(
    cert: CertSource,
    key: CertSource,
    client_cas: Sequence[CertSource] = (),
    client_auth: ClientAuth = "none",
) -> ssl.SSLContext:
    """A server context presenting `cert`/`key`, verifying client certificates against
    `client_cas` when `client_auth` is "optional" or "required"."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    _load_cert_chain(ctx, cert, key)
    if client_auth != "none":
        if not client_cas:
            raise ValueError(f"client_auth={client_auth!r} needs at least one CA in client_cas")
        _load_cas(ctx, client_cas)
        ctx.verify_mode = ssl.CERT_REQUIRED if client_auth == "required" else ssl.CERT_OPTIONAL
    return ctx


class ResumingClientContext(ssl.SSLContext):
    """A client context that offers `session` (a TLS session from an earlier connection to
    the same server, `SSLObject.session`) on every connection it makes, for asyncio and
    uvloop too (they call `wrap_bio` without a session).

    Resuming (TLS 1.3 tickets: PSK with a fresh ECDHE, so still forward-secret) skips the
    certificate signatures and chain verifications of a full handshake. Both identities
    stay bound to the session; the caller still checks the peer's certificate on every
    connection, and drops the context (and its session) when the credentials or the
    trusted CAs change. Set `session = None` to force a full handshake.
    """

    session: ssl.SSLSession | None = None

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session or self.session
        )

    def wrap_socket(  # type: ignore[override]
        self,
        sock: Any,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock, server_side, do_handshake_on_connect, suppress_ragged_eofs,
            server_hostname, session or self.session,
        )  # fmt: skip


def client_context(
    cas: Sequence[CertSource],
    cert: CertSource | None = None,
    key: CertSource | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client context that verifies the server against `cas` (and its host name unless
    `check_hostname` is False: verify-ca), presenting `cert`/`key` when given."""
    return _client_context(ssl.SSLContext, cas, cert, key, check_hostname)


def resuming_client_context(
    cas: Sequence[CertSource],
    cert: CertSource | None = None,
    key: CertSource | None = None,
    *,
    check_hostname: bool = True,
) -> ResumingClientContext:
    """`client_context`, able to resume a TLS session (`ResumingClientContext`)."""
    return _client_context(ResumingClientContext, cas, cert, key, check_hostname)


def _client_context(
    cls: type[_Context],
    cas: Sequence[CertSource],
    cert: CertSource | None,
    key: CertSource | None,
    check_hostname: bool,
) -> _Context:
    if not cas:
        raise ValueError("a client context needs the CA certificates that sign the server")
    if (cert is None) != (key is None):
        raise ValueError("give both cert and key, or neither")
    ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    _load_cas(ctx, cas)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert is not None and key is not None:
        _load_cert_chain(ctx, cert, key)
    return ctx


# --- the peer's certificates --------------------------------------------------------------


def _ssl_object(conn: Any) -> ssl.SSLObject | ssl.SSLSocket | None:
    if isinstance(conn, ssl.SSLObject | ssl.SSLSocket):
        return conn
    get_extra_info = getattr(conn, "get_extra_info", None)  # asyncio transport / writer
    if get_extra_info is not None:
        return get_extra_info("ssl_object")
    raise TypeError(f"expected an SSLObject, SSLSocket or asyncio transport, got {conn!r}")


def peer_certificate(conn: Any) -> bytes | None:
    """The DER of the certificate the peer presented (an SSLObject, SSLSocket or asyncio
    transport), or None if it presented none. Feed it to `verify_identity` with the CAs."""
    obj = _ssl_object(conn)
    if obj is None:
        return None
    der = obj.getpeercert(binary_form=True)
    return bytes(der) if der else None

"""Real TLS over loopback with the contexts of transport/tls.py and the cluster's certificates."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from control.ca import ClusterCAs, certificate_pem
from schemas.identity import IdentityError, verify_identity
from transport.tls import (
    client_context,
    new_private_key,
    peer_certificate,
    private_key_pem,
    server_context,
)

from .conftest import login_identity

HOUR = timedelta(hours=1)


@dataclass
class Pair:
    cert: bytes
    key: bytes


def user_pair(cas: ClusterCAs, name: str = "alice") -> Pair:
    key = new_private_key()
    cert = cas.user.issue_user(key.public_key(), login_identity(name), HOUR)
    return Pair(certificate_pem(cert), private_key_pem(key))


def proxy_pair(cas: ClusterCAs) -> Pair:
    key = new_private_key()
    cert = cas.host.issue_host(
        key.public_key(),
        "proxy-1",
        "proxy",
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
        ttl=HOUR,
    )
    return Pair(certificate_pem(cert), private_key_pem(key))


@dataclass
class Served:
    """What the server side saw: one entry per connection whose handshake completed."""

    identities: list[str] = field(default_factory=list)


async def serve_once(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    trusted: ClusterCAs,
    server_hostname: str = "localhost",
) -> tuple[bytes, Served]:
    """Run a server that names the verified client, connect once, return its answer."""
    served = Served()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        der = peer_certificate(writer)
        try:
            identity = verify_identity(
                der or [], [trusted.user.certificate], datetime.now(UTC), "user"
            )
            version = writer.get_extra_info("ssl_object").version()
            answer = f"hello {identity.username} over {version}"
            served.identities.append(identity.username)
        except IdentityError as exc:
            answer = f"refused: {exc}"
        writer.write(answer.encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname
            ),
            10,
        )
        try:
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        return data, served
    finally:
        server.close()
        await server.wait_closed()


def mtls_server(cas: ClusterCAs) -> ssl.SSLContext:
    proxy = proxy_pair(cas)
    return server_context(proxy.cert, proxy.key, [cas.user.certificate_pem()], "required")


def test_mtls_accepts_a_user_certificate_and_reads_its_identity(cas: ClusterCAs) -> None:
    alice = user_pair(cas)
    client = client_context([cas.host.certificate_pem()], alice.cert, alice.key)
    data, served = asyncio.run(serve_once(mtls_server(cas), client, cas))
    assert data == b"hello alice over TLSv1.3"
    assert served.identities == ["alice"]


def test_peer_certificate_is_the_leaf_the_peer_presented(cas: ClusterCAs) -> None:
    alice = user_pair(cas)
    seen: list[int] = []

    async def run() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            der = peer_certificate(writer)
            assert der is not None
            seen.append(1)
            assert certificate_pem(x509.load_der_x509_certificate(der)) == alice.cert
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=mtls_server(cas))
        port = server.sockets[0].getsockname()[1]
        client = client_context([cas.host.certificate_pem()], alice.cert, alice.key)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        # The client side sees the proxy's host certificate.
        der = peer_certificate(writer)
        assert der is not None
        assert x509.load_der_x509_certificate(der).issuer == cas.host.certificate.subject
        await reader.read()
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())
    assert seen and seen[0] >= 1


def refused(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, cas: ClusterCAs) -> bool:
    """True when the server ended the connection in the handshake, before any application
    byte. (TLS 1.3 finishes the client's side before the server checks the client's
    certificate, so the refusal may arrive as an alert on read or as an empty read.)"""
    try:
        data, served = asyncio.run(serve_once(server_ctx, client_ctx, cas))
    except (ssl.SSLError, ConnectionError):
        return True
    return data == b"" and served.identities == []


def test_client_certificate_from_another_ca_is_refused_in_the_handshake(
    cas: ClusterCAs, other_cas: ClusterCAs
) -> None:
    mallory = user_pair(other_cas, "alice")  # same CA name, different key
    client = client_context([cas.host.certificate_pem()], mallory.cert, mallory.key)
    assert refused(mtls_server(cas), client, cas)
    # Control: the same client with a certificate from the right CA gets through.
    alice = user_pair(cas)
    client = client_context([cas.host.certificate_pem()], alice.cert, alice.key)
    assert not refused(mtls_server(cas), client, cas)


def test_client_without_certificate_is_refused(cas: ClusterCAs) -> None:
    assert refused(mtls_server(cas), client_context([cas.host.certificate_pem()]), cas)


def test_client_verifies_the_server_name_and_ca(cas: ClusterCAs, other_cas: ClusterCAs) -> None:
    alice = user_pair(cas)
    client = client_context([cas.host.certificate_pem()], alice.cert, alice.key)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"Hostname mismatch|doesn't match"):
        asyncio.run(serve_once(mtls_server(cas), client, cas, server_hostname="db.example.com"))
    impostor = proxy_pair(other_cas)
    server = server_context(impostor.cert, impostor.key, [cas.user.certificate_pem()], "required")
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(serve_once(server, client, cas))


def _tls11_client() -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_tls_1_1_is_refused(cas: ClusterCAs, tmp_path: Path) -> None:
    proxy = proxy_pair(cas)

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi " + writer.get_extra_info("ssl_object").version().encode())
        await writer.drain()
        writer.close()

    async def connect(server_ctx: ssl.SSLContext) -> bytes:
        server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_tls11_client())
            data = await reader.read()
            writer.close()
            return data
        finally:
            server.close()
            await server.wait_closed()

    # Control: this client really speaks TLS 1.1 to a server that allows it...
    (tmp_path / "c.pem").write_bytes(proxy.cert)
    (tmp_path / "k.pem").write_bytes(proxy.key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        weak = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        weak.minimum_version = ssl.TLSVersion.TLSv1_1
    weak.set_ciphers("DEFAULT:@SECLEVEL=0")
    weak.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    assert asyncio.run(connect(weak)) == b"hi TLSv1.1"
    # ...and ours refuses it.
    ours = server_context(proxy.cert, proxy.key)
    assert ours.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        asyncio.run(connect(ours))


def test_pem_bytes_leave_no_key_file_behind(
    cas: ClusterCAs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    proxy = proxy_pair(cas)
    server_context(proxy.cert, proxy.key, [cas.user.certificate_pem()], "optional")
    client_context([cas.host.certificate_pem()], proxy.cert, proxy.key)
    assert list(tmp_path.iterdir()) == []


def test_contexts_refuse_unsafe_arguments(cas: ClusterCAs) -> None:
    proxy = proxy_pair(cas)
    with pytest.raises(ValueError, match="needs at least one CA"):
        server_context(proxy.cert, proxy.key, [], "required")
    with pytest.raises(ValueError, match="CA certificates"):
        client_context([])
    with pytest.raises(ValueError, match="both cert and key"):
        client_context([cas.host.certificate_pem()], proxy.cert)

"""The API's own TLS certificate: issued by the host CA for the configured names, sent with
the host CA so a joining host can check its pin, renewed in place for new connections."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from control.api import ApiServer
from control.ca import ClusterCAs
from control.settings import ApiSettings, ControlSettings
from control.signing import load_or_create_signing_key
from schemas.identity import fingerprint, verify_identity
from transport import tls


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


def _server(tmp_path: Path, clock: Clock) -> tuple[ApiServer, ClusterCAs]:
    cas = ClusterCAs.load_or_create(tmp_path, "root")
    settings = ControlSettings(
        cluster_name="root",
        api_addr="127.0.0.1:0",
        api=ApiSettings(
            nodename="auth1",
            public_addrs=["auth.example.com:3025", "10.1.2.3:3025"],
            proxy_addrs=["teleport.example.com:3080"],
        ),
    )
    key = load_or_create_signing_key(tmp_path).public_key()
    return ApiServer(tmp_path, settings, cas, key, clock=clock), cas


def _peer_cert(port: int, server_hostname: str | None, ctx: ssl.SSLContext) -> x509.Certificate:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(
        raw, server_hostname=server_hostname
    ) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_api_certificate_names_the_cluster_hosts_and_carries_the_host_ca(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        server, cas = _server(tmp_path, Clock())
        _, port = await server.start()
        try:
            ctx = tls.client_context([cas.host.certificate_pem()])
            for name in ("localhost", "auth1", "auth.example.com", "teleport.example.com"):
                cert = await asyncio.to_thread(_peer_cert, port, name, ctx)
            identity = verify_identity([cert], [cas.host.certificate], datetime.now(UTC), "host")
            assert (identity.host_id, identity.host_role) == ("auth", "auth")
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert "10.1.2.3" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.to_thread(_peer_cert, port, "elsewhere.example.com", ctx)
            shown = await asyncio.to_thread(
                subprocess.run,
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts"],
                input=b"",
                capture_output=True,
                timeout=20,
            )
            pems = x509.load_pem_x509_certificates(shown.stdout)
            assert len(pems) == 2
            assert fingerprint(pems[1]) == cas.host.fingerprint
        finally:
            await server.close()

    asyncio.run(scenario())


def test_the_api_certificate_is_renewed_for_new_connections(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = Clock()
        server, cas = _server(tmp_path, clock)
        _, port = await server.start()
        insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # only to read what the server presents
        try:
            first = await asyncio.to_thread(_peer_cert, port, None, insecure)
            clock.now += timedelta(days=21)  # past two thirds of 30 days
            deadline = asyncio.get_running_loop().time() + 5
            while True:
                await asyncio.sleep(0.2)
                second = await asyncio.to_thread(_peer_cert, port, None, insecure)
                if second.serial_number != first.serial_number:
                    break
                assert asyncio.get_running_loop().time() < deadline, "not renewed"
            assert second.not_valid_after_utc - first.not_valid_after_utc >= timedelta(days=20)
            second.verify_directly_issued_by(cas.host.certificate)
        finally:
            await server.close()

    asyncio.run(scenario())

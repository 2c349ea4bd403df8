"""HTTPS with real certificates over loopback: round trips, mutual TLS (the handler sees the
client's certificate), connections handed over after peeking, and TLS failures."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl

import pytest

from tests.transport.conftest import Parked, Pki, Runner, eventually, serving
from transport.http import (
    HttpClient,
    HttpProtocolError,
    HttpServer,
    HttpTlsError,
    Request,
    Response,
    json_response,
)


async def whoami(request: Request) -> Response:
    cert = request.peer_cert
    return json_response({
        "path": request.path,
        "cert_sha256": hashlib.sha256(cert).hexdigest() if cert else None,
        "json": request.json() if request.body else None,
    })


def test_json_round_trip_over_tls(run: Runner, pki: Pki) -> None:
    async def scenario() -> None:
        async with serving(whoami, ssl_context=pki.server_context()) as s, \
                HttpClient(s.url, ssl_context=pki.client_context()) as client:
            got = await client.request("POST", "/v1/ping", json={"cluster": "example"})
            assert got.json() == {"path": "/v1/ping", "cert_sha256": None,
                                  "json": {"cluster": "example"}}
            again = await client.request("GET", "/v1/ping")  # same TLS connection
            assert again.status == 200
            assert s.server.connection_count == 1

    run(scenario())


def test_mtls_the_handler_sees_the_client_certificate(run: Runner, pki: Pki) -> None:
    async def scenario() -> None:
        ctx = pki.server_context(ssl.CERT_REQUIRED)
        async with serving(whoami, ssl_context=ctx) as s, HttpClient(
                s.url, ssl_context=pki.client_context(identity=pki.client)) as client:
            got = (await client.request("GET", "/v1/databases")).json()
            assert got["cert_sha256"] == hashlib.sha256(pki.client.der).hexdigest()

    run(scenario())


def test_without_a_client_certificate_the_handler_sees_none(run: Runner, pki: Pki) -> None:
    async def scenario() -> None:
        ctx = pki.server_context(ssl.CERT_OPTIONAL)
        async with serving(whoami, ssl_context=ctx) as s, \
                HttpClient(s.url, ssl_context=pki.client_context()) as client:
            assert (await client.request("GET", "/v1/ping")).json()["cert_sha256"] is None

    run(scenario())


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("who", ["nobody", "other_ca"])
def test_a_server_requiring_client_certificates_refuses_others(
        run: Runner, pki: Pki, who: str, version: ssl.TLSVersion) -> None:
    async def scenario() -> None:
        ctx = pki.server_context(ssl.CERT_REQUIRED)
        ctx.maximum_version = version
        identity = pki.other_client if who == "other_ca" else None
        async with serving(whoami, ssl_context=ctx) as s, HttpClient(
                s.url, ssl_context=pki.client_context(identity=identity)) as client:
            with pytest.raises(HttpTlsError) as caught:
                await client.request("GET", "/v1/databases")
            message = str(caught.value)
            assert s.url in message
            assert "client certificate" in message
            assert s.server.connection_count == 0

    run(scenario())


def test_the_client_refuses_a_server_certificate_from_another_ca(run: Runner, pki: Pki) -> None:
    async def scenario() -> None:
        async with serving(whoami, ssl_context=pki.server_context()) as s, HttpClient(
                s.url, ssl_context=pki.client_context(trust=pki.other_ca)) as client:
            with pytest.raises(HttpTlsError) as caught:
                await client.request("GET", "/v1/ping")
            message = str(caught.value)
            assert f"TLS with {s.url} failed" in message
            assert "certificate is not trusted" in message
            assert "check the CA certificate" in message

    run(scenario())


def test_the_client_checks_the_server_name(run: Runner, pki: Pki) -> None:
    async def scenario() -> None:
        async with serving(whoami, ssl_context=pki.server_context()) as s, HttpClient(
                s.url, ssl_context=pki.client_context(),
                server_hostname="auth.example.com") as client:
            with pytest.raises(HttpTlsError, match=r"not trusted.*Hostname mismatch"):
                await client.request("GET", "/v1/ping")

    run(scenario())


def test_https_to_a_plain_server_and_http_to_a_tls_server(run: Runner, pki: Pki) -> None:
    async def scenario() -> None:
        async with serving(whoami) as plain:
            url = plain.url.replace("http://", "https://")
            async with HttpClient(url, ssl_context=pki.client_context()) as client:
                with pytest.raises(HttpTlsError) as caught:
                    await client.request("GET", "/v1/ping")
                assert "did not answer in TLS" in str(caught.value)
                assert url in str(caught.value)
        async with serving(whoami, ssl_context=pki.server_context()) as tls:
            url = tls.url.replace("https://", "http://")
            async with HttpClient(url) as client:
                with pytest.raises(HttpProtocolError) as closed:
                    await client.request("GET", "/v1/ping")
                assert "closed the connection without answering" in str(closed.value)
                assert "use an https:// address" in str(closed.value)
                assert url in str(closed.value)

    run(scenario())


class OtherListener:
    """A listening socket that is not the HttpServer's (the proxy's web port), with the
    server the accepted connections are handed to."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.server = HttpServer(whoami)

    async def accept(self) -> socket.socket:
        sock, _ = await asyncio.get_running_loop().sock_accept(self.sock)
        return sock

    async def close(self) -> None:
        await self.server.close()
        self.sock.close()


async def _peek(sock: socket.socket, size: int) -> bytes:
    """What the proxy does: look at the first bytes without consuming them."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(sock.fileno())
    return sock.recv(size, socket.MSG_PEEK)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_accept_socket_serves_a_connection_accepted_and_peeked_elsewhere(
        run: Runner, pki: Pki, tls: bool) -> None:
    async def scenario() -> None:
        other = OtherListener()
        client = HttpClient(host="127.0.0.1", port=other.port,
                            ssl_context=pki.client_context(identity=pki.client) if tls else None)
        try:
            answer = asyncio.create_task(client.request("GET", "/v1/handed-over"))
            sock = await other.accept()
            first = await _peek(sock, 5)
            assert (first[0] == 0x16) is tls  # a TLS handshake record, or "GET /"
            ctx = pki.server_context(ssl.CERT_REQUIRED) if tls else None
            await other.server.accept_socket(sock, ssl=ctx)
            got = (await answer).json()
            assert got["path"] == "/v1/handed-over"
            expected = hashlib.sha256(pki.client.der).hexdigest() if tls else None
            assert got["cert_sha256"] == expected
        finally:
            await client.aclose()
            await other.close()

    run(scenario())


def test_accept_socket_with_a_failed_handshake_closes_the_socket(run: Runner, pki: Pki) -> None:
    async def scenario() -> None:
        other = OtherListener()
        client = HttpClient(host="127.0.0.1", port=other.port,
                            ssl_context=pki.client_context(trust=pki.other_ca))
        try:
            answer = asyncio.create_task(client.request("GET", "/"))
            sock = await other.accept()
            await other.server.accept_socket(sock, ssl=pki.server_context())  # no exception
            with pytest.raises(HttpTlsError):
                await answer
            await eventually(lambda: sock.fileno() == -1)
            assert other.server.connection_count == 0
        finally:
            await client.aclose()
            await other.close()

    run(scenario())


def test_a_tls_client_that_disconnects_cancels_its_long_poll(run: Runner, pki: Pki) -> None:
    async def scenario() -> None:
        parked = Parked()
        async with serving(parked, ssl_context=pki.server_context()) as s:
            client = HttpClient(s.url, ssl_context=pki.client_context())
            poll = asyncio.create_task(client.request("GET", "/v1/bundle", timeout=30))
            await asyncio.wait_for(parked.entered.wait(), 2)
            poll.cancel()  # the caller gives up: the client drops its connection
            with contextlib.suppress(asyncio.CancelledError):
                await poll
            await asyncio.wait_for(parked.cancelled.wait(), 2)
            await eventually(lambda: s.server.connection_count == 0)
            await client.aclose()

    run(scenario())

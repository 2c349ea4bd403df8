"""The HTTP client: clear errors naming the address, keep-alive and reconnection, response
limits, ApiError from error bodies, and the synchronous facade tsh and tctl use."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator

import pydantic
import pytest

from tests.transport.conftest import FAST, Runner, eventually, server_thread, serving
from transport.http import (
    ApiError,
    ClientResponse,
    Headers,
    HttpClient,
    HttpConnectError,
    HttpProtocolError,
    HttpTimeoutError,
    Request,
    Response,
    ResponseTooLarge,
    error_response,
    json_response,
    request_sync,
)


async def api(request: Request) -> Response:
    if request.path == "/slow":
        await asyncio.sleep(5)
    if request.path == "/big":
        return Response(200, [("content-type", "text/plain")], b"b" * 2_000_000)
    if request.path == "/denied":
        return error_response(403, "access_denied", "role dev may not use db user postgres")
    assert request.peer is not None
    return json_response({"path": request.path, "peer_port": request.peer[1]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def answering(reply: bytes) -> AsyncIterator[str]:
    """A raw TCP server that reads a request head, writes `reply` and closes."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(respond, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def test_connection_refused_names_the_address(run: Runner) -> None:
    port = _free_port()

    async def scenario() -> None:
        async with HttpClient(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(HttpConnectError) as caught:
                await client.request("GET", "/v1/ping")
            message = str(caught.value)
            assert f"cannot connect to http://127.0.0.1:{port}: connection refused" in message
            assert "check that the server is running" in message
            assert caught.value.address == f"http://127.0.0.1:{port}"

    run(scenario())


def test_a_timeout_names_the_address_and_the_time(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s, HttpClient(s.url, timeout=0.2) as client:
            with pytest.raises(HttpTimeoutError) as caught:
                await client.request("GET", "/slow")
            assert f"GET {s.url}/slow: no complete answer within 0.2s" in str(caught.value)
            # The next request works (on a new connection).
            assert (await client.request("GET", "/fine")).status == 200

    run(scenario())


def test_a_server_that_accepts_but_never_answers_times_out(run: Runner) -> None:
    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as silent:
            port = silent.getsockname()[1]
            async with HttpClient(f"http://127.0.0.1:{port}") as client:
                with pytest.raises(HttpTimeoutError, match=f"127.0.0.1:{port}/x: no complete"):
                    await client.request("GET", "/x", timeout=0.2)

    run(scenario())


def test_the_client_reconnects_after_the_server_closed_an_idle_connection(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s, HttpClient(s.url) as client:
            first = (await client.request("GET", "/a")).json()["peer_port"]
            # The server closes the idle connection after keepalive_timeout.
            await eventually(lambda: s.server.connection_count == 0,
                             timeout=FAST.keepalive_timeout + 2.0)
            second = (await client.request("POST", "/b", json={})).json()["peer_port"]
            assert second != first

    run(scenario())


def test_the_client_drops_a_connection_it_kept_too_long(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s, HttpClient(s.url, idle_timeout=0.05) as client:
            first = (await client.request("GET", "/a")).json()["peer_port"]
            await asyncio.sleep(0.1)
            assert (await client.request("GET", "/b")).json()["peer_port"] != first

    run(scenario())


def test_a_response_over_the_limit_is_refused(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s, HttpClient(s.url, max_response_bytes=1_000_000) as c:
            with pytest.raises(ResponseTooLarge) as caught:
                await c.request("GET", "/big")
            assert "of 2000000 bytes is larger than the limit of 1000000" in str(caught.value)
            assert (await c.request("GET", "/ok")).status == 200

        chunk = b"400\r\n" + b"c" * 1024 + b"\r\n"
        head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        chunked = head + chunk * 20 + b"0\r\n\r\n"
        async with answering(chunked) as url, HttpClient(url, max_response_bytes=10_000) as c:
            with pytest.raises(ResponseTooLarge, match="larger than the limit of 10000"):
                await c.request("GET", "/stream")

    run(scenario())


@pytest.mark.parametrize(("reply", "fragment"), [
    (b"NOT HTTP AT ALL\r\n\r\n", "not valid HTTP/1.1"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "not valid HTTP/1.1"),
    (b"HTTP/1.1 200 OK\r\n" + b"x-big: " + b"a" * 70_000 + b"\r\n\r\n", "response head is larger"),
    (b"", "closed the connection without answering (if it serves HTTPS"),
])
def test_a_broken_answer_is_a_protocol_error(run: Runner, reply: bytes, fragment: str) -> None:
    async def scenario() -> None:
        async with answering(reply) as url, HttpClient(url) as client:
            with pytest.raises(HttpProtocolError) as caught:
                await client.request("GET", "/v1/ping")
            assert fragment in str(caught.value)
            assert url in str(caught.value)

    run(scenario())


def test_raise_for_error_gives_the_servers_code_and_message(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s, HttpClient(s.url) as client:
            denied = await client.request("GET", "/denied")
            with pytest.raises(ApiError) as caught:
                denied.raise_for_error()
            assert caught.value.status == 403
            assert caught.value.code == "access_denied"
            assert str(caught.value) == "role dev may not use db user postgres"
            ok = await client.request("GET", "/fine")
            assert ok.raise_for_error() is ok

    run(scenario())


def test_raise_for_error_without_a_json_error_body() -> None:
    plain = ClientResponse(502, "Bad Gateway", Headers({"content-type": "text/plain"}),
                           b"upstream is down\n", "GET https://proxy:3080/v1/ping")
    with pytest.raises(ApiError) as caught:
        plain.raise_for_error()
    assert (caught.value.status, caught.value.code) == (502, "http_502")
    assert str(caught.value) == "GET https://proxy:3080/v1/ping answered 502 Bad Gateway: " \
        "upstream is down"
    html = ClientResponse(500, "", Headers({"content-type": "text/html"}), b"<h1>x</h1>", "u")
    with pytest.raises(ApiError) as caught:
        html.raise_for_error()
    assert str(caught.value) == "u answered 500"


def test_json_of_a_response_that_is_not_json_or_not_the_model() -> None:
    class Ping(pydantic.BaseModel):
        cluster: str

    bad = ClientResponse(200, "OK", Headers(), b"<html>", "GET http://a:1/v1/ping")
    with pytest.raises(HttpProtocolError, match="GET http://a:1/v1/ping answered 200, but the "
                       "response body is not valid JSON"):
        bad.json()
    other = ClientResponse(200, "OK", Headers(), b'{"name": 1}', "GET http://a:1/v1/ping")
    with pytest.raises(HttpProtocolError, match=r"not a Ping: 1 problem.*cluster: Field req"):
        other.json(Ping)


def test_request_sync_from_synchronous_code() -> None:
    with server_thread(api) as s:
        got = request_sync(s.url, "GET", "/v1/ping", params={"a": "1"})
        assert got.json()["path"] == "/v1/ping"
        posted = request_sync(s.url, "POST", "/v1/join", json={"token": "t"})
        assert posted.status == 200
        with pytest.raises(ApiError, match="may not use db user postgres"):
            request_sync(s.url, "GET", "/denied").raise_for_error()
    with pytest.raises(HttpConnectError, match="connection refused"):
        request_sync(s.url, "GET", "/v1/ping")


def test_bad_client_arguments_are_refused_early() -> None:
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        HttpClient("ftp://example.com")
    with pytest.raises(ValueError, match="base_url, or a host and a port"):
        HttpClient()
    with pytest.raises(ValueError, match="plain http:// but an ssl_context"):
        HttpClient("http://a:1", ssl_context=ssl.create_default_context())
    client = HttpClient(host="::1", port=3080)
    assert client.address == "http://[::1]:3080"

"""The server's limits against misbehaving clients: oversized bodies and headers, slow
heads and bodies, idle keep-alive connections, too many connections, broken HTTP.
In every case the offender gets a 4xx (or is closed) and the server keeps serving others."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from tests.transport.conftest import (
    FAST,
    Runner,
    eventually,
    parse_responses,
    read_all,
    serving,
    status_line,
)
from transport.http import HttpClient, Request, Response, json_response


async def echo(request: Request) -> Response:
    return json_response({"path": request.path, "size": len(request.body)})


async def still_serving(url: str) -> None:
    async with HttpClient(url, timeout=2) as client:
        assert (await client.request("GET", "/alive")).json()["path"] == "/alive"


def error_of(data: bytes) -> tuple[int, dict[str, str]]:
    [(head, body)] = parse_responses(data)
    return head.status_code, json.loads(body)["error"]


def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(echo) as s:
            # No body is sent: the server answers at once.
            answer = await s.exchange(
                b"POST /v1/join HTTP/1.1\r\nhost: x\r\ncontent-length: 10485760\r\n\r\n")
            status, error = error_of(answer)
            assert status == 413
            assert error["code"] == "body_too_large"
            assert "10485760 bytes is larger than the limit of 1048576" in error["message"]
            await still_serving(s.url)

    run(scenario())


def test_a_10mb_body_sent_in_full_gets_413_and_the_server_stays_up(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(echo) as s, HttpClient(s.url) as client:
            big = await client.request("POST", "/v1/join", body=b"x" * (10 * 1024 * 1024))
            assert big.status == 413
            assert big.json()["error"]["code"] == "body_too_large"
            small = await client.request("POST", "/v1/join", body=b"x" * 1024)
            assert small.json() == {"path": "/v1/join", "size": 1024}

    run(scenario())


def test_a_chunked_body_growing_past_the_limit_is_413(run: Runner) -> None:
    limits = dataclasses.replace(FAST, max_body_bytes=1000)

    async def scenario() -> None:
        async with serving(echo, limits) as s:
            reader, writer = await asyncio.open_connection(s.host, s.port)
            writer.write(b"POST /v1/join HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(3):
                writer.write(b"190\r\n" + b"y" * 400 + b"\r\n")
            answer = await read_all(reader, timeout=2)
            writer.close()
            status, error = error_of(answer)
            assert status == 413
            assert "limit of 1000 bytes" in error["message"]

            [(head, body)] = parse_responses(await s.exchange(
                b"POST /ok HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
                b"connection: close\r\n\r\n3e8\r\n" + b"z" * 1000 + b"\r\n0\r\n\r\n"))
            assert head.status_code == 200
            assert json.loads(body)["size"] == 1000

    run(scenario())


def test_a_header_block_over_the_limit_is_431(run: Runner) -> None:
    limits = dataclasses.replace(FAST, max_header_bytes=4096)

    async def scenario() -> None:
        async with serving(echo, limits) as s:
            reader, writer = await asyncio.open_connection(s.host, s.port)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n")
            for i in range(200):
                writer.write(f"x-filler-{i}: {'a' * 100}\r\n".encode())
            answer = await read_all(reader, timeout=2)
            writer.close()
            status, error = error_of(answer)
            assert status == 431
            assert error["code"] == "headers_too_large"
            assert "limit of 4096 bytes" in error["message"]

            # A head that arrives whole in one read is measured too.
            status, _ = error_of(await s.exchange(
                b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"b" * 5000 + b"\r\n\r\n"))
            assert status == 431
            await still_serving(s.url)

    run(scenario())


def test_a_head_sent_one_byte_at_a_time_is_cut_off_and_others_are_served(run: Runner) -> None:
    """Slowloris: a byte every 0.1 s against a 0.5 s head timeout (scaled down from 1/s)."""

    async def scenario() -> None:
        async with serving(echo) as s:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection(s.host, s.port)
            started = loop.time()

            async def drip() -> None:
                for byte in b"GET /slow HTTP/1.1\r\nhost: x\r\nx-pad: " + b"p" * 100:
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.1)

            dripping = asyncio.create_task(drip())
            for _ in range(3):  # meanwhile, others are served without delay
                await still_serving(s.url)
            answer = await read_all(reader, timeout=3)
            closed_after = loop.time() - started
            dripping.cancel()
            writer.close()
            assert closed_after < FAST.header_timeout + 1.0
            status, error = error_of(answer)
            assert status == 408
            assert "request head did not arrive within 0.5s" in error["message"]

    run(scenario())


def test_a_connection_that_says_nothing_is_closed_without_an_answer(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(echo) as s:
            assert await s.exchange(b"", timeout=FAST.header_timeout + 1.0) == b""

    run(scenario())


def test_a_body_that_stalls_is_408(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(echo) as s:
            answer = await s.exchange(
                b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly-this",
                timeout=FAST.body_timeout + 1.0)
            status, error = error_of(answer)
            assert status == 408
            assert "request body did not arrive within 0.5s" in error["message"]

    run(scenario())


def test_an_idle_keep_alive_connection_is_closed(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(echo) as s:
            # One answer, then (keep-alive, idle) the server closes after keepalive_timeout.
            data = await s.exchange(b"GET /once HTTP/1.1\r\nhost: x\r\n\r\n",
                                    timeout=FAST.keepalive_timeout + 1.0)
            assert status_line(data) == b"HTTP/1.1 200 OK"
            assert len(parse_responses(data)) == 1
            await eventually(lambda: s.server.connection_count == 0)

    run(scenario())


def test_connections_over_the_maximum_get_503_until_one_closes(run: Runner) -> None:
    limits = dataclasses.replace(FAST, max_connections=2, keepalive_timeout=5.0)

    async def scenario() -> None:
        async with serving(echo, limits) as s:
            first, second = HttpClient(s.url), HttpClient(s.url)
            for client in (first, second):
                assert (await client.request("GET", "/held")).status == 200
            assert s.server.connection_count == 2

            status, error = error_of(await s.exchange(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"))
            assert status == 503
            assert error["code"] == "server_busy"

            await first.aclose()
            await eventually(lambda: s.server.connection_count == 1)
            await still_serving(s.url)
            await second.aclose()

    run(scenario())


def test_malformed_http_is_400_naming_the_problem(run: Runner) -> None:
    cases = {
        b"GARBAGE\r\n\r\n": 400,
        b"GET / HTTP/1.1\r\n\r\n": 400,  # no Host
        b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n": 400,
        b"GET / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n": 501,
        b"GET / HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n": 400,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n": 400,  # TLS, not HTTP
    }

    async def scenario() -> None:
        async with serving(echo) as s:
            for request, expected in cases.items():
                status, error = error_of(await s.exchange(request))
                assert status == expected, request
                assert error["code"] == "bad_http"
                assert error["message"].startswith("malformed HTTP request: ")
            await still_serving(s.url)

    run(scenario())

"""The HTTP server as handlers and clients see it: JSON round trips, keep-alive, errors,
HEAD, chunked bodies, long polls. Real loopback sockets, on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pydantic
import pytest

from tests.transport.conftest import (
    FAST,
    Parked,
    Runner,
    eventually,
    parse_responses,
    read_all,
    serving,
)
from transport.http import (
    ApiError,
    HttpClient,
    Request,
    Response,
    ServerLimits,
    error_response,
    json_response,
)


class Route(pydantic.BaseModel):
    service: str
    db_user: str


class Spec(pydantic.BaseModel):
    ttl: int
    route: Route


class CertRequest(pydantic.BaseModel):
    public_key: str
    spec: Spec


async def api(request: Request) -> Response:
    """A small API in the shape the control plane's will have."""
    if request.path == "/v1/echo":
        if request.method not in ("GET", "HEAD"):
            return Response(405, [("allow", "GET, HEAD")], b"")
        return json_response({"method": request.method, "query": request.query,
                              "peer_port": request.peer[1] if request.peer else None})
    if request.path == "/v1/certs":
        if request.method != "POST":
            raise ApiError(405, "method_not_allowed", "use POST on /v1/certs")
        body = request.json(CertRequest)
        return json_response(body, status=201)
    if request.path == "/v1/raw":
        parsed = request.json()
        return json_response({"body": request.body.decode(), "json": parsed})
    if request.path == "/v1/crash":
        raise RuntimeError("the handler is broken")
    return error_response(404, "not_found", f"no endpoint {request.path}")


def test_get_and_post_json_round_trip(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s, HttpClient(s.url) as client:
            got = await client.request("GET", "/v1/echo", params={"serial": 7, "x": "a b"})
            assert got.status == 200
            assert got.headers["Content-Type"] == "application/json"
            assert got.json()["query"] == {"serial": ["7"], "x": ["a b"]}

            sent = CertRequest(public_key="PEM", spec=Spec(ttl=60, route=Route(
                service="aurora", db_user="alice")))
            created = await client.request("POST", "/v1/certs", json=sent)
            assert created.status == 201
            assert created.json(CertRequest) == sent

    run(scenario())


def test_keep_alive_serves_two_requests_on_one_connection(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s, HttpClient(s.url) as client:
            first = (await client.request("GET", "/v1/echo")).json()["peer_port"]
            assert s.server.connection_count == 1
            second = (await client.request("GET", "/v1/echo")).json()["peer_port"]
            assert first == second
            assert s.server.connection_count == 1

    run(scenario())


def test_handler_404_and_405_reach_the_client_as_api_errors(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s, HttpClient(s.url) as client:
            missing = await client.request("GET", "/v1/nope")
            assert missing.status == 404
            with pytest.raises(ApiError) as caught:
                missing.raise_for_error()
            assert (caught.value.status, caught.value.code) == (404, "not_found")
            assert "no endpoint /v1/nope" in str(caught.value)

            wrong_method = await client.request("DELETE", "/v1/echo")
            assert wrong_method.status == 405
            assert wrong_method.headers["allow"] == "GET, HEAD"

            raised = await client.request("GET", "/v1/certs")
            assert raised.status == 405
            assert raised.json() == {"error": {"code": "method_not_allowed",
                                               "message": "use POST on /v1/certs"}}

    run(scenario())


def test_malformed_json_is_400_saying_where(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s, HttpClient(s.url) as client:
            bad = await client.request("POST", "/v1/raw", body=b'{"user": "alice",,}')
            assert bad.status == 400
            error = bad.json()["error"]
            assert error["code"] == "malformed_json"
            assert "not valid JSON" in error["message"]
            assert "line 1 column 18" in error["message"]

            empty = await client.request("POST", "/v1/raw")
            assert empty.status == 400
            assert "empty" in empty.json()["error"]["message"]

            not_utf8 = await client.request("POST", "/v1/raw", body=b'"\xff\xfe"')
            assert not_utf8.status == 400
            assert "UTF-8" in not_utf8.json()["error"]["message"]

            deep = await client.request("POST", "/v1/raw", body=b"[" * 100_000)
            assert deep.status == 400

    run(scenario())


def test_validation_error_is_400_naming_field_paths_but_not_values(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s, HttpClient(s.url) as client:
            bad = await client.request("POST", "/v1/certs", json={
                "public_key": "PEM", "spec": {"ttl": "s3cret-value", "route": {"service": "x"}}})
            assert bad.status == 400
            error = bad.json()["error"]
            assert error["code"] == "invalid_request"
            assert "spec.ttl: Input should be a valid integer" in error["message"]
            assert "spec.route.db_user: Field required" in error["message"]
            assert "s3cret-value" not in error["message"]

    run(scenario())


def test_handler_exception_is_500_logged_without_the_body(
        run: Runner, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with serving(api) as s, HttpClient(s.url) as client:
            crashed = await client.request("POST", "/v1/crash?token=tok-123",
                                           json={"password": "hunter2"})
            assert crashed.status == 500
            assert crashed.json()["error"]["code"] == "internal_error"
            assert "broken" not in crashed.body.decode()  # no internals to the client
            after = await client.request("GET", "/v1/echo")
            assert after.status == 200

    with caplog.at_level(logging.ERROR, logger="transport.http"):
        run(scenario())
    assert "RuntimeError: the handler is broken" in caplog.text
    assert "POST /v1/crash" in caplog.text
    assert "hunter2" not in caplog.text
    assert "tok-123" not in caplog.text


def test_a_handler_returning_an_invalid_response_is_500(run: Runner) -> None:
    async def bad(request: Request) -> Response:
        if request.path == "/header":
            return Response(200, [("x-evil", "a\r\nset-cookie: b")], b"")
        if request.path == "/status":
            return Response(101, [], b"")
        return "not a response"  # type: ignore[return-value]

    async def scenario() -> None:
        async with serving(bad) as s, HttpClient(s.url) as client:
            for path in ("/header", "/status", "/type"):
                got = await client.request("GET", path)
                assert got.status == 500, path
                assert "set-cookie" not in got.headers

    run(scenario())


def test_head_sends_headers_only_and_the_connection_stays_usable(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s:
            data = await s.exchange(
                b"HEAD /v1/echo HTTP/1.1\r\nhost: x\r\n\r\n"
                b"GET /v1/echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            (head, head_body), (get, get_body) = parse_responses(data, [b"HEAD", b"GET"])
            assert head.status_code == get.status_code == 200
            assert head_body == b""
            assert b'"method":"GET"' in get_body
            length = dict(head.headers)[b"content-length"]
            assert int(length) == len(get_body.replace(b'"GET"', b'"HEAD"'))

    run(scenario())


def test_connection_close_is_honoured(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s:
            # Returns only because the server closes.
            data = await s.exchange(
                b"GET /v1/echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            [(head, _)] = parse_responses(data)
            assert (b"connection", b"close") in head.headers

    run(scenario())


def test_chunked_request_body_is_joined_for_the_handler(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s:
            [(head, body)] = parse_responses(await s.exchange(
                b"POST /v1/raw HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
                b"connection: close\r\n\r\n"
                b"5\r\n{\"a\":\r\n3\r\n 1}\r\n0\r\n\r\n"))
            assert head.status_code == 200
            assert body == b'{"body":"{\\"a\\": 1}","json":{"a":1}}'

    run(scenario())


def test_expect_100_continue_gets_an_interim_answer(run: Runner) -> None:
    async def scenario() -> None:
        async with serving(api) as s:
            reader, writer = await asyncio.open_connection(s.host, s.port)
            writer.write(b"POST /v1/raw HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                         b"expect: 100-continue\r\nconnection: close\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert interim.startswith(b"HTTP/1.1 100 ")
            writer.write(b"{}")
            rest = await read_all(reader)
            writer.close()
            assert rest.startswith(b"HTTP/1.1 200 ")

    run(scenario())


def test_pipelined_requests_are_answered_in_order(run: Runner) -> None:
    async def slow_first(request: Request) -> Response:
        if request.path == "/slow":
            await asyncio.sleep(0.1)
        return json_response({"path": request.path})

    async def scenario() -> None:
        async with serving(slow_first) as s:
            answers = parse_responses(await s.exchange(
                b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n"
                b"GET /fast HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
                [b"GET", b"GET"])
            assert [body for _, body in answers] == [b'{"path":"/slow"}', b'{"path":"/fast"}']

    run(scenario())


def test_a_long_poll_does_not_block_other_connections(run: Runner) -> None:
    async def scenario() -> None:
        published = asyncio.Event()

        async def handler(request: Request) -> Response:
            if request.path == "/wait":
                await published.wait()
            return json_response({"path": request.path})

        async with serving(handler) as s, HttpClient(s.url) as poller, \
                HttpClient(s.url) as other:
            poll = asyncio.create_task(poller.request("GET", "/wait"))
            await asyncio.sleep(0.05)
            for _ in range(3):
                assert (await other.request("GET", "/fast")).status == 200
            assert not poll.done()
            published.set()
            assert (await poll).json() == {"path": "/wait"}

    run(scenario())


def test_a_client_that_disconnects_cancels_its_long_poll(run: Runner) -> None:
    async def scenario() -> None:
        parked = Parked()
        async with serving(parked) as s:
            _, writer = await asyncio.open_connection(s.host, s.port)
            writer.write(b"GET /v1/bundle?serial=3 HTTP/1.1\r\nhost: x\r\n\r\n")
            await asyncio.wait_for(parked.entered.wait(), 2)
            writer.close()
            await asyncio.wait_for(parked.cancelled.wait(), 2)
            await eventually(lambda: s.server.connection_count == 0)

    run(scenario())


def test_long_poll_with_etag(run: Runner) -> None:
    """The bundle endpoint's pattern: 304 while nothing newer appears, 200 when it does."""

    async def scenario() -> None:
        state = {"serial": 3}
        changed = asyncio.Condition()

        async def bundle(request: Request) -> Response:
            async def current() -> Response:
                etag = f'"{state["serial"]}"'
                if request.etag_matches(etag):
                    return Response(304, [("etag", etag)])
                return json_response({"serial": state["serial"]}, headers={"etag": etag})

            if request.etag_matches(f'"{state["serial"]}"'):
                async with changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), float(request.arg("wait", "0")))
            return await current()

        async with serving(bundle) as s, HttpClient(s.url) as client:
            first = await client.request("GET", "/v1/bundle")
            assert first.json() == {"serial": 3}
            etag = first.headers["etag"]

            unchanged = await client.request("GET", "/v1/bundle", params={"wait": "0.05"},
                                             headers={"if-none-match": etag})
            assert unchanged.status == 304
            assert unchanged.body == b""

            poll = asyncio.create_task(client.request(
                "GET", "/v1/bundle", params={"wait": "5"}, headers={"if-none-match": etag}))
            await asyncio.sleep(0.05)
            async with changed:
                state["serial"] = 4
                changed.notify_all()
            newer = await poll
            assert newer.status == 200
            assert newer.json() == {"serial": 4}
            assert newer.headers["etag"] == '"4"'

    run(scenario())


def test_closing_the_server_cancels_running_handlers(run: Runner) -> None:
    async def scenario() -> None:
        parked = Parked()
        async with serving(parked) as s:
            reader, writer = await asyncio.open_connection(s.host, s.port)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await asyncio.wait_for(parked.entered.wait(), 2)
            await s.server.close()
            assert parked.cancelled.is_set()
            assert await read_all(reader) == b""
            writer.close()

    run(scenario())


def test_bad_targets_and_repeated_query_parameters_are_400(run: Runner) -> None:
    async def handler(request: Request) -> Response:
        return json_response({"serial": request.arg("serial")})

    async def scenario() -> None:
        async with serving(handler) as s, HttpClient(s.url) as client:
            ok = await client.request("GET", "/b?serial=4")
            assert ok.json() == {"serial": "4"}
            twice = await client.request("GET", "/b?serial=4&serial=5")
            assert twice.status == 400
            assert "'serial' is given 2 times" in twice.json()["error"]["message"]
            bad_escape = await client.request("GET", "/b%ff")
            assert bad_escape.status == 400
            assert "not UTF-8" in bad_escape.json()["error"]["message"]
            many = await client.request("GET", "/b?" + "&".join(f"k{i}=1" for i in range(65)))
            assert many.status == 400

    run(scenario())


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_body_bytes must be positive"):
        ServerLimits(max_body_bytes=0)
    assert FAST.header_timeout == 0.5

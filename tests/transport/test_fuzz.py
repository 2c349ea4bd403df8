"""Hostile bytes on both sides. Whatever a client sends, the server answers with a
well-formed HTTP response or closes, logs no defect, and keeps serving; whatever a server
answers, the client returns a response or raises an HttpError, nothing else."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.transport.conftest import ErrorLog, server_thread
from transport.http import (
    ClientResponse,
    HttpError,
    Request,
    Response,
    json_response,
    request_sync,
)

VALID = [
    b"GET /v1/ping?x=1 HTTP/1.1\r\nhost: a\r\n\r\n",
    b"POST /v1/login HTTP/1.1\r\nhost: a\r\ncontent-length: 13\r\n\r\n{\"user\":\"al\"}",
    b"POST /v1/join HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"HEAD / HTTP/1.0\r\n\r\n",
]


@st.composite
def hostile_requests(draw: st.DrawFn) -> bytes:
    base = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(base)))
        action = draw(st.sampled_from(["insert", "delete", "flip"]))
        if action == "insert":
            base[at:at] = draw(st.binary(min_size=1, max_size=40))
        elif action == "delete" and base:
            del base[at:at + draw(st.integers(1, 20))]
        elif base:
            i = min(at, len(base) - 1)
            base[i] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        base *= draw(st.integers(1, 3))  # pipelining
    return bytes(base)


async def handler(request: Request) -> Response:
    data = request.json() if request.method == "POST" else None
    return json_response({"path": request.path, "json": data})


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def test_the_server_survives_hostile_requests(http_errors: ErrorLog) -> None:
    with server_thread(handler) as s:

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(st.one_of(hostile_requests(), st.binary(max_size=300)))
        def probe(data: bytes) -> None:
            reply = _exchange(s.port, data)
            if reply:
                assert reply.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), reply[:40]
                status = int(reply[9:12])
                assert status in (200, 400, 404, 408, 413, 431, 501), reply[:200]
                assert b"HTTP/1.1 500" not in reply

        probe()
        assert _exchange(s.port, VALID[0]).startswith(b"HTTP/1.1 200 ")
    assert http_errors.records == []


@contextlib.contextmanager
def _replying(reply: bytes) -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(2)
                conn.recv(65536)
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(3)


RESPONSES = [
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda base, cut, junk: base[:cut] + junk + base[cut:],
              st.sampled_from(RESPONSES), st.integers(0, 60), st.binary(max_size=20)),
))
def test_the_client_survives_hostile_responses(reply: bytes) -> None:
    with _replying(reply) as port:
        try:
            response = request_sync(f"http://127.0.0.1:{port}", "GET", "/v1/ping", timeout=1)
        except HttpError as exc:
            assert f"127.0.0.1:{port}" in str(exc)
        else:
            assert isinstance(response, ClientResponse)
            assert 100 <= response.status <= 999

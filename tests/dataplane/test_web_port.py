"""One web port for two protocols: HTTPS goes to the API (in-process, or relayed as raw TCP
to the control plane) with every byte intact, PostgreSQL to the database path."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from launcher.embedded_postgres import free_tcp_port
from tests.dataplane.conftest import DataPath, Pg
from tests.dataplane.support import LoopThread, Pki
from tests.fixtures.pg import run_psql
from transport.http import HttpError, HttpServer, Request, Response, json_response, request_sync
from transport.tls import client_context, server_context

pytestmark = pytest.mark.slow


async def api(request: Request) -> Response:
    return json_response({"path": request.path, "served_by": "api", "bytes": len(request.body)})


@pytest.fixture
def control_plane(pki: Pki) -> Iterator[tuple[int, HttpServer, LoopThread]]:
    """A real HTTPS API server (host certificate) on its own loop."""
    thread = LoopThread("control-plane")
    creds = pki.host("auth-1", "proxy")
    server = HttpServer(api)
    ctx = server_context(creds.cert_pem, creds.key_pem)
    _, port = thread.run(server.listen("127.0.0.1", 0, ssl=ctx))
    try:
        yield port, server, thread
    finally:
        thread.run(server.close())
        thread.stop()


def https(dp: DataPath, port: int) -> dict[str, object]:
    ctx = client_context([dp.pki.cas.host.certificate_pem()])
    result: dict[str, object] = {}

    def call() -> None:  # request_sync runs its own event loop: not on this thread's
        try:
            response = request_sync(f"https://localhost:{port}", "POST", "/v1/ping",
                                    body=b"x" * 100_000, ssl_context=ctx)
        except HttpError as exc:
            result["error"] = str(exc)
            return
        result.update(response.json())

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(30)
    return result


@pytest.fixture
def dp(pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey) -> Iterator[DataPath]:
    out = DataPath(pki, pg, signing_key)
    out.bundle_bytes = out.next_bundle()
    try:
        yield out
    finally:
        out.close()


def test_https_is_relayed_to_the_control_plane_untouched(
    dp: DataPath, control_plane: tuple[int, HttpServer, LoopThread]
) -> None:
    port, _, _ = control_plane
    dp.start_proxy("proxy-web", api_upstream=("127.0.0.1", port))
    dp.start_agent("agent-web")
    # TLS end to end between the client and the API: the proxy sees only bytes.
    assert https(dp, dp.web_port) == {"path": "/v1/ping", "served_by": "api", "bytes": 100_000}
    done = run_psql(dp.dsn(dp.cert("alice"), "alice", "main"), "select 'same port'")
    assert done.stdout.strip() == "same port", done.stderr


def test_https_is_handed_to_an_in_process_api(dp: DataPath, pki: Pki) -> None:
    creds = pki.host("proxy-inproc", "proxy")
    server = HttpServer(api)
    ctx = server_context(creds.cert_pem, creds.key_pem)

    async def hand_over(sock: object, peer: str) -> None:
        await server.accept_socket(sock, ssl=ctx)  # type: ignore[arg-type]

    dp.start_proxy("proxy-inproc", api=hand_over)
    try:
        assert https(dp, dp.web_port)["served_by"] == "api"
    finally:
        dp.proxy.thread.run(server.close())  # type: ignore[union-attr]


def test_the_api_being_down_does_not_hurt_postgres(dp: DataPath) -> None:
    dp.start_proxy("proxy-noapi", api_upstream=("127.0.0.1", free_tcp_port()))
    dp.start_agent("agent-noapi")
    # The proxy answers itself, with its host certificate (verified here against the host
    # CA), saying what is wrong; PostgreSQL on the same port is not affected.
    error = https(dp, dp.web_port)["error"]
    assert isinstance(error, dict) and error["code"] == "control_plane_unreachable", error
    assert "cannot be reached from the proxy (Connection refused)" in error["message"]
    done = run_psql(dp.dsn(dp.cert("alice"), "alice", "main"), "select 1")
    assert done.stdout.strip() == "1", done.stderr

"""TLS between hosts checks the identity in the peer's certificate, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Coroutine
from typing import Any

import pytest
import uvloop

from control.ca import CertificateAuthority, ClusterCAs
from dataplane.cluster.identity import HostCredentials
from tests.cluster.pki import credentials


def new_cas() -> ClusterCAs:
    return ClusterCAs(*(CertificateAuthority.generate(k, "root") for k in ("user", "host", "db")))


@pytest.fixture(scope="module")
def cas() -> ClusterCAs:
    return new_cas()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest):
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(10):
                return await coro

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


async def exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                   served: list[bool] | None = None) -> bytes:
    """Connect client to server over loopback TLS; the server answers b"hello" (and notes in
    `served` that a handshake it accepted reached it)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if served is not None:
            served.append(True)
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        data = await reader.read()
        writer.close()
        return data
    finally:
        server.close()


def test_an_agent_talks_to_the_api_only_if_the_peer_is_the_auth_host(
    cas: ClusterCAs, run: Any
) -> None:
    agent = credentials(cas, "db", "agent-1")
    auth = credentials(cas, "auth", "auth-1")
    assert run(exchange(auth.server_context("optional"), agent.api_context())) == b"hello"

    impostor = credentials(cas, "db", "agent-2")  # same host CA, but a db agent
    with pytest.raises(ssl.SSLCertVerificationError, match=r"is a db host \(agent-2\), not auth"):
        run(exchange(impostor.server_context("optional"), agent.api_context()))


def test_a_server_from_another_cluster_ca_is_refused_by_openssl(
    cas: ClusterCAs, run: Any
) -> None:
    other = new_cas()
    agent = credentials(cas, "db", "agent-1")
    stranger = credentials(other, "auth", "auth-x")
    with pytest.raises(ssl.SSLCertVerificationError):
        run(exchange(stranger.server_context("optional"), agent.api_context()))


def test_a_server_requiring_proxy_peers_refuses_a_db_agent(cas: ClusterCAs, run: Any) -> None:
    proxy = credentials(cas, "proxy", "proxy-1")
    agent = credentials(cas, "db", "agent-1")
    other_proxy = credentials(cas, "proxy", "proxy-2")
    server_ctx = proxy.server_context("required", "host", peer_roles=("db",))
    client_ctx = agent.client_context("host", check_hostname=True, peer_roles=("proxy",))
    assert run(exchange(server_ctx, client_ctx)) == b"hello"

    wrong_client = other_proxy.client_context("host", peer_roles=("proxy",))
    served: list[bool] = []
    try:
        # TLS 1.3: the client finishes its side first and learns of the refusal on reading
        data = run(exchange(server_ctx, wrong_client, served))
    except (ssl.SSLError, ConnectionError):
        data = b""
    assert data == b""
    assert served == [], "a proxy was served by a server that accepts only db agents"


def test_peer_roles_need_the_host_ca(cas: ClusterCAs) -> None:
    agent: HostCredentials = credentials(cas, "db", "agent-1")
    with pytest.raises(ValueError, match="peer_roles needs"):
        agent.server_context("required", "user", peer_roles=("proxy",))
    with pytest.raises(ValueError, match="peer_roles needs"):
        agent.client_context("db", peer_roles=("proxy",))
    assert "key_pem" not in repr(agent)

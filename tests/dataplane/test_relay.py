"""The relay on real loopback TCP connections (uvloop): bulk copy both ways, scanners beside
it, backpressure, termination at a message boundary, closing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop

from dataplane.postgres import (
    BACKEND,
    MessageDecoder,
    MessageScanner,
    ScannedMessage,
    encode,
    fatal,
)
from dataplane.postgres import messages as m
from dataplane.relay import ConnectionClosed, Inbox, Relay


def run(coro: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(coro(), 30))


async def tcp_pair() -> tuple[asyncio.Transport, Inbox, socket.socket]:
    """A transport on the loop and the raw socket of its peer (blocking-free, on the loop)."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    inbox = Inbox()
    transport, _ = await loop.connect_accepted_socket(lambda: inbox, ours)
    return transport, inbox, theirs


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < size:
        chunk = await loop.sock_recv(sock, size - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


async def recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 65536):
        out += chunk
    return bytes(out)


@asynccontextmanager
async def relay(**options: Any) -> AsyncIterator[tuple[Relay, socket.socket, socket.socket]]:
    """(relay, the client's socket, the server's socket)."""
    client_t, client_in, client_sock = await tcp_pair()
    server_t, server_in, server_sock = await tcp_pair()
    r = Relay(client_t, server_t, **options)
    r.start(client_in.take(), server_in.take())
    try:
        yield r, client_sock, server_sock
    finally:
        client_sock.close()
        server_sock.close()
        r.close("test over")


def test_bytes_flow_both_ways_unchanged_and_are_counted() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        closed: list[str] = []
        async with relay(on_closed=closed.append) as (r, client, server):
            payload = bytes(range(256)) * 4096  # 1 MiB
            _, got = await asyncio.gather(
                loop.sock_sendall(client, payload), recv_exactly(server, len(payload))
            )
            assert got == payload
            await loop.sock_sendall(server, b"answer" * 1000)
            assert await recv_exactly(client, 6000) == b"answer" * 1000
            assert (r.bytes_from_client, r.bytes_from_server) == (len(payload), 6000)
            client.close()  # the client leaves: the server side is closed too
            assert await recv_all(server) == b""
            for _ in range(100):
                if closed:
                    break
                await asyncio.sleep(0.01)
            assert closed == ["client disconnected"]

    run(main)


def test_scanners_see_the_messages_beside_the_copy() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: list[ScannedMessage] = []
        async with relay(
            server_scanner=MessageScanner(b"CZ", side="server"),
            on_server_messages=seen.extend,
        ) as (_, client, server):
            stream = b"".join(
                encode(x)
                for x in [m.DataRow((b"x" * 70000,)), m.CommandComplete("SELECT 1"),
                          m.ReadyForQuery("I")]
            )

            async def send() -> None:
                for i in range(0, len(stream), 777):  # arbitrary chunking
                    await loop.sock_sendall(server, stream[i : i + 777])

            _, got = await asyncio.gather(send(), recv_exactly(client, len(stream)))
            assert got == stream
            assert [(s.type_code, s.payload) for s in seen] == [
                (b"C", b"SELECT 1\0"), (b"Z", b"I")
            ]

    run(main)


def test_the_servers_messages_are_observed_before_the_client_can_read_them() -> None:
    """The audit records an answer (its journal written) before the client has it: a
    process killed in between loses no event of an answer the client saw."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        readable_then: list[bool] = []
        async with relay(
            server_scanner=MessageScanner(b"CZ", side="server"),
        ) as (r, client, server):

            def observe(messages: list[ScannedMessage]) -> None:
                try:
                    readable_then.append(bool(client.recv(1, socket.MSG_PEEK)))
                except BlockingIOError:
                    readable_then.append(False)

            r._on_server_messages = observe
            answer = encode(m.CommandComplete("SELECT 1")) + encode(m.ReadyForQuery("I"))
            await loop.sock_sendall(server, answer)
            assert await recv_exactly(client, len(answer)) == answer
            assert readable_then == [False]

    run(main)


def test_a_stream_the_scanner_cannot_follow_ends_the_session() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with relay(
            client_scanner=MessageScanner(b"Q", max_message_size=1000, side="client"),
        ) as (r, client, server):
            await loop.sock_sendall(client, b"Q" + (5000).to_bytes(4, "big"))
            assert await recv_all(server) == b"Q" + (5000).to_bytes(4, "big")
            assert "the client broke the PostgreSQL protocol" in r.close_reason

    run(main)


def test_a_destination_that_does_not_read_pauses_the_source() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with relay() as (r, client, server):
            for s in (client, server):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            chunk = b"z" * 65536
            sent = 0

            async def flood() -> None:
                nonlocal sent
                while True:
                    await loop.sock_sendall(server, chunk)
                    sent += len(chunk)

            task = loop.create_task(flood())
            await asyncio.sleep(1.0)  # the client reads nothing
            worst = max(r.buffered())
            assert worst <= 2 * 65536 + 65536, worst  # high-water mark plus one chunk
            before = sent
            await asyncio.sleep(0.5)
            assert sent == before  # the server is blocked: the relay stopped reading it
            got = await recv_exactly(client, 1024 * 1024)  # reading resumes the flow
            assert got == b"z" * len(got)
            task.cancel()

    run(main)


def test_terminate_waits_for_the_end_of_the_message_in_flight() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with relay(
            client_scanner=MessageScanner(b"", side="client"),
            server_scanner=MessageScanner(b"", side="server"),
        ) as (r, client, server):
            row = encode(m.DataRow((b"y" * 100_000,)))
            await loop.sock_sendall(server, row[:50_000])  # half a message
            await asyncio.sleep(0.1)
            error = fatal("28000", "access was revoked")
            r.terminate(encode(error), "revoked")
            _, received = await asyncio.gather(
                loop.sock_sendall(server, row[50_000:] + encode(m.CommandComplete("SELECT 1"))),
                recv_all(client),
            )
            decoder = MessageDecoder(BACKEND)
            decoder.receive_data(received)
            decoder.receive_eof()
            messages = []
            while (message := decoder.next_message()) is not None:
                messages.append(message)
            # the row completes, then the error; nothing after it (the CommandComplete is cut)
            assert messages == [m.DataRow((b"y" * 100_000,)), error]
            terminate = await recv_all(server)
            assert terminate == encode(m.Terminate())  # the server is told goodbye
            assert r.close_reason == "revoked"

    run(main)


def test_terminate_at_a_boundary_is_immediate() -> None:
    async def main() -> None:
        async with relay(server_scanner=MessageScanner(b"")) as (r, client, _):
            r.terminate(encode(fatal("57P01", "the db agent is shutting down")), "shutdown")
            received = await recv_all(client)
            assert received == encode(fatal("57P01", "the db agent is shutting down"))

    run(main)


def test_inbox_hands_over_what_it_read_and_reports_a_closed_peer() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, inbox, peer = await tcp_pair()
        await loop.sock_sendall(peer, b"hello")
        assert await inbox.receive() == b"hello"
        await loop.sock_sendall(peer, b"rest")
        await asyncio.sleep(0.05)
        assert inbox.take() == b"rest"
        peer.close()
        with pytest.raises(ConnectionClosed):
            await inbox.receive()
        transport.close()

    run(main)


def test_inbox_stops_reading_past_its_limit() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        inbox = Inbox(limit=1000)
        transport, _ = await loop.connect_accepted_socket(lambda: inbox, ours)
        sending = loop.create_task(loop.sock_sendall(theirs, b"a" * 20_000_000))
        await asyncio.sleep(0.3)
        assert not transport.is_reading()
        data = inbox.take()
        assert 1000 < len(data) <= 1000 + 256 * 1024  # the limit plus one read
        assert transport.is_reading()
        assert not sending.done()  # the sender is held back by the kernel's buffers
        sending.cancel()
        transport.close()
        theirs.close()

    run(main)


def test_keep_server_takes_the_server_connection_at_the_clients_terminate() -> None:
    """The Terminate is not forwarded; the client side closes; the server connection lives
    on under the protocol its new owner installed."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        closed: list[str] = []
        owner = Inbox()
        seen: list[bytes] = []

        def keep() -> bool:
            owner.transport = r.server
            r.server.set_protocol(owner)
            return True

        async with relay(
            client_scanner=MessageScanner(report=b"QX"),
            on_client_messages=lambda ms: seen.extend(x.type_code for x in ms),
            on_closed=closed.append,
            keep_server=keep,
        ) as (r, client, server):
            query = encode(m.Query("select 1"))
            await loop.sock_sendall(client, query)
            assert await recv_exactly(server, len(query)) == query
            await loop.sock_sendall(client, encode(m.Terminate()))
            assert await recv_all(client) == b""  # the client side is closed
            assert closed == ["client disconnected"]
            assert seen == [b"Q", b"X"]
            with pytest.raises(BlockingIOError):
                server.recv(1)  # the Terminate was not forwarded
            await loop.sock_sendall(server, b"still ours")
            assert await owner.receive() == b"still ours"
            owner.write(b"reset")
            assert await recv_exactly(server, 5) == b"reset"
            r.server.close()
            assert await recv_all(server) == b""

    run(main)


def test_keep_server_refusing_forwards_the_terminate() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with relay(keep_server=lambda: False) as (_r, client, server):
            await loop.sock_sendall(client, encode(m.Terminate()))
            assert await recv_exactly(server, 5) == encode(m.Terminate())
            client.close()
            assert await recv_all(server) == b""

    run(main)

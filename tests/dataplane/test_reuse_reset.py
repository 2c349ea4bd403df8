"""ServerReuse's reset of a given-back server connection, against a scripted server on a
real socket pair: what it sends, and when it keeps or closes the connection; and which
clients' connections it takes at all (those that reconnect)."""

from __future__ import annotations

import asyncio
import socket

from dataplane.agent.reuse import ReuseKey, ServerReuse, reuse_key
from dataplane.postgres import FRONTEND, MessageDecoder, encode
from dataplane.postgres import messages as m
from schemas.bundle import BundleDatabase

KEY = reuse_key(BundleDatabase(name="pg", uri="localhost:5432"), "alice", "alice", "main", {})


async def _connected() -> tuple[asyncio.Transport, socket.socket]:
    """Our end as an asyncio transport; the scripted server's end as a plain socket."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await asyncio.get_running_loop().create_connection(
        asyncio.Protocol, sock=ours
    )
    return transport, theirs


async def _given_back(reuse: ServerReuse) -> tuple[asyncio.Transport, socket.socket]:
    transport, theirs = await _connected()
    loop = asyncio.get_running_loop()
    assert reuse.give_back(KEY, transport, m.BackendKeyData(1, 2), [], loop.time(),
                           reuse.generation)
    return transport, theirs


async def _query_received(server: socket.socket) -> m.Query:
    decoder = MessageDecoder(FRONTEND)
    loop = asyncio.get_running_loop()
    while (message := decoder.next_message()) is None:
        decoder.receive_data(await loop.sock_recv(server, 4096))
    assert isinstance(message, m.Query)
    return message


async def _reset_answered(close_all_first: bool) -> tuple[int, bytes]:
    reuse = ServerReuse(10.0, keep_after=1)
    transport, server = await _given_back(reuse)
    query = await _query_received(server)
    assert query.query == "DISCARD ALL"
    if close_all_first:
        reuse.close_all()  # a session sent DROP DATABASE while this reset ran
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(
        server, encode(m.CommandComplete("DISCARD ALL")) + encode(m.ReadyForQuery("I"))
    )
    while reuse.resetting:  # the reset task reads the answer, then keeps or closes
        await asyncio.sleep(0.01)
    kept = len(reuse)
    server.settimeout(0)
    try:
        after = server.recv(4096)
    except BlockingIOError:
        after = b"(nothing)"
    await reuse.shutdown()
    transport.abort()
    server.close()
    return kept, after


def test_a_reset_connection_is_kept() -> None:
    kept, after = asyncio.run(_reset_answered(close_all_first=False))
    assert (kept, after) == (1, b"(nothing)")


def test_one_given_back_before_close_all_is_closed_after_its_reset() -> None:
    kept, after = asyncio.run(_reset_answered(close_all_first=True))
    assert kept == 0
    assert after == encode(m.Terminate())  # closed the PostgreSQL way


async def _given_back_after_close_all() -> tuple[bool, int]:
    reuse = ServerReuse(10.0, keep_after=1)
    logged_in = reuse.generation
    reuse.close_all()  # while its session ran, another changed a role or a database
    transport, theirs = await _connected()
    taken = reuse.give_back(KEY, transport, None, [], asyncio.get_running_loop().time(),
                            logged_in)
    transport.abort()
    theirs.close()
    return taken, len(reuse)


def test_one_logged_in_before_close_all_is_not_taken() -> None:
    assert asyncio.run(_given_back_after_close_all()) == (False, 0)


async def _taken_after(starts: list[float], idle_timeout: float = 10.0,
                       others: tuple[ReuseKey, ...] = ()) -> list[bool]:
    """Sessions of `others`, then of KEY after each delay in `starts` (seconds), start;
    after each of KEY's, whether its server connection would be taken when it ends."""
    reuse = ServerReuse(idle_timeout)
    for other in others:
        reuse.take(other)
    taken, sockets = [], []
    for delay in starts:
        await asyncio.sleep(delay)
        reuse.take(KEY)
        transport, theirs = await _connected()
        sockets.append((transport, theirs))
        taken.append(reuse.give_back(KEY, transport, None, [],
                                     asyncio.get_running_loop().time(), reuse.generation))
    await reuse.shutdown()  # the resets (not what is tested here) are cancelled
    for transport, theirs in sockets:
        transport.abort()
        theirs.close()
    return taken


def test_only_a_client_that_reconnects_has_its_connection_kept() -> None:
    # the first session of a key ends with its server process; the second, started
    # within idle_timeout of the first, is kept; one whose previous start is older is not
    assert asyncio.run(_taken_after([0, 0, 0])) == [False, True, True]
    assert asyncio.run(_taken_after([0, 0.3], idle_timeout=0.2)) == [False, False]


def test_other_keys_do_not_count_as_reconnects() -> None:
    other = reuse_key(BundleDatabase(name="pg", uri="localhost:5432"), "bob", "alice", "main",
                      {})  # fmt: skip
    assert asyncio.run(_taken_after([0], others=(other,))) == [False]

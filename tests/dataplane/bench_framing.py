"""Micro-benchmark behind the tunnel's design (not a test; nothing is asserted):
`python -m tests.dataplane.bench_framing [--seconds 5] [--clients 8]`.

Compares, in one uvloop process over real TLS on loopback, two ways to carry many sessions
from a proxy to an agent:
- per-session: one TLS connection per session, the relay copies bytes (what we ship);
- mux: all sessions over one TLS connection as framed streams (4-byte stream id + 4-byte
  length per chunk), demultiplexed on the other side. The prototype has no per-stream
  flow control at all, so it is a lower bound of what a real multiplexer costs.
Each client does request/response round trips (100-byte request, `--reply` bytes back)
against an in-process backend, like `pgbench -S`; then again while one more client has
asked for a 64 MB result it never reads (a slow client); then a bulk run streams 64 KiB
chunks. Printed: round trips per second and CPU microseconds per round trip, the others'
round trips beside the slow client, and bulk MB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import ssl
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from dataplane.relay import Inbox, Relay
from tests.dataplane.support import Pki
from transport.tls import client_context, server_context

_HDR = struct.Struct("!II")


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Backend(asyncio.Protocol):
    """Answers each request (bytes ending in a newline) with `reply` bytes; counts bytes."""

    received = 0

    def __init__(self, reply: int) -> None:
        self.answer = b"r" * (reply - 1) + b"\n"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        Backend.received += len(data)
        if data.endswith(b"\n") and self.transport is not None:
            if data.startswith(b"big"):  # a huge result for a client that will not read it
                for _ in range(64):
                    self.transport.write(b"x" * (1 << 20))
            self.transport.write(self.answer)


# -- the mux prototype ---------------------------------------------------------------------


class MuxEnd(asyncio.Protocol):
    """One end of the shared TLS connection: frames out, frames in to the stream's peer.

    Flow control is the simplest that is not unbounded: when the shared connection is
    full, every stream feeding it stops reading; when one stream's destination is full,
    the shared connection stops reading, which stalls every other stream too (head-of-line
    blocking; a real multiplexer needs per-stream windows to avoid it, and costs more)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, asyncio.Transport] = {}
        self.buf = bytearray()

    def pause_writing(self) -> None:
        for stream in self.streams.values():
            stream.pause_reading()

    def resume_writing(self) -> None:
        for stream in self.streams.values():
            stream.resume_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, sid: int, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_HDR.pack(sid, len(data)) + data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= 8:
            sid, size = _HDR.unpack_from(buf, pos)
            end = pos + 8 + size
            if end > n:
                break
            target = self.streams.get(sid)
            if target is not None:
                target.write(bytes(buf[pos + 8 : end]))
            pos = end
        if pos:
            del buf[:pos]


class StreamEnd(asyncio.Protocol):
    def __init__(self, mux: MuxEnd, sid: int) -> None:
        self.mux = mux
        self.sid = sid

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.mux.streams[self.sid] = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.mux.send(self.sid, data)

    def pause_writing(self) -> None:
        if self.mux.transport is not None:
            self.mux.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.mux.transport is not None:
            self.mux.transport.resume_reading()


# -- the two topologies ----------------------------------------------------------------------


class Handoff(Inbox):
    """Accepts a connection and runs `handler(transport, inbox)` for it (no streams)."""

    def __init__(self, handler: Callable[[asyncio.Transport, Inbox], Awaitable[None]]) -> None:
        super().__init__()
        self._handler = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.get_running_loop().create_task(self._handler(transport, self))  # type: ignore[arg-type]
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)


_tasks: set[asyncio.Task[None]] = set()


async def per_session(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                      backend_port: int) -> int:
    """Entry port: each client connection gets its own TLS connection to the 'agent'."""
    loop = asyncio.get_running_loop()

    async def agent_side(tunnel: asyncio.Transport, inbox: Inbox) -> None:
        up_inbox = Inbox()
        up, _ = await loop.create_connection(lambda: up_inbox, "127.0.0.1", backend_port)
        Relay(tunnel, up).start(inbox.take(), up_inbox.take())

    agent = await loop.create_server(lambda: Handoff(agent_side), "127.0.0.1", 0,
                                     ssl=server_ctx)
    agent_port = agent.sockets[0].getsockname()[1]

    async def proxy_side(client: asyncio.Transport, inbox: Inbox) -> None:
        down_inbox = Inbox()
        down, _ = await loop.create_connection(
            lambda: down_inbox, "127.0.0.1", agent_port, ssl=client_ctx,
            server_hostname="localhost",
        )
        Relay(client, down).start(inbox.take(), down_inbox.take())

    proxy = await loop.create_server(lambda: Handoff(proxy_side), "127.0.0.1", 0)
    _servers.extend((agent, proxy))
    return int(proxy.sockets[0].getsockname()[1])


_servers: list[asyncio.AbstractServer] = []


async def mux(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, backend_port: int) -> int:
    """Entry port: every client connection is a stream of one shared TLS connection."""
    loop = asyncio.get_running_loop()
    agent_mux = MuxEnd()
    agent = await loop.create_server(lambda: agent_mux, "127.0.0.1", 0, ssl=server_ctx)
    agent_port = agent.sockets[0].getsockname()[1]
    proxy_mux = MuxEnd()
    await loop.create_connection(lambda: proxy_mux, "127.0.0.1", agent_port, ssl=client_ctx,
                                 server_hostname="localhost")
    next_sid = [0]

    async def proxy_side(client: asyncio.Transport, inbox: Inbox) -> None:
        next_sid[0] += 1
        sid = next_sid[0]
        # Both ends live in this process, so the agent's side of the stream is opened here,
        # before its first frame (a real mux would send an "open stream" frame).
        await loop.create_connection(lambda: StreamEnd(agent_mux, sid), "127.0.0.1",
                                     backend_port)
        client.set_protocol(StreamEnd(proxy_mux, sid))
        proxy_mux.streams[sid] = client
        client.write(b"ready\n")

    proxy = await loop.create_server(lambda: Handoff(proxy_side), "127.0.0.1", 0)
    _servers.extend((agent, proxy))
    return int(proxy.sockets[0].getsockname()[1])


async def round_trips(port: int, clients: int, seconds: float, handshake: bool) -> int:
    done = 0
    stop = time.monotonic() + seconds

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if handshake:
            await asyncio.wait_for(reader.readline(), seconds + 1)
        request = b"q" * 99 + b"\n"
        while (left := stop - time.monotonic()) > 0:
            writer.write(request)
            try:
                await asyncio.wait_for(reader.readline(), left + 0.5)
            except TimeoutError:
                break  # stalled behind someone else's data (head-of-line blocking)
            done += 1
        writer.transport.abort()

    await asyncio.gather(*(one() for _ in range(clients)))
    return done


async def bulk(port: int, seconds: float, handshake: bool) -> float:
    """MB/s forwarded from one client to the backend, 64 KiB writes with drain."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if handshake:
        await reader.readline()
    chunk = b"b" * 65536
    start = Backend.received
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        writer.write(chunk)
        await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    return (Backend.received - start) / seconds / 1e6


async def main(args: argparse.Namespace) -> None:
    pki = Pki(Path(tempfile.mkdtemp(prefix="h8-framing-")))
    creds = pki.host("bench", "proxy")
    server_ctx = server_context(creds.cert_pem, creds.key_pem)
    client_ctx = client_context(list(creds.host_cas))
    loop = asyncio.get_running_loop()
    backend = await loop.create_server(lambda: Backend(args.reply), "127.0.0.1", 0)
    backend_port = backend.sockets[0].getsockname()[1]
    ports = {
        "per-session": (await per_session(server_ctx, client_ctx, backend_port), False),
        "mux (framed)": (await mux(server_ctx, client_ctx, backend_port), True),
    }
    print(f"{args.clients} clients, {args.seconds:g} s each, 100-byte requests, "
          f"{args.reply}-byte replies (client and backend run in this process too)")
    for name, (port, handshake) in ports.items():
        before = cpu()
        count = await round_trips(port, args.clients, args.seconds, handshake)
        spent = cpu() - before
        print(f"  {name:<14} {count / args.seconds:9.0f} round trips/s "
              f"{spent / count * 1e6:7.1f} us CPU each", flush=True)
    print("with one more client that asked for a 64 MB result and reads none of it:")
    for name, (port, handshake) in ports.items():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if handshake:
            await reader.readline()
        writer.write(b"big\n")
        await asyncio.sleep(0.5)
        count = await round_trips(port, args.clients, args.seconds, handshake)
        print(f"  {name:<14} {count / args.seconds:9.0f} round trips/s for the others",
              flush=True)
        writer.transport.abort()
        await asyncio.sleep(0.5)
    for name, (port, handshake) in ports.items():
        before = cpu()
        rate = await bulk(port, args.seconds, handshake)
        spent = cpu() - before
        print(f"  {name:<14} bulk {rate:7.1f} MB/s, {spent / (rate * args.seconds):6.3f} "
              "CPU s per MB", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--reply", type=int, default=400)
    uvloop.run(main(parser.parse_args()))

"""Accepting raw sockets on the event loop, for listeners that decide what a connection is
before any transport owns it (the proxy's web port peeks at the first bytes; the tunnel
picks the TLS context in force for each connection).

`Acceptor(sock, on_socket)` watches a listening socket with `loop.add_reader` and hands
every accepted socket (non-blocking, TCP_NODELAY) to `on_socket(sock, address)`, which
owns it from then on. `bind_listener(host, port)` makes the listening socket.

Never: block the loop (accept is non-blocking, at most `BATCH` per wake-up), or let an
accept error (EMFILE, ECONNABORTED) stop the listener for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable

logger = logging.getLogger(__name__)

BATCH = 64
_RETRY_AFTER_EMFILE = 0.5


def bind_listener(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking listening TCP socket on host:port (port 0 picks a free one)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"cannot listen on {address_text((host, port))}: {exc.strerror or exc}"
        ) from None
    return sock


def address_text(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


class Acceptor:
    """Accepts connections on `sock` and passes each to `on_socket`."""

    def __init__(
        self,
        sock: socket.socket,
        on_socket: Callable[[socket.socket, str], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.sock = sock
        self._on_socket = on_socket
        self._loop = loop or asyncio.get_running_loop()
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def address(self) -> tuple[str, int]:
        name = self.sock.getsockname()
        return name[0], name[1]

    def _accept(self) -> None:
        for _ in range(BATCH):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment instead of spinning.
                    logger.error("cannot accept connections (%s); retrying shortly", exc)
                    self._loop.remove_reader(self.sock.fileno())
                    self._retry = self._loop.call_later(_RETRY_AFTER_EMFILE, self._resume)
                    return
                continue  # ECONNABORTED and friends: that one connection is gone
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._on_socket(conn, address_text(address))
            except Exception:
                logger.exception("handling a new connection failed")
                conn.close()

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

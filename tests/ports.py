"""Free loopback ports for tests that start real services on fixed port blocks."""

from __future__ import annotations

import socket


def free_port_block(size: int) -> int:
    """A base port with `size` free loopback ports from it (a demo or a docs page uses
    several consecutive ones)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + size > 65535:
            continue
        try:
            for port in range(base, base + size):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of free ports")

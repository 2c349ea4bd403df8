"""The cancel keys the proxy hands out: BackendKeyData that maps back to a session.

The client sees the real server's process id (what `pg_backend_pid()` returns, so tools
that cancel with `pg_cancel_backend(pid)` or match NOTIFY senders work as they do directly)
and a secret the proxy drew (`secrets`), never the server's own. The proxy issues the
secret before the session is placed, unique among its live sessions, and remembers where
the session runs (an agent's host id, or the local agent) until it ends; the agent that
serves it writes the BackendKeyData with the server's process id and that secret.

A CancelRequest is routed by its secret to that agent, which cancels only when the process
id matches too (so a key is as hard to guess as PostgreSQL's own: a 32-bit secret with the
process id); anything else finds nothing, and the client is told nothing.

A key this proxy did not issue may be another proxy's: behind a load balancer, the new
connection a client sends its CancelRequest on can land on any proxy of the cluster. Every
agent is connected to every proxy, so the request is passed to all of them, and the one
holding the session cancels. Since anyone may send CancelRequests, `FanOutLimit` bounds how
often that happens: per client address, and in all.

Never log a secret; never reuse a secret that is still in use.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from dataplane.tunnel.frames import BackendKey
from transport.ratelimit import TokenBuckets

LOCAL = ""  # the host id recorded for sessions of the in-process agent


@dataclass
class CancelTarget:
    session_id: str
    host_id: str | None = None  # the agent serving it; LOCAL for the in-process agent


class CancelKeys:
    """secret -> where the session runs."""

    def __init__(self) -> None:
        self._keys: dict[int, CancelTarget] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def issue(self, session_id: str) -> BackendKey:
        """A new key for a session not yet placed on an agent (`bind` says where it went).
        Its process id stands in only when the server sends none of its own."""
        while True:
            secret = secrets.randbits(32)
            if secret not in self._keys:
                break
        self._keys[secret] = CancelTarget(session_id)
        process_id = secrets.randbelow(0x7FFFFFFF) + 1  # positive: libpq prints it signed
        return BackendKey(process_id=process_id, secret_key=secret)

    def bind(self, key: BackendKey, host_id: str) -> None:
        target = self._keys.get(key.secret_key)
        if target is not None:
            target.host_id = host_id

    def forget(self, key: BackendKey) -> None:
        self._keys.pop(key.secret_key, None)

    def lookup(self, secret_key: int) -> CancelTarget | None:
        """Where the session with this secret runs; the agent checks the process id."""
        return self._keys.get(secret_key & 0xFFFFFFFF)


class FanOutLimit:
    """How often a CancelRequest with a key this proxy did not issue may be passed to every
    agent: `per_client` in a burst from one client address (then one per `refill` seconds),
    and `total` in a burst from all of them (then one per `total_refill` seconds). Each one
    passed costs every agent a data connection (a TLS handshake to replace it)."""

    def __init__(self, per_client: int = 5, refill: float = 1.0, total: int = 20,
                 total_refill: float = 0.1, max_clients: int = 10_000) -> None:
        self._clients = TokenBuckets(per_client, refill, max_clients)
        self._all = TokenBuckets(total, total_refill, 1)

    def allow(self, address: str, now: float) -> bool:
        """Spend one pass for `address` (and one of the total) if both have one left."""
        if self._clients.wait_time(address, now) is not None:
            return False
        if self._all.take("", now) is not None:
            return False
        self._clients.take(address, now)
        return True

"""The cancel keys the proxy hands out: BackendKeyData that maps back to a session.

Each client gets a fresh random process id and secret (`secrets`), remembered with where
its session runs (an agent's host id, or the local agent) until the session ends. A
CancelRequest that names a known process id with the right secret (compared in constant
time) is routed; anything else finds nothing, and the client is told nothing.

Never log a secret; never reuse a process id that is still in use.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from dataplane.tunnel.frames import BackendKey

LOCAL = ""  # the host id recorded for sessions of the in-process agent


@dataclass
class CancelTarget:
    session_id: str
    host_id: str | None = None  # the agent serving it; LOCAL for the in-process agent


class CancelKeys:
    """process id -> (secret, where the session runs)."""

    def __init__(self) -> None:
        self._keys: dict[int, tuple[int, CancelTarget]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def issue(self, session_id: str) -> BackendKey:
        """A new key for a session not yet placed on an agent (`bind` says where it went)."""
        while True:
            process_id = secrets.randbelow(0x7FFFFFFF) + 1  # positive: libpq prints it signed
            if process_id not in self._keys:
                break
        secret = secrets.randbits(32)
        self._keys[process_id] = (secret, CancelTarget(session_id))
        return BackendKey(process_id=process_id, secret_key=secret)

    def bind(self, key: BackendKey, host_id: str) -> None:
        entry = self._keys.get(key.process_id)
        if entry is not None and entry[0] == key.secret_key:
            entry[1].host_id = host_id

    def forget(self, key: BackendKey) -> None:
        entry = self._keys.get(key.process_id)
        if entry is not None and entry[0] == key.secret_key:
            del self._keys[key.process_id]

    def lookup(self, process_id: int, secret_key: int) -> CancelTarget | None:
        entry = self._keys.get(process_id)
        expected = entry[0] if entry is not None else 0
        same = hmac.compare_digest(
            expected.to_bytes(4, "big"), (secret_key & 0xFFFFFFFF).to_bytes(4, "big")
        )
        return entry[1] if entry is not None and same else None

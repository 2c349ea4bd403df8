"""Token buckets that bound how often one key (a user name, a client address) may try.

`take(key, now)` spends one token of the key's bucket: None when allowed, else the seconds
to wait. Buckets refill continuously up to `burst`. Keys are kept in insertion order and the
oldest full buckets are dropped past `max_keys`, so a flood of new keys cannot grow memory
without bound. Time is the caller's (a monotonic clock); no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    def __init__(self, burst: int, refill_seconds: float, max_keys: int = 100_000) -> None:
        if burst < 1 or refill_seconds <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be at least 1, refill_seconds positive")
        self.burst = burst
        self.refill_seconds = refill_seconds
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed / self.refill_seconds)
            bucket.updated = now
        return bucket

    def wait_time(self, key: str, now: float) -> float | None:
        """Seconds until `key` may try again, or None if it may now (nothing is spent)."""
        bucket = self._bucket(key, now)
        if bucket.tokens >= 1.0:
            return None
        return (1.0 - bucket.tokens) * self.refill_seconds

    def take(self, key: str, now: float) -> float | None:
        """Spend one attempt of `key`: None if allowed, else the seconds to wait."""
        wait = self.wait_time(key, now)
        if wait is None:
            self._buckets[key].tokens -= 1.0
        return wait

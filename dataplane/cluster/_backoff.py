"""Waiting between retries: exponential backoff with jitter, and sleeps that end on stop.

Every loop in this package that talks to the control plane retries with `Backoff`, so a
control plane coming back is not hit by all agents in the same second. Nothing here does
I/O besides sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import random


class Backoff:
    """Delays `first`, `first*factor`, ... capped at `cap`, each spread by +-`jitter`."""

    def __init__(
        self, first: float = 1.0, cap: float = 30.0, factor: float = 2.0, jitter: float = 0.2
    ) -> None:
        if first <= 0 or cap < first or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("backoff needs 0 < first <= cap, factor >= 1, 0 <= jitter < 1")
        self.first = first
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self.failures = 0

    def next(self) -> float:
        """The delay before the next attempt, counting one more failure."""
        base = min(self.cap, self.first * self.factor**self.failures)
        self.failures += 1
        spread = base * self.jitter
        return max(0.0, base + random.uniform(-spread, spread))  # noqa: S311 - not a secret

    def reset(self) -> None:
        self.failures = 0


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`, or less if `stop` is set meanwhile; True when stopping."""
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, seconds)):
            await stop.wait()
    return stop.is_set()

"""Settings of a long-running service process: its event loop and its garbage collector.

    install_event_loop()   # before asyncio.run: uvloop where it is installed
    freeze_startup_heap()  # once the service is built: see below

Why `freeze_startup_heap`: the data path allocates a few short-lived containers per query
(scanned messages, audit events waiting in the shipper's queue), so the cyclic collector
runs often, and its older generations walked every object of the process: pydantic's
schemas, the modules, a compiled policy bundle. That walk was about 10% of the all-in-one's
CPU under load. `gc.freeze()` moves what exists once the service is built out of the
collector's sight: those objects are never walked again (nor collected, which they would
not be anyway). The thresholds stay CPython's: raising them saved nothing measurable and let
the garbage of closed sessions (reference cycles between a relay, its protocols and its
transports) pile up to hundreds of MB under `pgbench -C`.
"""

from __future__ import annotations

import asyncio
import gc


def install_event_loop() -> None:
    """Use uvloop's event loop for the asyncio.run calls that follow, when it is installed."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, absent on some platforms
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def freeze_startup_heap() -> None:
    """Collect once, then keep everything built so far out of later collections."""
    gc.collect()
    gc.freeze()

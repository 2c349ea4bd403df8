"""Settings of a long-running service process: its event loop and its garbage collector.

    install_event_loop()   # before asyncio.run: uvloop where it is installed
    tune_gc()              # once the service is built: see below

Why `tune_gc`: the data path allocates a few short-lived containers per query (scanned
messages, audit events waiting in the shipper's queue); with the interpreter's default
thresholds the cyclic collector then runs thousands of times a second and, every so often,
walks every object of the process (a compiled policy bundle, pydantic's schemas, the
modules), which is pure overhead: almost nothing on these paths forms reference cycles.
`gc.freeze()` moves what exists once the service is built out of the collector's sight
(it is never collected and never walked again), and a larger first threshold makes the
young collections rarer. Memory stays bounded: refcounting frees acyclic garbage at once
and the collector still runs, only less often.
"""

from __future__ import annotations

import asyncio
import gc

# Container allocations (net) before a young-generation collection; CPython's default is 700.
GC_THRESHOLD_YOUNG = 50_000


def install_event_loop() -> None:
    """Use uvloop's event loop for the asyncio.run calls that follow, when it is installed."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, absent on some platforms
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def tune_gc() -> None:
    """Freeze what the process built so far and make young collections rarer."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD_YOUNG, older, oldest)

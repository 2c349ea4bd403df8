"""Settings of our processes: a service's event loop and garbage collector, and how every
command line tool ends when its reader goes away.

    install_event_loop()   # before asyncio.run: uvloop where it is installed
    freeze_startup_heap()  # once the service is built: see below
    run_command(func, args)  # a CLI subcommand; `tctl status | head -1` ends quietly

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

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Callable

# What a shell reports for a process that SIGPIPE ended (128 + 13), as C tools get it.
BROKEN_PIPE_EXIT = 141


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


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`func(args)`, ending quietly with BROKEN_PIPE_EXIT when whoever reads our output
    has closed it (`tctl audit search | head`), instead of a BrokenPipeError traceback.
    Standard output then points at /dev/null, so that the interpreter's last flush at exit
    does not fail again."""
    try:
        return int(func(args))
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_EXIT

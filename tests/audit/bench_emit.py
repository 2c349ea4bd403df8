"""What `AuditShipper.emit()` costs the data path, and what delivery costs behind it.

    .venv/bin/python -m tests.audit.bench_emit [--events N] [--rounds R]

Prints, measured in the same run:
- emit(): nanoseconds per event, the call the relay makes (queue and return), with the
  shipper started and its sender idle (the loop is busy emitting);
- the same loop calling `MemoryAuditSink.emit` (a list append), for comparison;
- delivery: events per second and CPU microseconds per event for the whole path behind
  emit (JSON encoding, HTTP to a real endpoint, `AuditStore` append with fsync), both ends
  in this one process.

Not a test: nothing is asserted. Lives here until the lead moves it to bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from dataplane.agent.audit import MemoryAuditSink
from dataplane.audit import AuditShipper
from tests.audit.conftest import AuditEndpoint, HttpSend, numbered_events


async def emit_cost(events: list, directory: Path) -> tuple[float, float]:
    endpoint = AuditEndpoint(directory / "audit")
    await endpoint.start()
    send = HttpSend(endpoint.url)
    shipper = AuditShipper(send.sender(), directory / "spool", max_memory_events=len(events) + 1)
    await shipper.start()
    emit = shipper.emit
    started = time.perf_counter_ns()
    for event in events:
        emit(event)
    per_event = (time.perf_counter_ns() - started) / len(events)
    sink = MemoryAuditSink()
    started = time.perf_counter_ns()
    for event in events:
        sink.emit(event)
    baseline = (time.perf_counter_ns() - started) / len(events)
    await shipper.close(timeout=120)
    await send.aclose()
    await endpoint.stop()
    return per_event, baseline


async def delivery(events: list, directory: Path) -> tuple[float, float]:
    endpoint = AuditEndpoint(directory / "audit")
    await endpoint.start()
    send = HttpSend(endpoint.url)
    shipper = AuditShipper(send.sender(), directory / "spool", max_memory_events=len(events) + 1)
    await shipper.start()
    wall, cpu = time.perf_counter(), time.process_time()
    for i, event in enumerate(events):
        shipper.emit(event)
        if i % 100 == 99:
            await asyncio.sleep(0)
    while endpoint.store is None or endpoint.store.last_seq < len(events):
        await asyncio.sleep(0.005)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await shipper.close()
    await send.aclose()
    await endpoint.stop()
    return len(events) / wall, cpu / len(events) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    emits, bases, rates, cpus = [], [], [], []
    for _ in range(args.rounds):
        events = numbered_events(args.events)
        with tempfile.TemporaryDirectory() as tmp:
            per_event, baseline = asyncio.run(emit_cost(events, Path(tmp)))
        emits.append(per_event)
        bases.append(baseline)
        events = numbered_events(args.events)
        with tempfile.TemporaryDirectory() as tmp:
            rate, cpu = asyncio.run(delivery(events, Path(tmp)))
        rates.append(rate)
        cpus.append(cpu)
    print(f"{args.events} events, median of {args.rounds} rounds")
    print(f"  AuditShipper.emit():      {statistics.median(emits):7.0f} ns/event")
    print(f"  MemoryAuditSink.emit():   {statistics.median(bases):7.0f} ns/event (list append)")
    print(f"  delivery to AuditStore:   {statistics.median(rates):7.0f} events/s, "
          f"{statistics.median(cpus):.1f} us CPU/event (both ends, one process)")


if __name__ == "__main__":
    main()

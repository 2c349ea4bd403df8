"""transport.process.tune_gc: what a service process built is frozen, young collections are
rarer, and garbage in reference cycles is still collected (memory stays bounded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

PROBE = """
import gc, weakref
from transport.process import GC_THRESHOLD_YOUNG, tune_gc

class Node:
    pass

built = [Node() for _ in range(1000)]  # what the service built before it was tuned
tune_gc()
print(gc.get_threshold()[0] == GC_THRESHOLD_YOUNG, gc.get_freeze_count() >= 1000)

collected = []
for _ in range(3):
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: refcounting alone never frees it
    weakref.finalize(a, collected.append, 1)
    del a, b
keep = [[] for _ in range(2 * GC_THRESHOLD_YOUNG)]  # net allocations start a collection
print(len(collected) == 3)
"""


def test_tune_gc_freezes_what_exists_and_still_collects_cycles() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True"]

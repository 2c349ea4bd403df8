"""transport.process.freeze_startup_heap: what a service process built is kept out of later
collections, and garbage in reference cycles made afterwards is still collected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

PROBE = """
import gc, weakref
from transport.process import freeze_startup_heap

class Node:
    pass

built = [Node() for _ in range(1000)]  # what the service built before it was frozen
freeze_startup_heap()
print(gc.get_freeze_count() >= 1000, gc.isenabled())

collected = []
for _ in range(3):
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: refcounting alone never frees it
    weakref.finalize(a, collected.append, 1)
    del a, b
keep = [[] for _ in range(10 * gc.get_threshold()[0])]  # net allocations start a collection
print(len(collected) == 3)
"""


def test_the_startup_heap_is_frozen_and_later_cycles_are_still_collected() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True"]


BROKEN_PIPE_PROBE = """
import sys
from transport.process import run_command

def chatty(args):
    for i in range(1_000_000):
        print(f"line {i}")
    return 0

sys.exit(run_command(chatty, None))
"""


def test_a_command_whose_reader_went_away_ends_quietly() -> None:
    """`tctl audit search | head -1`: when the reader closes the pipe, the command ends
    with 141 (what a shell shows for SIGPIPE) and no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-c", BROKEN_PIPE_PROBE], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == 141
    assert err == b""

"""A control plane on a temp data dir, running its watcher in a background thread."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from control.service import ControlPlane
from control.settings import ControlSettings, SourceSettings
from control.state import ReconcileState, load_state

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Alice Admin",
    "GIT_AUTHOR_EMAIL": "alice@example.com",
    "GIT_COMMITTER_NAME": "Alice Admin",
    "GIT_COMMITTER_EMAIL": "alice@example.com",
}


def git(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=check,
    )


@dataclass
class RunningControlPlane:
    data_dir: Path
    plane: ControlPlane
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event
    thread: threading.Thread

    def state(self) -> ReconcileState:
        return load_state(self.data_dir / "state.json")

    def wait_for(
        self, predicate: Callable[[ReconcileState], bool], timeout: float = 15.0
    ) -> ReconcileState:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if predicate(state):
                return state
            time.sleep(0.02)
        raise AssertionError(f"timed out; last state: {self.state().model_dump_json(indent=1)}")

    def shutdown(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def start_control_plane(data_dir: Path, settings: ControlSettings) -> RunningControlPlane:
    plane = ControlPlane(data_dir, settings)
    plane.prepare()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)

        async def run() -> None:
            ready.set()
            await plane.run(stop)

        loop.run_until_complete(run())
        loop.close()

    thread = threading.Thread(target=main, name="control-plane", daemon=True)
    thread.start()
    ready.wait(5)
    return RunningControlPlane(data_dir, plane, loop, stop, thread)


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[RunningControlPlane]:
    running = start_control_plane(
        tmp_path / "data", ControlSettings(cluster_name="root", source=SourceSettings())
    )
    running.wait_for(lambda s: s.in_force is not None)
    yield running
    running.shutdown()


@pytest.fixture
def policy_clone(control_plane: RunningControlPlane, tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    git("clone", "--quiet", str(control_plane.data_dir / "policies.git"), str(clone), cwd=tmp_path)
    return clone

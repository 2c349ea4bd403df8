"""The real control plane (policy watcher + HTTPS API) on a temp data dir, in a thread.

The tests' own event loop plays the agent; the control plane runs its loop in a background
thread, as another process would: they meet only over loopback TLS.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from control import hosted
from control.ca import ClusterCAs
from control.service import ControlPlane
from control.settings import ApiSettings, ControlSettings, SourceSettings
from control.state import load_state
from schemas.identity import fingerprint

TOKEN = "cbdeeab9-6f88-436d-a673-44d14bd86bb7"  # the static token of seed 001


@dataclass
class LiveControlPlane:
    data_dir: Path
    plane: ControlPlane
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event
    thread: threading.Thread
    addr: str

    @property
    def cas(self) -> ClusterCAs:
        return ClusterCAs.load(self.data_dir)

    @property
    def pin(self) -> str:
        return fingerprint(self.cas.host.certificate)

    def serial(self) -> int:
        in_force = load_state(self.data_dir / "state.json").in_force
        return in_force.serial if in_force else 0

    def commit(self, changes: dict[str, bytes | None], message: str) -> str:
        """A real commit pushed to the hosted repository (through its pre-receive hook)."""
        return hosted.commit_files(hosted.repo_path(self.data_dir), changes, message)

    def wait_for_serial(self, serial: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.serial() < serial:
            if time.monotonic() > deadline:
                raise AssertionError(f"the control plane did not publish serial {serial}")
            time.sleep(0.01)

    def agents(self) -> dict[str, object]:
        path = self.data_dir / "run" / "agents.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def shutdown(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
            self.thread.join(timeout=15)
            assert not self.thread.is_alive(), "the control plane did not stop"


def start_control_plane(data_dir: Path, **api: object) -> LiveControlPlane:
    settings = ControlSettings(
        cluster_name="root",
        source=SourceSettings(),
        api_addr="127.0.0.1:0",
        api=ApiSettings(static_tokens=[f"proxy,db:{TOKEN}"], **api),  # type: ignore[arg-type]
    )
    plane = ControlPlane(data_dir, settings)
    plane.prepare()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failed: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(plane.run(stop))
        except BaseException as exc:  # shown by the waiting test
            failed.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="control-plane", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while plane.api is None or plane.api.address is None or not _has_bundle(data_dir):
        if failed:
            raise failed[0]
        if time.monotonic() > deadline:
            raise AssertionError("the control plane did not start its API and publish")
        time.sleep(0.02)
    host, port = plane.api.address
    return LiveControlPlane(data_dir, plane, loop, stop, thread, f"{host}:{port}")


def _has_bundle(data_dir: Path) -> bool:
    return (data_dir / "state.json").exists() and load_state(
        data_dir / "state.json"
    ).in_force is not None


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[LiveControlPlane]:
    cp = start_control_plane(tmp_path / "control")
    try:
        yield cp
    finally:
        cp.shutdown()


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    path = tmp_path / "agent"
    path.mkdir()
    return path

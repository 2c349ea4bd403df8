"""Run reconciles when policy changes: on a push, on `tctl reconcile`, on a timer.

Local repositories are watched with watchfiles on the refs that matter (loose refs,
`packed-refs`, `HEAD`), so a push is published within about a second. In pull mode the remote
is fetched every `pull_interval` with up to 20% jitter. A periodic tick re-signs the bundle
before it expires. `tctl reconcile` writes a request file under `<data_dir>/run/`, which is
watched too. Reconciles run in a worker thread (git and signing are blocking work), one at a
time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from datetime import timedelta
from pathlib import Path

import watchfiles

from control.reconcile import Outcome, Reconciler
from control.sources import LocalSource, RemoteSource
from transport.files import write_atomic

log = logging.getLogger("teleport.control.watch")

REQUEST_DIR = Path("run")
REQUEST_FILE = "reconcile-request"
DONE_FILE = "reconcile-done"
TICK = timedelta(minutes=1)


def request_path(data_dir: Path) -> Path:
    return Path(data_dir) / REQUEST_DIR / REQUEST_FILE


class _RefFilter(watchfiles.DefaultFilter):
    """Pass only changes that can move the policy branch, and reconcile requests."""

    def __init__(self, git_dir: Path | None, request_dir: Path) -> None:
        super().__init__()
        self.git_dir = git_dir.resolve() if git_dir else None
        self.request_dir = request_dir.resolve()

    def __call__(self, change: watchfiles.Change, path: str) -> bool:
        p = Path(path)
        if p.parent == self.request_dir:
            return p.name == REQUEST_FILE
        if self.git_dir is None:
            return False
        try:
            rel = p.relative_to(self.git_dir)
        except ValueError:
            return False
        if rel.name.endswith(".lock"):
            return False
        return rel.parts[:1] == ("refs",) or rel.name in ("packed-refs", "HEAD")


class PolicyWatcher:
    def __init__(
        self,
        reconciler: Reconciler,
        pull_interval: timedelta | None = None,
        tick: timedelta = TICK,
    ) -> None:
        self.reconciler = reconciler
        self.pull_interval = pull_interval
        self.tick = tick
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.last: Outcome | None = None

    def poke(self) -> None:
        """Ask for a reconcile now (from inside the process)."""
        self._wake.set()

    async def reconcile(self, force: bool = False) -> Outcome:
        async with self._lock:
            try:
                self.last = await asyncio.to_thread(self.reconciler.run_once, force=force)
            except Exception:
                log.exception("reconcile failed unexpectedly; the bundle in force stays")
                raise
            if self.last.result != "unchanged":
                log.info("reconcile: %s", self.last)
            return self.last

    async def run(self, stop: asyncio.Event) -> None:
        data_dir = self.reconciler.data_dir
        req = request_path(data_dir)
        req.parent.mkdir(parents=True, exist_ok=True)
        source = self.reconciler.source
        tasks = [
            asyncio.create_task(self._loop(stop), name="reconcile-loop"),
            asyncio.create_task(self._timer(stop), name="reconcile-timer"),
        ]
        git_dir = source.git_dir() if isinstance(source, LocalSource) else None
        tasks.append(asyncio.create_task(self._watch(git_dir, req.parent, stop), name="watch"))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, stop: asyncio.Event) -> None:
        req = request_path(self.reconciler.data_dir)
        answered = req.read_text() if req.exists() else ""
        while not stop.is_set():
            # A `tctl reconcile` request carries a nonce; answer it once this run is done.
            pending = req.read_text() if req.exists() else ""
            force = bool(pending) and pending != answered
            try:
                outcome = await self.reconcile(force=force)
                answer = json.dumps({"nonce": pending, "outcome": str(outcome)})
            except Exception as exc:  # logged in reconcile(); keep the last good bundle
                answer = json.dumps({"nonce": pending, "outcome": f"error: {exc}"})
                await asyncio.sleep(1)
            if force:
                write_atomic(req.parent / DONE_FILE, answer.encode())
                answered = pending
            await self._wake.wait()
            self._wake.clear()

    async def _timer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if isinstance(self.reconciler.source, RemoteSource) and self.pull_interval:
                base = self.pull_interval.total_seconds()
                delay = base * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not secrets
            else:
                delay = self.tick.total_seconds()
            await asyncio.sleep(delay)
            self._wake.set()

    async def _watch(self, git_dir: Path | None, request_dir: Path, stop: asyncio.Event) -> None:
        paths = [request_dir] + ([git_dir] if git_dir else [])
        async for _changes in watchfiles.awatch(
            *paths,
            watch_filter=_RefFilter(git_dir, request_dir),
            debounce=50,
            step=20,
            stop_event=stop,
            recursive=True,
        ):
            self._wake.set()

"""The control plane as a long-running service: `teleport start --roles=auth`.

Prepares the data dir (signing key, CAs, hosted policy repository, settings), then runs the
policy watcher and, when `settings.api_addr` is set, the HTTPS API (`control.api`), which
learns of every bundle the reconciler publishes through `Reconciler.on_publish`. Holds an
exclusive lock on `<data_dir>/run/control.lock` for its whole life, so two control planes
never share a data dir and `tctl` knows whether one is running.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import timedelta
from pathlib import Path

from control import hosted
from control.api import ApiServer
from control.ca import ClusterCAs
from control.reconcile import Reconciler
from control.settings import ControlSettings, load_settings, save_settings
from control.signing import load_or_create_signing_key
from control.sources import LocalSource, RemoteSource
from control.watch import PolicyWatcher
from schemas.bundle import BundleCAs
from transport.files import LockHeld, ensure_dir, hold_lock, lock_is_held

log = logging.getLogger("teleport.control")

LOCK_FILE = Path("run") / "control.lock"


class DataDirBusy(Exception):
    """Another control plane runs on this data dir."""


def bundle_cas(cas: ClusterCAs) -> BundleCAs:
    return BundleCAs(
        user=[cas.user.certificate_pem().decode()],
        host=[cas.host.certificate_pem().decode()],
        db=[cas.db.certificate_pem().decode()],
    )


def make_source(data_dir: Path, settings: ControlSettings) -> LocalSource | RemoteSource:
    src = settings.source
    if src.kind == "remote":
        if not src.url:
            raise ValueError("pull mode needs the policy repository's URL")
        return RemoteSource(src.url, Path(data_dir) / "mirror.git", src.branch)
    if src.kind == "local":
        if not src.path:
            raise ValueError("a local policy source needs the repository's path")
        return LocalSource(Path(src.path), src.branch)
    return LocalSource(hosted.repo_path(data_dir), src.branch)


def make_reconciler(data_dir: Path, settings: ControlSettings) -> Reconciler:
    data_dir = Path(data_dir)
    cas = ClusterCAs.load(data_dir)
    return Reconciler(
        data_dir,
        make_source(data_dir, settings),
        load_or_create_signing_key(data_dir),
        settings.cluster_name,
        cas=lambda: bundle_cas(cas),
        bundle_ttl=timedelta(seconds=settings.bundle_ttl_seconds),
    )


def control_plane_running(data_dir: Path) -> bool:
    return lock_is_held(Path(data_dir) / LOCK_FILE)


class ControlPlane:
    def __init__(self, data_dir: Path, settings: ControlSettings) -> None:
        self.data_dir = Path(data_dir)
        self.settings = settings
        self._lock_fd: int | None = None
        self.cas: ClusterCAs | None = None
        self.reconciler: Reconciler | None = None
        self.watcher: PolicyWatcher | None = None
        self.api: ApiServer | None = None

    def prepare(self) -> None:
        """Create what a first start needs; refuse a data dir that belongs to another cluster."""
        ensure_dir(self.data_dir)
        ensure_dir(self.data_dir / "run")
        self._take_lock()
        previous = load_settings(self.data_dir)
        if previous is not None and previous.cluster_name != self.settings.cluster_name:
            raise ValueError(
                f"{self.data_dir} belongs to cluster {previous.cluster_name!r}, not "
                f"{self.settings.cluster_name!r}; the cluster name cannot change"
            )
        save_settings(self.data_dir, self.settings)
        load_or_create_signing_key(self.data_dir)
        self.cas = ClusterCAs.load_or_create(self.data_dir, self.settings.cluster_name)
        if self.settings.source.kind == "hosted":
            hosted.init_hosted_repo(
                self.data_dir, self.settings.cluster_name, self.settings.source.branch
            )
        self.reconciler = make_reconciler(self.data_dir, self.settings)
        pull = self.settings.source.pull_interval_seconds
        self.watcher = PolicyWatcher(
            self.reconciler,
            pull_interval=timedelta(seconds=pull)
            if self.settings.source.kind == "remote"
            else None,
        )

    async def start(self) -> None:
        """Prepare (if not done) and start the API, so that proxies and agents of this
        process can join it before policy watching begins. Idempotent."""
        if self.watcher is None:
            self.prepare()
        if self.settings.api_addr and self.api is None:
            assert self.cas is not None and self.reconciler is not None
            self.api = ApiServer(
                self.data_dir, self.settings, self.cas, self.reconciler.key.public_key()
            )
            self.reconciler.on_publish = self.api.on_publish
            await self.api.start()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.start()
            assert self.watcher is not None
            log.info(
                "control plane for cluster %s; policy from %s",
                self.settings.cluster_name,
                make_source(self.data_dir, self.settings).describe(),
            )
            await self.watcher.run(stop)
        finally:
            if self.api is not None:
                if self.reconciler is not None:
                    self.reconciler.on_publish = None
                await self.api.close()
                self.api = None
            self.close()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self) -> None:
        if self._lock_fd is not None:
            return
        try:
            self._lock_fd = hold_lock(self.data_dir / LOCK_FILE)
        except LockHeld:
            raise DataDirBusy(
                f"another control plane is running on {self.data_dir}; stop it first or use "
                "another --data-dir"
            ) from None

"""The bundle in force as the API serves it, and the long polls waiting for a newer one.

The reconciler publishes from a worker thread: `publish_threadsafe(serial, data)` (its
`on_publish` hook) checks the signature there, then hands the bundle to the event loop with
`call_soon_threadsafe`, where setting the current `asyncio.Event` (and putting a fresh one
in its place) wakes every waiting `GET /v1/bundle`. Nothing polls in a loop: a waiter
sleeps until a publish or its own deadline.

A bundle published by another process on the same data dir (`tctl reconcile` without a
running watcher) is noticed at the next request: `refresh()` compares the current file's
identity (inode, size, mtime) with what was last read, a single `stat`.

Never serves bytes whose signature it has not checked with the cluster's own key.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from control.bundles import CURRENT, BundleStore
from schemas.bundle import Bundle, BundleRejected, key_id, verify_bundle_signature

log = logging.getLogger("teleport.control.api")


@dataclass(frozen=True)
class PublishedBundle:
    serial: int
    data: bytes
    bundle: Bundle

    @property
    def etag(self) -> str:
        return f'"{self.serial}"'


class BundleFeed:
    def __init__(self, store: BundleStore, public_key: Ed25519PublicKey, cluster: str) -> None:
        self.store = store
        self.keys = {key_id(public_key): public_key}
        self.cluster = cluster
        self.current: PublishedBundle | None = None
        self._file_id: tuple[int, int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._published: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the loop the API runs on; loads the bundle in force from disk."""
        self._loop = loop
        self._published = asyncio.Event()
        self.refresh()

    # -- producers -----------------------------------------------------------------------

    def _verify(self, data: bytes) -> PublishedBundle | None:
        try:
            bundle = verify_bundle_signature(data, self.keys, self.cluster)
        except BundleRejected as exc:
            log.error("the published bundle does not verify with our own key: %s", exc)
            return None
        return PublishedBundle(bundle.serial, data, bundle)

    def publish_threadsafe(self, serial: int, data: bytes) -> None:
        """The reconciler's `on_publish`: safe to call from any thread."""
        published = self._verify(data)
        if published is None or self._loop is None or self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._offer, published)
        except RuntimeError:  # the loop closed meanwhile: the API is stopping
            return

    def refresh(self) -> None:
        """Pick up a bundle another process published (one stat when nothing changed)."""
        path = self.store.directory / CURRENT
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        file_id = (st.st_ino, st.st_size, st.st_mtime_ns)
        if file_id == self._file_id:
            return
        data = self.store.read_current()
        if data is None:
            return
        self._file_id = file_id
        published = self._verify(data)
        if published is not None:
            self._offer(published)

    def _offer(self, published: PublishedBundle) -> None:
        if self.current is not None and published.serial <= self.current.serial:
            return
        self.current = published
        if self._published is not None:
            event, self._published = self._published, asyncio.Event()
            event.set()

    # -- consumers -----------------------------------------------------------------------

    async def wait_for(
        self, wanted: Callable[[PublishedBundle], bool], timeout: float
    ) -> PublishedBundle | None:
        """The bundle in force as soon as `wanted(bundle)` holds, or None after `timeout`."""
        self.refresh()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            current = self.current
            if current is not None and wanted(current):
                return current
            event = self._published
            remaining = deadline - loop.time()
            if event is None or remaining <= 0:
                return None
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                return None

"""The signed bundle in force on a proxy or db agent, and how a new one gets there.

    control plane --long poll--> fetch --write atomically--> <data_dir>/cache/bundle
                                                                  |
                                                   watchfiles sees the file
                                                                  v
                                   verify (keys, cluster, serial >= in force, times)
                                                                  |
                                         swap in, then tell every subscriber

The cache file is the one hand-over point: whatever writes it (the fetcher here, an
operator copying a bundle by hand), the bundle is activated only after `verify_bundle`
accepts it with the keys obtained at join, this cluster's name, a serial not below the one
in force (no rollback) and the current time. A refused bundle is logged with the reason
and never used; the bundle in force stays. The fetcher checks a bundle the same way before
writing it, so the cache never holds anything worse than what is in force.

At start the cache is loaded if it verifies, so an agent restarted while the control plane
is down serves at once. When the bundle in force expires and no newer one came, it is no
longer used (fail closed: `current` is None, `on_expired` listeners are told) and an error
says so; the control plane re-signs bundles well before expiry, so this means it has been
unreachable for a long time.

This module never activates a bundle it has not verified and never goes back to a lower
serial.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import watchfiles
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dataplane.cluster._backoff import Backoff, sleep_or_stop
from dataplane.cluster.api_client import ControlPlaneClient, ControlPlaneError
from schemas.api import BUNDLE_WAIT_DEFAULT_S
from schemas.bundle import Bundle, BundleRejected, RejectReason, verify_bundle
from transport.files import ensure_dir, write_atomic

log = logging.getLogger("teleport.cluster.bundles")

CACHE_DIR = "cache"
CACHE_FILE = "bundle"
#: If the watcher has not activated a bundle the fetcher wrote within this many seconds
#: (an event lost by the OS), the fetcher activates it from the cache file itself.
WATCH_GRACE_S = 2.0

BundleListener = Callable[[Bundle], None]


def cache_path(data_dir: Path) -> Path:
    return Path(data_dir) / CACHE_DIR / CACHE_FILE


class _CacheFilter(watchfiles.DefaultFilter):
    """Only the cache file itself (the directory is watched alone, not recursively); the
    temporary files of atomic writes and deletions are ignored."""

    def __call__(self, change: watchfiles.Change, path: str) -> bool:
        return Path(path).name == CACHE_FILE and change != watchfiles.Change.deleted


class BundleFeed:
    """The verified bundle in force, kept current from the control plane through the cache.

    `client` None: no fetching, only the cache is watched (tests, or a bundle delivered by
    other means). Subscribers are called on the event loop with each newly activated
    bundle; `on_expired` listeners with the bundle that expired without a successor.
    """

    def __init__(
        self,
        data_dir: Path,
        cluster: str,
        keys: Mapping[str, Ed25519PublicKey],
        client: ControlPlaneClient | None = None,
        *,
        poll_wait: float = BUNDLE_WAIT_DEFAULT_S,
        retry: Backoff | None = None,
    ) -> None:
        if not keys:
            raise ValueError("a bundle feed needs at least one bundle verification key")
        self.data_dir = Path(data_dir)
        self.cluster = cluster
        self.keys = dict(keys)
        self.client = client
        self.poll_wait = poll_wait
        self.cache_file = cache_path(self.data_dir)
        self._retry = retry or Backoff(first=1.0, cap=30.0)
        self._bundle: Bundle | None = None
        self._digest: str | None = None
        self._expired_serial: int | None = None
        self._fetched_serial = 0
        self._listeners: list[BundleListener] = []
        self._expiry_listeners: list[BundleListener] = []
        self._changed = asyncio.Event()
        self.last_rejection: BundleRejected | None = None
        self.activations = 0

    # --- what the data path reads ------------------------------------------------------

    @property
    def current(self) -> Bundle | None:
        """The verified bundle in force, or None (none yet, or it expired: fail closed)."""
        bundle = self._bundle
        if bundle is None or _aware(bundle.expires_at) <= datetime.now(UTC):
            return None
        return bundle

    @property
    def serial(self) -> int:
        """Serial of the last bundle activated (0 before the first), expired or not."""
        return self._bundle.serial if self._bundle is not None else 0

    def subscribe(self, callback: BundleListener) -> None:
        """`callback(bundle)` after each activation (re-check live sessions, rebuild CAs)."""
        self._listeners.append(callback)

    def on_expired(self, callback: BundleListener) -> None:
        """`callback(expired_bundle)` when the bundle in force expires with no successor:
        from then on `current` is None until a valid bundle arrives."""
        self._expiry_listeners.append(callback)

    # --- activation ----------------------------------------------------------------------

    def offer(self, data: bytes, source: str) -> Bundle | None:
        """Verify `data` and make it the bundle in force; the new bundle, or None when it
        was refused or is the bundle already in force. Never raises for a bad bundle."""
        now = datetime.now(UTC)
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return None
        try:
            bundle = verify_bundle(data, self.keys, self.cluster, self.serial, now)
        except BundleRejected as exc:
            self._refused(exc, source)
            return None
        if self._bundle is not None and bundle.serial == self._bundle.serial:
            exc = BundleRejected(
                RejectReason.ROLLBACK,
                f"serial {bundle.serial} is already in force with different content; a new "
                "policy always comes with a new serial",
            )
            self._refused(exc, source)
            return None
        previous = self._bundle
        self._bundle = bundle
        self._digest = digest
        self._expired_serial = None
        self.activations += 1
        self._changed.set()
        log.info(
            "bundle serial %d (commit %s) is in force (from %s; was %s); expires %s",
            bundle.serial, bundle.commit[:12], source,
            previous.serial if previous is not None else "none",
            _aware(bundle.expires_at).strftime("%Y-%m-%d %H:%M:%S UTC"),
        )
        self._notify(self._listeners, bundle)
        return bundle

    def load_cache(self) -> Bundle | None:
        """Activate the cached bundle if it verifies (at start, or after a missed event)."""
        try:
            data = self.cache_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read the cached bundle %s: %s", self.cache_file, exc.strerror)
            return None
        return self.offer(data, f"cache {self.cache_file}")

    def _refused(self, exc: BundleRejected, source: str) -> None:
        self.last_rejection = exc
        log.error("REFUSED a bundle from %s (%s): %s; serial %s stays in force", source,
                  exc.reason.value, exc, self.serial or "none")

    def _notify(self, listeners: list[BundleListener], bundle: Bundle) -> None:
        for callback in list(listeners):
            try:
                callback(bundle)
            except Exception:
                log.exception("a bundle listener failed on serial %d", bundle.serial)

    # --- running -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Load the cache, then watch it, fetch into it and expire, until `stop` is set."""
        ensure_dir(self.cache_file.parent)
        self.load_cache()
        tasks = [
            asyncio.create_task(self._watch(stop), name="bundle-watch"),
            asyncio.create_task(self._expire(stop), name="bundle-expiry"),
        ]
        if self.client is not None:
            tasks.append(asyncio.create_task(self._fetch(stop), name="bundle-fetch"))
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _watch(self, stop: asyncio.Event) -> None:
        directory = self.cache_file.parent
        while not stop.is_set():
            try:
                async for _ in watchfiles.awatch(
                    directory,
                    watch_filter=_CacheFilter(),
                    stop_event=stop,
                    debounce=100,
                    # Each step takes the GIL from the data path: 10 wake-ups a second,
                    # not 100 (a bundle is activated at most ~0.2 s after it is written).
                    step=100,
                    recursive=False,
                ):
                    self.load_cache()
            except Exception as exc:
                log.error("watching %s failed (%s); watching again in 1s", directory, exc)
                if await sleep_or_stop(stop, 1.0):
                    return
                with contextlib.suppress(OSError):
                    ensure_dir(directory)
                self.load_cache()
            # awatch returns when stop is set

    async def _fetch(self, stop: asyncio.Event) -> None:
        assert self.client is not None
        outage_logged = False
        while not stop.is_set():
            after = max(self.serial, self._fetched_serial)
            try:
                data = await self.client.fetch_bundle(after, self.poll_wait)
            except ControlPlaneError as exc:
                delay = self._retry.next()
                if not outage_logged:
                    log.warning("cannot fetch bundles from the control plane (%s); serving "
                                "serial %s meanwhile, retrying", exc, self.serial or "none")
                    outage_logged = True
                else:
                    log.debug("bundle fetch failed again (%s); next try in %.1fs", exc, delay)
                if await sleep_or_stop(stop, delay):
                    return
                continue
            if outage_logged:
                log.info("the control plane answers again; fetching bundles")
                outage_logged = False
            self._retry.reset()
            if data is None:
                continue
            await self._store(data, after, stop)

    async def _store(self, data: bytes, after: int, stop: asyncio.Event) -> None:
        try:
            bundle = verify_bundle(data, self.keys, self.cluster, self.serial,
                                   datetime.now(UTC))
        except BundleRejected as exc:
            self._refused(exc, f"the control plane at {self.client_address()}")
            # The control plane answers the same at once: do not spin on it.
            await sleep_or_stop(stop, self._retry.next())
            return
        if bundle.serial <= after:
            return
        self._fetched_serial = bundle.serial
        ensure_dir(self.cache_file.parent)
        await asyncio.to_thread(write_atomic, self.cache_file, data)
        # The watcher activates it; if its event got lost, do it here after a grace period.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WATCH_GRACE_S
        while self.serial < bundle.serial and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.serial < bundle.serial:
            log.warning("the cache watcher missed serial %d; activating it from %s",
                        bundle.serial, self.cache_file)
            self.load_cache()

    def client_address(self) -> str:
        return self.client.base_url if self.client is not None else "(no control plane)"

    async def _expire(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            bundle = self._bundle
            if bundle is None or self._expired_serial == bundle.serial:
                wait = 3600.0
            else:
                wait = (_aware(bundle.expires_at) - datetime.now(UTC)).total_seconds()
            if wait > 0:
                self._changed.clear()
                waiter = asyncio.create_task(self._changed.wait())
                stopper = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait({waiter, stopper}, timeout=wait,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()
                continue
            assert bundle is not None
            self._expired_serial = bundle.serial
            log.error(
                "the bundle in force (serial %d) EXPIRED at %s and no newer bundle arrived: "
                "every new session is refused until the control plane is reachable again "
                "and a valid bundle is fetched (fail closed)",
                bundle.serial, _aware(bundle.expires_at).strftime("%Y-%m-%d %H:%M:%S UTC"),
            )
            self._notify(self._expiry_listeners, bundle)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)

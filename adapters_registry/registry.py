"""The adapter registry: register, load, lease, pin and delete adapters while the server runs.

Tiers, coldest first:

    source (upload bytes, a local directory, s3://)  --register-->  AdapterStore (disk)
    AdapterStore  --load (worker thread)-->  HostCache (host RAM, LRU bounded in bytes)
    HostCache  --lease-->  the engine, which copies the weights into a device slot it owns

Every registration is validated against the served base model before anything is stored, so a
rejected adapter leaves the store unchanged. Loads run on worker threads, never on the caller's
(the engine step loop's) thread; concurrent requests for one cold adapter share one load.

A request holds an `AdapterLease` from `acquire` until it ends (`release`): its version stays in
host RAM even if the adapter is deleted or replaced meanwhile; new requests see the change at once.
Listeners (the engine) hear of every replace and delete so they can free device slots the same way.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adapters_registry.host_cache import (AdapterKey, AdapterLease, CacheFullError, EntryState,
                                          HostCache)
from adapters_registry.mixtures import (AdapterMix, MixtureError, cat_weights, check_mixable,
                                        merge, mixture_key)
from adapters_registry.peft_format import AdapterFormatError, parse_peft_adapter
from adapters_registry.weights import LoraWeights
from adapters_registry.spec import BaseModelSpec
from adapters_registry.store import (AdapterCorruptError, AdapterRecord, AdapterStore, StoreError,
                                     UnknownAdapterError)

log = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """A stored adapter could not be brought into host RAM (corrupt blob, base-model mismatch,
    cache full); the message names the adapter, its version and the reason."""


class AdapterCacheFullError(AdapterLoadError):
    """Running requests and pins hold the whole host adapter cache; retry when some finish."""


def adapter_key(record: AdapterRecord) -> AdapterKey:
    both = f"{record.config_sha256}:{record.weights_sha256}".encode()
    return AdapterKey(record.name, record.version, hashlib.sha256(both).hexdigest()[:16])


@dataclass(frozen=True)
class AdapterStatus:
    record: AdapterRecord
    pinned: bool
    in_host_memory: bool
    running_requests: int  # leases held on the current version


class _Load:
    """One load in flight: the futures of everyone waiting for `key`."""

    def __init__(self, key: AdapterKey, read: Callable[[], LoraWeights] | None):
        self.key = key
        self.read = read  # builds the weights; None: read them from the store
        self.leases: list[Future] = []  # Future[AdapterLease], one per acquire
        self.pins: list[Future] = []  # Future[AdapterKey], one per pin


class AdapterRegistry:
    def __init__(self, store: AdapterStore, spec: BaseModelSpec, *, max_rank: int,
                 cache_bytes: int, allowed_roots: Sequence[str | Path] = (),
                 max_adapter_bytes: int | None = None, load_workers: int = 2,
                 worker_init: Callable[[], None] | None = None):
        """`worker_init` runs first on each load worker thread (the server makes them run torch
        single-threaded: server/engine/threads.py)."""
        self.store = store
        self.spec = spec
        self.max_rank = max_rank
        self.allowed_roots = [Path(root) for root in allowed_roots]
        self.max_adapter_bytes = max_adapter_bytes
        self.cache = HostCache(cache_bytes)
        # guards cache, _loads, _pinned; reentrant: a lease granted under it runs its future's
        # callbacks there, and a cat mixture's callback may release leases
        self._lock = threading.RLock()
        self._loads: dict[AdapterKey, _Load] = {}
        self._pinned: set[str] = set()
        self._listeners: list[Callable[[str], None]] = []
        self._executor = ThreadPoolExecutor(load_workers, thread_name_prefix="adapter-load",
                                            initializer=worker_init)
        # finds unregistered adapters in sources on first request (adapters_registry/resolver.py)
        self.resolver = None
        self.loads = 0
        self.load_failures = 0
        self.merges = 0  # mixtures merged into host RAM
        # Called with the seconds each successful store -> RAM load took (metrics).
        self.load_observer: Callable[[float], None] | None = None

    # ---- registration (blocking: store writes fsync) ----------------------------------------

    def register(self, name: str, config: bytes, weights: bytes, *,
                 expected_sha256: str | None = None, version: int | None = None
                 ) -> AdapterRecord:
        """Validates an adapter's two files and stores them as `name`'s new current version.

        Identical content to the current version is a no-op that returns the current record
        (unless an explicit `version` asks for a new one). Raises AdapterFormatError (nothing
        stored) or a StoreError (e.g. InvalidContentError for a version not above the stored).
        """
        parse_peft_adapter(name, config, weights, self.spec, max_rank=self.max_rank,
                           expected_sha256=expected_sha256, max_bytes=self.max_adapter_bytes)
        if name in self.store and version is None:
            current = self.store.versions(name)[-1]
            if (current.error is None and current.config_sha256 == _sha256(config)
                    and current.weights_sha256 == _sha256(weights)):
                return current
        record = self.store.put(name, config, weights, version=version)
        log.info("adapter %s: version %d registered (%d bytes)", name, record.version,
                 record.weights_size)
        self._changed(name)
        return record

    def register_source(self, name: str, source: str) -> AdapterRecord:
        """Fetches an adapter from a local directory under the allowed roots or from s3:// and
        registers it."""
        from adapters_registry.sources import fetch_adapter

        files = fetch_adapter(source, name=name, allowed_roots=self.allowed_roots,
                              max_bytes=self.max_adapter_bytes)
        return self.register(name, files.config, files.weights)

    def delete(self, name: str) -> None:
        """New requests get UnknownAdapterError at once; running ones finish on their lease."""
        self.store.delete(name)
        log.info("adapter %s: deleted", name)
        with self._lock:
            self._pinned.discard(name)
        self._changed(name)

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(name)` is called after `name` is replaced or deleted."""
        self._listeners.append(listener)

    def _changed(self, name: str) -> None:
        """Retires every cached version of `name` that is no longer current, tells listeners."""
        current = self.current_key(name)
        with self._lock:
            for key in [k for k in self.cache.snapshot() if k.is_stale(name, current)]:
                self.cache.retire(key)
            repin = name in self._pinned and current is not None
        if repin:
            self._request(current, pin=True)  # a pinned adapter's new version is loaded now
        for listener in self._listeners:
            listener(name)

    # ---- serving ---------------------------------------------------------------------------

    def current_key(self, name: str) -> AdapterKey | None:
        try:
            return adapter_key(self.store.get(name))
        except StoreError:
            return None

    def acquire(self, name: str) -> Future:
        """Future[AdapterLease] of `name`'s current version; resolves at once when it is in RAM.

        Raises UnknownAdapterError (or InvalidNameError) now; the future fails with
        AdapterLoadError if the load does. Pair every lease with one `release`.
        """
        key = adapter_key(self._servable(name))
        return self._request(key, pin=False)

    def acquire_mixture(self, mix: AdapterMix, max_slots: int | None = None) -> Future:
        """Future[AdapterLease] of a weighted mixture of the adapters' current versions
        (adapters_registry/mixtures.py).

        `cat`: a lease whose parts are leases on the components, loaded as by `acquire`. The
        merged types: a lease on the merged adapter, built on a load worker the first time and
        then kept in host RAM under its `mixture_key` like any adapter version (its bytes count
        against the cache; it is evicted when idle, retired when a component changes).
        Raises MixtureError or UnknownAdapterError now; the future fails with MixtureError when
        the components cannot be combined. Pair the lease with one `release`.
        """
        mix.validate(max_slots)
        parts = tuple(adapter_key(self._servable(name)) for name in mix.adapters)
        if mix.effective == "cat":
            futures = []
            try:
                for name in mix.adapters:
                    futures.append(self.acquire(name))
            except Exception:  # deleted since: the leases already asked for go back
                for future in futures:
                    future.add_done_callback(self._release_granted)
                raise
            return self._cat_lease(mix, futures)
        key = mixture_key(mix, parts)
        return self._request(key, pin=False, read=lambda: self._merge(mix, key))

    def release(self, lease: AdapterLease) -> None:
        with self._lock:
            for part, _ in lease.slot_uses():
                self.cache.release(part.key)

    def _release_granted(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self.release(future.result())

    def _cat_lease(self, mix: AdapterMix, futures: list[Future]) -> Future:
        """One future for the components' leases: their cat lease once all are granted; the
        first failure (or a refusal of the components) releases those granted."""
        combined: Future = Future()
        pending = [len(futures)]
        lock = threading.Lock()

        def done(_) -> None:
            with lock:
                pending[0] -= 1
                if pending[0]:
                    return
            leases = [f.result() for f in futures if f.exception() is None]
            errors = [f.exception() for f in futures if f.exception() is not None]
            try:
                if errors:
                    raise errors[0]
                parts = [lease.weights for lease in leases]
                check_mixable(mix, parts)
                key = mixture_key(mix, tuple(lease.key for lease in leases))
                lease = AdapterLease(key, None, tuple(zip(leases, cat_weights(mix, parts))))
            except Exception as exc:
                for granted in leases:
                    self.release(granted)
                if combined.set_running_or_notify_cancel():
                    combined.set_exception(exc)
                return
            if combined.set_running_or_notify_cancel():
                combined.set_result(lease)
            else:
                self.release(lease)  # the caller left meanwhile

        for future in futures:
            future.add_done_callback(done)
        return combined

    def _merge(self, mix: AdapterMix, key: AdapterKey) -> LoraWeights:
        """The merged adapter of `key`'s component versions (on a load worker): components in
        host RAM are used in place (held meanwhile), the others read from the store."""
        held, parts = [], []
        try:
            for part in key.parts:
                with self._lock:
                    resident = self.cache.lookup(part) is not None
                    if resident:
                        parts.append(self.cache.acquire(part))
                        held.append(part)
                if not resident:
                    parts.append(self._read(part))
            check_mixable(mix, parts, self.max_rank)
            start = time.perf_counter()
            merged = merge(mix, parts, key.name)
        finally:
            with self._lock:
                for part in held:
                    self.cache.release(part)
        self.merges += 1
        log.info("mixture %s merged in %.1f ms (%.1f MiB)", key.name,
                 (time.perf_counter() - start) * 1e3, merged.nbytes / 2**20)
        return merged

    def pin(self, name: str) -> Future:
        """Keeps `name` resident in host RAM (loading it now); Future[AdapterKey]."""
        key = adapter_key(self._servable(name))
        with self._lock:
            self._pinned.add(name)
        return self._request(key, pin=True)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._pinned.discard(name)
            for key in self.cache.snapshot():
                if key.name == name:
                    self.cache.unpin(key)

    def is_pinned(self, name: str) -> bool:
        with self._lock:
            return name in self._pinned

    def status(self, name: str) -> AdapterStatus:
        """The current version's record and where it stands in the host-RAM tier."""
        record = self.store.versions(name)[-1]  # raises UnknownAdapterError; shows corrupt ones
        key = adapter_key(record)
        with self._lock:
            state = self.cache.snapshot().get(key)
            return AdapterStatus(record=record, pinned=name in self._pinned,
                                 in_host_memory=state is not None,
                                 running_requests=state.refs if state else 0)

    def resident(self) -> dict[AdapterKey, EntryState]:
        """The host-RAM tier: every cached version and its state, least recently used first."""
        with self._lock:
            return self.cache.snapshot()

    def close(self) -> None:
        if self.resolver is not None:
            self.resolver.close()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _servable(self, name: str) -> AdapterRecord:
        try:
            return self.store.get(name)
        except UnknownAdapterError:
            raise UnknownAdapterError(f"adapter {name!r} is not registered") from None
        except AdapterCorruptError as exc:  # found corrupt by an earlier load
            raise AdapterLoadError(str(exc)) from None

    def _request(self, key: AdapterKey, *, pin: bool,
                 read: Callable[[], LoraWeights] | None = None) -> Future:
        future: Future = Future()
        with self._lock:
            # A deleted version that is re-registered with the same content has the same key and
            # may still be resident, retired, under a running request: it is current again.
            self.cache.revive(key)
            if self.cache.lookup(key) is not None:
                self._grant(key, future, pin)
                return future
            load = self._loads.get(key)
            if load is None:
                load = self._loads[key] = _Load(key, read)
                self._executor.submit(self._run_load, load)
            (load.pins if pin else load.leases).append(future)
        return future

    def _grant(self, key: AdapterKey, future: Future, pin: bool) -> None:
        """Hands a resident entry to one waiter (under the lock); skips cancelled waiters."""
        if not future.set_running_or_notify_cancel():
            return
        if pin:
            if key.name in self._pinned:
                self.cache.pin(key)
            future.set_result(key)
        else:
            future.set_result(AdapterLease(key, self.cache.acquire(key)))

    # ---- the worker thread -----------------------------------------------------------------

    def _run_load(self, load: _Load) -> None:
        key = load.key
        start = time.perf_counter()
        try:
            weights = load.read() if load.read is not None else self._read(key)
            with self._lock:
                evicted = self.cache.insert(key, weights)
                self._loads.pop(key)
                for future in load.leases:
                    self._grant(key, future, pin=False)
                for future in load.pins:
                    self._grant(key, future, pin=True)
                if not self._is_current(key):  # replaced or deleted while loading
                    self.cache.retire(key)
        except Exception as exc:
            error = _load_error(key, exc)
            refused = isinstance(error, MixtureError)  # the request's fault, not the load's
            with self._lock:
                self._loads.pop(key, None)
                self.load_failures += not refused
                for future in load.leases + load.pins:
                    if future.set_running_or_notify_cancel():
                        future.set_exception(error)
            if not refused:
                log.warning("%s", error)
            return
        elapsed = time.perf_counter() - start
        if key.parts:  # a merge: logged by _merge
            return
        self.loads += 1
        if self.load_observer is not None:
            self.load_observer(elapsed)
        log.info("adapter %s: version %d loaded into host RAM in %.1f ms (%.1f MiB)%s", key.name,
                 key.version, elapsed * 1e3, weights.nbytes / 2**20,
                 f", evicted {', '.join(k.name for k in evicted)}" if evicted else "")

    def _is_current(self, key: AdapterKey) -> bool:
        """Whether `key` is its adapter's current version (a mixture: all its components are)."""
        if key.parts:
            return all(self._is_current(part) for part in key.parts)
        return self.current_key(key.name) == key

    def _read(self, key: AdapterKey) -> LoraWeights:
        """Store -> validated weights; the store verifies every blob's sha256 on read."""
        return self.store.open_files(key.name, key.version, then=lambda config, weights:
                                     parse_peft_adapter(key.name, config, weights, self.spec,
                                                        max_rank=self.max_rank))


def _load_error(key: AdapterKey, exc: Exception) -> Exception:
    """The error every waiter of a failed load gets: what failed, for which version, and why."""
    if isinstance(exc, UnknownAdapterError):  # deleted while the load was queued
        if key.parts:
            return exc
        return UnknownAdapterError(f"adapter {key.name!r} is not registered")
    if isinstance(exc, MixtureError):
        return exc
    what = f"adapter {key.name!r} version {key.version} cannot be loaded"
    if isinstance(exc, CacheFullError):
        return AdapterCacheFullError(f"{what}: {exc}")
    if isinstance(exc, AdapterFormatError):  # stored under another base model or --max-rank
        return AdapterLoadError(f"{what}: it does not fit the served model: {exc.reason} "
                                f"({exc.file}{', ' + exc.tensor if exc.tensor else ''})")
    return AdapterLoadError(f"{what}: {exc}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

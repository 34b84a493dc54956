"""Resolve on first request: an adapter nobody registered on this replica, found in a source.

A request naming an unknown adapter asks the resolver, which looks for `<uri>/<name>/` in each
`--adapter-resolver` URI in order (s3://bucket/prefix, or a directory under
--adapter-source-roots; an `org/name` id is `<uri>/org/name/`). The first that holds the
adapter's files is fetched, validated and stored, then the request is served like any other.
One lookup runs per name at a time (single flight: every request for it waits on that one),
on the resolver's own threads, while other requests keep flowing. A name found nowhere is
remembered as absent for `negative_ttl` seconds: its requests get NOT_FOUND at once, without
asking the sources again. A source that holds a bad adapter answers FAILED_PRECONDITION with
the reason (and is asked again next time: someone may be fixing it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

from adapters_registry.peft_format import AdapterFormatError
from adapters_registry.sources import SourceUnavailableError, holds_adapter
from adapters_registry.store import UnknownAdapterError

log = logging.getLogger(__name__)
OUTCOMES = ("resolved", "absent", "absent_cached", "failed")


class AdapterResolveError(RuntimeError):
    """A source holds the adapter, but it cannot be served (its reason follows)."""


class AdapterResolver:
    def __init__(self, registry, uris: list[str], *, negative_ttl: float = 10.0,
                 workers: int = 2, clock=time.monotonic):
        """`registry`: the AdapterRegistry that stores what is found (its source roots, size
        limit and validation apply)."""
        self.registry = registry
        self.uris = [uri.rstrip("/") for uri in uris]
        self.negative_ttl = negative_ttl
        self.counts: Counter[str] = Counter()  # by outcome (OUTCOMES)
        self._clock = clock
        self._absent_until: dict[str, float] = {}
        self._in_flight: dict[str, Future] = {}
        # Reentrant: a lookup that ends before its done-callback is added runs that callback
        # at once, on the thread that holds the lock in `resolve`.
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="adapter-resolve")

    def resolve(self, name: str) -> Future:
        """Future[None]: done once `name` is registered; fails with UnknownAdapterError (found
        nowhere), AdapterResolveError (a source holds a bad adapter) or
        SourceUnavailableError (a source could not be asked)."""
        with self._lock:
            if self._absent_until.get(name, 0.0) > self._clock():
                self.counts["absent_cached"] += 1
                raise self._absent(name)
            future = self._in_flight.get(name)
            if future is None:
                future = self._in_flight[name] = self._executor.submit(self._find, name)
                future.add_done_callback(lambda _: self._done(name))
            return future

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _done(self, name: str) -> None:
        with self._lock:
            self._in_flight.pop(name, None)

    def _find(self, name: str) -> None:
        if name in self.registry.store:  # registered meanwhile (by a request, or an admin)
            return
        for uri in self.uris:
            source = f"{uri}/{name}"
            try:
                if not holds_adapter(source, name=name):
                    continue
                self.registry.register_source(name, source)
            except SourceUnavailableError:
                self._count("failed")
                raise
            except AdapterFormatError as exc:
                self._count("failed")
                raise AdapterResolveError(f"adapter {name!r} found at {source} cannot be "
                                          f"served: {exc}") from None
            self._count("resolved")
            log.info("adapter %r resolved from %s", name, source)
            return
        with self._lock:
            self._absent_until[name] = self._clock() + self.negative_ttl
            self.counts["absent"] += 1
        raise self._absent(name)

    def _count(self, outcome: str) -> None:
        with self._lock:  # the lookups run on several threads
            self.counts[outcome] += 1

    def _absent(self, name: str) -> UnknownAdapterError:
        return UnknownAdapterError(f"adapter {name!r} is not registered and no "
                                   f"--adapter-resolver source holds it (looked in "
                                   f"{', '.join(self.uris)}; asked again after "
                                   f"{self.negative_ttl:g} s)")

"""An adapter store in RAM, for an engine that needs no durable store (tests, `loraplex generate`).

It keeps the interface the registry uses of `AdapterStore` (put, get, versions, delete,
open_files, read_config, list, total_bytes), so an `AdapterRegistry` over it serves adapters
exactly as the server does: leases, the host cache, replace and delete. Nothing survives the
process, so there is nothing to recover and nothing can be corrupt.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from adapters_registry.store import (AdapterRecord, InvalidContentError, UnknownAdapterError,
                                     check_name, next_version)

T = TypeVar("T")


class MemoryStore:
    def __init__(self, *, keep_versions: int = 1):
        self.root = "(memory)"
        self.keep_versions = keep_versions
        self._lock = threading.Lock()
        self._versions: dict[str, list[AdapterRecord]] = {}  # oldest first; the last is current
        self._files: dict[tuple[str, int], tuple[bytes, bytes]] = {}

    def put(self, name: str, config_bytes: bytes, weights_bytes: bytes, *,
            version: int | None = None) -> AdapterRecord:
        check_name(name)
        for what, data in (("adapter_config.json", config_bytes),
                           ("adapter_model.safetensors", weights_bytes)):
            if len(data) == 0:
                raise InvalidContentError(f"adapter {name!r}: {what} is empty")
        with self._lock:
            old = self._versions.get(name, [])
            version = next_version(name, old[-1].version if old else 0, version)
            record = AdapterRecord(name, version, _sha256(config_bytes), _sha256(weights_bytes),
                                   len(config_bytes), len(weights_bytes), round(time.time(), 3),
                                   None, None)
            kept = [*old, record][-(self.keep_versions + 1):]
            for dropped in old[:len(old) + 1 - len(kept)]:
                del self._files[(name, dropped.version)]
            self._versions[name] = kept
            self._files[(name, version)] = (bytes(config_bytes), bytes(weights_bytes))
            return record

    def delete(self, name: str) -> None:
        with self._lock:
            for record in self._entry(name):
                del self._files[(name, record.version)]
            del self._versions[name]

    def get(self, name: str, version: int | None = None) -> AdapterRecord:
        with self._lock:
            return self._record(name, version)

    def versions(self, name: str) -> list[AdapterRecord]:
        with self._lock:
            return list(self._entry(name))

    def open_files(self, name: str, version: int | None = None, *,
                   then: Callable[[bytearray, bytearray], T] | None = None):
        """(config bytes, weights bytes), in writable copies (parsers may keep views into them);
        with `then`, returns then(config, weights)."""
        with self._lock:
            record = self._record(name, version)
            config, weights = self._files[(name, record.version)]
        config, weights = bytearray(config), bytearray(weights)
        return then(config, weights) if then is not None else (config, weights)

    def read_config(self, name: str, version: int | None = None) -> bytes:
        with self._lock:
            return self._files[(name, self._record(name, version).version)][0]

    def list(self) -> list[AdapterRecord]:
        with self._lock:
            return [versions[-1] for _, versions in sorted(self._versions.items())]

    def total_bytes(self) -> int:
        with self._lock:
            return sum(len(c) + len(w) for c, w in self._files.values())

    def close(self) -> None:
        pass

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._versions

    def __len__(self) -> int:
        with self._lock:
            return len(self._versions)

    def _entry(self, name: str) -> list[AdapterRecord]:
        check_name(name)
        versions = self._versions.get(name)
        if versions is None:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        return versions

    def _record(self, name: str, version: int | None) -> AdapterRecord:
        versions = self._entry(name)
        if version is None:
            return versions[-1]
        for record in versions:
            if record.version == version:
                return record
        raise UnknownAdapterError(f"adapter {name!r} has no version {version!r} "
                                  f"(stored: {[r.version for r in versions]})")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

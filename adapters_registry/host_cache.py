"""The host-RAM tier: validated adapter weights, an LRU bounded in bytes.

Each entry is one version of one adapter (`AdapterKey`). An entry is

    in use   refs > 0: running requests hold a lease on it; never evicted
    pinned   kept resident by an operator; never evicted
    idle     neither; evicted in least-recently-used order when space is needed
    retired  its adapter was deleted or replaced: no new lease; freed when the last one ends

`HostCache` is a plain data structure, not thread-safe: the registry calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from adapters_registry.weights import LoraWeights


@dataclass(frozen=True)
class AdapterKey:
    """One servable version of one adapter.

    `digest` comes from the content's sha256s: the store restarts version numbers after a delete,
    so (name, version) alone could name two different contents over a server's life.
    """

    name: str
    version: int
    digest: str
    parts: tuple[AdapterKey, ...] = ()  # a mixture's components (adapters_registry/mixtures.py)

    def is_stale(self, name: str, current: AdapterKey | None) -> bool:
        """Whether adapter `name` being replaced or deleted (its current version is `current`,
        None once deleted) makes this version stale: it is another version of `name`, or a
        mixture of one."""
        if self.name == name and self != current:
            return True
        return any(part.is_stale(name, current) for part in self.parts)


@dataclass(frozen=True)
class AdapterLease:
    """Weights a running request holds; the registry frees them after `release(lease)`.

    A `cat` mixture's lease holds no weights of its own: `parts` are its components' leases, each
    with the weight its update gets (adapters_registry/mixtures.py)."""

    key: AdapterKey
    weights: LoraWeights | None
    parts: tuple[tuple[AdapterLease, float], ...] = ()

    def slot_uses(self) -> tuple[tuple[AdapterLease, float], ...]:
        """The adapter versions this lease's tokens run through, each with its weight."""
        return self.parts or ((self, 1.0),)


class CacheFullError(RuntimeError):
    """Everything resident is in use or pinned: the new adapter does not fit the byte budget."""


@dataclass
class EntryState:
    """What tests and the admin API see of one entry."""

    nbytes: int
    refs: int = 0
    pinned: bool = False
    retired: bool = False


class HostCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._weights: dict[AdapterKey, LoraWeights] = {}
        self._state: OrderedDict[AdapterKey, EntryState] = OrderedDict()  # LRU first
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, key: AdapterKey) -> bool:
        return key in self._state

    def lookup(self, key: AdapterKey) -> LoraWeights | None:
        """The weights if resident and not retired (a hit makes them most recently used)."""
        state = self._state.get(key)
        if state is None or state.retired:
            self.misses += 1
            return None
        self.hits += 1
        self._state.move_to_end(key)
        return self._weights[key]

    def insert(self, key: AdapterKey, weights: LoraWeights) -> list[AdapterKey]:
        """Adds an entry, evicting idle ones (LRU first) to fit; returns the evicted keys.

        Raises CacheFullError, changing nothing, when in-use and pinned entries leave no room.
        """
        assert key not in self._state, f"{key} is already cached"
        nbytes = weights.nbytes
        victims = self._victims(nbytes)
        for victim in victims:
            self._drop(victim)
        self.evictions += len(victims)
        self._weights[key] = weights
        self._state[key] = EntryState(nbytes=nbytes)
        self.used_bytes += nbytes
        return victims

    def acquire(self, key: AdapterKey) -> LoraWeights:
        state = self._state[key]
        assert not state.retired, f"{key} is retired"
        state.refs += 1
        self._state.move_to_end(key)
        return self._weights[key]

    def release(self, key: AdapterKey) -> None:
        state = self._state[key]
        assert state.refs > 0, f"{key} released more often than acquired"
        state.refs -= 1
        if state.refs == 0 and state.retired:
            self._drop(key)

    def pin(self, key: AdapterKey) -> None:
        self._state[key].pinned = True

    def unpin(self, key: AdapterKey) -> None:
        state = self._state.get(key)
        if state is not None:
            state.pinned = False

    def retire(self, key: AdapterKey) -> None:
        """No new leases; freed now if unused, else when its last lease is released."""
        state = self._state.get(key)
        if state is None:
            return
        state.retired, state.pinned = True, False
        if state.refs == 0:
            self._drop(key)

    def revive(self, key: AdapterKey) -> None:
        """Takes back a retirement whose entry is still held (its content became current again)."""
        state = self._state.get(key)
        if state is not None:
            state.retired = False

    def snapshot(self) -> dict[AdapterKey, EntryState]:
        """A copy of every entry's state, least recently used first."""
        return {key: EntryState(**vars(state)) for key, state in self._state.items()}

    def _victims(self, nbytes: int) -> list[AdapterKey]:
        need = self.used_bytes + nbytes - self.max_bytes
        victims = []
        for key, state in self._state.items():
            if need <= 0:
                break
            if state.refs == 0 and not state.pinned:
                victims.append(key)
                need -= state.nbytes
        if need > 0:
            held = sum(s.nbytes for s in self._state.values() if s.refs or s.pinned)
            raise CacheFullError(
                f"an adapter of {_mib(nbytes)} does not fit the host adapter cache of "
                f"{_mib(self.max_bytes)}: {_mib(held)} are held by running requests or pins")
        return victims

    def _drop(self, key: AdapterKey) -> None:
        state = self._state.pop(key)
        del self._weights[key]
        self.used_bytes -= state.nbytes


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"

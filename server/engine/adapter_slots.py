"""The device slot table: which adapter version sits in which slot, who uses it, what to evict.

A small explicit state machine. A slot is FREE (never loaded or cleared), BUSY (an adapter
version with refs > 0: running sequences use it) or IDLE (loaded, refs == 0, evictable in LRU
order). Slots are keyed by the registry's `AdapterKey` (name, version, content digest), so a replaced
adapter's old version keeps serving the sequences that started on it while new sequences get the
new version in another slot. `acquire` takes the request's `AdapterLease`, which carries the
weights to write when the version is not in a slot yet.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from adapters_registry.host_cache import AdapterKey, AdapterLease

class AdapterSlots:
    def __init__(self, max_slots: int, load: Callable[[int, AdapterLease], None],
                 clear: Callable[[int], None]):
        """`load(slot, lease)` writes an adapter version into a slot, replacing all it held;
        `clear(slot)` zeroes it."""
        self.max_slots = max_slots
        self._load = load
        self._clear = clear
        self.slot_of: dict[AdapterKey, int] = {}
        self.refs = [0] * max_slots
        self._free = list(range(max_slots - 1, -1, -1))  # pop() hands out low slots first
        self._idle: OrderedDict[AdapterKey, int] = OrderedDict()  # least recently used first
        self._retired: set[AdapterKey] = set()  # replaced or deleted, still busy
        self.loads = 0  # = misses: acquires that had to write a slot
        self.hits = 0  # acquires that found their version already in a slot
        self.evictions = 0
        # Called with the seconds each slot write took (metrics); None = nobody listens.
        self.write_observer: Callable[[float], None] | None = None

    def acquire(self, lease: AdapterLease) -> int | None:
        """Slot holding the lease's version with one more reference; loads it if needed.

        None: every slot is busy with other adapters.
        """
        key = lease.key
        slot = self.slot_of.get(key)
        if slot is None:
            slot = self._take_slot()
            if slot is None:
                return None
            start = time.perf_counter()
            try:
                self._load(slot, lease)
            except BaseException:
                self._clear(slot)  # a partial write: the slot goes back empty
                self._free.append(slot)
                raise
            if self.write_observer is not None:
                self.write_observer(time.perf_counter() - start)
            self.loads += 1
            self.slot_of[key] = slot
        else:
            self.hits += 1
        self._idle.pop(key, None)
        self._retired.discard(key)  # only current versions are acquired (re-registered content)
        self.refs[slot] += 1
        return slot

    def release(self, key: AdapterKey) -> None:
        slot = self.slot_of[key]
        self.refs[slot] -= 1
        assert self.refs[slot] >= 0, f"slot {slot} released more often than acquired"
        if self.refs[slot] == 0:
            if key in self._retired:
                self._retired.discard(key)
                self._drop(key)
            else:
                self._idle[key] = slot

    def retire(self, key: AdapterKey) -> None:
        """The version was replaced or deleted: no new user; its slot frees when unused."""
        slot = self.slot_of.get(key)
        if slot is None:
            return
        if self.refs[slot] == 0:
            self._drop(key)
        else:
            self._retired.add(key)

    def retire_stale(self, name: str, current: AdapterKey | None) -> None:
        """Retires every version of adapter `name` other than `current` (None: all of them)."""
        for key in [k for k in self.slot_of if k.name == name and k != current]:
            self.retire(key)

    def free_slots(self) -> int:
        return len(self._free) + len(self._idle)

    def _take_slot(self) -> int | None:
        """A slot to write: a free one, else the least recently used idle one, evicted without
        clearing (`load` replaces everything a slot holds; zeroing it first added ~70 % to the cost
        of a write, paid on the engine's step)."""
        if self._free:
            return self._free.pop()
        if self._idle:
            key, slot = self._idle.popitem(last=False)
            del self.slot_of[key]
            self.evictions += 1
            return slot
        return None

    def _drop(self, key: AdapterKey) -> None:
        """Removes `key` from its slot, which is cleared and goes back to the free list."""
        slot = self.slot_of.pop(key)
        self._idle.pop(key, None)
        self._clear(slot)
        self._free.append(slot)

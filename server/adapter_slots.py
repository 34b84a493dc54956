"""The device slot table: which adapter version sits in which slot, who uses it, what to evict.

A small explicit state machine. A slot is FREE (never loaded or cleared), BUSY (an adapter
version with refs > 0: running sequences use it) or IDLE (loaded, refs == 0, evictable in LRU
order). Adapters are keyed by `AdapterKey` (id plus a version number that changes on every
replace), so a replaced adapter's old version keeps serving the sequences that started on it
while new sequences get the new version in another slot.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class AdapterKey:
    adapter_id: str
    version: int


class AdapterSlots:
    def __init__(self, max_slots: int, load: Callable[[int, AdapterKey], None],
                 clear: Callable[[int], None]):
        """`load(slot, key)` writes an adapter version into a slot; `clear(slot)` zeroes it."""
        self.max_slots = max_slots
        self._load = load
        self._clear = clear
        self.slot_of: dict[AdapterKey, int] = {}
        self.refs = [0] * max_slots
        self._free = list(range(max_slots - 1, -1, -1))  # pop() hands out low slots first
        self._idle: OrderedDict[AdapterKey, int] = OrderedDict()  # least recently used first
        self._retired: set[AdapterKey] = set()  # replaced or deleted, still busy
        self.loads = 0
        self.evictions = 0

    def acquire(self, key: AdapterKey) -> int | None:
        """Slot holding `key` with one more reference; loads it if needed. None: all slots busy."""
        slot = self.slot_of.get(key)
        if slot is None:
            slot = self._take_slot()
            if slot is None:
                return None
            self._load(slot, key)
            self.loads += 1
            self.slot_of[key] = slot
        self._idle.pop(key, None)
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

    def free_slots(self) -> int:
        return len(self._free) + len(self._idle)

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        if self._idle:
            key = next(iter(self._idle))
            self.evictions += 1
            return self._drop(key, keep=True)
        return None

    def _drop(self, key: AdapterKey, keep: bool = False) -> int:
        """Removes `key` from its slot; the slot goes back to the free list unless `keep`."""
        slot = self.slot_of.pop(key)
        self._idle.pop(key, None)
        self._clear(slot)
        if not keep:
            self._free.append(slot)
        return slot

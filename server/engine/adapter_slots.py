"""The device slot table: which adapter version sits in which slot, who uses it, what to evict.

A small explicit state machine, bookkeeping only: the engine writes the weights (server/engine/
core.py, at admission). A slot is FREE (never used or dropped), BUSY (an adapter version with
refs > 0: running sequences use it) or IDLE (holds a version, refs == 0, evictable in LRU
order). Slots are keyed by the registry's `AdapterKey` (name, version, content digest), so a
replaced adapter's old version keeps serving the sequences that started on it while new sequences
get the new version in another slot.

A freed or evicted slot is never cleared: the next write into it replaces everything it held.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from adapters_registry.host_cache import AdapterKey


@dataclass(frozen=True)
class Placement:
    slot: int
    needs_write: bool  # the version is not in the slot yet: the engine writes it before the step


class AdapterSlots:
    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self.slot_of: dict[AdapterKey, int] = {}
        self.refs = [0] * max_slots
        self._free = list(range(max_slots - 1, -1, -1))  # pop() hands out low slots first
        self._idle: OrderedDict[AdapterKey, int] = OrderedDict()  # least recently used first
        self._retired: set[AdapterKey] = set()  # replaced, deleted or failed to write; still busy
        self.loads = 0  # = misses: acquires that need a slot write
        self.hits = 0  # acquires that found their version already in a slot
        self.evictions = 0

    def can_place(self, key: AdapterKey) -> bool:
        """Whether `acquire(key)` would succeed now."""
        return self.can_place_all([key])

    def can_place_all(self, keys: list[AdapterKey]) -> bool:
        """Whether acquiring every one of `keys` (distinct) would succeed now: those not in a
        slot need free or idle slots other than the idle ones holding the rest."""
        missing = sum(key not in self.slot_of for key in keys)
        idle_own = sum(key in self._idle for key in keys)
        return missing <= self.free_slots() - idle_own

    def acquire(self, key: AdapterKey) -> Placement | None:
        """The slot for `key` with one more reference; None: every slot is busy with others."""
        slot = self.slot_of.get(key)
        needs_write = slot is None
        if needs_write:
            slot = self._take_slot()
            if slot is None:
                return None
            self.loads += 1
            self.slot_of[key] = slot
        else:
            self.hits += 1
        self._idle.pop(key, None)
        self._retired.discard(key)  # only current versions are acquired (re-registered content)
        self.refs[slot] += 1
        return Placement(slot, needs_write)

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
        """The version was replaced or deleted, or its write failed: no new user; its slot frees
        when unused."""
        slot = self.slot_of.get(key)
        if slot is None:
            return
        if self.refs[slot] == 0:
            self._drop(key)
        else:
            self._retired.add(key)

    def retire_stale(self, name: str, current: AdapterKey | None) -> None:
        """Retires every version of adapter `name` other than `current` (None: all of them),
        and every mixture of such a version."""
        for key in [k for k in self.slot_of if k.is_stale(name, current)]:
            self.retire(key)

    def free_slots(self) -> int:
        return len(self._free) + len(self._idle)

    def _take_slot(self) -> int | None:
        """A slot to write: a free one, else the least recently used idle one (evicted)."""
        if self._free:
            return self._free.pop()
        if self._idle:
            key, slot = self._idle.popitem(last=False)
            del self.slot_of[key]
            self.evictions += 1
            return slot
        return None

    def _drop(self, key: AdapterKey) -> None:
        slot = self.slot_of.pop(key)
        self._idle.pop(key, None)
        self._free.append(slot)

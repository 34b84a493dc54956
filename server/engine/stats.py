"""What the engine looks like between two steps, published for the other threads.

The loop thread builds an `EngineStats` after every step (and after applying commands) and
publishes it by replacing one attribute; metrics and the admin API read that snapshot and never
touch the scheduler, the KV cache or the slot table, which the loop thread changes meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences in the running batch
    waiting: int  # sequences waiting for a place in it
    kv_blocks: int
    kv_blocks_free: int  # free, or cached for prefixes with no running sequence using them
    kv_blocks_cached: int  # of those, cached
    slots_in_use: int  # adapter versions held in device slots (busy or idle)
    slot_adapters: frozenset[tuple[str, int]]  # (name, version) of each of them
    slot_loads: int  # slot writes so far (= slot misses)
    slot_hits: int  # admissions that found their version in a slot
    slot_evictions: int
    running_by_adapter: dict[str, int]  # running sequences per adapter ("" = the base model)
    waiting_by_adapter: dict[str, int]
    preemptions: int
    prefix_queried_tokens: int  # tokens of admitted sequences looked up in the prefix cache
    prefix_hit_tokens: int  # of which found there
    prefix_evictions: int  # cached blocks reclaimed for new content
    steps: int  # model steps run so far
    generated_tokens: int  # tokens sampled so far, over all requests

    @property
    def kv_usage(self) -> float:
        """Fraction of KV-cache blocks in use, 0-1."""
        return 1 - self.kv_blocks_free / self.kv_blocks

    @property
    def running_adapters(self) -> tuple[str, ...]:
        """Names of the adapters of running sequences, sorted."""
        return tuple(sorted(name for name in self.running_by_adapter if name))

    @property
    def waiting_adapters(self) -> tuple[str, ...]:
        return tuple(sorted(name for name in self.waiting_by_adapter if name))

    @staticmethod
    def of(scheduler, kv, slots, *, steps: int, generated_tokens: int) -> EngineStats:
        """The snapshot of a scheduler, its KV cache and its slot table (on their thread)."""
        return EngineStats(
            running=len(scheduler.running), waiting=len(scheduler.waiting),
            kv_blocks=kv.num_blocks, kv_blocks_free=kv.allocator.num_free,
            kv_blocks_cached=kv.allocator.num_cached,
            slots_in_use=len(slots.slot_of),
            slot_adapters=frozenset((key.name, key.version) for key in slots.slot_of),
            slot_loads=slots.loads, slot_hits=slots.hits,
            slot_evictions=slots.evictions, running_by_adapter=dict(scheduler.running_counts),
            waiting_by_adapter=dict(scheduler.waiting.counts),
            preemptions=scheduler.preemptions,
            prefix_queried_tokens=scheduler.prefix_queried_tokens,
            prefix_hit_tokens=scheduler.prefix_hit_tokens,
            prefix_evictions=kv.allocator.evictions, steps=steps, generated_tokens=generated_tokens)

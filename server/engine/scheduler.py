"""Continuous (iteration-level) batching: which sequences run in the next step, and how much.

Each step the scheduler first gives every running sequence its tokens (one for decode, a chunk
for a prompt still being prefilled), growing its KV blocks; when blocks run out it preempts the
most recently admitted sequence (its blocks are freed and it is recomputed later). Then it admits
waiting sequences in the order the admission policy offers them (server/engine/admission.py: fair
across adapters, or first come first served) while the step's token budget, the batch size, the
free KV blocks and the adapter slots allow (a `cat` mixture of adapters needs a slot for each
of its components at once; other mixtures are one merged adapter). A sequence whose adapter
cannot get a slot, whose
adapter is at --max-running-per-adapter, or whose slot write would exceed the step's budget of
slot-write bytes (--max-slot-write-mb-per-step; the first write of a step always fits) is skipped
for this step; one that does not fit the free KV blocks stops admission (memory is first come,
first served). A request that does not fit waits; it never fails the batch.

With the prefix cache (server/engine/kv_cache.py) an admitted sequence first takes the cached
blocks its tokens start with, under its adapter version, and computes only the rest (at least
its last token, whose logits it needs); after each step the blocks its computed tokens filled
are offered to the cache. Preemption frees a sequence's blocks like any other: those that are
full stay cached, so its recompute usually finds them again.

The scheduler only decides: it places admitted sequences in adapter slots (bookkeeping), and the
engine writes the adapter versions new to their slot before running the step.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from dataclasses import dataclass, field


from adapters_registry.host_cache import AdapterLease
from server.engine.adapter_slots import AdapterSlots
from adapters_registry.mixtures import AdapterMix
from server.engine.admission import FcfsQueue, WaitingQueue, tenant_of
from server.engine.kv_cache import KVCache, block_hashes
from server.engine.sampler import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterLease | None  # None = base model; a mixture's lease for a mixture
    seed: int | None  # the sampling seed of a non-greedy sequence (server/engine/sampler.py)
    mixture: AdapterMix | None = None  # what the request asked for, when a mixture
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    # while running: (slot, weight) of each of adapter.slot_uses(); none = base model
    slots: list[tuple[int, float]] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    preemptions: int = 0
    cached_tokens: int | None = None  # prompt tokens the prefix cache held at first admission
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks so far
    registered_blocks: int = 0  # leading blocks of block_table offered to the prefix cache
    matcher: object | None = None  # structured output: the grammar's state over output_ids
    prompt_logprobs: list = field(default_factory=list)  # of prompt positions 1.., when asked

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed on
    # admitted into slots that do not hold these adapter versions yet: (slot, lease) to write
    writes: list[tuple[int, AdapterLease]] = field(default_factory=list)

    @property
    def writes_slot(self) -> bool:
        return bool(self.writes)


class Scheduler:
    def __init__(self, kv: KVCache, slots: AdapterSlots, *, max_batch_size: int,
                 max_step_tokens: int, waiting: WaitingQueue | None = None,
                 max_running_per_adapter: int = 0, max_slot_write_bytes_per_step: int = 0):
        """`waiting`: the admission policy's queue (default: first come, first served).
        The two limits: 0 = none. A slot write costs the adapter's bytes in host RAM."""
        self.kv = kv
        self.slots = slots
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.max_running_per_adapter = max_running_per_adapter
        self.max_slot_write_bytes_per_step = max_slot_write_bytes_per_step
        self.waiting = waiting if waiting is not None else FcfsQueue()
        self.running: list[Sequence] = []  # in admission order
        self.running_counts: Counter[str] = Counter()  # running sequences per tenant
        self.preemptions = 0
        self.prefix_queried_tokens = 0  # tokens of admitted sequences looked up in the cache
        self.prefix_hit_tokens = 0  # of which found there (not computed again)

    def add(self, seq: Sequence) -> None:
        self.waiting.push(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_step_tokens
        chunks: list[ScheduledChunk] = []
        # Decoding sequences first (one token each), then prompts still being prefilled.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1):
            if seq.status is not SeqStatus.RUNNING or budget == 0:
                continue  # preempted while making room for an earlier one
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n, scheduled=chunks):
                continue  # seq itself was preempted
            chunks.append(ScheduledChunk(seq, n))
            self.waiting.charge(seq, n)
            budget -= n
        self._admit(chunks, budget)
        return chunks

    def computed(self, chunks: list[ScheduledChunk]) -> None:
        """After a step computed `chunks`: offers the blocks they filled to the prefix cache."""
        allocator = self.kv.allocator
        if not allocator.caching:
            return
        size = self.kv.block_size
        for c in chunks:
            seq = c.seq
            full = seq.num_computed // size
            if full <= seq.registered_blocks:
                continue
            seq.block_hashes = block_hashes(seq.tokens[:full * size], size, _adapter_key(seq),
                                            seq.block_hashes)
            for i in range(seq.registered_blocks, full):
                allocator.register(seq.block_table[i], seq.block_hashes[i], _adapter_key(seq))
            seq.registered_blocks = full

    def finish(self, seq: Sequence) -> None:
        """Frees a finished or cancelled sequence's blocks and adapter reference at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> None:
        written = 0  # bytes of adapter weights this step's slot writes copy
        for seq in self.waiting.offers():
            if budget == 0 or len(self.running) >= self.max_batch_size:
                break
            if not self._may_start(seq, written):
                continue  # stays waiting; later ones may start
            cached = self._cached_prefix(seq)
            start = len(cached) * self.kv.block_size
            n = min(seq.num_tokens - start, budget)
            blocks = self.kv.blocks_needed(start + n) - len(cached)
            if blocks + self.kv.allocator.unused(cached) > self.kv.allocator.num_free:
                break  # memory is first come, first served
            self.waiting.remove(seq)
            writes = self._place(seq)
            written += sum(lease.weights.nbytes for _, lease in writes)
            self.kv.allocator.take(cached)
            seq.block_table = cached + self.kv.allocator.allocate(blocks)
            seq.num_computed = start
            seq.registered_blocks = len(cached)
            if seq.cached_tokens is None:
                seq.cached_tokens = start
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += start
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            self.running_counts[tenant_of(seq)] += 1
            chunks.append(ScheduledChunk(seq, n, writes))
            self.waiting.charge(seq, n)
            budget -= n

    def _place(self, seq: Sequence) -> list[tuple[int, AdapterLease]]:
        """Takes a slot for each adapter version seq runs through; returns those to write."""
        writes = []
        for lease, weight in _slot_uses(seq):
            placement = self.slots.acquire(lease.key)
            seq.slots.append((placement.slot, weight))
            if placement.needs_write:
                writes.append((placement.slot, lease))
        return writes

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks seq's tokens start with under its adapter version, leaving at
        least its last token to compute."""
        if not self.kv.allocator.caching or seq.params.prompt_logprobs is not None:
            return []  # prompt log-probabilities need every prompt position computed
        size = self.kv.block_size
        seq.block_hashes = block_hashes(seq.tokens, size, _adapter_key(seq), seq.block_hashes)
        usable = (seq.num_tokens - 1) // size
        return self.kv.allocator.cached_prefix(seq.block_hashes[:usable])

    def _may_start(self, seq: Sequence, written: int) -> bool:
        """Whether seq's adapter limits let it start now (memory and budget aside)."""
        limit = self.max_running_per_adapter
        if limit and self.running_counts[tenant_of(seq)] >= limit:
            return False
        uses = _slot_uses(seq)
        missing = [lease for lease, _ in uses if lease.key not in self.slots.slot_of]
        if not missing:
            return True  # base model, or its versions are in slots already: nothing to write
        limit = self.max_slot_write_bytes_per_step
        nbytes = sum(lease.weights.nbytes for lease in missing)
        fits = not limit or not written or written + nbytes <= limit
        return fits and self.slots.can_place_all([lease.key for lease, _ in uses])

    def _grow(self, seq: Sequence, num_tokens: int, scheduled: list[ScheduledChunk]) -> bool:
        """Gives seq blocks for num_tokens positions, preempting the newest others if needed."""
        need = self.kv.blocks_needed(num_tokens) - len(seq.block_table)
        while need > self.kv.allocator.num_free:
            victim = self._newest_unscheduled(scheduled)
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.block_table += self.kv.allocator.allocate(need)
        return True

    def _newest_unscheduled(self, scheduled: list[ScheduledChunk]) -> Sequence:
        taken = {id(c.seq) for c in scheduled}
        return next(s for s in reversed(self.running) if id(s) not in taken)

    def _preempt(self, seq: Sequence) -> None:
        """Frees seq's blocks and slot; it waits at the head of the queue and is recomputed."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.push_front(seq)

    def _release(self, seq: Sequence) -> None:
        tenant = tenant_of(seq)
        self.running_counts[tenant] -= 1
        if not self.running_counts[tenant]:
            del self.running_counts[tenant]
        self.kv.allocator.free(seq.block_table)
        seq.block_table = []
        seq.registered_blocks = 0
        for lease, _ in _slot_uses(seq)[:len(seq.slots)]:  # those placed in a slot
            self.slots.release(lease.key)
        seq.slots = []


def _adapter_key(seq: Sequence):
    return seq.adapter.key if seq.adapter is not None else None


def _slot_uses(seq: Sequence) -> tuple[tuple[AdapterLease, float], ...]:
    """The adapter versions seq's tokens run through, each with its weight (none: base)."""
    return seq.adapter.slot_uses() if seq.adapter is not None else ()

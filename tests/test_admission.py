"""Admission order across adapters, on a scheduler driven step by step (no model).

Each simulated step schedules, computes what was scheduled and samples one token per sequence
whose prompt is done; a sequence finishes after `OUTPUT_TOKENS`. The tests read the order in which
sequences were admitted, never times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters_registry.host_cache import AdapterKey, AdapterLease
from server.engine.adapter_slots import AdapterSlots
from server.engine.admission import make_waiting_queue
from server.engine.kv_cache import KVCache
from server.engine.sampler import SamplingParams
from server.engine.scheduler import Scheduler, SeqStatus, Sequence

OUTPUT_TOKENS = 3
PROMPT = [5, 6, 7, 8]


def _scheduler(policy="fair", *, batch=4, slots=8, weights=None, **limits) -> Scheduler:
    kv = KVCache(num_layers=1, num_blocks=256, block_size=4, kv_heads=1, head_dim=2,
                 dtype=torch.float32, device=torch.device("cpu"))
    return Scheduler(kv, AdapterSlots(slots), max_batch_size=batch, max_step_tokens=256,
                     waiting=make_waiting_queue(policy, weights), **limits)


@dataclass(frozen=True)
class _Weights:
    nbytes: int  # all the scheduler reads of an adapter's weights


def _seq(name: str | None, label: str, nbytes: int = 1000) -> Sequence:
    lease = (None if name is None
             else AdapterLease(AdapterKey(name, 1, name), weights=_Weights(nbytes)))
    return Sequence(request_id=label, prompt_ids=list(PROMPT), params=SamplingParams(),
                    adapter=lease, seed=None)


class Driver:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.admitted: list[str] = []  # request ids in the order they first ran
        self.peak_running: dict[str, int] = {}

    def submit(self, name: str | None, count: int, label: str) -> None:
        for i in range(count):
            self.scheduler.add(_seq(name, f"{label}{i}"))

    def step(self) -> None:
        chunks = self.scheduler.schedule()
        for chunk in chunks:
            seq = chunk.seq
            if seq.num_computed == 0 and seq.request_id not in self.admitted:
                self.admitted.append(seq.request_id)
            seq.num_computed += chunk.num_tokens
            if seq.num_computed == seq.num_tokens:
                seq.output_ids.append(0)
        for tenant, n in self.scheduler.running_counts.items():
            self.peak_running[tenant] = max(self.peak_running.get(tenant, 0), n)
        for seq in list(self.scheduler.running):
            if len(seq.output_ids) >= OUTPUT_TOKENS:
                self.scheduler.finish(seq)

    def run(self, max_steps=500) -> list[str]:
        for _ in range(max_steps):
            if not self.scheduler.has_work():
                return self.admitted
            self.step()
        raise AssertionError("the scheduler did not drain its queue")


def _positions(order: list[str], prefix: str) -> list[int]:
    return [i for i, rid in enumerate(order) if rid.startswith(prefix)]


def test_a_flood_on_one_adapter_does_not_hold_back_another_under_fair_admission():
    driver = Driver(_scheduler("fair"))
    driver.submit("b", 20, "b")  # one client floods adapter b ...
    driver.submit("a", 3, "a")  # ... then a's three requests arrive
    order = driver.run()
    # a alternates with b from the first step on: its requests are among the first six
    assert _positions(order, "a") == [1, 3, 5]


def test_fcfs_admission_serves_the_flood_first():
    driver = Driver(_scheduler("fcfs"))
    driver.submit("b", 20, "b")
    driver.submit("a", 3, "a")
    order = driver.run()
    assert _positions(order, "a") == [20, 21, 22]


def test_weights_split_admissions_between_backlogged_adapters():
    driver = Driver(_scheduler("fair", weights={"a": 3.0}))
    driver.submit("b", 20, "b")
    driver.submit("a", 20, "a")
    first = driver.run()[:16]
    # both backlogged all along: a, of weight 3, runs three requests for each of b's
    assert len(_positions(first, "a")) == 12


def test_an_adapter_idle_for_a_while_banks_no_credit():
    """a ran alone for a long time; b, new, must not then run alone until its counter
    catches up with a's."""
    driver = Driver(_scheduler("fair", batch=2))
    driver.submit("a", 30, "old-a")
    driver.run()
    driver.submit("b", 10, "b")
    driver.submit("a", 10, "a")
    order = driver.run()[30:]
    assert 1 <= len(_positions(order[:4], "a")) <= 3


def test_a_running_limit_per_adapter_leaves_room_for_others():
    driver = Driver(_scheduler("fcfs", batch=4, max_running_per_adapter=2))
    driver.submit("b", 10, "b")
    driver.submit(None, 4, "base")
    order = driver.run()
    assert driver.peak_running["b"] == 2
    assert len(_positions(order[:4], "base")) == 2  # base requests fill the other half at once


def test_cold_adapters_enter_slots_within_a_byte_budget_per_step():
    scheduler = _scheduler("fair", batch=8, max_slot_write_bytes_per_step=2500)
    for i in range(5):
        scheduler.add(_seq(f"cold-{i}", f"c{i}", nbytes=1000))
    scheduler.add(_seq(None, "base"))
    first = scheduler.schedule()
    assert sum(c.writes_slot for c in first) == 2  # a third would copy 3000 bytes
    assert "base" in [c.seq.request_id for c in first]  # needs no slot: not held back
    second = scheduler.schedule()
    assert sum(c.writes_slot for c in second) == 2


def test_an_adapter_larger_than_the_budget_still_enters_alone():
    scheduler = _scheduler("fcfs", batch=8, max_slot_write_bytes_per_step=2500)
    scheduler.add(_seq("big", "big", nbytes=4000))
    scheduler.add(_seq("small", "small", nbytes=100))
    first = scheduler.schedule()
    assert [c.seq.request_id for c in first if c.writes_slot] == ["big"]
    second = scheduler.schedule()
    assert [c.seq.request_id for c in second if c.writes_slot] == ["small"]


def test_small_adapters_enter_many_a_step_where_large_ones_enter_one():
    small, large = (_scheduler("fair", batch=16, max_slot_write_bytes_per_step=16 * 2**20)
                    for _ in range(2))
    for i in range(8):
        small.add(_seq(f"s{i}", f"s{i}", nbytes=2 * 2**20))  # rank 16 on q, v of the demo
        large.add(_seq(f"l{i}", f"l{i}", nbytes=10 * 2**20))  # rank 16 on all 7 modules
    assert sum(c.writes_slot for c in small.schedule()) == 8
    assert sum(c.writes_slot for c in large.schedule()) == 1


def test_a_preempted_sequence_goes_back_to_the_front_of_its_adapter_queue():
    scheduler = _scheduler("fair", batch=1)
    scheduler.add(_seq("a", "a0"))
    scheduler.add(_seq("a", "a1"))
    (chunk,) = scheduler.schedule()
    scheduler._preempt(chunk.seq)
    assert chunk.seq.status is SeqStatus.WAITING
    (again,) = scheduler.schedule()
    assert again.seq.request_id == "a0"

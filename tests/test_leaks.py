"""Memory stays flat under adapter load/evict cycles and requests.

After a warm-up, N cycles each lease an adapter straight from the registry and run a request on
another one (a host cache of 2 adapters, 6 adapters in turn, 1 device slot: every cycle loads
from the store into host RAM, evicts, and writes the slot), then M requests of every kind
(greedy, sampled, streamed, cancelled mid-stream, stopped, refused, unknown adapter, tokenize).
The requests come from a child process (tests/leak_client.py), so the process measured holds
the server alone. Then:

- the server process's RSS (/proc/self/statm, after gc.collect() and malloc_trim(0)) is at most 5% above
  its value after the warm-up: a leak of one adapter's weights per cycle (134 KiB x 2 loads per
  cycle) would exceed that within the cycles run here, while allocator noise (arenas, gRPC
  buffers) stays well below it;
- the live torch tensors (gc.get_objects()) are at most 5% more, plus 4: they number a few
  hundred (model parameters, slot tables, KV cache), and a handful may be in flight in objects
  that are still being torn down;
- nothing is held: no running or waiting sequence, every KV block free, no slot or host-cache
  reference, at most 2 adapters in host RAM.

`measure_leaks` is the driver; scripts/soak.py runs it with 1,000 cycles and 10,000 requests.
"""

from __future__ import annotations

import ctypes
import json
import gc
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from adapters_registry.registry import AdapterRegistry
from adapters_registry.store import AdapterStore
from tests.engine_helpers import make_core
from tests.inprocess_server import serving
from tests.leak_client import KINDS, PINNED, ROTATING
from tests.test_churn import cache_bytes_for, settled, variant_files, wait_until

RSS_GROWTH = 0.05
TENSOR_GROWTH, TENSOR_SLACK = 0.05, 4


def rss_bytes() -> int:
    """Resident set size after a full collection and returning freed heap to the kernel."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@dataclass
class LeakReport:
    cycles: int
    requests: int
    rss_before: int
    rss_after: int
    tensors_before: int
    tensors_after: int
    seconds: float
    host_loads: int
    slot_writes: int
    outcomes: dict[str, int]

    @property
    def rss_growth(self) -> float:
        return self.rss_after / self.rss_before - 1


@contextmanager
def leak_server(model_dir, adapter_dir, root):
    """(target, core, registry): 1 slot, a host cache of 2 adapters, ROTATING and PINNED
    registered (contents of `adapter_dir` with lora_B scaled), PINNED pinned."""
    files = variant_files(adapter_dir, scales=[1.0 + i / 8 for i in range(len(ROTATING) + 1)])

    def open_registry(spec):
        return AdapterRegistry(AdapterStore(root / "store"), spec, max_rank=64,
                               cache_bytes=cache_bytes_for(spec, files, held=2))

    core = make_core(model_dir, {}, max_slots=1, registry=open_registry)
    registry = core.registry
    for name, (config, weights) in zip([*ROTATING, PINNED], files):
        registry.register(name, config.encode(), weights)
    registry.pin(PINNED).result(30)
    with serving(core) as (_, running):
        yield f"127.0.0.1:{running.port}", core, registry
    registry.close()
    registry.store.close()


def run_workload(target: str, registry, cycles: int, requests: int) -> dict[str, int]:
    """`cycles` leases straight from the registry (each loads and evicts), then a child process
    sends `cycles` requests on rotating adapters and `requests` of every kind; returns the
    child's outcomes. One after the other: the host cache holds the pin and one more adapter."""
    for i in range(cycles):
        lease = registry.acquire(ROTATING[i % len(ROTATING)]).result(60)
        registry.release(lease)
    client = subprocess.run([sys.executable, "-m", "tests.leak_client", target, str(cycles),
                             str(requests)], stdout=subprocess.PIPE, text=True, timeout=1800)
    assert client.returncode == 0, client.stdout
    return json.loads(client.stdout)


def measure_leaks(target: str, core, registry, cycles: int, requests: int) -> LeakReport:
    """Warms up, measures, runs `cycles` load/evict cycles and `requests` requests, measures."""
    run_workload(target, registry, cycles=2 * len(ROTATING), requests=2 * KINDS)
    assert wait_until(lambda: settled(core, registry))
    rss_before, tensors_before = rss_bytes(), live_tensors()
    loads, writes = registry.loads, core.slots.loads
    started = time.monotonic()
    outcomes = run_workload(target, registry, cycles, requests)
    seconds = time.monotonic() - started
    assert wait_until(lambda: settled(core, registry))
    return LeakReport(cycles, requests, rss_before, rss_bytes(), tensors_before, live_tensors(),
                      seconds, registry.loads - loads, core.slots.loads - writes, outcomes)


@pytest.fixture(scope="module")
def leak_setup(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    with leak_server(tiny_model_dir, tiny_adapter_dirs["all-r8"],
                     tmp_path_factory.mktemp("leaks")) as setup:
        yield setup


def test_memory_stays_flat_over_load_evict_cycles_and_requests(leak_setup):
    target, core, registry = leak_setup
    report = measure_leaks(target, core, registry, cycles=800, requests=300 * KINDS)
    assert report.host_loads >= 2 * 800 and report.slot_writes >= 800  # every cycle missed
    assert report.outcomes == {"ok": 6 * 300, "cancelled": 300, "INVALID_ARGUMENT": 300,
                               "NOT_FOUND": 300}
    assert report.rss_after <= report.rss_before * (1 + RSS_GROWTH), report
    assert report.tensors_after <= report.tensors_before * (1 + TENSOR_GROWTH) + TENSOR_SLACK, \
        report
    assert len(registry.resident()) <= 2

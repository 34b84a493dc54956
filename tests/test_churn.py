"""Churn under load: adapters uploaded, replaced, pinned, unpinned, deleted and uploaded again
while greedy requests keep the server busy, with 2 device slots and a host cache that holds only
a few of the adapters.

The rules: a request never fails, except NOT_FOUND for a churning adapter that was deleted at
some moment while the request ran; no RESOURCE_EXHAUSTED (the cache is sized for the leases and
pins that can be held at once, so it never happens); a stable adapter's tokens equal those it
gave before the churn; a churning adapter's tokens equal those of one of the versions that were
current while the request ran (a replace is atomic); every Admin call the churner makes succeeds.

`run_churn` is the driver; scripts/soak.py calls it with bigger numbers.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import pytest
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adapters_registry.peft_format import CONFIG_FILE, WEIGHTS_FILE, parse_peft_adapter
from adapters_registry.registry import AdapterRegistry
from adapters_registry.store import AdapterStore
from loraplex.v1 import admin_pb2 as apb
from loraplex.v1 import admin_pb2_grpc
from loraplex.v1 import inference_pb2 as pb
from loraplex.v1 import inference_pb2_grpc
from server.serving import Tokens
from tests.engine_helpers import make_core
from tests.inprocess_server import serving

ADMIN_TOKEN = "churn-admin"
PROMPTS = ([1, 40, 41, 42], [1, 99, 98], [1, 7, 8, 9, 10])
STABLE = ("attn-r4", "all-r8", "all-r16-rslora")
VARIANT_BASE = "all-r16-rslora"  # churning contents: its lora_B scaled by these factors
VARIANT_SCALES = (-1.0, 0.5, 2.0, -2.0)


@dataclass
class ChurnReport:
    requests: int = 0
    served: int = 0
    not_found_while_deleted: int = 0  # allowed: the adapter was deleted at that moment
    exhausted: int = 0  # RESOURCE_EXHAUSTED answers (the test sizes the cache so there are none)
    failures: list[str] = field(default_factory=list)  # any other error, request or Admin call
    mismatches: list[str] = field(default_factory=list)  # tokens no possible version gives
    admin_ops: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    # (stable name or variant index, prompt index) -> greedy tokens before the churn
    reference: dict[tuple[str | int, int], list[int]] = field(default_factory=dict)


class Timeline:
    """What each churning adapter held over time: None (absent) or a variant index.

    A change may take effect at any moment between its call and its answer, so during
    [start, end] both the old and the new state are possible.
    """

    def __init__(self, names: Sequence[str]):
        inf = float("inf")
        self._changes = {name: [[-inf, -inf, None]] for name in names}  # [start, end, state]

    def begin(self, name: str, state: int | None) -> list:
        change = [time.monotonic(), float("inf"), state]
        self._changes[name].append(change)
        return change

    @staticmethod
    def end(change: list) -> None:
        change[1] = time.monotonic()

    def possible(self, name: str, start: float, end: float) -> set[int | None]:
        """The states `name` may have had at some moment in [start, end]."""
        changes = self._changes[name]
        states = set()
        for i, (began, _, state) in enumerate(changes):
            until = changes[i + 1][1] if i + 1 < len(changes) else float("inf")
            if began <= end and until >= start:
                states.add(state)
        return states


def upload_messages(name: str, config: str, weights: bytes, chunk: int = 1 << 16):
    yield apb.UploadAdapterRequest(header=apb.UploadHeader(
        name=name, adapter_config_json=config, sha256=hashlib.sha256(weights).hexdigest(),
        size=len(weights)))
    for i in range(0, len(weights), chunk):
        yield apb.UploadAdapterRequest(chunk=weights[i:i + chunk])


async def run_churn(target: str, admin_token: str, stable: Sequence[str],
                    variants: Sequence[tuple[str, bytes]], *, names: int = 16, workers: int = 3,
                    max_pins: int = 1, ops: int | None = None, seconds: float | None = None,
                    requests_per_op: int = 4, seed: int = 0, max_new_tokens: int = 4
                    ) -> ChurnReport:
    """Drives a server at `target` whose registry holds the `stable` adapters.

    First the reference: each stable adapter's and each variant's (uploaded as churn-ref-i,
    then deleted) greedy tokens for every prompt, one request at a time. Then `workers`
    concurrent request loops over the stable and `names` churning adapters (churn-00, ...) while
    one churner makes `ops` Admin changes (or changes for `seconds`) with contents from
    `variants` ((adapter_config.json, adapter_model.safetensors) pairs), keeping at most
    `max_pins` pinned, and waiting for `requests_per_op` finished requests between changes (so
    that the load is not starved by the churn). Everything random comes from `seed`.
    """
    metadata = [("authorization", f"Bearer {admin_token}")]
    churning = [f"churn-{i:02d}" for i in range(names)]
    report = ChurnReport()
    async with grpc.aio.insecure_channel(target) as channel:
        inference = inference_pb2_grpc.InferenceStub(channel)
        admin = admin_pb2_grpc.AdminStub(channel)

        async def generate(adapter: str, prompt: int) -> list[int]:
            reply = await inference.Generate(pb.GenerateRequest(
                prompt_token_ids=PROMPTS[prompt], adapter_id=adapter,
                params=pb.SamplingParams(max_new_tokens=max_new_tokens)), timeout=120)
            return list(reply.token_ids)

        reference = report.reference
        for name in stable:
            for p in range(len(PROMPTS)):
                reference[name, p] = await generate(name, p)
        for v, (config, weights) in enumerate(variants):
            await admin.UploadAdapter(upload_messages(f"churn-ref-{v}", config, weights),
                                      metadata=metadata)
            for p in range(len(PROMPTS)):
                reference[v, p] = await generate(f"churn-ref-{v}", p)
            await admin.DeleteAdapter(apb.DeleteAdapterRequest(name=f"churn-ref-{v}"),
                                      metadata=metadata)

        timeline = Timeline(churning)
        stop = asyncio.Event()
        progress = asyncio.Event()  # set when a request finishes
        rng = random.Random(seed)
        started = time.monotonic()

        async def admin_call(op: str, name: str, call, change: tuple[str, int | None] | None):
            """Runs `call()`; `change` = (name, new state) is recorded around it."""
            entry = timeline.begin(name, change[1]) if change else None
            try:
                await call()
                report.admin_ops[op] += 1
            except grpc.aio.AioRpcError as error:
                report.failures.append(f"{op} {name}: {error.code().name}: {error.details()}")
            finally:
                if entry is not None:
                    Timeline.end(entry)

        async def churner() -> None:
            present: dict[str, int] = {}
            uploaded: set[str] = set()
            pinned: set[str] = set()
            done = 0
            while not ((ops is not None and done >= ops) or
                       (seconds is not None and time.monotonic() - started >= seconds)):
                name = rng.choice(churning)
                if name not in present:
                    op = "re-upload" if name in uploaded else "upload"
                else:
                    op = rng.choices(["replace", "pin", "unpin", "delete"], [4, 1, 1, 2])[0]
                    if op == "pin" and len(pinned) >= max_pins and name not in pinned:
                        op = "replace"
                if op in ("upload", "re-upload", "replace"):
                    v = rng.choice([i for i in range(len(variants)) if i != present.get(name)])
                    await admin_call(op, name, lambda: admin.UploadAdapter(
                        upload_messages(name, *variants[v]), metadata=metadata), (name, v))
                    present[name] = v
                    uploaded.add(name)
                elif op == "delete":
                    await admin_call(op, name, lambda: admin.DeleteAdapter(
                        apb.DeleteAdapterRequest(name=name), metadata=metadata), (name, None))
                    del present[name]
                    pinned.discard(name)
                elif op == "pin":
                    await admin_call(op, name, lambda: admin.PinAdapter(
                        apb.PinAdapterRequest(name=name), metadata=metadata), None)
                    pinned.add(name)
                else:
                    await admin_call(op, name, lambda: admin.UnpinAdapter(
                        apb.UnpinAdapterRequest(name=name), metadata=metadata), None)
                    pinned.discard(name)
                done += 1
                while report.requests < done * requests_per_op:
                    progress.clear()
                    await progress.wait()
            stop.set()

        async def worker(w: int) -> None:
            mine = random.Random(seed * 1000 + w + 1)
            while not stop.is_set():
                name = mine.choice(stable) if mine.random() < 0.5 else mine.choice(churning)
                p = mine.randrange(len(PROMPTS))
                begin = time.monotonic()
                try:
                    tokens = await generate(name, p)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    code, details = error.code(), error.details()
                end = time.monotonic()
                report.requests += 1
                progress.set()
                if name in stable:
                    possible = {name}
                else:
                    possible = timeline.possible(name, begin, end)
                if code == grpc.StatusCode.OK:
                    report.served += 1
                    if not any(reference[s, p] == tokens for s in possible if s is not None):
                        report.mismatches.append(f"{name} prompt {p}: {tokens}, possible "
                                                 f"versions {possible}")
                elif code == grpc.StatusCode.NOT_FOUND and None in possible:
                    report.not_found_while_deleted += 1
                elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    report.exhausted += 1
                else:
                    report.failures.append(f"{name}: {code.name}: {details} (possible {possible})")

        await asyncio.gather(churner(), *(worker(w) for w in range(workers)))
        report.seconds = time.monotonic() - started
    return report


def variant_files(directory, scales: Sequence[float] = VARIANT_SCALES) -> list[tuple[str, bytes]]:
    """Contents of one adapter with its lora_B scaled: same shapes, different outputs."""
    config = (directory / CONFIG_FILE).read_text()
    tensors = load_safetensors((directory / WEIGHTS_FILE).read_bytes())
    return [(config, save_safetensors({k: t * scale if "lora_B" in k else t
                                       for k, t in tensors.items()})) for scale in scales]


def cache_bytes_for(spec, files: Sequence[tuple[str, bytes]], held: int) -> int:
    """Room for `held` of the largest adapter: what can be leased and pinned at once."""
    largest = max(parse_peft_adapter("x", config, weights, spec).nbytes
                  for config, weights in files)
    return held * largest


def settled(core, registry) -> bool:
    """Nothing running or waiting, every KV block free, no slot or host-cache reference held."""
    return (not core.scheduler.has_work() and not any(core.slots.refs)
            and core.kv.allocator.num_free == core.kv.num_blocks
            and all(state.refs == 0 for state in registry.resident().values()))


def wait_until(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextmanager
def churn_setup(model_dir, adapter_dirs, root):
    """(port, core, registry, variants) of a server with 2 slots, the STABLE adapters, and a
    host cache for 3 leases + 1 pin + 2 spare of the largest adapter."""
    variants = variant_files(adapter_dirs[VARIANT_BASE])
    stable = {name: ((adapter_dirs[name] / CONFIG_FILE).read_text(),
                     (adapter_dirs[name] / WEIGHTS_FILE).read_bytes()) for name in STABLE}

    def open_registry(spec):
        cache = cache_bytes_for(spec, [*variants, *stable.values()], held=3 + 1 + 2)
        return AdapterRegistry(AdapterStore(root / "store"), spec, max_rank=64,
                               cache_bytes=cache)

    core = make_core(model_dir, {}, max_slots=2, registry=open_registry)
    registry = core.registry
    for name, (config, weights) in stable.items():
        registry.register(name, config.encode(), weights)
    with serving(core, tokens=Tokens(admin=ADMIN_TOKEN.encode(), inference=None)
                 ) as (_, running):
        yield running.port, core, registry, variants
    registry.close()
    registry.store.close()


@pytest.fixture(scope="module")
def churn_server(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    with churn_setup(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory.mktemp("churn")) as setup:
        yield setup


def test_requests_survive_adapter_churn_with_evictions_in_both_tiers(churn_server):
    port, core, registry, variants = churn_server
    host_evictions, slot_evictions = registry.cache.evictions, core.slots.evictions
    report = asyncio.run(run_churn(f"127.0.0.1:{port}", ADMIN_TOKEN, STABLE, variants,
                                   names=16, workers=3, max_pins=1, ops=300, seed=0))
    assert report.failures == [] and report.mismatches == []
    assert report.exhausted == 0
    assert report.requests >= 300 * 4
    assert report.served + report.not_found_while_deleted == report.requests
    assert {"upload", "replace", "pin", "unpin", "delete", "re-upload"} <= set(report.admin_ops)
    # Distinct variants: a churning request's tokens tell which version served it.
    by_variant = {tuple(tuple(report.reference[v, p]) for p in range(len(PROMPTS)))
                  for v in range(len(variants))}
    assert len(by_variant) == len(variants)
    # 19 adapters through 2 slots and a cache that holds 6 of the largest: both tiers evicted.
    assert registry.cache.evictions > host_evictions and core.slots.evictions > slot_evictions
    assert wait_until(lambda: settled(core, registry))

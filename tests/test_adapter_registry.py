"""The adapter registry's tiers: store (disk) -> host RAM -> device slots.

Every test drives the registry step by step and states the whole content of every tier after
each step: the store as {name: current version}, host RAM and the device slots as
{"name@version": state}. The device tier is the engine's real slot table (server.engine.adapter_slots),
with the writes the engine would make recorded instead of made.
"""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adapters_registry.host_cache import AdapterLease, HostCache
from adapters_registry.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterFormatError
from adapters_registry.registry import (AdapterCacheFullError, AdapterLoadError, AdapterRegistry,
                                        adapter_key)
from adapters_registry.store import AdapterStore, InvalidNameError, UnknownAdapterError
from server.engine.adapter_slots import AdapterSlots
from tests.test_adapter_store import tree_digest
from tests.test_adapter_validation import BASE, CORPUS, assert_rejection, load_base

WAIT = 30  # seconds a test waits for a load before failing


@pytest.fixture(scope="module")
def spec(tiny_model_dir):
    from server.model.loading import model_spec

    return model_spec(load_base(tiny_model_dir))


@pytest.fixture(scope="module")
def files(tiny_adapter_dirs):
    """name -> (adapter_config.json bytes, adapter_model.safetensors bytes)."""
    return {name: ((d / CONFIG_FILE).read_bytes(), (d / WEIGHTS_FILE).read_bytes())
            for name, d in tiny_adapter_dirs.items()}


@pytest.fixture(scope="module")
def size(files, spec):
    """Host bytes of one all-r8 adapter: every test adapter below is a copy of it."""
    from adapters_registry.peft_format import parse_peft_adapter

    return parse_peft_adapter("x", *files["all-r8"], spec).nbytes


def other_content(files):
    """all-r8 with different weights: what a replace uploads."""
    config, weights = files["all-r8"]
    tensors = {k: t * 2 for k, t in load_safetensors(weights).items()}
    return config, save_safetensors(tensors)


@pytest.fixture
def make_registry(tmp_path, spec):
    made = []

    def make(cache_bytes, **kwargs):
        store = AdapterStore(tmp_path / "store")
        registry = AdapterRegistry(store, spec, max_rank=kwargs.pop("max_rank", 64),
                                   cache_bytes=cache_bytes, **kwargs)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        registry.close()
        registry.store.close()


class Device:
    """The engine's slot table, the writes it asks for recorded; leases are taken and released
    as a running request would."""

    def __init__(self, max_slots=4):
        self.written: list[str] = []
        self.slots = AdapterSlots(max_slots)

    def start(self, lease: AdapterLease) -> int:
        placement = self.slots.acquire(lease.key)
        if placement.needs_write:
            self.written.append(_label(lease.key))
        return placement.slot

    def finish(self, lease: AdapterLease) -> None:
        self.slots.release(lease.key)

    def state(self) -> dict[str, str]:
        s = self.slots
        return {_label(key): f"slot {slot} " + (f"busy x{s.refs[slot]}" if s.refs[slot] else "idle")
                for key, slot in sorted(s.slot_of.items(), key=lambda kv: kv[1])}


def _label(key) -> str:
    return f"{key.name}@{key.version}"


def tiers(registry: AdapterRegistry, device: Device | None = None) -> dict:
    ram = {}
    for key, state in registry.resident().items():
        words = [f"in use x{state.refs}" if state.refs else "idle"]
        words += ["pinned"] * state.pinned + ["retired"] * state.retired
        ram[_label(key)] = ", ".join(words)
    result = {"store": {r.name: r.version for r in registry.store.list()}, "ram": ram}
    if device is not None:
        result["device"] = device.state()
    return result


def lease(registry: AdapterRegistry, name: str) -> AdapterLease:
    return registry.acquire(name).result(timeout=WAIT)


def register(registry, files, *names, content="all-r8"):
    for name in names:
        registry.register(name, *files[content])


class Gate:
    """Holds every store read until opened, so concurrent requests meet a load in flight."""

    def __init__(self, registry: AdapterRegistry):
        self.open = threading.Event()
        self.reads = 0
        original = registry.store.open_files

        def gated(*args, **kwargs):
            self.reads += 1
            assert self.open.wait(WAIT), "the test never opened the gate"
            return original(*args, **kwargs)

        registry.store.open_files = gated


# ---- load, hit, evict -----------------------------------------------------------------------

def test_load_hit_and_lru_eviction(make_registry, files, size):
    registry, device = make_registry(cache_bytes=int(2.5 * size)), Device()
    register(registry, files, "a", "b", "c")
    assert tiers(registry, device) == {"store": {"a": 1, "b": 1, "c": 1}, "ram": {}, "device": {}}

    a = lease(registry, "a")  # cold: store -> RAM
    assert tiers(registry, device)["ram"] == {"a@1": "in use x1"}
    assert registry.loads == 1 and registry.cache.misses == 1

    device.start(a)
    assert tiers(registry, device)["device"] == {"a@1": "slot 0 busy x1"}

    device.finish(a)
    registry.release(a)
    assert tiers(registry, device) == {"store": {"a": 1, "b": 1, "c": 1}, "ram": {"a@1": "idle"},
                                       "device": {"a@1": "slot 0 idle"}}

    again = lease(registry, "a")  # warm: a RAM hit, no store read
    assert again.weights is a.weights and registry.loads == 1 and registry.cache.hits == 1
    registry.release(again)

    registry.release(lease(registry, "b"))
    assert tiers(registry, device)["ram"] == {"a@1": "idle", "b@1": "idle"}

    c = lease(registry, "c")  # RAM holds two: the least recently used (a) goes
    assert tiers(registry, device) == {"store": {"a": 1, "b": 1, "c": 1},
                                       "ram": {"b@1": "idle", "c@1": "in use x1"},
                                       "device": {"a@1": "slot 0 idle"}}
    assert registry.cache.evictions == 1
    registry.release(c)

    registry.release(lease(registry, "a"))  # evicted from RAM: loaded again from the store
    assert registry.loads == 4
    assert tiers(registry, device)["ram"] == {"c@1": "idle", "a@1": "idle"}


def test_in_use_adapters_are_never_evicted(make_registry, files, size):
    registry, device = make_registry(cache_bytes=int(2.5 * size)), Device()
    register(registry, files, "a", "b", "c")
    a, b = lease(registry, "a"), lease(registry, "b")
    device.start(a), device.start(b)

    with pytest.raises(AdapterCacheFullError, match="held by running requests or pins"):
        lease(registry, "c")
    assert tiers(registry, device) == {
        "store": {"a": 1, "b": 1, "c": 1}, "ram": {"a@1": "in use x1", "b@1": "in use x1"},
        "device": {"a@1": "slot 0 busy x1", "b@1": "slot 1 busy x1"}}

    device.finish(a)
    registry.release(a)  # a's request ends: c now fits, a is evicted for it
    c = lease(registry, "c")
    assert tiers(registry, device) == {
        "store": {"a": 1, "b": 1, "c": 1}, "ram": {"b@1": "in use x1", "c@1": "in use x1"},
        "device": {"a@1": "slot 0 idle", "b@1": "slot 1 busy x1"}}
    registry.release(b), registry.release(c)


def test_an_adapter_larger_than_the_cache_fails_cleanly(make_registry, files, size):
    registry = make_registry(cache_bytes=size // 2)
    register(registry, files, "a")
    with pytest.raises(AdapterCacheFullError, match=r"adapter 'a' version 1 cannot be loaded: "
                                                    r"an adapter of .* does not fit"):
        lease(registry, "a")
    assert tiers(registry) == {"store": {"a": 1}, "ram": {}}


# ---- pin ------------------------------------------------------------------------------------

def test_pinned_adapter_stays_resident_until_unpinned(make_registry, files, size):
    registry = make_registry(cache_bytes=int(2.5 * size))
    register(registry, files, "a", "b", "c", "d")
    registry.pin("a").result(timeout=WAIT)  # loads now, without a request
    assert tiers(registry) == {"store": {"a": 1, "b": 1, "c": 1, "d": 1},
                               "ram": {"a@1": "idle, pinned"}}

    for name in ("b", "c", "d"):
        registry.release(lease(registry, name))
        assert tiers(registry)["ram"] == {"a@1": "idle, pinned", f"{name}@1": "idle"}

    registry.unpin("a")
    registry.release(lease(registry, "b"))  # a is now the least recently used
    assert tiers(registry)["ram"] == {"d@1": "idle", "b@1": "idle"}


def test_pins_cannot_exceed_the_cache(make_registry, files, size):
    registry = make_registry(cache_bytes=int(1.5 * size))
    register(registry, files, "a", "b")
    registry.pin("a").result(timeout=WAIT)
    with pytest.raises(AdapterCacheFullError):
        registry.pin("b").result(timeout=WAIT)
    assert tiers(registry)["ram"] == {"a@1": "idle, pinned"}


def test_replacing_a_pinned_adapter_loads_and_pins_the_new_version(make_registry, files, size):
    registry = make_registry(cache_bytes=4 * size)
    register(registry, files, "a")
    registry.pin("a").result(timeout=WAIT)
    registry.register("a", *other_content(files))
    registry.release(lease(registry, "a"))  # waits for the background load if still running
    assert tiers(registry) == {"store": {"a": 2}, "ram": {"a@2": "idle, pinned"}}


# ---- delete and replace while in use --------------------------------------------------------

def test_delete_while_in_use(make_registry, files, size):
    registry, device = make_registry(cache_bytes=4 * size), Device()
    register(registry, files, "a", "b")
    a = lease(registry, "a")
    device.start(a)

    registry.delete("a")
    device.slots.retire_stale("a", registry.current_key("a"))  # what the engine's listener does
    with pytest.raises(UnknownAdapterError, match="adapter 'a' is not registered"):
        registry.acquire("a")  # new requests: NOT_FOUND at once
    assert tiers(registry, device) == {"store": {"b": 1}, "ram": {"a@1": "in use x1, retired"},
                                       "device": {"a@1": "slot 0 busy x1"}}

    device.finish(a)  # the running request ends: both copies are freed
    registry.release(a)
    assert tiers(registry, device) == {"store": {"b": 1}, "ram": {}, "device": {}}
    assert device.slots.free_slots() == 4


def test_replace_while_in_use(make_registry, files, size):
    registry, device = make_registry(cache_bytes=4 * size), Device()
    register(registry, files, "a")
    old = lease(registry, "a")
    device.start(old)

    registry.register("a", *other_content(files))  # atomic: the store's current version is 2
    device.slots.retire_stale("a", registry.current_key("a"))
    assert tiers(registry, device) == {"store": {"a": 2}, "ram": {"a@1": "in use x1, retired"},
                                       "device": {"a@1": "slot 0 busy x1"}}

    new = lease(registry, "a")  # a new request gets the new version, in its own slot
    device.start(new)
    assert new.key.version == 2 and new.key.digest != old.key.digest
    module = (0, "q_proj")
    assert (new.weights.modules[module].a == 2 * old.weights.modules[module].a).all()
    assert tiers(registry, device) == {
        "store": {"a": 2}, "ram": {"a@1": "in use x1, retired", "a@2": "in use x1"},
        "device": {"a@1": "slot 0 busy x1", "a@2": "slot 1 busy x1"}}

    device.finish(old)  # the old request finishes on the old version; then it is freed
    registry.release(old)
    assert tiers(registry, device) == {"store": {"a": 2}, "ram": {"a@2": "in use x1"},
                                       "device": {"a@2": "slot 1 busy x1"}}
    device.finish(new)
    registry.release(new)


def test_deleted_then_re_registered_same_content_while_in_use(make_registry, files, size):
    """Versions restart at 1 after a delete, so the key is equal: the held entry is reused."""
    registry = make_registry(cache_bytes=4 * size)
    register(registry, files, "a")
    old = lease(registry, "a")
    registry.delete("a")
    register(registry, files, "a")
    new = lease(registry, "a")
    assert new.key == old.key and new.weights is old.weights and registry.loads == 1
    assert tiers(registry)["ram"] == {"a@1": "in use x2"}
    registry.release(old), registry.release(new)
    assert tiers(registry)["ram"] == {"a@1": "idle"}


def test_registering_identical_content_is_a_no_op(make_registry, files, size):
    registry = make_registry(cache_bytes=4 * size)
    first = registry.register("a", *files["all-r8"])
    assert registry.register("a", *files["all-r8"]) == first
    assert tiers(registry)["store"] == {"a": 1}


def test_listeners_hear_replace_and_delete(make_registry, files, size):
    registry = make_registry(cache_bytes=4 * size)
    heard = []
    registry.add_listener(heard.append)
    register(registry, files, "a")
    registry.register("a", *other_content(files))
    registry.delete("a")
    assert heard == ["a", "a", "a"]


# ---- concurrency ----------------------------------------------------------------------------

def test_concurrent_requests_for_a_cold_adapter_share_one_load(make_registry, files, size):
    registry = make_registry(cache_bytes=4 * size)
    register(registry, files, "a")
    gate = Gate(registry)
    futures = [registry.acquire("a") for _ in range(16)]
    assert not any(f.done() for f in futures)  # the caller is not blocked by the load
    gate.open.set()
    leases = [f.result(timeout=WAIT) for f in futures]
    assert gate.reads == 1 and registry.loads == 1
    assert all(x.weights is leases[0].weights for x in leases)
    assert tiers(registry)["ram"] == {"a@1": "in use x16"}
    for x in leases:
        registry.release(x)
    assert tiers(registry)["ram"] == {"a@1": "idle"}


def test_a_failed_load_fails_every_waiter_and_leaves_the_cache_consistent(make_registry, files,
                                                                          size):
    registry = make_registry(cache_bytes=4 * size)
    register(registry, files, "a")
    registry.register("b", *other_content(files))  # blobs are shared by content: b's differ
    record = registry.store.get("a")
    record.weights_path.write_bytes(b"\0" * record.weights_size)  # the disk rots
    gate = Gate(registry)
    futures = [registry.acquire("a") for _ in range(5)]
    gate.open.set()
    for future in futures:
        with pytest.raises(AdapterLoadError, match=r"adapter 'a' version 1 cannot be loaded: .*"
                                                   r"corrupt \(sha256 mismatch\)"):
            future.result(timeout=WAIT)
    assert registry.load_failures == 1
    assert tiers(registry) == {"store": {"a": 1, "b": 1}, "ram": {}}
    with pytest.raises(AdapterLoadError, match="upload it again"):
        registry.acquire("a")  # known corrupt now: refused without another read
    registry.release(lease(registry, "b"))  # the registry keeps serving everything else
    assert tiers(registry)["ram"] == {"b@1": "idle"}


def test_a_stored_adapter_that_no_longer_fits_the_model_fails_with_the_reason(
        make_registry, tmp_path, spec, files, size):
    registry = make_registry(cache_bytes=4 * size)
    register(registry, files, "a")
    registry.close()
    registry.store.close()
    smaller = make_registry(cache_bytes=4 * size, max_rank=4)  # restarted with --max-rank 4
    with pytest.raises(AdapterLoadError, match="does not fit the served model: rank 8 .* exceeds "
                                               "the server's max rank 4"):
        lease(smaller, "a")
    assert tiers(smaller) == {"store": {"a": 1}, "ram": {}}


def test_a_waiter_that_gives_up_holds_no_reference(make_registry, files, size):
    registry = make_registry(cache_bytes=4 * size)
    register(registry, files, "a")
    gate = Gate(registry)
    gone, staying = registry.acquire("a"), registry.acquire("a")
    assert gone.cancel()
    gate.open.set()
    kept = staying.result(timeout=WAIT)
    assert tiers(registry)["ram"] == {"a@1": "in use x1"}
    registry.release(kept)


def test_unknown_and_invalid_names_fail_at_once(make_registry, size):
    registry = make_registry(cache_bytes=4 * size)
    with pytest.raises(UnknownAdapterError, match="adapter 'nope' is not registered"):
        registry.acquire("nope")
    with pytest.raises(InvalidNameError):
        registry.acquire("../etc/passwd")


# ---- registration validates before it stores -----------------------------------------------

@pytest.mark.parametrize("build,file,tensor,fragment",
                         [case[1:] for case in CORPUS], ids=[case[0] for case in CORPUS])
def test_malformed_registration_leaves_the_store_byte_for_byte_unchanged(
        make_registry, tmp_path, tiny_adapter_dirs, build, file, tensor, fragment, size):
    base = tiny_adapter_dirs[BASE]
    config = json.loads((base / CONFIG_FILE).read_text())
    tensors = load_safetensors((base / WEIGHTS_FILE).read_bytes())
    config_raw, weights_raw, kwargs = build(config, tensors)
    registry = make_registry(cache_bytes=4 * size, max_rank=kwargs.get("max_rank", 64),
                             max_adapter_bytes=kwargs.get("max_bytes"))
    registry.store.put("good", (base / CONFIG_FILE).read_bytes(), (base / WEIGHTS_FILE).read_bytes())
    before = tree_digest(tmp_path / "store")
    with pytest.raises(AdapterFormatError) as info:
        registry.register("bad", config_raw, weights_raw,
                          expected_sha256=kwargs.get("expected_sha256"))
    assert_rejection(info.value, "bad", file, tensor, fragment)
    assert tree_digest(tmp_path / "store") == before


@pytest.mark.parametrize("name", ["../escape", "a/b/c", "", ".hidden", "x" * 129])
def test_bad_names_are_rejected_before_anything_is_written(make_registry, tmp_path, files, size,
                                                           name):
    registry = make_registry(cache_bytes=4 * size)
    before = tree_digest(tmp_path / "store")
    with pytest.raises(AdapterFormatError, match="invalid adapter name"):
        registry.register(name, *files["all-r8"])
    assert tree_digest(tmp_path / "store") == before


# ---- the host cache on its own --------------------------------------------------------------

def test_host_cache_counts_exactly_the_tensor_bytes(files, spec):
    from adapters_registry.peft_format import parse_peft_adapter

    cache = HostCache(max_bytes=10**9)
    for i, name in enumerate(files):
        weights = parse_peft_adapter(name, *files[name], spec)
        record_like = type("R", (), dict(name=name, version=1, config_sha256="c",
                                         weights_sha256=hashlib.sha256(name.encode()).hexdigest()))
        cache.insert(adapter_key(record_like), weights)
    tensor_bytes = sum(len(files[n][1]) for n in files)  # file size = tensor bytes + header
    assert cache.used_bytes <= tensor_bytes
    assert cache.used_bytes == sum(
        t.nbytes for n in files for t in load_safetensors(files[n][1]).values())


# ---- sources --------------------------------------------------------------------------------

def test_register_from_a_directory_under_an_allowed_root(make_registry, tmp_path, size,
                                                         tiny_adapter_dirs):
    import shutil

    root = tmp_path / "uploads"
    shutil.copytree(tiny_adapter_dirs["all-r8"], root / "mine")
    registry = make_registry(cache_bytes=4 * size, allowed_roots=[root])
    record = registry.register_source("mine", str(root / "mine"))
    assert record.version == 1 and tiers(registry)["store"] == {"mine": 1}

    before = tree_digest(tmp_path / "store")
    with pytest.raises(AdapterFormatError, match="not under an allowed --adapter-source-roots"):
        registry.register_source("theirs", str(tiny_adapter_dirs["all-r8"]))
    assert tree_digest(tmp_path / "store") == before

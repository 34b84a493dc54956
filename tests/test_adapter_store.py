"""The durable local adapter store: names, versions, atomic writes, recovery, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapters_registry import store as store_mod
from adapters_registry.store import (AdapterCorruptError, AdapterStore, InvalidContentError,
                                     InvalidNameError, StoreLockedError, UnknownAdapterError,
                                     check_name)
from tests.store_crash_helper import KEEP_VERSIONS, content, model_states

REPO = Path(__file__).resolve().parents[1]
CFG, W = content("one")
CFG2, W2 = content("two")
CFG3, W3 = content("three")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_digest(root: Path) -> str:
    """A hash of every name and every byte under root."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            h.update(str(path.relative_to(root)).encode() + b"\0")
            if path.is_file() and not path.is_symlink():
                h.update(sha(path.read_bytes()).encode())
    return h.hexdigest()


def blob_files(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs" / "sha256").iterdir()}


@pytest.fixture
def store(tmp_path):
    with AdapterStore(tmp_path / "store") as s:
        yield s


# ------------------------------------------------------------------------------ names and layout

BAD_NAMES = ["", ".", "..", "../x", "../../etc/passwd", "/abs", "a/b/c", "a/", "a//b", "a/.x",
             "org/..", "a\\b", ".hidden", "-x", "_x", "a..b", "a b", "a\n", "a\0b", "ä",
             "x" * 129, "org/" + "x" * 129, None, 5, b"bytes"]
GOOD_NAMES = ["a", "A", "A.b_c-1", "x" * 128, "9.9", "llama-3.1_sql", "org/name",
              "Meta-Llama/llama-3.1_sql", "x" * 128 + "/" + "y" * 128]


def test_invalid_names_are_rejected_and_touch_nothing(tmp_path):
    root = tmp_path / "store"
    with AdapterStore(root) as s:
        s.put("keep", CFG, W)
        before = tree_digest(tmp_path)
        for name in BAD_NAMES:
            with pytest.raises(InvalidNameError, match="invalid adapter name"):
                s.put(name, CFG, W)
            for call in (s.get, s.open_files, s.delete, s.versions):
                with pytest.raises(InvalidNameError):
                    call(name)
            assert name not in s
        assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_name_rule_matches_peft_format():
    from adapters_registry.peft_format import AdapterFormatError, validate_adapter_name

    for name in BAD_NAMES:
        with pytest.raises(AdapterFormatError):
            validate_adapter_name(name)
    assert [validate_adapter_name(n) for n in GOOD_NAMES] == [check_name(n) for n in GOOD_NAMES]


def test_names_are_hashed_never_used_as_paths(store):
    names = GOOD_NAMES
    for name in names:
        store.put(name, CFG, W)
    refs = sorted(p.name for p in (store.root / "refs").iterdir())
    assert refs == sorted(f"{sha(n.encode())}.json" for n in names)
    all_parts = {part for p in store.root.rglob("*") for part in p.relative_to(store.root).parts}
    assert not all_parts & set(names)
    assert [r.name for r in store.list()] == sorted(names)
    assert blob_files(store.root) == {sha(CFG), sha(W)}  # one copy of shared content


# ---------------------------------------------------------------------------- put, get, versions

def test_put_get_and_version_numbering(store):
    r1 = store.put("ad", CFG, W)
    assert (r1.name, r1.version, r1.config_sha256, r1.weights_sha256) == ("ad", 1, sha(CFG), sha(W))
    assert (r1.config_size, r1.weights_size) == (len(CFG), len(W))
    assert r1.weights_path.read_bytes() == W and r1.error is None
    assert store.open_files("ad") == (CFG, W)
    assert "ad" in store and "other" not in store and len(store) == 1

    assert store.put("ad", CFG2, W2).version == 2
    assert store.get("ad").version == 2 and store.open_files("ad") == (CFG2, W2)
    assert store.open_files("ad", 1) == (CFG, W)  # keep_versions=1: the old one stays readable

    assert store.put("ad", CFG3, W3).version == 3  # prunes v1 and its blobs
    assert [r.version for r in store.versions("ad")] == [2, 3]
    with pytest.raises(UnknownAdapterError, match="no version 1"):
        store.get("ad", 1)
    assert blob_files(store.root) == {sha(CFG2), sha(W2), sha(CFG3), sha(W3)}

    assert store.put("ad", CFG, W, version=10).version == 10
    for bad in (10, 9, 0, -1, True, "11", 2.5):
        with pytest.raises(InvalidContentError, match="version must be an integer above 10"):
            store.put("ad", CFG2, W2, version=bad)
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'"):
        store.get("nope")


def test_keep_versions_zero_drops_old_blobs_at_once(tmp_path):
    with AdapterStore(tmp_path, keep_versions=0) as s:
        s.put("ad", CFG, W)
        s.put("ad", CFG2, W2)
        assert [r.version for r in s.versions("ad")] == [2]
        assert blob_files(tmp_path) == {sha(CFG2), sha(W2)}


def test_state_survives_reopen(tmp_path):
    with AdapterStore(tmp_path) as s:
        s.put("a", CFG, W)
        s.put("a", CFG2, W2)
        s.put("b", CFG3, W3, expected_sha256=sha(W3).upper())
        records = s.list()
    with AdapterStore(tmp_path) as s:
        assert s.list() == records
        assert s.recovery.tmp_removed == s.recovery.blobs_removed == 0
        assert s.open_files("a", 1) == (CFG, W) and s.open_files("b") == (CFG3, W3)
        assert s.put("a", CFG3, W3).version == 3


def test_rejected_puts_leave_the_store_byte_for_byte_unchanged(store):
    store.put("ad", CFG, W)
    before = tree_digest(store.root)
    rejected = [
        (InvalidNameError, dict(name="../ad")),
        (InvalidContentError, dict(config_bytes=b"")),
        (InvalidContentError, dict(weights_bytes=b"")),
        (InvalidContentError, dict(weights_bytes=None)),
        (InvalidContentError, dict(expected_sha256=sha(W))),  # the checksum of other bytes
        (InvalidContentError, dict(expected_sha256="0" * 64)),
        (InvalidContentError, dict(expected_sha256=b"not a str")),
        (InvalidContentError, dict(version=1)),
        (InvalidContentError, dict(version=True)),
    ]
    for error, override in rejected:
        args = dict(name="ad", config_bytes=CFG2, weights_bytes=W2) | override
        with pytest.raises(error):
            store.put(args.pop("name"), args.pop("config_bytes"), args.pop("weights_bytes"), **args)
        assert tree_digest(store.root) == before, override
    assert store.get("ad").version == 1 and store.open_files("ad") == (CFG, W)


def test_delete(store):
    store.put("a", CFG, W)
    store.put("a", CFG2, W2)
    store.put("b", CFG, W)  # shares a v1's blobs
    store.delete("a")
    assert "a" not in store and [r.name for r in store.list()] == ["b"]
    for call in (store.get, store.open_files, store.versions, store.delete):
        with pytest.raises(UnknownAdapterError, match="unknown adapter 'a'"):
            call("a")
    assert blob_files(store.root) == {sha(CFG), sha(W)}
    store.delete("b")
    assert blob_files(store.root) == set() and list((store.root / "refs").iterdir()) == []
    assert store.put("a", CFG3, W3).version == 1  # versions restart after a delete


def test_replace_keeps_the_old_version_served_until_the_commit(store, monkeypatch):
    store.put("ad", CFG, W)
    before = tree_digest(store.root)
    seen = []

    def hook(label):
        seen.append((label, store.get("ad").version, store.open_files("ad")))
        if label == "ref.tmp_synced":
            raise OSError("disk full")

    monkeypatch.setattr(store_mod, "_crash_point", hook)
    with pytest.raises(OSError, match="disk full"):
        store.put("ad", CFG2, W2)
    assert [label for label, *_ in seen][-5:] == ["ref.tmp_created", "ref.half_written",
                                                  "ref.tmp_synced", "gc.unlinked", "gc.unlinked"]
    assert all(version == 1 and files == (CFG, W) for _, version, files in seen)
    assert tree_digest(store.root) == before  # the failed put removed its temp file and blobs
    monkeypatch.setattr(store_mod, "_crash_point", lambda label: None)
    assert store.get("ad").version == 1 and store.put("ad", CFG2, W2).version == 2
    assert store.open_files("ad") == (CFG2, W2)


def test_readers_run_during_puts(store):
    """Reads never block on a put and always see one whole committed version."""
    store.put("ad", *content("ad-1"))
    stop, errors = threading.Event(), []

    def reader():
        while not stop.is_set():
            try:
                record = store.get("ad")
                assert store.open_files("ad", record.version) == content(f"ad-{record.version}")
            except UnknownAdapterError:
                pass  # pruned between get and open_files: a replace committed meanwhile
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(2, 12):
            store.put("ad", *content(f"ad-{version}"))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert store.get("ad").version == 11


def test_a_second_owner_is_refused(tmp_path):
    with AdapterStore(tmp_path):
        with pytest.raises(StoreLockedError, match="already open"):
            AdapterStore(tmp_path)
    AdapterStore(tmp_path).close()


# ------------------------------------------------------------------------------------ corruption

def test_bit_flip_is_reported_and_never_served(tmp_path):
    with AdapterStore(tmp_path) as s:
        s.put("ad", CFG, W)
        weights_path = s.put("ad", CFG2, W2).weights_path
    data = bytearray(weights_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights_path.write_bytes(bytes(data))

    with AdapterStore(tmp_path) as s:  # size unchanged: found on the first read
        assert s.recovery.bad_blobs == {}
        with pytest.raises(AdapterCorruptError, match="sha256 mismatch"):
            s.open_files("ad")
        with pytest.raises(AdapterCorruptError, match="upload it again"):
            s.get("ad")
        assert s.list()[0].error.endswith("is corrupt (sha256 mismatch)")
        assert s.open_files("ad", 1) == (CFG, W)  # the old version is intact, but not current

    with AdapterStore(tmp_path, verify_on_open=True) as s:
        assert s.recovery.bad_blobs == {sha(W2): "is corrupt (sha256 mismatch)"}
        with pytest.raises(AdapterCorruptError):
            s.get("ad", 2)
        s.put("other", CFG2, W2)  # the same content again repairs the blob in place
        assert s.open_files("ad", 2) == (CFG2, W2) and s.get("ad").error is None
    assert sha(weights_path.read_bytes()) == sha(W2)


def test_work_done_while_verifying_is_discarded_when_the_blob_is_corrupt(tmp_path):
    with AdapterStore(tmp_path) as s:
        weights_path = s.put("ad", CFG, W).weights_path
        assert s.open_files("ad", then=lambda c, w: (bytes(c), bytes(w))) == (CFG, W)
        data = bytearray(W)
        data[-1] ^= 0x01
        weights_path.write_bytes(bytes(data))
        parsed = []
        with pytest.raises(AdapterCorruptError, match="sha256 mismatch"):
            s.open_files("ad", then=lambda c, w: parsed.append(w) or "parsed")
        assert parsed == [data]  # it ran, but its result never reached the caller


def test_a_blob_changed_after_a_verified_read_is_verified_again(tmp_path):
    """Reads skip the sha256 of a file verified before only while it is unchanged: rewriting it,
    even with its size and mtime restored, changes its ctime and forces a new check."""
    with AdapterStore(tmp_path) as s:
        weights_path = s.put("ad", CFG, W).weights_path
        assert s.open_files("ad") == (CFG, W)
        before = weights_path.stat()
        data = bytearray(W)
        data[0] ^= 0x01
        weights_path.write_bytes(bytes(data))
        os.utime(weights_path, ns=(before.st_atime_ns, before.st_mtime_ns))
        with pytest.raises(AdapterCorruptError, match="sha256 mismatch"):
            s.open_files("ad")


def test_missing_and_truncated_blobs_are_found_on_open(tmp_path):
    with AdapterStore(tmp_path) as s:
        a = s.put("a", CFG, W)
        b = s.put("b", CFG2, W2)
    a.weights_path.unlink()
    b.weights_path.write_bytes(W2[:100])
    with AdapterStore(tmp_path) as s:
        assert s.recovery.bad_blobs == {sha(W): "is missing",
                                        sha(W2): f"has 100 bytes, expected {len(W2)}"}
        for name in ("a", "b"):
            with pytest.raises(AdapterCorruptError):
                s.open_files(name)
        s.delete("b")
        assert s.put("a", CFG, W).version == 2 and s.open_files("a") == (CFG, W)


def test_unreadable_or_hostile_refs_are_skipped_and_stop_gc(tmp_path):
    with AdapterStore(tmp_path) as s:
        s.put("good", CFG, W)
    refs = tmp_path / "refs"
    evil = {"format": 1, "name": "evil", "current": 1,
            "versions": [{"version": 1, "config_sha256": "../../../outside",
                          "weights_sha256": "0" * 64, "config_size": 1, "weights_size": 1,
                          "created_at": 0}]}
    (refs / f"{sha(b'evil')}.json").write_text(json.dumps(evil))
    (refs / f"{sha(b'junk')}.json").write_bytes(b"{not json")
    (refs / f"{sha(b'other')}.json").write_text(json.dumps(evil))  # name does not hash to file
    (refs / "README").write_text("not ours")
    orphan = tmp_path / "blobs" / "sha256" / ("f" * 64)
    orphan.write_bytes(b"orphan")
    with AdapterStore(tmp_path) as s:
        assert sorted(s.recovery.unreadable_refs) == sorted(
            f"{sha(n)}.json" for n in (b"evil", b"junk", b"other"))
        assert [r.name for r in s.list()] == ["good"] and s.open_files("good") == (CFG, W)
        assert orphan.exists()  # a ref that cannot be read may still need its blobs
        s.put("junk", CFG2, W2)  # a put over an unreadable ref replaces it
        assert s.open_files("junk") == (CFG2, W2)


# ---------------------------------------------------------------------------------------- crashes

def run_helper(mode: str, root: Path, crash_at: int | None = None,
               timeout: float = 20) -> subprocess.CompletedProcess:
    env = dict(os.environ, CRASH_AT=str(crash_at or ""))
    return subprocess.run([sys.executable, "-m", "tests.store_crash_helper", mode, str(root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def recovered_state(root: Path) -> dict[str, tuple[int, dict[int, tuple[str, str]]]]:
    """Opens the store as a restarted server would and checks it is consistent.

    Returns {name: (current version, {version: (config sha256, weights sha256)})}, every version
    read back through open_files (which verifies each blob's sha256).
    """
    with AdapterStore(root, keep_versions=KEEP_VERSIONS) as s:
        assert s.recovery.unreadable_refs == [] and s.recovery.bad_blobs == {}
        assert list((root / "tmp").iterdir()) == []
        state, referenced = {}, set()
        for current in s.list():
            versions = {}
            for r in s.versions(current.name):
                config, weights = s.open_files(r.name, r.version)
                versions[r.version] = (sha(config), sha(weights))
                referenced |= {r.config_sha256, r.weights_sha256}
            state[current.name] = (current.version, versions)
        assert blob_files(root) == referenced  # no orphan left, none missing
    settled = tree_digest(root)
    with AdapterStore(root, keep_versions=KEEP_VERSIONS) as s:  # recovery is idempotent
        assert s.recovery.tmp_removed == s.recovery.blobs_removed == 0
    assert tree_digest(root) == settled
    return state


def expected_state(model: dict[str, tuple[int, dict[int, str]]]):
    return {name: (current, {v: tuple(sha(b) for b in content(tag)) for v, tag in vs.items()})
            for name, (current, vs) in model.items()}


STATES = [expected_state(m) for m in model_states()]


def crash_labels(mode: str, root: Path) -> list[str]:
    proc = run_helper(mode, root, crash_at=-1)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1].removeprefix("labels "))


def completed_ops(proc: subprocess.CompletedProcess) -> int:
    return sum(line.startswith("ok ") for line in proc.stdout.splitlines())


def test_sigkill_at_every_crash_point_of_register_replace_delete(tmp_path):
    labels = crash_labels("seq", tmp_path / "dry")
    assert recovered_state(tmp_path / "dry") == STATES[-1]
    for point in ("put.begin", "blob.half_written", "blob.renamed", "ref.half_written",
                  "ref.renamed", "delete.unlinked", "gc.unlinked"):
        assert point in labels
    outcomes = {}
    roots = [tmp_path / f"crash-{n}" for n in range(1, len(labels) + 1)]
    with ThreadPoolExecutor(4) as pool:  # the children mostly wait on fsync
        procs = list(pool.map(lambda n: run_helper("seq", roots[n - 1], crash_at=n),
                              range(1, len(labels) + 1)))
    for n, (label, root, proc) in enumerate(zip(labels, roots, procs), start=1):
        assert proc.returncode == -signal.SIGKILL, (n, label, proc.stderr)
        done = completed_ops(proc)
        state = recovered_state(root)
        # Killed during op `done`: the store holds the state from before it or after it.
        assert state in (STATES[done], STATES[done + 1]), (n, label, done)
        outcomes[label] = outcomes.get(label, set()) | {state == STATES[done + 1]}
        shutil.rmtree(root)
    # Before the ref is renamed a crash keeps the old state; from the rename on, the new one.
    assert outcomes["blob.dir_synced"] == outcomes["ref.tmp_synced"] == {False}
    for label in ("ref.renamed", "ref.dir_synced", "delete.unlinked", "gc.unlinked"):
        assert outcomes[label] == {True}, label
    assert outcomes["delete.begin"] == {False}


def test_sigkill_during_recovery(tmp_path):
    """A store left dirty by a crash is killed again at every step of its own recovery."""
    dirty = tmp_path / "dirty"
    labels = crash_labels("seq", tmp_path / "dry")
    proc = run_helper("seq", dirty, crash_at=labels.index("gc.unlinked") + 1)
    done = completed_ops(proc)  # died collecting a v1's blobs after committing a v3
    for i in range(3):
        (dirty / "tmp" / f"blob-stale-{i}").write_bytes(b"partial")
    (dirty / "blobs" / "sha256" / ("e" * 64)).write_bytes(b"orphan")
    recovery_labels = crash_labels("open", shutil.copytree(dirty, tmp_path / "dry-open"))
    assert recovery_labels.count("recover.tmp_removed") == 3
    assert "gc.unlinked" in recovery_labels
    for n in range(1, len(recovery_labels) + 1):
        root = shutil.copytree(dirty, tmp_path / f"open-{n}")
        assert run_helper("open", root, crash_at=n).returncode == -signal.SIGKILL
        assert recovered_state(root) == STATES[done + 1]


def test_sigkill_at_random_times_during_replaces(tmp_path):
    root, rng = tmp_path / "store", random.Random(20240601)
    committed: dict[str, int] = {}
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-m", "tests.store_crash_helper", "loop",
                                 str(root)], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.01, 0.2))
        proc.kill()
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL, err
        for line in out.splitlines():
            _, name, version = line.split()
            committed[name] = int(version)
        state = recovered_state(root)
        for name, (current, versions) in state.items():
            assert current == max(versions)
            for version, shas in versions.items():
                assert shas == tuple(sha(b) for b in content(f"{name}-{version}"))
        for name, version in committed.items():  # an acknowledged put is never lost
            assert state[name][0] >= version
    assert sum(committed.values()) > 6  # the kills landed while puts were running

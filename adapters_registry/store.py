"""The durable local adapter store: adapters by name and version, content-addressed blobs.

Layout under `root` (one process owns a root; `LOCK` is held with `flock` while it is open):

    LOCK                          the owner's lock file (empty)
    blobs/sha256/<hex>            immutable blobs: adapter_config.json and
                                  adapter_model.safetensors bytes, named by their sha256
    refs/<sha256(name)>.json      one adapter: {"format", "name", "current", "versions": [...]}
    tmp/                          writes in progress; emptied when the store opens

A name is validated and then only ever hashed into a file name, never used as a path.

Every file is written to tmp/, fsynced, renamed into place, and its directory fsynced. `put`
writes both blobs first and the ref last: renaming the ref is the commit point of a register or
replace, unlinking it is the commit point of a delete. A process killed at any moment leaves the
old ref or the new one, never a partial adapter; what it leaves behind (temp files, blobs no ref
names) is removed when the store next opens.

Content is identified by its sha256; (name, version) is unique only while the name exists
(versions restart at 1 after `delete`). Adapter *content* is validated by the caller before `put`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

from adapters_registry.names import NAME_RULE, is_valid_adapter_name, shown_name

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_VERSION = 2**64 - 1  # what the API's uint64 version fields can carry
_READ_CHUNK = 1 << 20  # blobs are read (and hashed behind the reader) in chunks of this size
_HEX = re.compile(r"[0-9a-f]{64}")
_FORMAT = 1

crash_hook: Callable[[str], None] | None = None
"""A test seam, not a setting: called with the label of every crash point a write passes (the
crash-safety test's child process kills itself at one of them); None in service."""


def _crash_point(label: str) -> None:
    if crash_hook is not None:
        crash_hook(label)


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class InvalidNameError(StoreError, ValueError):
    """The adapter name does not match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ or contains '..'."""


class InvalidContentError(StoreError, ValueError):
    """Empty content, a checksum that does not match, or a bad version number."""


class UnknownAdapterError(StoreError, KeyError):
    """No such adapter, or no such version of it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AdapterCorruptError(StoreError):
    """A stored blob is missing or its bytes no longer match their sha256; it is never served."""


class StoreLockedError(StoreError):
    """Another AdapterStore (in this or another process) has the root open."""


def next_version(name: str, highest: int, version: int | None) -> int:
    """The version a put of `name` gets: `version` when it is above `highest` (the highest
    stored), else highest + 1 when `version` is None; anything else is InvalidContentError."""
    if version is None:
        if highest + 1 > MAX_VERSION:
            raise InvalidContentError(
                f"adapter {name!r}: no version left above {highest}; delete it and "
                "upload again (versions restart at 1)")
        return highest + 1
    if (isinstance(version, bool) or not isinstance(version, int)
            or not highest < version <= MAX_VERSION):
        raise InvalidContentError(
            f"adapter {name!r}: version must be an integer above {highest} and at "
            f"most {MAX_VERSION}, got {version!r}")
    return version


def check_name(name: object) -> str:
    """Returns `name` if it follows adapters_registry.names' rule, else raises InvalidNameError."""
    if not is_valid_adapter_name(name):
        raise InvalidNameError(f"invalid adapter name {shown_name(name)!r}: {NAME_RULE}")
    return name


@dataclass(frozen=True)
class AdapterRecord:
    """One stored version of one adapter. Read the bytes with `AdapterStore.open_files`."""

    name: str
    version: int
    config_sha256: str
    weights_sha256: str
    config_size: int
    weights_size: int
    created_at: float
    config_path: Path | None  # None in a MemoryStore
    weights_path: Path | None
    # Why this version cannot be served (missing or corrupt blob); None when healthy.
    error: str | None = None


@dataclass
class RecoveryReport:
    """What opening the store found and cleaned up."""

    tmp_removed: int = 0
    blobs_removed: int = 0
    # ref files that could not be parsed; while any exist, no blob is garbage-collected
    unreadable_refs: list[str] = field(default_factory=list)
    # blob hex -> why it cannot be served
    bad_blobs: dict[str, str] = field(default_factory=dict)


@dataclass
class _Version:
    version: int
    config_sha256: str
    weights_sha256: str
    config_size: int
    weights_size: int
    created_at: float


@dataclass
class _Entry:
    name: str
    current: int
    versions: dict[int, _Version]  # version -> metadata, ascending

    def to_json(self) -> bytes:
        doc = {"format": _FORMAT, "name": self.name, "current": self.current,
               "versions": [vars(v) for v in self.versions.values()]}
        return json.dumps(doc, indent=1, sort_keys=True).encode()


class AdapterStore:
    """The local store; thread-safe within its one owning process."""

    def __init__(self, root: str | Path, *, keep_versions: int = 1, verify_on_open: bool = False,
                 worker_init: Callable[[], None] | None = None):
        """Opens (creating if needed) the store at `root` and recovers it.

        worker_init: runs first on the thread that hashes blobs as they are read (the server
            makes it a background thread, like the registry's load threads).

        keep_versions: how many versions older than the current one a replace keeps readable.
        verify_on_open: hash every referenced blob now (reads the whole store); otherwise only
            existence and size are checked here, and `open_files` verifies a blob's sha256 the
            first time this process reads it (see `_verified`).
        """
        if keep_versions < 0:
            raise ValueError(f"keep_versions must be >= 0, got {keep_versions}")
        self.root = Path(root)
        self.keep_versions = keep_versions
        self._blobs = self.root / "blobs" / "sha256"
        self._refs = self.root / "refs"
        self._tmp = self.root / "tmp"
        # _write_lock serializes mutations (put, delete, close); _lock guards the in-memory index
        # and is held only briefly, so readers never wait for blob I/O or fsync.
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._index: dict[str, _Entry] = {}
        self._hash_pool: ThreadPoolExecutor | None = None  # sha256 of blobs being read
        self._worker_init = worker_init
        self._bad_blobs: dict[str, str] = {}
        # blob hex -> identity (inode, size, mtime, ctime) of the file when this process last
        # found or wrote its sha256 correct. A read of an unchanged file skips the hash: any
        # write, rename or truncate changes the identity; a restart hashes everything again.
        self._verified: dict[str, tuple[int, int, int, int]] = {}
        self._unreadable_refs: list[str] = []
        for d in (self._blobs, self._refs, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / "LOCK", "a+b")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreLockedError(f"adapter store {self.root} is already open elsewhere") from None
        try:
            self.recovery = self._recover(verify_on_open)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------------- recovery

    def _recover(self, verify: bool) -> RecoveryReport:
        report = RecoveryReport()
        for path in sorted(self._tmp.iterdir()):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            report.tmp_removed += 1
            _crash_point("recover.tmp_removed")
        if report.tmp_removed:
            log.warning("adapter store %s: removed %d stale temp file(s)", self.root,
                        report.tmp_removed)
        for path in sorted(self._refs.iterdir()):
            stem = path.name.removesuffix(".json")
            if not (path.name.endswith(".json") and _HEX.fullmatch(stem)):
                log.warning("adapter store %s: ignoring unknown file refs/%s", self.root, path.name)
                continue
            try:
                entry = _parse_ref(path.read_bytes())
                if _ref_key(entry.name) != stem:
                    raise ValueError(f"name {entry.name!r} does not hash to the file name")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("adapter store %s: unreadable ref refs/%s (%s); its adapter is not "
                            "served and no blob is garbage-collected", self.root, path.name, exc)
                self._unreadable_refs.append(path.name)
                continue
            self._index[entry.name] = entry
        for hex_, size in sorted(self._referenced_sizes().items()):
            reason = self._check_blob(hex_, size, verify)
            if reason:
                log.warning("adapter store %s: blob %s %s", self.root, hex_, reason)
                self._bad_blobs[hex_] = reason
        report.unreadable_refs = list(self._unreadable_refs)
        report.bad_blobs = dict(self._bad_blobs)
        if not self._unreadable_refs:
            orphans = {p.name for p in self._blobs.iterdir()} - set(self._referenced_sizes())
            report.blobs_removed = self._collect_garbage(orphans)
            if report.blobs_removed:
                log.warning("adapter store %s: removed %d unreferenced blob(s)", self.root,
                            report.blobs_removed)
        return report

    def _check_blob(self, hex_: str, size: int, verify: bool) -> str | None:
        path = self._blobs / hex_
        try:
            actual = path.stat().st_size
            if actual != size:
                return f"has {actual} bytes, expected {size}"
            if verify:
                if _sha256_file(path) != hex_:
                    return "is corrupt (sha256 mismatch)"
                self._verified[hex_] = _identity(path.stat())
        except FileNotFoundError:
            return "is missing"
        return None

    # -------------------------------------------------------------------------------- mutations

    def put(self, name: str, config_bytes: bytes, weights_bytes: bytes, *,
            version: int | None = None, expected_sha256: str | None = None) -> AdapterRecord:
        """Registers `name`, or replaces it: the new version becomes current.

        version: defaults to the highest stored version + 1; an explicit one must be higher.
        expected_sha256: the weights' sha256 as announced by the source; a mismatch is rejected.
        Every check runs before anything is written: a rejected put leaves the store unchanged.
        """
        check_name(name)
        for what, data in (("adapter_config.json", config_bytes),
                           ("adapter_model.safetensors", weights_bytes)):
            if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
                raise InvalidContentError(f"adapter {name!r}: {what} is empty")
        config_sha = hashlib.sha256(config_bytes).hexdigest()
        weights_sha = hashlib.sha256(weights_bytes).hexdigest()
        if expected_sha256 is not None and (not isinstance(expected_sha256, str)
                                            or expected_sha256.lower() != weights_sha):
            raise InvalidContentError(
                f"adapter {name!r}: adapter_model.safetensors has sha256 {weights_sha}, "
                f"expected {expected_sha256}")
        with self._write_lock:
            with self._lock:
                self._check_open()
                old = self._index.get(name)
            version = next_version(name, max(old.versions) if old else 0, version)
            new = _Version(version, config_sha, weights_sha, len(config_bytes), len(weights_bytes),
                           round(time.time(), 3))
            versions = [*(old.versions.values() if old else ()), new][-(self.keep_versions + 1):]
            entry = _Entry(name, version, {v.version: v for v in versions})
            _crash_point("put.begin")
            try:
                self._put_blob(config_sha, config_bytes)
                self._put_blob(weights_sha, weights_bytes)
                tmp = self._write_tmp(entry.to_json(), "ref")
                with self._lock:
                    os.replace(tmp, self._ref_path(name))  # commit point
                    self._index[name] = entry
            except BaseException:
                # Not committed (the index matches the refs on disk): drop the new blobs again.
                self._collect_garbage({config_sha, weights_sha})
                raise
            _crash_point("ref.renamed")
            _fsync_dir(self._refs)
            _crash_point("ref.dir_synced")
            if old:
                self._collect_garbage(_blobs_of(old))
            with self._lock:
                return self._record(entry, version)

    def delete(self, name: str) -> None:
        """Removes `name` and all its versions."""
        check_name(name)
        with self._write_lock:
            with self._lock:
                entry = self._entry(name)
                _crash_point("delete.begin")
                self._ref_path(name).unlink()  # commit point
                del self._index[name]
            _crash_point("delete.unlinked")
            _fsync_dir(self._refs)
            _crash_point("delete.dir_synced")
            self._collect_garbage(_blobs_of(entry))

    def close(self) -> None:
        """Releases the root; the store cannot be used afterwards."""
        with self._write_lock, self._lock:
            if not self._lock_file.closed:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()
            pool, self._hash_pool = self._hash_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ reads

    def get(self, name: str, version: int | None = None) -> AdapterRecord:
        """The current (or given) version; raises AdapterCorruptError if it cannot be served."""
        check_name(name)
        with self._lock:
            return self._servable(name, version)

    def open_files(self, name: str, version: int | None = None, *,
                   then: Callable[[bytearray, bytearray], T] | None = None):
        """(adapter_config.json bytes, adapter_model.safetensors bytes), sha256-verified.

        The weights are hashed on another thread while they are read, chunk by chunk (both
        release the GIL). With `then`, returns `then(config, weights)` instead, computed on this
        thread while the hash finishes; its result is discarded and AdapterCorruptError raised
        if the check fails, so nothing computed from corrupt bytes escapes.
        """
        check_name(name)
        with self._lock:
            record = self._servable(name, version)
        config, config_check = self._read_blob(record, record.config_sha256, record.config_path)
        weights, weights_check = self._read_blob(record, record.weights_sha256,
                                                 record.weights_path)
        try:
            return then(config, weights) if then is not None else (config, weights)
        finally:
            for (digest, identity), hex_ in ((config_check, record.config_sha256),
                                             (weights_check, record.weights_sha256)):
                if digest.result() != hex_:
                    self._corrupt(record, hex_, "is corrupt (sha256 mismatch)")
                with self._lock:
                    self._verified[hex_] = identity

    def read_config(self, name: str, version: int | None = None) -> bytes:
        """adapter_config.json of the current (or given) version, sha256-verified."""
        check_name(name)
        with self._lock:
            record = self._servable(name, version)
        config, (digest, identity) = self._read_blob(record, record.config_sha256,
                                                     record.config_path)
        if digest.result() != record.config_sha256:
            self._corrupt(record, record.config_sha256, "is corrupt (sha256 mismatch)")
        with self._lock:
            self._verified[record.config_sha256] = identity
        return bytes(config)

    def total_bytes(self) -> int:
        """Bytes of every blob the store references (shared blobs counted once)."""
        with self._lock:
            return sum(self._referenced_sizes().values())

    def _read_blob(self, record: AdapterRecord, hex_: str, path: Path
                   ) -> tuple[bytearray, tuple[Future, tuple[int, int, int, int]]]:
        """The blob's bytes in a writable buffer (parsers may keep views into it), a future of
        their sha256 (computed on the hashing thread just behind the reader, unless this
        unchanged file was verified before) and the file's identity."""
        try:
            with open(path, "rb") as f:
                identity = _identity(os.fstat(f.fileno()))
                size = identity[1]
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)  # read ahead it all
                data = bytearray(size)  # reuses memory freed by evicted adapters (malloc)
                view = memoryview(data)
                with self._lock:
                    known = self._verified.get(hex_) == identity
                hashing = _KnownDigest(hex_) if known else _HashBehind(view, self._hasher())
                position = 0
                while position < size:
                    n = f.readinto(view[position:position + _READ_CHUNK])
                    if not n:
                        break
                    position += n
                    hashing.filled(position)
                if position == size and not f.read(1):
                    return data, (hashing.digest, identity)
                hashing.filled(-1)
        except FileNotFoundError:
            self._corrupt(record, hex_, "is missing")
        self._corrupt(record, hex_, "changed size while being read")

    def _corrupt(self, record: AdapterRecord, hex_: str, reason: str) -> NoReturn:
        with self._lock:
            self._verified.pop(hex_, None)
            # A replace or delete may have collected the blob since `record` was taken.
            self._record(self._entry(record.name), record.version)
            log.warning("adapter store %s: blob %s %s", self.root, hex_, reason)
            self._bad_blobs[hex_] = reason
        raise AdapterCorruptError(f"adapter {record.name!r} version {record.version}: blob {hex_} "
                                  f"{reason}; upload it again")

    def _hasher(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._hash_pool is None:
                self._hash_pool = ThreadPoolExecutor(1, thread_name_prefix="store-sha256",
                                                     initializer=self._worker_init)
            return self._hash_pool

    def versions(self, name: str) -> list[AdapterRecord]:
        """Every stored version of `name`, oldest first, unservable ones with `error` set."""
        check_name(name)
        with self._lock:
            entry = self._entry(name)
            return [self._record(entry, v) for v in entry.versions]

    def list(self) -> list[AdapterRecord]:
        """The current version of every adapter, by name; unservable ones with `error` set."""
        with self._lock:
            self._check_open()
            return [self._record(e, e.current) for _, e in sorted(self._index.items())]

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    # ---------------------------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if self._lock_file.closed:
            raise StoreError(f"adapter store {self.root} is closed")

    def _servable(self, name: str, version: int | None) -> AdapterRecord:
        entry = self._entry(name)
        record = self._record(entry, entry.current if version is None else version)
        if record.error:
            raise AdapterCorruptError(f"adapter {name!r} version {record.version}: {record.error}; "
                                      "upload it again")
        return record

    def _entry(self, name: str) -> _Entry:
        self._check_open()
        entry = self._index.get(name)
        if entry is None:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        return entry

    def _record(self, entry: _Entry, version: int) -> AdapterRecord:
        v = entry.versions.get(version)
        if v is None:
            raise UnknownAdapterError(f"adapter {entry.name!r} has no version {version!r} "
                                      f"(stored: {sorted(entry.versions)})")
        errors = [f"blob {h} {self._bad_blobs[h]}" for h in (v.config_sha256, v.weights_sha256)
                  if h in self._bad_blobs]
        return AdapterRecord(entry.name, v.version, v.config_sha256, v.weights_sha256,
                             v.config_size, v.weights_size, v.created_at,
                             self._blobs / v.config_sha256, self._blobs / v.weights_sha256,
                             "; ".join(errors) or None)

    def _ref_path(self, name: str) -> Path:
        return self._refs / f"{_ref_key(name)}.json"

    def _referenced_sizes(self) -> dict[str, int]:
        sizes = {}
        for entry in self._index.values():
            for v in entry.versions.values():
                sizes[v.config_sha256] = v.config_size
                sizes[v.weights_sha256] = v.weights_size
        return sizes

    def _put_blob(self, hex_: str, data: bytes) -> None:
        path = self._blobs / hex_
        if path.is_file() and _sha256_file(path) == hex_:
            with self._lock:
                self._bad_blobs.pop(hex_, None)
                self._verified[hex_] = _identity(path.stat())
            return
        tmp = self._write_tmp(data, "blob")
        os.replace(tmp, path)  # also repairs a corrupt blob in place
        with self._lock:
            self._bad_blobs.pop(hex_, None)
            self._verified[hex_] = _identity(path.stat())  # written from bytes hashed above
        _crash_point("blob.renamed")
        _fsync_dir(self._blobs)
        _crash_point("blob.dir_synced")

    def _write_tmp(self, data: bytes, what: str) -> Path:
        """Writes `data` to a new fsynced file in tmp/; the caller renames it into place."""
        path = self._tmp / f"{what}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            with open(path, "xb") as f:
                _crash_point(f"{what}.tmp_created")
                half = len(data) // 2  # two writes, so that a crash test can kill in between
                f.write(data[:half])
                f.flush()
                _crash_point(f"{what}.half_written")
                f.write(data[half:])
                f.flush()
                os.fsync(f.fileno())
            _crash_point(f"{what}.tmp_synced")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def _collect_garbage(self, candidates: set[str]) -> int:
        """Deletes the candidate blobs that no ref names any more; returns how many.

        Runs with no put in flight (under _write_lock, or while opening), so an unreferenced blob
        is garbage, never a blob that a put is about to commit.
        """
        if self._unreadable_refs:
            return 0
        with self._lock:
            unreferenced = candidates - set(self._referenced_sizes())
            for hex_ in unreferenced:
                self._bad_blobs.pop(hex_, None)
                self._verified.pop(hex_, None)
        removed = 0
        for hex_ in sorted(unreferenced):
            path = self._blobs / hex_
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            removed += 1
            _crash_point("gc.unlinked")
        if removed:
            _fsync_dir(self._blobs)
        return removed


def _ref_key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _blobs_of(entry: _Entry) -> set[str]:
    return {h for v in entry.versions.values() for h in (v.config_sha256, v.weights_sha256)}


def _parse_ref(raw: bytes) -> _Entry:
    doc = json.loads(raw)
    if doc["format"] != _FORMAT:
        raise ValueError(f"format {doc['format']!r} is not {_FORMAT}")
    name = check_name(doc["name"])
    versions: dict[int, _Version] = {}
    for item in doc["versions"]:
        v = _Version(**item)
        for n in (v.version, v.config_size, v.weights_size):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"bad version or size {n!r}")
        for h in (v.config_sha256, v.weights_sha256):
            if not isinstance(h, str) or not _HEX.fullmatch(h):
                raise ValueError(f"bad sha256 {h!r}")
        if v.version in versions:
            raise ValueError(f"version {v.version} listed twice")
        versions[v.version] = v
    if doc["current"] not in versions:
        raise ValueError(f"current version {doc['current']!r} is not stored")
    return _Entry(name, doc["current"], dict(sorted(versions.items())))


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _KnownDigest:
    """Stands in for _HashBehind when the file was verified before and has not changed."""

    def __init__(self, hex_: str):
        self.digest: Future = Future()
        self.digest.set_result(hex_)

    def filled(self, position: int) -> None:
        pass


class _HashBehind:
    """The sha256 of a buffer while it is being filled, on a worker thread.

    The worker hashes whatever has arrived in one call (which releases the GIL), then waits for
    more. Once the reader is done the rest is hashed in a single call: a worker that needed the
    GIL once per chunk would stall behind a parser holding it (5 ms per switch).
    """

    def __init__(self, view: memoryview, pool: ThreadPoolExecutor):
        self._view = view
        self._filled = 0  # bytes the reader has written; -1 = the reader gave up
        self._changed = threading.Condition()
        self.digest: Future = pool.submit(self._run)

    def filled(self, position: int) -> None:
        with self._changed:
            self._filled = position
            self._changed.notify()

    def _run(self) -> str | None:
        hasher, done = hashlib.sha256(), 0
        while done < len(self._view):
            with self._changed:
                self._changed.wait_for(lambda: self._filled != done)
                upto = self._filled
            if upto < 0:
                return None
            hasher.update(self._view[done:upto])
            done = upto
        return hasher.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

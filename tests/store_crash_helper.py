"""A child process for tests/test_adapter_store.py's crash tests; the test SIGKILLs it.

    python -m tests.store_crash_helper seq ROOT    runs SEQUENCE, printing "ok <i>" after op i
    python -m tests.store_crash_helper open ROOT   only opens (recovers) the store
    python -m tests.store_crash_helper loop ROOT   replaces x and y forever, printing
                                                   "committed <name> <version>" after each put

With CRASH_AT=n in the environment the process kills itself at the store's n-th crash point
(`store.crash_hook`); with -1 it only records them, and `seq`/`open` print them as
"labels <json>" at the end.
Imports nothing heavy: a run costs a Python start-up.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys

from adapters_registry import store as store_mod

WEIGHTS_SIZE = 96 * 1024
KEEP_VERSIONS = 1

# (op, name, content tag, explicit version)
SEQUENCE = [
    ("put", "a", "A1", None),
    ("put", "b", "B1", None),
    ("put", "a", "A2", None),
    ("put", "a", "A3", None),     # prunes a v1 (keep_versions=1) and collects its blobs
    ("put", "c", "A3", None),     # shares a v3's blobs
    ("delete", "b", None, None),
    ("delete", "a", None, None),  # c keeps the shared blobs alive
    ("put", "b", "B2", 5),
    ("put", "c", "A2", None),     # A2's blobs were collected with a: written again
]


def content(tag: str) -> tuple[bytes, bytes]:
    """Deterministic (adapter_config.json, adapter_model.safetensors) bytes for a tag."""
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "tag": tag}).encode()
    return config, random.Random(tag).randbytes(WEIGHTS_SIZE)


def model_states() -> list[dict[str, tuple[int, dict[int, str]]]]:
    """states[k]: {name: (current version, {version: tag})} after the first k ops of SEQUENCE."""
    state: dict[str, tuple[int, dict[int, str]]] = {}
    states = [state]
    for op, name, tag, version in SEQUENCE:
        state = {n: (cur, dict(vs)) for n, (cur, vs) in state.items()}
        if op == "delete":
            del state[name]
        else:
            versions = state[name][1] if name in state else {}
            version = version or max(versions, default=0) + 1
            versions[version] = tag
            kept = sorted(versions)[-(KEEP_VERSIONS + 1):]
            state[name] = (version, {v: versions[v] for v in kept})
        states.append(state)
    return states


def install_crash_hook(crash_at: int) -> list[str]:
    """Kills this process at the store's `crash_at`-th crash point (-1: never); returns the
    labels passed, as they are passed."""
    labels: list[str] = []

    def hook(label: str) -> None:
        labels.append(label)
        if len(labels) == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    if crash_at:
        store_mod.crash_hook = hook
    return labels


def main(mode: str, root: str) -> None:
    labels = install_crash_hook(int(os.environ.get("CRASH_AT") or 0))
    store = store_mod.AdapterStore(root, keep_versions=KEEP_VERSIONS)
    if mode == "seq":
        for i, (op, name, tag, version) in enumerate(SEQUENCE):
            if op == "put":
                store.put(name, *content(tag), version=version)
            else:
                store.delete(name)
            print(f"ok {i}", flush=True)
    elif mode == "loop":
        print("ready", flush=True)
        for i in range(10**9):
            name = "xy"[i % 2]
            version = store.get(name).version + 1 if name in store else 1
            store.put(name, *content(f"{name}-{version}"), version=version)
            print(f"committed {name} {version}", flush=True)
    store.close()
    print("labels " + json.dumps(labels), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

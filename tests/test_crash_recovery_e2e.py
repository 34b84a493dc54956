"""SIGKILL a real server while a client uploads and replaces adapters, restart it on the same
store, and check that nothing acknowledged was lost.

Each round: a client thread uploads demo-adapter contents under a few names (each upload of a
name that exists is a replace) and, once an upload is acknowledged, records the greedy tokens
that (name, weights sha256) serves; the test SIGKILLs the server after a random delay (seeded)
and starts it again on the same store. Then:

- every adapter listed is servable (GetAdapter reports no error) and serves exactly the tokens
  its content served before the crash (recorded per (name, sha256), and per sha256 for every
  content before the first round);
- a name holds the content of its last acknowledged upload, or that of the upload in flight
  when the server died, with a version no lower than the acknowledged one;
- a name whose first upload was in flight holds that content or does not exist.

`run_crash_rounds` is the driver; scripts/soak.py runs it with many more rounds.
"""

from __future__ import annotations

import hashlib
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapters_registry.peft_format import WEIGHTS_FILE
from clients import LoraplexClient, LoraplexError
from tests.server_process import ServerProcess, start_server

ADMIN_TOKEN = "crash-admin"
NAMES = ("crash-0", "crash-1", "crash-2")
PROMPT = "Once upon a time"
TOKENS = 6


@dataclass
class CrashReport:
    rounds: int = 0
    killed_mid_upload: int = 0  # rounds whose kill fell while an upload was unacknowledged
    uploads_acked: int = 0
    uploads_in_flight_kept: int = 0  # unacknowledged uploads found committed after the restart
    stale_files_removed: int = 0  # temp files and orphan blobs the restarted store cleaned up
    adapters_checked: int = 0  # (round, adapter) pairs served and compared after a restart
    violations: list[str] = field(default_factory=list)  # lost, wrong or unservable adapters
    restart_seconds: list[float] = field(default_factory=list)


class Uploader(threading.Thread):
    """Uploads and replaces adapters until the server goes away."""

    def __init__(self, target: str, contents: list[Path], rng: random.Random,
                 acked: dict[str, tuple[int, str]], outputs: dict[tuple[str, str], list[int]]):
        super().__init__(daemon=True)
        self.client = LoraplexClient(target, admin_token=ADMIN_TOKEN, timeout=60)
        self.contents, self.rng, self.acked, self.outputs = contents, rng, acked, outputs
        self.in_flight: tuple[str, str] | None = None  # (name, sha256) sent, not acknowledged
        self.uploads = 0

    def run(self) -> None:
        try:
            while True:
                name = self.rng.choice(NAMES)
                directory = self.rng.choice(self.contents)
                sha = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
                self.in_flight = (name, sha)
                info = self.client.upload_adapter(name, directory, chunk_size=1 << 18)
                self.in_flight = None
                self.acked[name] = (info.version, info.weights_sha256)
                self.uploads += 1
                if (name, sha) not in self.outputs:  # once per (name, content): keep uploading
                    self.outputs[name, sha] = self.client.generate(
                        PROMPT, adapter=name, max_new_tokens=TOKENS).token_ids
        except LoraplexError:
            pass  # the server was killed
        finally:
            self.client.close()


def serve(demo_cache: Path, store: Path, token_file: Path) -> ServerProcess:
    return start_server("--admin-token-file", str(token_file), "--store", str(store),
                        "--quantize", "none", "--kv-cache-mb", "16", "--threads", "1",
                        env={"LORAPLEX_CACHE_DIR": str(demo_cache)})


def removed_files(log: str) -> int:
    """Temp files and unreferenced blobs the store removed when it opened."""
    return sum(int(n) for n in re.findall(
        r"removed (\d+) (?:stale temp file|unreferenced blob)", log))


def run_crash_rounds(demo_cache: Path, workdir: Path, rounds: int, *, seed: int = 0,
                     max_delay: float = 1.0) -> CrashReport:
    """`rounds` kill/restart rounds on one store under `workdir`; kills come after a delay drawn
    uniformly from [0.05, max_delay] seconds of uploading."""
    rng = random.Random(seed)
    token_file = workdir / "admin-token"
    token_file.write_text(ADMIN_TOKEN)
    store = workdir / "store"
    contents = sorted(p for p in (demo_cache / "demo" / "v1" / "adapters").iterdir())
    report = CrashReport()
    acked: dict[str, tuple[int, str]] = {}
    outputs: dict[tuple[str, str], list[int]] = {}
    server = serve(demo_cache, store, token_file)
    try:
        with LoraplexClient(server.target, admin_token=ADMIN_TOKEN, timeout=60) as client:
            by_sha: dict[str, list[int]] = {}  # each content's tokens, before any crash
            for i, directory in enumerate(contents):
                info = client.upload_adapter(f"reference-{i}", directory)
                by_sha[info.weights_sha256] = client.generate(
                    PROMPT, adapter=f"reference-{i}", max_new_tokens=TOKENS).token_ids
                client.delete_adapter(f"reference-{i}")
            by_name = {a.name: client.generate(PROMPT, adapter=a.name,
                                               max_new_tokens=TOKENS).token_ids
                       for a in client.list_adapters()}  # the demo adapters registered at start
        for r in range(rounds):
            uploader = Uploader(server.target, contents, random.Random(rng.random()), acked,
                                outputs)
            uploader.start()
            time.sleep(rng.uniform(0.05, max_delay))
            server.stop(signal.SIGKILL)
            uploader.join(120)
            report.rounds += 1
            report.uploads_acked += uploader.uploads
            report.killed_mid_upload += uploader.in_flight is not None
            started = time.monotonic()
            server = serve(demo_cache, store, token_file)
            report.restart_seconds.append(time.monotonic() - started)
            report.stale_files_removed += removed_files(server.output())
            with LoraplexClient(server.target, admin_token=ADMIN_TOKEN, timeout=60) as client:
                check_store(client, r, uploader.in_flight, acked, outputs, by_sha, by_name,
                            report)
    finally:
        server.stop(signal.SIGKILL)
    return report


def check_store(client: LoraplexClient, round_: int, in_flight: tuple[str, str] | None,
                acked: dict[str, tuple[int, str]], outputs: dict[tuple[str, str], list[int]],
                by_sha: dict[str, list[int]], by_name: dict[str, list[int]],
                report: CrashReport) -> None:
    listed = {a.name: a for a in client.list_adapters()}
    for name, (version, sha) in acked.items():
        allowed = {sha} | ({in_flight[1]} if in_flight and in_flight[0] == name else set())
        info = listed.get(name)
        if info is None or info.weights_sha256 not in allowed or info.version < version:
            found = info and (info.version, info.weights_sha256[:12])
            report.violations.append(f"round {round_}: {name} acknowledged as v{version} "
                                     f"{sha[:12]}, found {found}")
    if in_flight and in_flight[0] in listed:
        name, sha = in_flight
        found = listed[name].weights_sha256
        if found == sha and acked.get(name, (0, ""))[1] != sha:
            report.uploads_in_flight_kept += 1
        if name not in acked and found != sha:
            report.violations.append(f"round {round_}: {name} appeared with content "
                                     f"{found[:12]} nobody uploaded")
    for name in NAMES:  # what the store holds now is what later rounds must keep
        if name in listed:
            acked[name] = (listed[name].version, listed[name].weights_sha256)
    for name, info in listed.items():
        expected = by_name.get(name) or by_sha.get(info.weights_sha256)
        if info.error or client.get_adapter(name).error:
            report.violations.append(f"round {round_}: {name} is not servable: {info.error}")
            continue
        tokens = client.generate(PROMPT, adapter=name, max_new_tokens=TOKENS).token_ids
        recorded = outputs.get((name, info.weights_sha256))
        if tokens != expected or (recorded is not None and tokens != recorded):
            report.violations.append(f"round {round_}: {name} ({info.weights_sha256[:12]}) "
                                     f"serves {tokens}, served {recorded or expected} before")
        report.adapters_checked += 1


def test_sigkill_during_uploads_loses_nothing_acknowledged(demo_cache, tmp_path):
    report = run_crash_rounds(demo_cache, tmp_path, rounds=4, seed=0)
    assert report.violations == []
    assert report.rounds == 4 and report.uploads_acked > 0
    assert report.killed_mid_upload >= 1  # the kills did land inside uploads
    assert report.adapters_checked >= 4 * 5  # the demo adapters and the crash-* ones present

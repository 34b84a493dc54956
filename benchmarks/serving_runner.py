"""Drives a real `loraplex serve` process with an open-loop trace over gRPC.

- `build_store`: a durable adapter store holding N distinct rank-16 adapters (all 7 modules of
  the core engine benchmark's model, bf16, seeded), built once and grown on demand.
- `ServingServer`: the server in a child process on that store, with its /metrics endpoint.
- `run_open_loop`: sends each trace request at its arrival time (asyncio, one stream per request,
  never waiting for earlier ones) and records TTFT, end-to-end latency and tokens per request.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.traces import TraceRequest, prompt_tokens

RANK = 16
LORA_ALPHA = 32
PROMPT_VOCAB = 500  # prompts use ids in [5, 500), the demo tokenizer's range


def adapter_name(index: int) -> str:
    return f"bench-{index:04d}"


@dataclass
class RequestResult:
    request: TraceRequest
    sent: float  # seconds since the run started
    ttft: float | None  # seconds from sending to the first token; None if it failed first
    latency: float  # seconds from sending to the last token (or the error)
    tokens: int  # generated tokens received
    error: str | None = None


# ---- assets ----------------------------------------------------------------------------------

def build_store(store_dir: Path, model_dir: Path, count: int, log,
                target_modules: tuple[str, ...] | None = None) -> None:
    """Makes `store_dir` hold adapters bench-0000 .. bench-{count-1}; only missing ones are
    written. Each is a PEFT-format rank-16 adapter with its own seed, bf16, on `target_modules`
    (default: all 7 modules). A store holds one kind of adapter: name it by its modules.

    `<store_dir>.count` (written atomically once a build ends) records how many are complete, so a
    later run that needs no more does not open the store (another process may hold its lock)."""
    marker = store_dir.with_name(store_dir.name + ".count")
    if marker.is_file() and int(marker.read_text()) >= count:
        return
    from adapters_registry.store import AdapterStore
    from server.tools.demo import ALL_LINEAR_MODULES, write_lora_adapter

    store = AdapterStore(store_dir)
    try:
        missing = [i for i in range(count) if adapter_name(i) not in store]
        if missing:
            log(f"writing {len(missing)} adapters into {store_dir} (once)")
        scratch = Path(tempfile.mkdtemp(prefix="adapter-", dir=store_dir.parent))
        try:
            for done, index in enumerate(missing, 1):
                write_lora_adapter(scratch, base_model_dir=model_dir, r=RANK,
                                   lora_alpha=LORA_ALPHA,
                                   target_modules=target_modules or ALL_LINEAR_MODULES,
                                   seed=10_000 + index, init_std=0.02, dtype=_bf16())
                store.put(adapter_name(index), (scratch / "adapter_config.json").read_bytes(),
                          (scratch / "adapter_model.safetensors").read_bytes())
                if done % 50 == 0 or done == len(missing):
                    log(f"  {done}/{len(missing)} adapters written")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        store.close()
    partial = marker.with_suffix(".partial")
    partial.write_text(str(count))
    partial.rename(marker)


def _bf16():
    import torch

    return torch.bfloat16


def export_adapters(store_dir: Path, indices: list[int], out: Path) -> dict[int, Path]:
    """PEFT directories of the given adapters, read from the store (for the baselines)."""
    from adapters_registry.store import AdapterStore

    store = AdapterStore(store_dir)
    dirs = {}
    try:
        for index in indices:
            config, weights = store.open_files(adapter_name(index))
            directory = out / adapter_name(index)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "adapter_config.json").write_bytes(bytes(config))
            (directory / "adapter_model.safetensors").write_bytes(bytes(weights))
            dirs[index] = directory
    finally:
        store.close()
    return dirs


# ---- the server --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServingServer:
    """`loraplex serve` on the benchmark model and store, in a child process (NF4 base, fp32
    compute unless told otherwise; `extra`: more command-line flags)."""

    def __init__(self, model_dir: Path, store_dir: Path, *, max_slots: int, max_batch_size: int,
                 lora_dtype: str, adapter_cache_mb: int, threads: int, quantize: str = "nf4",
                 dtype: str = "float32", extra: tuple[str, ...] = ()):
        from tests.server_process import start_server

        self.metrics_port = free_port()
        self.process = start_server(
            "--model", str(model_dir), "--quantize", quantize, "--dtype", dtype,
            "--store", str(store_dir),
            "--max-slots", str(max_slots), "--max-rank", str(RANK),
            "--max-batch-size", str(max_batch_size), "--lora-dtype", lora_dtype,
            "--adapter-cache-mb", str(adapter_cache_mb), "--kv-cache-mb", "512",
            "--threads", str(threads), "--max-queue", "4096",
            "--metrics-port", str(self.metrics_port), *extra)
        if not self.process.port:
            raise RuntimeError("the server did not start:\n" + self.process.output()[-3000:])
        self._warm_up()

    def _warm_up(self) -> None:
        """One short base-model request: the first forward repacks bitsandbytes' 4-bit weights
        for its CPU kernel (seconds), which would otherwise land on the first timed request."""
        from clients import LoraplexClient

        with LoraplexClient(self.target, timeout=600) as client:
            client.generate(prompt_token_ids=list(range(5, 37)), max_new_tokens=4)

    @property
    def target(self) -> str:
        return self.process.target

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.metrics_port)

    def rss_bytes(self) -> int:
        """The server process's resident memory (VmRSS)."""
        status = Path(f"/proc/{self.process.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the server process has used so far."""
        fields = Path(f"/proc/{self.process.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def stop(self) -> None:
        self.process.stop()


def read_metrics(port: int) -> dict[str, float]:
    """Every sample of the /metrics on `port` as 'name{labels}' -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            samples[match[1]] = float(match[2])
    return samples


class QueueSampler:
    """Reads the server's running and waiting sequence counts from /metrics every `every`
    seconds on a thread while a trace runs: how full the running batch was."""

    def __init__(self, metrics_port: int, every: float = 1.0):
        self.metrics_port, self.every = metrics_port, every
        self.samples: list[tuple[float, float]] = []  # (running, waiting)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            m = read_metrics(self.metrics_port)
            self.samples.append((m.get("loraplex_num_requests_running", math.nan),
                                 m.get("loraplex_num_requests_waiting", math.nan)))

    def __enter__(self) -> QueueSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cache_counters(samples: dict[str, float], tier: str) -> dict[str, float]:
    """loads / hits / misses / evictions of one adapter-cache tier (device or host)."""
    return {what: samples.get(f'loraplex_adapter_cache_{what}_total{{tier="{tier}"}}', 0.0)
            for what in ("loads", "hits", "misses", "evictions")}


def load_seconds(samples: dict[str, float], tier: str) -> float:
    """Seconds spent loading adapters into a tier: host (store -> RAM), device (RAM -> slot)."""
    return samples.get(f'loraplex_adapter_load_seconds_sum{{tier="{tier}"}}', 0.0)


# ---- the open-loop client ----------------------------------------------------------------------

async def _run_open_loop(target: str, trace: list[TraceRequest], names: list[str | None],
                         log) -> list[RequestResult]:
    from clients import AsyncLoraplexClient
    from clients._common import LoraplexError

    done = 0
    async with AsyncLoraplexClient(target, timeout=3600) as client:
        start = time.perf_counter()

        async def one(request: TraceRequest) -> RequestResult:
            nonlocal done
            prompt = prompt_tokens(request, PROMPT_VOCAB)
            await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
            sent = time.perf_counter()
            first, tokens, error = None, 0, None
            try:
                async for delta in client.stream(prompt_token_ids=prompt,
                                                 adapter=names[request.index],
                                                 max_new_tokens=request.output_len):
                    if delta.token_ids and first is None:
                        first = time.perf_counter()
                    tokens += len(delta.token_ids)
            except LoraplexError as exc:
                error = str(exc)
            end = time.perf_counter()
            done += 1
            if done % max(1, len(trace) // 4) == 0:
                log(f"    {done}/{len(trace)} requests done")
            return RequestResult(request, sent - start, None if first is None else first - sent,
                                 end - sent, tokens, error)

        return await asyncio.gather(*(one(r) for r in trace))


def run_open_loop(target: str, trace: list[TraceRequest], names: list[str | None],
                  log) -> list[RequestResult]:
    """names[i]: the adapter of trace request i (None = base model)."""
    return asyncio.run(_run_open_loop(target, trace, names, log))

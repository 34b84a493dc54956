"""1000 adapters for real: a trace that requests over a thousand distinct adapters, beside 5.

S-LoRA's scale setting on this machine. A store of STORE_ADAPTERS adapters; a trace of REQUESTS
requests whose adapters follow a power law (alpha = ALPHA, benchmarks/traces.py) and whose
arrivals form a Gamma process (RATE requests/s, gap CV = CV), so that about 1050 distinct
adapters are requested. The reference is the same trace over 5 adapters: the same arrivals and
lengths, only the adapter indices differ. RATE is above what the server serves, so both traces
keep it saturated and their throughputs compare what serving many adapters costs.

Two adapter sizes, each in a store of its own and on a fresh server:

- small: rank 16 on q_proj and v_proj, under 1% of the base's bytes (S-LoRA's rank 16 on q, k, v,
  o of a 7B base is ~0.25%). Target: 1000-adapter throughput >= 0.90 x the 5-adapter throughput.
- heavy: rank 16 on all 7 modules (benchmarks/serving.py's adapters, ~11% of the base each),
  reported with the memory traffic that explains it.

The server is `loraplex serve` as in benchmarks/serving.py (NF4 base, fp32 compute, 64 slots,
running batch <= 32, the default host adapter cache of 2048 MiB: it holds every small adapter of
the trace and a fifth of the heavy ones, whose other reads come from the store). Each server
first gets one 1-token request per adapter of the trace (S-LoRA keeps all adapters in host
memory; here the heavy ones that do not fit come from the store again). Then ROUNDS interleaved
rounds of (5-adapter trace, 1000-adapter trace); verdicts from the medians. Where adapters came
from in each run is read from the server's counters: store -> host RAM reads, host RAM -> slot
writes, and requests whose adapter was in a slot already.

    .venv/bin/python -m benchmarks.scale [--sizes small,heavy] [--rounds 3] [--requests N]
        [--out PATH]

About 35 minutes on 2 cores once the stores exist (the first run writes them: ~1500 small and
~1500 heavy adapters, ~16 GB in all).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from benchmarks.core_engine import THREADS, Log, build_assets, machine
from benchmarks.serving import MAX_SLOTS, Point, Rounds, serve_trace, warm_up
from benchmarks.serving_runner import ServingServer, adapter_name, build_store
from benchmarks.traces import TraceRequest, make_trace
from server.tools.demo import ALL_LINEAR_MODULES, default_cache_dir

STORE_ADAPTERS = 1500
REQUESTS = 2000
ALPHA = 0.7
RATE, CV = 30.0, 2.0
PROMPT_RANGE, OUTPUT_RANGE = (8, 32), (8, 16)
FEW = 5
MIN_REQUESTED = 1000
TARGET = 0.90  # small adapters: many / few throughput
BATCH = 32
ADAPTER_CACHE_MB = 2048
DEFAULT_OUT = Path("benchmarks/reports/scale.md")


@dataclass(frozen=True)
class Size:
    key: str
    label: str
    modules: tuple[str, ...]
    store: str  # directory name under the bench cache
    judged: bool  # whether the 1000 / 5 ratio has a target


SIZES = {
    "small": Size("small", "small: rank 16 on q_proj, v_proj", ("q_proj", "v_proj"),
                  "scale-store-qv-v1", True),
    "heavy": Size("heavy", "heavy: rank 16 on all 7 modules", tuple(ALL_LINEAR_MODULES),
                  "serving-store-v1", False),
}


@dataclass
class SizeResult:
    size: Size
    adapter_params: int  # one adapter's parameters
    few: Rounds
    many: Rounds
    warm_up: Point
    base_bytes: float  # the base model as served, from the server's gauge

    @property
    def ratio(self) -> float:
        return self.many.throughput / self.few.throughput


def traces(num_requests: int) -> tuple[list[TraceRequest], list[TraceRequest]]:
    """(the many-adapter trace, the same arrivals and lengths over FEW adapters)."""
    def trace(adapters: int) -> list[TraceRequest]:
        return make_trace(adapters, alpha=ALPHA, rate=RATE, cv=CV, num_requests=num_requests,
                          prompt_range=PROMPT_RANGE, output_range=OUTPUT_RANGE, seed=7)
    return trace(STORE_ADAPTERS), trace(FEW)


def named(trace: list[TraceRequest]) -> list[str]:
    return [adapter_name(r.adapter) for r in trace]


def requested(point: Point) -> int:
    return len({r.request.adapter for r in point.results})


def parameter_count(model_dir: Path) -> int:
    """The base model's parameters, from its safetensors headers (tied weights counted once)."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def run_size(size: Size, model_dir: Path, rounds: int, num_requests: int, log: Log) -> SizeResult:
    store_dir = default_cache_dir() / "bench" / size.store
    build_store(store_dir, model_dir, STORE_ADAPTERS, log, target_modules=size.modules)
    many_trace, few_trace = traces(num_requests)
    used = sorted({r.adapter for r in many_trace})
    log(f"{size.label}: {len(used)} distinct adapters in the trace; starting a server")
    server = ServingServer(model_dir, store_dir, max_slots=MAX_SLOTS, max_batch_size=BATCH,
                           lora_dtype="float32", adapter_cache_mb=ADAPTER_CACHE_MB,
                           threads=THREADS)
    try:
        warm = serve_trace(server, *warm_up(used, PROMPT_RANGE[0]), log)
        few, many = Rounds([]), Rounds([])
        for index in range(1, rounds + 1):
            few.points.append(serve_trace(server, f"{FEW} adapters, round {index}", few_trace,
                                          named(few_trace), log))
            many.points.append(serve_trace(server, f"{len(used)} adapters, round {index}",
                                           many_trace, named(many_trace), log))
        gauges = server.metrics()
    finally:
        server.stop()
    return SizeResult(size, adapter_params(store_dir), few, many, warm,
                      gauges.get("loraplex_base_model_bytes", math.nan))


def adapter_params(store_dir: Path) -> int:
    """One adapter's parameters (every adapter of a store has the same shapes)."""
    from safetensors.torch import load

    from adapters_registry.store import AdapterStore

    store = AdapterStore(store_dir)
    try:
        weights = load(bytes(store.open_files(adapter_name(0))[1]))
    finally:
        store.close()
    return sum(t.numel() for t in weights.values())


# ---- report ------------------------------------------------------------------------------------


def sources(point: Point) -> str:
    """Where the run's adapters came from, by the server's counters."""
    host, device = point.cache("host"), point.cache("device")
    return (f"{host['loads']:.0f} / {device['loads']:.0f} / {device['hits']:.0f}")


def verdict(ratio: float, target: float) -> str:
    if ratio >= target:
        return f"**{ratio:.2f}**, target >= {target}: **PASS**"
    return f"**{ratio:.2f}**, target >= {target}: **MISS** by {1 - ratio / target:.0%}"


def report(results: list[SizeResult], base_params: int, rounds: int, num_requests: int,
           command: str, loads: tuple[float, float]) -> str:
    host = machine()
    lines = ["# 1000 adapters for real", "",
             f"Command: `{command}`  ", f"Date: {datetime.date.today().isoformat()}", "",
             f"SmolLM2-135M-shaped Llama (random weights, {base_params / 1e6:.1f}M parameters), "
             f"NF4 base, fp32 compute, {THREADS} CPU threads; `loraplex serve` with {MAX_SLOTS} "
             f"slots, fp32 slot tables, running batch <= {BATCH}, host adapter cache "
             f"{ADAPTER_CACHE_MB} MiB, driven over gRPC by an open-loop client (one stream per "
             f"request, as benchmarks/serving.py). Trace: {num_requests} requests over a store of "
             f"{STORE_ADAPTERS} adapters, power-law popularity (alpha = {ALPHA}: adapter = "
             f"floor(n u), u ~ power({ALPHA})), Gamma arrivals at {RATE:g} requests/s with gap "
             f"CV {CV:g} (above what the server serves: it stays saturated), prompts "
             f"{PROMPT_RANGE[0]}-{PROMPT_RANGE[1]} tokens, outputs {OUTPUT_RANGE[0]}-"
             f"{OUTPUT_RANGE[1]}, greedy. The {FEW}-adapter trace has the same arrivals and "
             "lengths. Each server first got one 1-token request per adapter of the trace; then "
             f"{rounds} interleaved rounds of ({FEW}-adapter trace, many-adapter trace) on it. "
             "tok/s: median (spread min-max); the other figures are the median round's.", ""]
    lines += ["## Targets", ""]
    for res in results:
        lines.append(f"- {res.size.label}: distinct adapters requested "
                     f"{requested(res.many.median)} (>= {MIN_REQUESTED}: "
                     f"{'yes' if requested(res.many.median) >= MIN_REQUESTED else 'NO'}); "
                     "many / 5-adapter throughput "
                     + (verdict(res.ratio, TARGET) if res.size.judged
                        else f"**{res.ratio:.2f}** (reported; no target)"))
        lines.append(f"  - {traffic(res)}")
    lines += ["", "## Runs", "",
              "Sources, from the server's counters over each run: store reads (store -> host "
              "RAM) / slot writes (host RAM -> slot) / requests whose adapter was in a slot "
              "already. Load s: seconds spent on store reads / slot writes. Busy: CPU seconds "
              "per second of span, server / client (2.00 = both cores). Running / waiting: "
              "sequences, sampled each second.", "",
              "| adapters | run | requested | tok/s (spread) | TTFT p50 / p99 ms | sources | "
              "load s | running / waiting | busy | load avg | failed | RSS MiB | host cache MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        share = res.adapter_params / base_params
        rows = [("warm-up (1 token each)", Rounds([res.warm_up])), (f"{FEW} adapters", res.few),
                ("many adapters", res.many)]
        for name, rounds_ in rows:
            pt = rounds_.median
            lines.append(
                f"| {res.size.label} ({share:.2%} of the base's parameters) | {name} | "
                f"{requested(pt)} | {rounds_.throughput:.1f} ({rounds_.spread}) | "
                f"{pt.ttft(0.5) * 1e3:.0f} / {pt.ttft(0.99) * 1e3:.0f} | {sources(pt)} | "
                f"{pt.load_seconds('host'):.1f} / {pt.load_seconds('device'):.1f} | "
                f"{pt.mean_queue()} | {pt.busy(pt.server_cpu):.2f} / "
                f"{pt.busy(pt.client_cpu):.2f} | {pt.load_avg:.2f} | {pt.failures} | "
                f"{pt.rss_bytes / 2**20:.0f} | {pt.host_cache_bytes / 2**20:.0f} |")
    every = [pt for res in results for group in (res.few, res.many) for pt in group.points]
    errors = Counter(re.sub(r"bench-\d+", "bench-N", r.error)[:160] for pt in every
                     for r in pt.results if r.error)
    lines += ["", "## Checks", "",
              f"- failed requests over every timed run: {sum(pt.failures for pt in every)}"
              + "".join(f"; {count} x {error}" for error, count in errors.most_common()),
              f"- requests that ended at EOS before their output length: "
              f"{sum(pt.ended_early for pt in every)} of {sum(len(pt.results) for pt in every)}",
              f"- 1-minute load average before the run {loads[0]:.2f}, at the end of each run "
              f"{min(pt.load_avg for pt in every):.2f} - {max(pt.load_avg for pt in every):.2f} "
              "(this benchmark alone keeps it near 2)",
              "- server CPU busy over the timed runs: "
              f"{min(pt.busy(pt.server_cpu) for pt in every):.2f} - "
              f"{max(pt.busy(pt.server_cpu) for pt in every):.2f}"]
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in host.items()] + [""]
    return "\n".join(lines)


def traffic(res: SizeResult) -> str:
    """What a decode step reads: the slot-table rows of every distinct adapter in its batch (the
    kernel reads each module's rows up to the adapter's rank: its parameters, in fp32)."""
    few, many = res.few.median, res.many.median
    per_slot = res.adapter_params * 4 / 2**20
    return (f"profile: {FEW} adapters {few.throughput:.1f} tok/s, running / waiting "
            f"{few.mean_queue()}; many {many.throughput:.1f} tok/s, running / waiting "
            f"{many.mean_queue()}, {many.cache('host')['loads']:.0f} store reads "
            f"({many.load_seconds('host'):.1f} s) and {many.cache('device')['loads']:.0f} slot "
            f"writes ({many.load_seconds('device'):.1f} s). Memory traffic: one adapter's fp32 "
            f"slot rows are {per_slot:.1f} MiB, which a step reads for each distinct adapter of "
            f"its batch: {FEW} adapters {FEW * per_slot:.0f} MiB, {BATCH} distinct "
            f"{BATCH * per_slot:.0f} MiB, beside the base's {res.base_bytes / 2**20:.0f} MiB")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,heavy",
                        help="adapter sizes to run, comma-separated (small, heavy)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    parser.add_argument("--requests", type=int, default=REQUESTS,
                        help=f"requests per trace (default {REQUESTS}; fewer: a check only)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report path")
    args = parser.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {', '.join(unknown)}: choose from {', '.join(SIZES)}")
    if args.rounds < 3 and args.out == DEFAULT_OUT:
        parser.error("--rounds must be at least 3 for the committed report: verdicts come from "
                     "medians (give --out for a check)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    transformers.utils.logging.disable_progress_bar()
    log = Log()
    load_before = os.getloadavg()[0]
    model_dir, _ = build_assets(default_cache_dir(), log)
    results = [run_size(SIZES[key], model_dir, args.rounds, args.requests, log)
               for key in args.sizes]
    command = (".venv/bin/python -m benchmarks.scale " + shlex.join(
        sys.argv[1:] if argv is None else argv)).strip()
    text = report(results, parameter_count(model_dir), args.rounds, args.requests, command,
                  (load_before, os.getloadavg()[0]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    log(f"report written to {args.out}")


if __name__ == "__main__":
    main()

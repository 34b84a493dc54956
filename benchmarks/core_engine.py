"""Core engine benchmark: one NF4 base model, 32 rank-16 adapters, four ways to serve them.

On a SmolLM2-135M-shaped Llama (random weights, NF4, fp32 compute, 2 CPU threads), the same 32
prompts (32 tokens each, 64 new tokens, greedy, EOS ignored) run through:

  (a)      HF `generate`, static batch of 32, base only
  (b)      PEFT mixed batch, `generate(adapter_names=...)`, a different adapter per sequence
  (c)      loraplex EngineCore, base only
  (d)      loraplex EngineCore, a different adapter per sequence (slot tables in --lora-dtype)
  (d-bf16) as (d) with bfloat16 slot tables (only when --lora-dtype is float32)

Each config gets one short warm-up, then --repeats interleaved timed rounds. Throughput is
generated tokens / wall time from submission to the last token, prefill included, the same way
for all. Targets: (c) >= 1.0 x (a), (d) >= 0.80 x (c), (d) >= 3 x (b). Writes a Markdown report.

    ./dev bench [--quick] [--lora-dtype bfloat16] [--repeats N] [--profile on|off|auto] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import hashlib
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from server.tools.demo import ALL_LINEAR_MODULES, SMOLLM2_135M_SHAPE, default_cache_dir  # noqa: E402
from server.tools.demo import write_llama_model, write_lora_adapter  # noqa: E402

THREADS = 2
NUM_PROMPTS = 32
PROMPT_LEN = 32
NEW_TOKENS = 64
QUICK_NEW_TOKENS = 16
WARMUP_TOKENS = 4
RANK = 16
LORA_ALPHA = 32
PROMPT_SEED = 0
BENCH_VERSION = "v1"
"""Bump when the benchmark's model or adapters change, so older caches are not reused."""

TARGETS = (("c", "a", 1.0), ("d", "c", 0.80), ("d", "b", 3.0))
"""(config, reference, minimum ratio of their tokens/s)."""

DEFAULT_OUT = Path("benchmarks/reports/core_engine.md")
QUICK_OUT = Path("benchmarks/reports/core_engine-quick.md")


@dataclass
class Run:
    tokens: list[list[int]]  # [NUM_PROMPTS][new tokens]
    seconds: float  # wall time
    cpu_seconds: float  # this process's CPU time, all threads: ~THREADS x seconds when not contended

    @property
    def num_tokens(self) -> int:
        return sum(len(row) for row in self.tokens)

    @property
    def tok_s(self) -> float:
        return self.num_tokens / self.seconds


@dataclass
class Config:
    key: str
    label: str
    generate: Callable[[int], list[list[int]]]  # new tokens per sequence -> tokens per sequence
    lm_head: torch.nn.Module  # the output layer the run uses (its time is a profile section)


def run_config(config: Config, new_tokens: int) -> Run:
    """One timed run: submission to the last token, prefill included."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = config.generate(new_tokens)
    return Run(tokens, time.perf_counter() - wall, time.process_time() - cpu)


class Log:
    """Progress lines on stdout, each with the time since the benchmark started."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", flush=True)


# ---- assets -------------------------------------------------------------------------------


def build_assets(root: Path, log: Log) -> tuple[Path, dict[str, Path]]:
    """The 135M-shaped model and NUM_PROMPTS rank-16 adapters under `root/bench/`, built once."""
    final = root.expanduser().absolute() / "bench" / BENCH_VERSION
    names = [f"r{RANK}-{i:02d}" for i in range(NUM_PROMPTS)]
    if not (final / "complete").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
        log(f"building the benchmark model and {len(names)} adapters in {final} (once)")
        try:
            _write_assets(tmp, final, names, log)
            try:
                tmp.rename(final)
            except OSError:
                if not (final / "complete").is_file():  # not a concurrent builder: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "model", {name: final / "adapters" / name for name in names}


def _write_assets(tmp: Path, final: Path, names: list[str], log: Log) -> None:
    def every_tenth_layer(line: str) -> None:
        if line.split("/")[0].endswith("0"):
            log(line)

    write_llama_model(tmp / "model", **SMOLLM2_135M_SHAPE, seed=0, progress=every_tenth_layer)
    for seed, name in enumerate(names, start=1):
        write_lora_adapter(tmp / "adapters" / name, base_model_dir=tmp / "model", r=RANK,
                           lora_alpha=LORA_ALPHA, target_modules=ALL_LINEAR_MODULES, seed=seed,
                           base_model_name_or_path=str(final / "model"))
    log(f"{len(names)} adapters written")
    (tmp / "complete").write_text("")


def make_prompts() -> torch.Tensor:
    """[NUM_PROMPTS, PROMPT_LEN] token ids in [5, 500), the same on every run."""
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(5, 500, (NUM_PROMPTS, PROMPT_LEN), generator=generator)


# ---- the four configs ---------------------------------------------------------------------


def load_hf(model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The benchmark model as transformers serves it: NF4 (bitsandbytes), `dtype` compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant,
                                                 dtype=dtype, device_map={"": device})
    # EOS ignored like loraplex's ignore_eos: not just forbidden (min_new_tokens masks it out of
    # the logits, which would change greedy tokens wherever EOS is the argmax).
    model.generation_config.eos_token_id = None
    return model.eval()


def load_peft(model_dir: Path, adapters: dict[str, Path], device: str = "cpu",
              dtype: torch.dtype = torch.float32):
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(load_hf(model_dir, device, dtype), adapters[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def load_core(model_dir: Path, adapters: dict[str, Path], lora_dtype: str,
              max_slots: int = NUM_PROMPTS, **engine):
    """A loraplex engine over the benchmark model (NF4, fp32 compute unless `engine` says)."""
    from server.config import EngineConfig
    from server.engine.core import load_engine_core

    config = EngineConfig(**{"model": model_dir, "quantize": "nf4", "device": "cpu",
                             "threads": THREADS, "max_slots": max_slots, "max_rank": RANK,
                             "lora_dtype": lora_dtype, "kv_cache_mb": 256, **engine})
    config.validate()
    return load_engine_core(config, {name: str(path) for name, path in adapters.items()})


def generate_hf(model, prompts: torch.Tensor, new_tokens: int,
                adapter_names: list[str] | None = None) -> list[list[int]]:
    """(a) and (b): one static-batch `generate` call."""
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    with torch.inference_mode():
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, **extra)
    return out[:, prompts.shape[1]:].tolist()


def generate_loraplex(core, prompts: torch.Tensor, new_tokens: int,
                      adapter_ids: list[str | None]) -> list[list[int]]:
    """(c) and (d): submit every request, then step the engine until it is idle."""
    from server.engine.core import GenerationRequest
    from server.engine.sampler import SamplingParams

    ids = [core.add_request(GenerationRequest(
               prompt_token_ids=row, adapter_id=adapter,
               params=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))
           for row, adapter in zip(prompts.tolist(), adapter_ids)]
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    while core.has_work():
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[request_id] for request_id in ids]


def load_configs(model_dir: Path, adapters: dict[str, Path], lora_dtype: str,
                 log: Log) -> list[Config]:
    prompts = make_prompts()
    names = list(adapters)
    log("loading (a) HF NF4 model")
    hf = load_hf(model_dir)
    log(f"loading (b) HF NF4 model + PEFT with {len(names)} adapters")
    peft = load_peft(model_dir, adapters)
    log(f"loading (c)/(d) loraplex engine, {lora_dtype} slot tables")
    core = load_core(model_dir, adapters, lora_dtype)
    configs = [
        Config("a", "HF generate, static batch of 32, base only",
               lambda n: generate_hf(hf, prompts, n), hf.lm_head),
        Config("b", f"PEFT mixed batch generate(adapter_names=...), {len(names)} adapters",
               lambda n: generate_hf(peft, prompts, n, names), peft.get_output_embeddings()),
        Config("c", "loraplex, base only",
               lambda n: generate_loraplex(core, prompts, n, [None] * NUM_PROMPTS),
               core.model.hf.lm_head),
        Config("d", f"loraplex, {len(names)} adapters ({lora_dtype} slot tables)",
               lambda n: generate_loraplex(core, prompts, n, names), core.model.hf.lm_head),
    ]
    if lora_dtype == "float32":
        log("loading (d-bf16) loraplex engine, bfloat16 slot tables")
        core_bf16 = load_core(model_dir, adapters, "bfloat16")
        configs.append(Config("d-bf16", f"loraplex, {len(names)} adapters (bfloat16 slot tables)",
                              lambda n: generate_loraplex(core_bf16, prompts, n, names),
                              core_bf16.model.hf.lm_head))
    return configs


# ---- measuring ----------------------------------------------------------------------------


def measure(configs: list[Config], new_tokens: int, repeats: int, log: Log) -> dict[str, list[Run]]:
    """One warm-up per config (loads the adapters into their slots), then interleaved rounds."""
    for config in configs:
        log(f"warm-up ({config.key}) {config.label}, {WARMUP_TOKENS} new tokens")
        config.generate(WARMUP_TOKENS)
    runs: dict[str, list[Run]] = defaultdict(list)
    for round_index in range(1, repeats + 1):
        for config in configs:
            log(f"round {round_index}/{repeats} ({config.key}) {config.label} ...")
            gc.collect()
            run = run_config(config, new_tokens)
            runs[config.key].append(run)
            log(f"round {round_index}/{repeats} ({config.key}) {run.num_tokens} tokens in "
                f"{run.seconds:.2f} s = {run.tok_s:.1f} tok/s, CPU busy {run.cpu_seconds / run.seconds:.2f} "
                f"of {THREADS} threads, load average {os.getloadavg()[0]:.2f}")
    return runs


def mix_benchmark_args(doc: str, out: Path, argv: list[str] | None) -> argparse.Namespace:
    """--repeats, --new-tokens and --out of the benchmarks that vary the core engine's batch
    (dora_mix, mixtures)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved runs per config (>= 3: verdicts come from medians)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    return args


def write_mix_report(out: Path, lines: list[str]) -> None:
    """Writes (and prints) a report of the benchmarks that vary the core engine's batch, with
    the machine section appended."""
    lines = [*lines, "## Machine", "", *(f"- {k}: {v}" for k, v in machine().items()), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def runs_table(configs: list[Config], runs: dict[str, list[Run]]) -> list[str]:
    """Markdown rows: each config's median tok/s, spread (min-max) and CPU busy."""
    lines = ["| config | median tok/s | spread | CPU busy |", "|---|---|---|---|"]
    for c in configs:
        tok_s = [r.tok_s for r in runs[c.key]]
        busy = [r.cpu_seconds / r.seconds for r in runs[c.key]]
        lines.append(f"| ({c.key}) {c.label} | {statistics.median(tok_s):.1f} | "
                     f"{min(tok_s):.1f}-{max(tok_s):.1f} | {min(busy):.2f}-{max(busy):.2f} |")
    return lines


def work_problems(runs: dict[str, list[Run]], new_tokens: int) -> list[str]:
    """Every run must have produced NUM_PROMPTS x new_tokens tokens; returns what did not."""
    return [f"({key}) run {i + 1}: {sorted({len(row) for row in run.tokens})} tokens per row in "
            f"{len(run.tokens)} rows"
            for key, key_runs in runs.items() for i, run in enumerate(key_runs)
            if len(run.tokens) != NUM_PROMPTS or any(len(row) != new_tokens for row in run.tokens)]


def token_agreement(x: Run, y: Run) -> str:
    """How many rows have identical greedy tokens, and where the others first diverge."""
    same = sum(a == b for a, b in zip(x.tokens, y.tokens))
    first = sorted(next(i for i, (s, t) in enumerate(zip(a, b)) if s != t)
                   for a, b in zip(x.tokens, y.tokens) if a != b)
    where = f"; the others first differ at token {', '.join(map(str, first))}" if first else ""
    return f"{same}/{len(x.tokens)} rows identical{where}"


def ratio(runs: dict[str, list[Run]], key: str, ref: str, stat: Callable) -> float:
    return stat([r.tok_s for r in runs[key]]) / stat([r.tok_s for r in runs[ref]])


def missed(runs: dict[str, list[Run]]) -> bool:
    return any(ratio(runs, key, ref, statistics.median) < target for key, ref, target in TARGETS)


# ---- profile ------------------------------------------------------------------------------


class Sections:
    """Exclusive wall time per named section: a call's time minus the sections nested in it."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._children: list[float] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            self._children.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[name] += elapsed - self._children.pop()
                if self._children:
                    self._children[-1] += elapsed

        return timed


def _section_targets(lm_head: torch.nn.Module) -> list[tuple[str, object, str]]:
    """(section, owner, attribute) of every function the profile times."""
    import bitsandbytes as bnb
    import peft.tuners.lora.bnb as peft_bnb
    from transformers.models.llama import modeling_llama

    import server.engine.core
    import server.lora.layer
    import server.model.linear4bit
    import server.model.step
    import server.engine.scheduler

    model_rest = "model rest: embeddings, norms, MLP act, residuals"
    return [
        ("base NF4 linears (bnb Linear4bit)", bnb.nn.Linear4bit, "forward"),
        ("base NF4 linears (loraplex 4-bit kernel)", server.model.linear4bit.CpuLinear4bit,
         "forward"),
        ("LoRA op (loraplex lora_apply)", server.lora.layer, "lora_apply"),
        ("LoRA slot mapping (SlotMapping.build, once per step)", server.lora.layer.LoraContext,
         "set_step"),
        ("LoRA (PEFT mixed-batch layers)", peft_bnb.Linear4bit, "forward"),
        ("attention (without q/k/v/o projections)", server.model.step.ModelRunner, "_attention"),
        ("attention (without q/k/v/o projections)", modeling_llama.LlamaAttention, "forward"),
        ("lm_head", lm_head, "forward"),
        (model_rest, server.model.step.ModelRunner, "forward"),
        (model_rest, modeling_llama.LlamaForCausalLM, "forward"),
        ("step inputs (packing, indices, masks)", server.engine.core, "build_step_inputs"),
        ("scheduler", server.engine.scheduler.Scheduler, "schedule"),
        ("sampling", server.engine.core, "sample"),
        ("engine step rest (python)", server.engine.core.EngineCore, "step"),
    ]


def profile_sections(config: Config, new_tokens: int) -> tuple[Run, dict[str, float]]:
    """Runs `config` once with its hot functions timed; returns the run and seconds by section."""
    sections = Sections()
    with contextlib.ExitStack() as stack:
        for name, owner, attr in _section_targets(config.lm_head):
            stack.enter_context(mock.patch.object(owner, attr, sections.wrap(name, getattr(owner, attr))))
        run = run_config(config, new_tokens)
    times = dict(sections.seconds)
    times["rest: generate / driver loop"] = run.seconds - sum(times.values())
    return run, times


def profile(configs: list[Config], new_tokens: int, log: Log) -> str:
    """Markdown: per-step time by section for every config, and torch.profiler's top ops for (d)."""
    results = {}
    for config in configs:
        log(f"profile ({config.key}) {config.label} ...")
        results[config.key] = profile_sections(config, new_tokens)
    d = next(c for c in configs if c.key == "d")
    log("torch.profiler (d) ...")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        d.generate(new_tokens)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=45)
    print(ops, flush=True)
    return _profile_markdown(results, new_tokens, ops)


def _profile_markdown(results: dict[str, tuple[Run, dict[str, float]]], new_tokens: int,
                      ops: str) -> str:
    keys = list(results)
    names = sorted({name for _, times in results.values() for name in times},
                   key=lambda name: -max(times.get(name, 0.0) for _, times in results.values()))
    lines = [f"Wall time per step (= per generated token of the batch; {new_tokens} steps, prefill "
             "included) by section, exclusive of the sections nested in it. One timed run each; "
             "the timers add a little overhead.", "",
             "| section | " + " | ".join(f"({k}) ms/step" for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for name in names:
        cells = [results[k][1].get(name, 0.0) * 1e3 / new_tokens for k in keys]
        if max(cells) >= 0.05:
            lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" if v else "" for v in cells) + " |")
    lines.append("| **total** | " + " | ".join(
        f"**{results[k][0].seconds * 1e3 / new_tokens:.1f}**" for k in keys) + " |")
    lines += ["", *_profile_deltas(results, new_tokens), "",
              "torch.profiler, one (d) run, top ops by self CPU time:", "", "```", ops.rstrip(), "```"]
    return "\n".join(lines)


def _profile_deltas(results: dict[str, tuple[Run, dict[str, float]]], new_tokens: int) -> list[str]:
    """Where the step time of one config differs from its target's reference, largest first."""
    lines = []
    for key, ref, _ in TARGETS:
        if key not in results or ref not in results:
            continue
        (run, times), (ref_run, ref_times) = results[key], results[ref]
        diff = {name: (times.get(name, 0.0) - ref_times.get(name, 0.0)) * 1e3 / new_tokens
                for name in set(times) | set(ref_times)}
        top = sorted(diff.items(), key=lambda item: -abs(item[1]))[:4]
        total = (run.seconds - ref_run.seconds) * 1e3 / new_tokens
        lines.append(f"- ({key}) vs ({ref}): {total:+.1f} ms/step; largest differences: "
                     + ", ".join(f"{name} {value:+.1f}" for name, value in top))
    return lines


# ---- report -------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    cpu = fields.get("Model name", "").strip() or platform.processor() or "unknown"
    l3 = fields.get("L3 cache", "").strip() or "unknown"
    return {"code": _code_version(), "CPU": cpu, "L3 cache": l3,
            "cores available": str(len(os.sched_getaffinity(0))),
            "torch threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def _code_version() -> str:
    """The commit, and whether the engine's files differ from it (others may be editing them)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.rstrip("\n")

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--", "server", "adapters_registry").splitlines()
    except OSError:
        return "unknown (no git)"
    changed = ", ".join(f"{path} (sha256 {_short_hash(path)})" for path in (line[3:] for line in dirty))
    return f"git {commit}" + (f" + uncommitted: {changed}" if changed else "")


def _short_hash(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]
    except OSError:
        return "deleted"


def report(configs: list[Config], runs: dict[str, list[Run]], new_tokens: int, command: str,
           problems: list[str], load_before: float, profile_md: str | None) -> str:
    labels = {c.key: c.label for c in configs}
    vs = _vs_targets(runs)
    lines = ["# Core engine benchmark", "",
             f"SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, "
             f"vocab 49152, random weights), NF4 base, fp32 compute, {THREADS} CPU threads. "
             f"{NUM_PROMPTS} prompts of {PROMPT_LEN} random tokens, {new_tokens} new tokens each, "
             f"greedy, EOS ignored; adapters rank {RANK}, alpha {LORA_ALPHA}, on all 7 linear "
             f"modules. Throughput = {NUM_PROMPTS}x{new_tokens} generated tokens / wall time from "
             "submission to the last token (prefill included); one warm-up per config (adapters "
             "already in their slots), then the configs run interleaved, "
             f"{len(next(iter(runs.values())))} times each.", "",
             "| config | | tok/s median | spread (min-max) | vs target |", "|---|---|---:|---:|---|"]
    for key, key_runs in runs.items():
        rates = [r.tok_s for r in key_runs]
        lines.append(f"| ({key}) | {labels[key]} | {statistics.median(rates):.1f} | "
                     f"{min(rates):.1f}-{max(rates):.1f} | {vs.get(key, 'reference')} |")
    lines += ["", "## Targets (ratios of the medians)", ""]
    for key, ref, target in TARGETS:
        median, best = ratio(runs, key, ref, statistics.median), ratio(runs, key, ref, max)
        verdict = "PASS" if median >= target else f"MISS by {(1 - median / target) * 100:.0f}%"
        lines.append(f"- ({key}) / ({ref}) = **{median:.2f}** (best {best:.2f}), target >= "
                     f"{target:.2f}: **{verdict}**")
    if "d-bf16" in runs:
        median = statistics.median
        lines.append(f"- extra: (d-bf16) / (c) = {ratio(runs, 'd-bf16', 'c', median):.2f}, "
                     f"(d-bf16) / (b) = {ratio(runs, 'd-bf16', 'b', median):.2f}")
    lines += ["", "## Checks", "",
              "- equal work: " + ("every run produced "
                                  f"{NUM_PROMPTS}x{new_tokens} tokens" if not problems
                                  else "**NO**: " + "; ".join(problems)),
              "- CPU busy in the timed runs (process CPU time / wall time, at most "
              f"{THREADS}.00; lower = a thread waits, e.g. on Python, or other processes "
              "contend): " + ", ".join(f"({key}) {_cpu_busy(key_runs)}"
                                       for key, key_runs in runs.items()),
              f"- load average (1 min) before the run: {load_before:.2f}",
              *_contended(runs),
              f"- (c) vs (a) greedy tokens: {token_agreement(runs['c'][0], runs['a'][0])}",
              f"- (d) vs (b) greedy tokens: {token_agreement(runs['d'][0], runs['b'][0])}"]
    if "d-bf16" in runs:
        lines.append(f"- (d-bf16) vs (b) greedy tokens: "
                     f"{token_agreement(runs['d-bf16'][0], runs['b'][0])}")
    lines += ["", "(bitsandbytes' CPU NF4 kernel computes in bf16, and the engines pack and "
              "attend differently, so a near-tie can flip a greedy token and the row diverges "
              "from there.)", "", "## Machine", ""]
    lines += [f"- {name}: {value}" for name, value in machine().items()]
    lines += [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
              "## Command", "", f"```\n{command}\n```"]
    if profile_md:
        lines += ["", "## What the profile shows", "", profile_md]
    return "\n".join(lines) + "\n"


def _contended(runs: dict[str, list[Run]]) -> list[str]:
    """A note on runs whose threads were not busy most of the time: likely other processes."""
    slow = [f"({key}) run {i + 1}" for key, key_runs in runs.items()
            for i, run in enumerate(key_runs) if run.cpu_seconds / run.seconds < 0.9 * THREADS]
    if not slow:
        return []
    return [f"- probably slowed by other processes (CPU busy < {0.9 * THREADS:.1f}): "
            f"{', '.join(slow)}; the median discounts one such run of three"]


def _cpu_busy(runs: list[Run]) -> str:
    busy = [run.cpu_seconds / run.seconds for run in runs]
    return f"{min(busy):.2f}-{max(busy):.2f}"


def _vs_targets(runs: dict[str, list[Run]]) -> dict[str, str]:
    notes: dict[str, list[str]] = defaultdict(list)
    for key, ref, target in TARGETS:
        notes[key].append(f"{ratio(runs, key, ref, statistics.median):.2f}x ({ref}), "
                          f"target >= {target:.2f}")
    return {key: "; ".join(parts) for key, parts in notes.items()}


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke check: {QUICK_NEW_TOKENS} new tokens instead of {NEW_TOKENS}; "
                             f"writes {QUICK_OUT} unless --out is given")
    parser.add_argument("--lora-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="loraplex slot-table dtype for (d); with float32, (d-bf16) runs too")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per config (>= 3, verdicts from medians; --quick: >= 2); "
                             "with 3, one run slowed by another process does not move the median")
    parser.add_argument("--profile", nargs="?", const="on", default="auto",
                        choices=("on", "off", "auto"),
                        help="profile every config once after timing; auto = when a target is "
                             "missed (not with --quick)")
    parser.add_argument("--out", type=Path, default=None, help=f"report path (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.repeats < 3 and not args.quick:
        parser.error("--repeats must be at least 3: verdicts come from medians")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "./dev bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    new_tokens = QUICK_NEW_TOKENS if args.quick else NEW_TOKENS
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    torch.set_num_threads(THREADS)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    log = Log()
    model_dir, adapters = build_assets(default_cache_dir(), log)
    configs = load_configs(model_dir, adapters, args.lora_dtype, log)
    runs = measure(configs, new_tokens, args.repeats, log)
    problems = work_problems(runs, new_tokens)
    for problem in problems:
        log(f"UNEQUAL WORK: {problem}")
    run_profile = args.profile == "on" or (args.profile == "auto" and not args.quick and missed(runs))
    profile_md = profile(configs, new_tokens, log) if run_profile else None
    text = report(configs, runs, new_tokens, command, problems, load_before, profile_md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text, flush=True)
    log(f"report written to {out}")


if __name__ == "__main__":
    main()

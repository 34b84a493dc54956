"""Weighted mixtures in the batch: the core engine benchmark with half of the 32 sequences on
2-adapter mixtures.

Same model, prompts and measurement as benchmarks/core_engine.py (SmolLM2-135M shape, NF4,
fp32 compute, 2 threads, 32 prompts x 32 tokens, 64 new greedy tokens, EOS ignored), loraplex
only, 32 rank-16 adapters r16-00..r16-31:

  (d)    one adapter per sequence: r16-00 .. r16-31
  (l)    sequences 0-15 as in (d); sequence 16+i a `linear` mixture 0.6 x r16-(16+i) +
         0.4 x r16-(16+(i+1)%16): 16 distinct merged adapters, each in one slot
  (cat)  as (l) with `cat` mixtures: each such token runs through both adapters' slots

The merged adapters are built once (in the warm-up) and then found in host RAM and in their slot,
as for a server that has seen them before; the time to merge one is measured apart. Target:
(l) >= 0.85 x (d). Writes benchmarks/reports/mixtures.md.

    .venv/bin/python -m benchmarks.mixtures [--repeats N] [--new-tokens N]
"""

from __future__ import annotations

import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from adapters_registry.mixtures import AdapterMix
from benchmarks.core_engine import (NUM_PROMPTS, THREADS, Config, Log, build_assets,
                                    load_core, make_prompts, measure,
                                    mix_benchmark_args, runs_table, work_problems,
                                    write_mix_report)
from server.tools.demo import default_cache_dir

HALF = NUM_PROMPTS // 2
WEIGHTS = (0.6, 0.4)
TARGET = 0.85
OUT = Path("benchmarks/reports/mixtures.md")


def mixtures(names: list[str], combination: str) -> list[AdapterMix]:
    """The second half's mixtures: each pairs its own adapter with the next of that half."""
    second = names[HALF:]
    return [AdapterMix((second[i], second[(i + 1) % HALF]), WEIGHTS, combination)
            for i in range(HALF)]


def generate(core, prompts: torch.Tensor, new_tokens: int,
             choices: list[str | AdapterMix]) -> list[list[int]]:
    """Submit every request (an adapter's name or a mixture each), then step until idle."""
    from server.engine.core import GenerationRequest
    from server.engine.sampler import SamplingParams

    ids = []
    for row, choice in zip(prompts.tolist(), choices):
        mixture = choice if isinstance(choice, AdapterMix) else None
        ids.append(core.add_request(GenerationRequest(
            prompt_token_ids=row, adapter_id=None if mixture else choice, mixture=mixture,
            params=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))))
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    while core.has_work():
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[request_id] for request_id in ids]


def merge_seconds(core, names: list[str], combination: str, repeats: int = 3) -> float:
    """Median wall time of building one 2-adapter mixture never seen before (its adapters are
    in host RAM, loaded first), on the registry's load worker."""
    for name in names[:repeats + 1]:  # store reads are not merges
        core.registry.release(core.registry.acquire(name).result())
    times = []
    for i in range(repeats):
        mix = AdapterMix((names[i], names[i + 1]), (0.5 + 0.01 * i, 0.5), combination)
        start = time.perf_counter()
        lease = core.registry.acquire_mixture(mix).result()
        times.append(time.perf_counter() - start)
        core.registry.release(lease)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = mix_benchmark_args(__doc__, OUT, argv)
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()[0]
    log = Log()
    model_dir, adapters = build_assets(default_cache_dir(), log)
    names = list(adapters)
    # A slot for each adapter and each merged mixture: timed rounds never write a slot.
    log("loading a loraplex engine with 32 LoRA adapters (fp32 slot tables)")
    core = load_core(model_dir, adapters, "float32", max_slots=NUM_PROMPTS + HALF)
    prompts = make_prompts()

    def on(choices: list):
        return lambda n: generate(core, prompts, n, choices)

    half = names[:HALF]
    configs = [
        Config("d", "32 single adapters", on(names), None),
        Config("l", f"{HALF} single adapters + {HALF} linear 2-adapter mixtures",
               on([*half, *mixtures(names, "linear")]), None),
        Config("cat", f"{HALF} single adapters + {HALF} cat 2-adapter mixtures",
               on([*half, *mixtures(names, "cat")]), None),
    ]
    # Merges are timed first, on an idle engine: right after steps, the step loop's idle
    # OpenMP threads keep spinning for a while and the load worker (at --load-nice) waits.
    log("timing merges")
    merges = {kind: merge_seconds(core, names, kind) for kind in ("linear", "svd")}
    runs = measure(configs, args.new_tokens, args.repeats, log)  # the warm-up merges (l)'s
    problems = work_problems(runs, args.new_tokens)
    assert not problems, problems
    median = {key: statistics.median(r.tok_s for r in key_runs) for key, key_runs in runs.items()}
    command = "python -m benchmarks.mixtures " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = ["# Weighted adapter mixtures in mixed batches", "",
             f"SmolLM2-135M-shaped Llama, NF4 base, fp32 compute, fp32 slot tables, {THREADS} "
             f"CPU threads; {NUM_PROMPTS} prompts x 32 tokens, {args.new_tokens} new greedy "
             f"tokens each; rank-16 adapters on all 7 modules; mixture weights {WEIGHTS}; median "
             f"and spread (min-max) of {args.repeats} interleaved runs (tokens/s, prefill "
             "included); CPU busy = this process's CPU seconds / wall seconds (at most "
             f"{THREADS}.00; lower: other processes took CPU).", "",
             f"Command: `{command.strip()}`  ", f"Date: {datetime.date.today().isoformat()}", "",
             *runs_table(configs, runs)]
    ratio = median["l"] / median["d"]
    lines += ["", f"- (l) / (d) = {ratio:.2f} (medians), target >= {TARGET}: "
                  f"**{'PASS' if ratio >= TARGET else 'MISS'}**",
              f"- (cat) / (d) = {median['cat'] / median['d']:.2f}: a cat mixture's tokens read "
              "both adapters' tables, so half the batch doubles its LoRA work; nothing is built "
              "for it.",
              f"- Building one 2-adapter mixture from adapters in host RAM, on a registry load "
              f"worker (off the step loop, timed with the engine idle; median of 3): linear "
              f"{merges['linear'] * 1e3:.0f} ms, svd {merges['svd'] * 1e3:.0f} ms (QR of the "
              "stacked factors and an SVD of the [32, 32] core per module, 210 modules).",
              f"- load average (1 min) before the run {load_before:.2f}, after "
              f"{os.getloadavg()[0]:.2f}", "",
              "A merged mixture is one adapter in one slot, so a step with 16 of them and 16 "
              "plain adapters reads the same tables as a step with 32 plain adapters: (l) and (d) "
              "differ only by measurement noise.", ""]
    write_mix_report(args.out, lines)


if __name__ == "__main__":
    main()

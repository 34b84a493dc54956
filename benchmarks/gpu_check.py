"""The CUDA path checked on a GPU machine in one run: `./dev gpu-check` -> benchmarks/reports/gpu.md.

(a) Equivalence: a tiny random Llama with an NF4 base (bitsandbytes' CUDA kernels on both sides)
    and LoRA adapters of several ranks and targets; loraplex's engine (Triton LoRA and paged
    attention kernels) against PEFT on the same device, all requests in one batch: every logits
    row within TOLERANCE of PEFT's, greedy tokens identical up to a near-tie of PEFT's top two.
(b) Core benchmark at Llama-3.2-1B's shape (random weights, NF4, bf16 compute): 64 sequences,
    32 distinct rank-16 adapters on all 7 modules; HF static batch (base), PEFT mixed batch,
    loraplex base, loraplex with adapters; median tok/s of ROUNDS interleaved rounds, the ratios
    against the targets, and a torch.profiler table of one loraplex-with-adapters run.

`--dry-run` runs the same script on the CPU at tiny sizes, with the kernels CUDA gets run by
Triton's interpreter (TRITON_INTERPRET=1): the test suite runs it, so the script cannot rot; its
figures mean nothing. The exit status is 1 when (a) fails; (b)'s targets are reported.

    ./dev gpu-check [--dry-run] [--out PATH]
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:]:  # Triton reads this when it is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import core_engine  # noqa: E402
from benchmarks.core_engine import generate_hf, generate_loraplex, load_hf, load_peft  # noqa: E402
from server.tools.demo import ALL_LINEAR_MODULES, write_llama_model, write_lora_adapter  # noqa: E402

REPORT = Path(__file__).parent / "reports" / "gpu.md"

TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
LLAMA_1B_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True)
"""meta-llama/Llama-3.2-1B's shape (its rope scaling left out: random weights either way)."""

EQUIVALENCE_ADAPTERS = {
    "attn-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-r8": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR_MODULES),
    "all-r16-rslora": dict(r=16, lora_alpha=8, target_modules=ALL_LINEAR_MODULES,
                           use_rslora=True),
}
EQUIVALENCE_PROMPTS = [[1, 45, 300, 12, 99, 7, 401, 250, 33], [1, 17, 3, 200],
                       [1] + list(range(60, 80))]
EQUIVALENCE_TOKENS = 6
TOLERANCE = 2 * 2**-8
"""Largest |loraplex - PEFT| / max |PEFT| of a logits row: both sides run the same NF4 weights
through bitsandbytes, whose kernels round to 16-bit floats on the way; two bf16 steps, as the
CPU equivalence test allows its 4-bit bases."""


@dataclass(frozen=True)
class Profile:
    """What one run measures: the full check on CUDA, or the dry run's tiny one on the CPU."""

    device: str
    dtype: torch.dtype  # compute dtype of the benchmark
    shape: dict
    sequences: int
    adapters: int
    prompt_len: int
    new_tokens: int
    rounds: int


GPU = Profile("cuda", torch.bfloat16, LLAMA_1B_SHAPE, sequences=64, adapters=32, prompt_len=64,
              new_tokens=64, rounds=3)
DRY_RUN = Profile("cpu", torch.float32, TINY_SHAPE, sequences=4, adapters=2, prompt_len=8,
                  new_tokens=3, rounds=1)

TARGETS = [("c", "a", 1.0, "loraplex base / HF static batch"),
           ("d", "c", 0.90, "loraplex 32 distinct adapters / loraplex base"),
           ("d", "b", 5.0, "loraplex with adapters / PEFT mixed batch")]


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def kernels(profile: Profile) -> dict:
    """The engine's kernel choice: CUDA's own, also in the dry run (interpreted there)."""
    return {} if profile.device == "cuda" else dict(lora_kernel="triton",
                                                    attention_kernel="triton")


def load_core(model_dir: Path, adapters: dict[str, Path], profile: Profile, dtype: torch.dtype,
              lora_dtype: str = "float32", **engine):
    """core_engine's engine (NF4 base) on the profile's device, in `dtype`, with its kernels."""
    return core_engine.load_core(model_dir, adapters, lora_dtype, device=profile.device,
                                 dtype=str(dtype).removeprefix("torch."), threads=0,
                                 **kernels(profile), **engine)


# ---- (a) equivalence ----------------------------------------------------------------------


def write_equivalence_assets(root: Path) -> tuple[Path, dict[str, Path]]:
    model_dir = root / "tiny-model"
    write_llama_model(model_dir, **TINY_SHAPE, seed=0)
    adapters = {}
    for seed, (name, spec) in enumerate(EQUIVALENCE_ADAPTERS.items(), start=11):
        adapters[name] = root / name
        write_lora_adapter(adapters[name], base_model_dir=model_dir, seed=seed, init_std=0.2,
                           **spec)
    return model_dir, adapters


def peft_reference(model_dir: Path, adapters: dict[str, Path], device: str):
    """{(adapter or None, prompt index): (greedy tokens, fp32 logits rows)}: a full forward per
    token, the plainest possible reference."""
    from peft import PeftModel

    results = {}
    for adapter in [None, *adapters]:
        model = load_hf(model_dir, device)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapters[adapter])).eval()
        for index, prompt in enumerate(EQUIVALENCE_PROMPTS):
            ids, rows = list(prompt), []
            with torch.inference_mode():
                for _ in range(EQUIVALENCE_TOKENS):
                    logits = model(torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
                    rows.append(logits)
                    ids.append(int(logits.argmax()))
            results[(adapter, index)] = ids[len(prompt):], rows
        del model
    return results


def engine_outputs(core, adapters: dict[str, Path]):
    """Every (adapter or base, prompt) submitted at once: {case: (tokens, logits rows)}."""
    from server.engine.core import GenerationRequest
    from server.engine.sampler import SamplingParams

    rows: dict[str, list[torch.Tensor]] = {}
    core.logits_observer = lambda ids, logits: [rows.setdefault(i, []).append(r.float().cpu())
                                                for i, r in zip(ids, logits)]
    cases = {}
    for adapter in [None, *adapters]:
        for index, prompt in enumerate(EQUIVALENCE_PROMPTS):
            request_id = core.add_request(GenerationRequest(
                prompt_token_ids=prompt, adapter_id=adapter,
                params=SamplingParams(max_new_tokens=EQUIVALENCE_TOKENS, ignore_eos=True)))
            cases[request_id] = (adapter, index)
    tokens = {request_id: [] for request_id in cases}
    while core.has_work():
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
    core.logits_observer = None
    return {case: (tokens[rid], rows.get(rid, [])) for rid, case in cases.items()}


@dataclass
class CaseResult:
    adapter: str | None
    prompt: int
    max_error: float
    steps_compared: int
    near_tie_at: int | None  # the step where greedy parted at a near-tie of PEFT's top two
    problem: str | None


def compare(got: tuple, want: tuple, adapter: str | None, index: int) -> CaseResult:
    got_tokens, got_rows = got
    want_tokens, want_rows = want
    if len(got_tokens) != EQUIVALENCE_TOKENS or len(got_rows) != EQUIVALENCE_TOKENS:
        return CaseResult(adapter, index, float("nan"), 0, None,
                          f"{len(got_tokens)} tokens, {len(got_rows)} logits rows")
    worst = 0.0
    for step, (g, w) in enumerate(zip(got_rows, want_rows)):
        error = float((g - w).abs().max() / w.abs().max())
        worst = max(worst, error)
        if error > TOLERANCE:
            return CaseResult(adapter, index, worst, step + 1, None,
                              f"step {step}: relative error {error:.2e}")
        if got_tokens[step] != want_tokens[step]:
            top2 = w.topk(2).values
            margin = float((top2[0] - top2[1]) / w.abs().max())
            if margin > TOLERANCE:
                return CaseResult(adapter, index, worst, step + 1, None,
                                  f"step {step}: token {got_tokens[step]} vs PEFT's "
                                  f"{want_tokens[step]} (margin {margin:.2e})")
            return CaseResult(adapter, index, worst, step + 1, step, None)
    return CaseResult(adapter, index, worst, EQUIVALENCE_TOKENS, None, None)


def check_equivalence(root: Path, profile: Profile) -> list[CaseResult]:
    log("(a) equivalence: writing the tiny model and adapters")
    model_dir, adapters = write_equivalence_assets(root)
    log("(a) PEFT reference")
    reference = peft_reference(model_dir, adapters, profile.device)
    log("(a) loraplex engine, every case in one batch")
    core = load_core(model_dir, adapters, profile, torch.float32, max_slots=4, max_rank=16,
                     kv_cache_mb=16)
    outputs = engine_outputs(core, adapters)
    results = [compare(outputs[case], reference[case], *case) for case in sorted(
        reference, key=lambda case: (case[0] or "", case[1]))]
    for result in results:  # guards the check itself: each adapter moves PEFT's logits
        base_row = reference[(None, result.prompt)][1][0]
        if result.adapter and float((reference[(result.adapter, result.prompt)][1][0]
                                     - base_row).abs().max()) <= 1e-2:
            result.problem = result.problem or "the adapter does not change PEFT's logits"
    return results


# ---- (b) benchmark ------------------------------------------------------------------------


def write_benchmark_assets(root: Path, profile: Profile) -> tuple[Path, dict[str, Path]]:
    model_dir = root / "bench-model"
    write_llama_model(model_dir, **profile.shape, seed=0)
    adapters = {}
    for i in range(profile.adapters):
        adapters[f"bench-{i}"] = root / f"bench-{i}"
        write_lora_adapter(adapters[f"bench-{i}"], base_model_dir=model_dir, r=16, lora_alpha=32,
                           target_modules=ALL_LINEAR_MODULES, seed=100 + i)
    return model_dir, adapters


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(generate, new_tokens: int, device: str) -> float:
    """tok/s of one run, prefill included."""
    synchronize(device)
    start = time.perf_counter()
    tokens = generate(new_tokens)
    synchronize(device)
    return sum(len(row) for row in tokens) / (time.perf_counter() - start)


def run_benchmark(root: Path, profile: Profile):
    log(f"(b) benchmark: writing the model ({profile.shape['num_hidden_layers']} layers, "
        f"hidden {profile.shape['hidden_size']}) and {profile.adapters} adapters")
    model_dir, adapters = write_benchmark_assets(root, profile)
    names = list(adapters)
    per_sequence = [names[i % len(names)] for i in range(profile.sequences)]
    prompts = torch.randint(5, 500, (profile.sequences, profile.prompt_len),
                            generator=torch.Generator().manual_seed(0))
    device_prompts = prompts.to(profile.device)
    log("(b) loading HF, PEFT and loraplex")
    hf = load_hf(model_dir, profile.device, profile.dtype)
    peft = load_peft(model_dir, adapters, profile.device, profile.dtype)
    kv_mb = 2048 if profile.device == "cuda" else 64
    core = load_core(model_dir, adapters, profile, profile.dtype,
                     str(profile.dtype).removeprefix("torch."), max_slots=profile.adapters,
                     max_rank=16,
                     kv_cache_mb=kv_mb, max_batch_size=profile.sequences,
                     max_step_tokens=profile.sequences * profile.prompt_len)
    configs = {
        "a": ("HF generate, static batch, base only", lambda n: generate_hf(hf, device_prompts, n)),
        "b": (f"PEFT mixed batch, {len(names)} adapters",
              lambda n: generate_hf(peft, device_prompts, n, per_sequence)),
        "c": ("loraplex, base only",
              lambda n: generate_loraplex(core, prompts, n, [None] * profile.sequences)),
        "d": (f"loraplex, {len(names)} distinct adapters",
              lambda n: generate_loraplex(core, prompts, n, per_sequence)),
    }
    for key, (label, generate) in configs.items():
        log(f"(b) warm-up ({key}) {label}")
        generate(2)
    runs = {key: [] for key in configs}
    for round_index in range(profile.rounds):
        for key, (label, generate) in configs.items():
            runs[key].append(timed(generate, profile.new_tokens, profile.device))
            log(f"(b) round {round_index + 1}/{profile.rounds} ({key}) {runs[key][-1]:.1f} tok/s")
    log("(b) profile of one loraplex run with adapters")
    table = profile_run(configs["d"][1], profile)
    syncs = count_syncs(core, prompts, per_sequence, profile)
    return {key: label for key, (label, _) in configs.items()}, runs, table, syncs


def count_syncs(core, prompts: torch.Tensor, adapters: list[str], profile: Profile) -> str:
    """Device-to-host synchronisations per engine step, as CUDA's sync debug mode reports them
    (the design allows one: the sampled tokens)."""
    if profile.device != "cuda":
        return "not measured (no CUDA device)"
    import warnings

    steps_before = core.steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate_loraplex(core, prompts, profile.new_tokens, adapters)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    steps = core.steps - steps_before
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = sorted({f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in syncs})
    return (f"{len(syncs) / max(steps, 1):.2f} per step over {steps} steps "
            f"(at {', '.join(where) or 'nowhere'})")


def profile_run(generate, profile: Profile) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if profile.device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        generate(profile.new_tokens)
        synchronize(profile.device)
    sort = "self_cuda_time_total" if profile.device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=50)


# ---- the report ---------------------------------------------------------------------------


def machine(profile: Profile) -> list[str]:
    import triton

    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "missing"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    card = torch.cuda.get_device_name() if profile.device == "cuda" else "none (CPU dry run)"
    return [f"- card: {card}", f"- torch {torch.__version__}, triton {triton.__version__}, "
            f"bitsandbytes {bnb}, python {sys.version.split()[0]}",
            f"- code: git {commit}", f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"]


def report(profile: Profile, dry_run: bool, cases: list[CaseResult], labels, runs, table,
           syncs: str) -> str:
    failed = [c for c in cases if c.problem]
    lines = ["# The CUDA path on a GPU", "",
             "Command: `./dev gpu-check" + (" --dry-run`" if dry_run else "`"), ""]
    if dry_run:
        lines += ["**Dry run**: the CPU, tiny sizes, the CUDA kernels in Triton's interpreter. "
                  "It proves the script runs; its figures mean nothing.", ""]
    lines += machine(profile)
    lines += ["", "## (a) Equivalence with PEFT, NF4 base", "",
              f"Tiny random Llama, NF4 (bitsandbytes on both sides), fp32 compute; "
              f"{len(EQUIVALENCE_ADAPTERS)} LoRA adapters and the base, {len(EQUIVALENCE_PROMPTS)} "
              f"prompts each, all in one batch, {EQUIVALENCE_TOKENS} greedy tokens; tolerance "
              f"{TOLERANCE:.1e} of a row's largest logit.", "",
              "| adapter | prompt | max relative error | steps compared | result |",
              "|---|---|---:|---:|---|"]
    for c in cases:
        result = c.problem or ("near-tie at step " + str(c.near_tie_at) if c.near_tie_at
                               is not None else "identical greedy tokens")
        lines.append(f"| {c.adapter or 'base'} | {c.prompt} | {c.max_error:.2e} | "
                     f"{c.steps_compared} | {result} |")
    lines += ["", f"**{'FAIL' if failed else 'PASS'}**: {len(cases) - len(failed)} of "
              f"{len(cases)} cases within tolerance.", ""]
    shape = profile.shape
    lines += ["## (b) Core benchmark", "",
              f"Random weights at {'Llama-3.2-1B' if profile.shape is LLAMA_1B_SHAPE else 'a tiny'}"
              f"'s shape (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
              f"vocab {shape['vocab_size']}), NF4 base, {str(profile.dtype).removeprefix('torch.')}"
              f" compute; {profile.sequences} sequences of {profile.prompt_len} prompt tokens, "
              f"{profile.new_tokens} new tokens, greedy, EOS ignored; {profile.adapters} rank-16 "
              f"adapters on all 7 modules. tok/s, prefill included, median of {profile.rounds} "
              f"interleaved rounds.", "",
              "| config | | tok/s median | every round |", "|---|---|---:|---|"]
    medians = {key: statistics.median(values) for key, values in runs.items()}
    for key, label in labels.items():
        lines.append(f"| ({key}) | {label} | {medians[key]:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in runs[key])} |")
    lines += ["", "Targets:", ""]
    for key, ref, target, what in TARGETS:
        value = medians[key] / medians[ref]
        lines.append(f"- {what}: ({key}) / ({ref}) = **{value:.2f}**, target >= {target}: "
                     f"**{'PASS' if value >= target else 'MISS'}**")
    lines += ["", f"Device-to-host synchronisations of the engine, CUDA's sync debug mode: {syncs}.",
              "", "## Profile: one loraplex run with adapters", "", "```", table.rstrip(), "```",
              ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the CPU, tiny sizes, the CUDA kernels in Triton's interpreter")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"report path (default {REPORT}; a dry run: a temporary file)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = DRY_RUN if args.dry_run else GPU
    if profile.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; `./dev gpu-check --dry-run` runs it on the CPU",
              file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.gettempdir()) / "loraplex-gpu-check-dry-run.md"
                       if args.dry_run else REPORT)
    with tempfile.TemporaryDirectory(prefix="loraplex-gpu-check-") as tmp:
        cases = check_equivalence(Path(tmp), profile)
        labels, runs, table, syncs = run_benchmark(Path(tmp), profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(profile, args.dry_run, cases, labels, runs, table, syncs))
    failed = [c for c in cases if c.problem]
    log(f"report written to {out}; equivalence {'FAILED' if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

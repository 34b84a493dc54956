"""What a structured-output row costs a decode step.

    .venv/bin/python -m benchmarks.structured_output [--rounds 3]   # -> benchmarks/reports/structured_output.md

In process, on the real demo (SmolLM2-135M-Instruct, NF4, fp32 compute, its 49,152-token
vocabulary, the five demo adapters): BATCH sequences decode together, each under one of the
adapters, and K of them are constrained, K in CONSTRAINED. A constrained row either follows a
JSON schema (an object with a free text field of 150-600 characters) or a regex of exactly
REGEX_CHARS characters, so none ends early. Each configuration runs the same prompts for
DECODE_STEPS decode steps after the prefill; the step time is the median over those steps,
configurations interleaved within each round, and the report gives medians of the rounds and
the mask work per constrained row. A second part checks validity on the real model: a seeded
set of constrained chat requests over every model, each answer that ended by its grammar parsed
and checked, those cut by max_tokens counted apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.machine import cpu_name

REPORT = Path("benchmarks/reports/structured_output.md")
BATCH = 16
CONSTRAINED = (0, 1, 4, 16)
DECODE_STEPS = 24
PROMPT_TOKENS = 48
THREADS = 2
REGEX_CHARS = 400
SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 150,
                                                    "maxLength": 600}},
          "required": ["text"], "additionalProperties": False}
KINDS = {"json_schema": json.dumps(SCHEMA), "regex": f"[a-z ]{{{REGEX_CHARS}}}"}


def load_core():
    from server.config import EngineConfig
    from server.engine.core import load_engine_core
    from server.tools.smollm2_demo import build_smollm2_demo

    demo = build_smollm2_demo(progress=None)
    config = EngineConfig(model=demo.model_dir, quantize="nf4", device="cpu", threads=THREADS,
                          max_slots=8, kv_cache_mb=256)
    config.validate()
    return load_engine_core(config, {name: str(p) for name, p in demo.adapters.items()})


class MaskClock:
    """Seconds spent filling (the grammars' C++ code) and applying (one masked_fill over the
    logits) structured-output masks, timed inside the engine's steps."""

    def __init__(self, core):
        from server.engine import sampler

        self.seconds = 0.0
        fill, apply = core._grammar_mask, sampler.apply_bitmask

        def timed(function):
            def run(*args):
                start = time.perf_counter()
                try:
                    return function(*args)
                finally:
                    self.seconds += time.perf_counter() - start
            return run

        core._grammar_mask = timed(fill)
        sampler.apply_bitmask = timed(apply)


def step_times(core, kind: str, constrained: int, clock: MaskClock) -> tuple[list[float], float]:
    """Decode-step seconds of one batch with `constrained` rows under `kind`, and the mask
    seconds per decode step."""
    from server.engine.core import GenerationRequest
    from server.engine.sampler import SamplingParams
    from server.engine.structured import StructuredOutput

    adapters = list(core.registry.store.list())
    for i in range(BATCH):
        structured = StructuredOutput(kind, KINDS[kind]) if i < constrained else None
        prompt = [(7919 * i + 31 * j) % 40000 + 100 for j in range(PROMPT_TOKENS)]
        core.add_request(GenerationRequest(
            prompt_token_ids=prompt, adapter_id=adapters[i % len(adapters)].name,
            params=SamplingParams(max_new_tokens=DECODE_STEPS + 2, ignore_eos=True,
                                  structured=structured)))
    core.step()  # the prefill (and first token) of all of them
    times = []
    clock.seconds = 0.0
    while core.has_work():
        start = time.perf_counter()
        outputs = core.step()
        times.append(time.perf_counter() - start)
        assert not any(o.finished and o.finish_reason != "length" for o in outputs)
    return times[:DECODE_STEPS], clock.seconds / len(times)


VALIDITY_CONSTRAINTS = {
    "json_schema": json.dumps({"type": "object", "properties": {
        "city": {"type": "string"}, "country": {"type": "string"},
        "population_millions": {"type": "number"}},
        "required": ["city", "country", "population_millions"], "additionalProperties": False}),
    "regex": r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])",
    "choice": ("positive", "negative", "neutral"),
}
VALIDITY_QUESTIONS = ("Tell me about Paris.", "When did the first person walk on the moon?",
                      "I loved the film, but the ending was weak.", "Describe Tokyo briefly.")
VALIDITY_MAX_TOKENS = 256


def validity(core) -> dict[str, tuple[int, int, int]]:
    """A seeded set: every constraint x question x model (base and the five adapters), sampled
    at temperature 0.7, all in one batch -> per constraint (valid, invalid, cut by length)."""
    import re

    import jsonschema

    from server.engine.core import GenerationRequest, render_chat
    from server.engine.sampler import SamplingParams
    from server.engine.structured import StructuredOutput

    models = [None, *(r.name for r in core.registry.store.list())]
    jobs, seed = {}, 0
    for kind, value in VALIDITY_CONSTRAINTS.items():
        for question in VALIDITY_QUESTIONS:
            for model in models:
                seed += 1
                prompt = render_chat(core.tokenizer, [{"role": "user", "content": question}])
                rid = core.add_request(GenerationRequest(
                    prompt_token_ids=prompt, adapter_id=model, params=SamplingParams(
                        max_new_tokens=VALIDITY_MAX_TOKENS, temperature=0.7, seed=seed,
                        structured=StructuredOutput(kind, value))))
                jobs[rid] = kind
    texts = {rid: "" for rid in jobs}
    reasons = {}
    while core.has_work():
        for out in core.step():
            texts[out.request_id] += out.new_text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    counts = {kind: [0, 0, 0] for kind in VALIDITY_CONSTRAINTS}
    for rid, kind in jobs.items():
        if reasons[rid] == "length":
            counts[kind][2] += 1
            continue
        value, text = VALIDITY_CONSTRAINTS[kind], texts[rid]
        try:
            if kind == "json_schema":
                jsonschema.validate(json.loads(text), json.loads(value))
                ok = True
            elif kind == "regex":
                ok = re.fullmatch(value, text) is not None
            else:
                ok = text in value
        except (ValueError, jsonschema.ValidationError):
            ok = False
        counts[kind][0 if ok else 1] += 1
    return {kind: tuple(c) for kind, c in counts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(THREADS)
    core = load_core()
    clock = MaskClock(core)
    for kind in KINDS:  # warm-up: compile both grammars, touch every adapter's slot
        step_times(core, kind, BATCH, clock)
    medians: dict[tuple[str, int], list[float]] = {}
    masks: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for kind in KINDS:
            for k in CONSTRAINED:
                times, mask = step_times(core, kind, k, clock)
                medians.setdefault((kind, k), []).append(statistics.median(times))
                masks.setdefault((kind, k), []).append(mask)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    valid = validity(core)
    command = "python -m benchmarks.structured_output " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    text = report(medians, masks, valid, command.strip(), args.rounds)
    args.out.write_text(text)
    print(text)


def report(medians: dict[tuple[str, int], list[float]], masks: dict[tuple[str, int], list[float]],
           valid: dict[str, tuple[int, int, int]], command: str, rounds: int) -> str:
    lines = [
        "# Structured output: what a constrained row costs a decode step",
        "",
        f"`{command}` on {cpu_name()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}, "
        f"torch threads {THREADS}. How it is measured: the module's docstring.",
        "",
        f"SmolLM2-135M-Instruct (NF4, fp32 compute, 49,152-token vocabulary), {BATCH} sequences "
        f"decoding under the five demo adapters, K of them constrained; step time = median over "
        f"{DECODE_STEPS} decode steps, then the median of {rounds} rounds (configurations "
        f"interleaved).",
        "",
        "The step times carry this machine's noise (several percent between identical "
        "configurations); the mask columns time only the structured-output work inside the "
        "same steps (filling the rows' bitmasks, applying them to the logits), which is the "
        "cost a constrained row adds.",
        "",
        "| constraint | K constrained of 16 | step (ms) | vs K = 0 | mask work per step (ms) "
        "| mask work per constrained row (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        base = statistics.median(medians[kind, 0])
        for k in CONSTRAINED:
            step = statistics.median(medians[kind, k])
            mask = statistics.median(masks[kind, k])
            per_row = f"{mask / k * 1e3:.3f}" if k else "-"
            lines.append(f"| {kind} | {k} | {step * 1e3:.1f} | {step / base:.3f}x | "
                         f"{mask * 1e3:.2f} | {per_row} |")
    lines += [
        "",
        "## Validity on the real model",
        "",
        f"Each constraint x {len(VALIDITY_QUESTIONS)} chat questions x 6 models (the base and "
        f"the five demo adapters), sampled at temperature 0.7 with seeds 1..N, all in one "
        f"batch, max_tokens {VALIDITY_MAX_TOKENS}. An answer that ended by its grammar (stop or "
        f"EOS) is checked: JSON parsed and validated against the schema, the regex matched in "
        f"full, the choice found; one cut by max_tokens is counted apart.",
        "",
        "| constraint | ended by the grammar: valid | invalid | cut by length |",
        "|---|---|---|---|",
        *(f"| {kind} | {ok} | {bad} | {cut} |" for kind, (ok, bad, cut) in valid.items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

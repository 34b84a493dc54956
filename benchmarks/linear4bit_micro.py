"""One layer, three ways, at SmolLM2-135M's shapes: loraplex's 4-bit kernel (NF4, bf16 compute),
bitsandbytes' own CPU 4-bit path, and the unquantized bf16 Linear (oneDNN). It explains the
NF4-against-bf16 ratio of benchmarks/reports/peers.md on a given CPU: which instructions oneDNN
picks for bf16 (AMX where the CPU has it, from ONEDNN_VERBOSE) against the kernel's AVX512-BF16.

    .venv/bin/python -m benchmarks.linear4bit_micro      # -> benchmarks/reports/linear4bit_micro.md

us per call, median of ROUNDS rounds of CALLS calls each, 2 threads, the same weights called
repeatedly (in cache: the per-layer compute, not a model step's memory traffic).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.machine import cpu_name

REPORT = Path(__file__).parent / "reports" / "linear4bit_micro.md"
SHAPES = [(576, 1536), (1536, 576), (576, 576), (576, 192)]  # gate/up, down, q/o, k/v
TOKENS = [1, 32]
ROUNDS, CALLS = 5, 100


def layers(n_in: int, n_out: int):
    """(loraplex 4-bit, bitsandbytes 4-bit, bf16 Linear) over the same random weights."""
    import bitsandbytes as bnb

    from server.model.linear4bit import CpuLinear4bit, load

    load()
    dense = torch.nn.Linear(n_in, n_out, bias=False)
    quantized = []
    for cls in (CpuLinear4bit, bnb.nn.Linear4bit):
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                         quant_type="nf4").to("cpu")
        layer.__class__ = cls
        quantized.append(layer)
    return quantized[0], quantized[1], dense.to(torch.bfloat16)


def timed(fn) -> float:
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        rounds.append((time.perf_counter() - start) / CALLS * 1e6)
    return statistics.median(rounds)


def onednn_isa() -> str:
    """The ISA oneDNN's bf16 matmul runs with on this CPU, as ONEDNN_VERBOSE reports it."""
    code = ("import torch; torch.set_num_threads(2); "
            "torch.nn.functional.linear(torch.randn(32, 576, dtype=torch.bfloat16), "
            "torch.randn(1536, 576, dtype=torch.bfloat16))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ONEDNN_VERBOSE": "1"}).stdout
    for line in out.splitlines():
        if "info,cpu,isa:" in line:
            return line.split("isa:", 1)[1].strip()
    return "not reported (oneDNN verbose printed no isa line)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    lines = ["# One 4-bit layer against the bf16 Linear", "",
             "Command: `.venv/bin/python -m benchmarks.linear4bit_micro`", "",
             f"CPU: {cpu_name()}; AMX (amx_bf16 flag): {'yes' if 'amx_bf16' in flags else 'no'}; "
             f"AVX512-BF16: {'yes' if 'avx512_bf16' in flags else 'no'}; oneDNN's ISA for "
             f"bf16: {onednn_isa()}; torch {torch.__version__}, 2 threads. us per call, median "
             f"of {ROUNDS} rounds of {CALLS} calls, weights in cache.", "",
             "| in x out | tokens | loraplex 4-bit kernel | bitsandbytes 4-bit | bf16 Linear "
             "(oneDNN) | bf16 / loraplex 4-bit |", "|---|---:|---:|---:|---:|---:|"]
    with torch.inference_mode():
        for n_in, n_out in SHAPES:
            ours, theirs, dense = layers(n_in, n_out)
            for m in TOKENS:
                x = torch.randn(m, n_in, dtype=torch.bfloat16)
                t_ours, t_bnb, t_dense = (timed(lambda layer=layer: layer(x))
                                          for layer in (ours, theirs, dense))
                lines.append(f"| {n_in} x {n_out} | {m} | {t_ours:.0f} | {t_bnb:.0f} | "
                             f"{t_dense:.0f} | {t_dense / t_ours:.2f} |")
                print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()

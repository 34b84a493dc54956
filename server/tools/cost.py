"""`loraplex cost`: the memory report as a table and a chart, and what sharing a batch is worth.

The figures come from server/model/memory.py, counted from the loaded tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.model.memory import CostReport

LORAPLEX_LINE = "loraplex: one base + N adapters"


FULL_COPIES_LINE = "N fully fine-tuned copies"


@dataclass
class BatchSharing:
    """Decode throughput of the same requests served two ways on one engine (tokens/s)."""

    adapters: int
    requests: int  # in all
    new_tokens: int  # per request
    shared: float  # every request in one continuous batch, adapters mixed
    one_adapter_at_a_time: float  # one batch per adapter, in turn: what N copies would do

    def __str__(self) -> str:
        return (f"throughput, {self.requests} requests x {self.new_tokens} new tokens over "
                f"{self.adapters} adapters: {self.shared:.0f} tokens/s in one shared batch, "
                f"{self.one_adapter_at_a_time:.0f} tokens/s one adapter's batch at a time (as "
                f"{self.adapters} separate copies would take turns on this machine): "
                f"{self.shared / self.one_adapter_at_a_time:.2f}x")


def measure_batch_sharing(core, adapters: Sequence[str], requests_per_adapter: int,
                          new_tokens: int = 32) -> BatchSharing:
    """Runs `requests_per_adapter` greedy requests per adapter on `core` (an EngineCore with the
    adapters resident), mixed in one batch, then grouped one adapter at a time; a short warm-up
    first puts every adapter in a slot, so both runs time decoding only."""
    from server.engine.core import GenerationRequest
    from server.engine.sampler import SamplingParams

    prompt = core.tokenizer("Tell me about the sea, the wind and the boats.",
                            add_special_tokens=False)["input_ids"]

    def run(groups: list[list[str]], tokens: int) -> float:
        started, produced = time.perf_counter(), 0
        for group in groups:
            for adapter in group:
                params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
                core.add_request(GenerationRequest(prompt_token_ids=list(prompt),
                                                   adapter_id=adapter, params=params))
            while core.has_work():
                produced += sum(len(out.new_token_ids) for out in core.step())
        return produced / (time.perf_counter() - started)

    run([list(adapters)], 2)
    mixed = [a for _ in range(requests_per_adapter) for a in adapters]
    grouped = [[a] * requests_per_adapter for a in adapters]
    return BatchSharing(adapters=len(adapters), requests=len(mixed), new_tokens=new_tokens,
                        shared=run([mixed], new_tokens),
                        one_adapter_at_a_time=run(grouped, new_tokens))


def format_table(report: CostReport, ns: Sequence[int] = (1, 10, 100, 1000)) -> str:
    """The report as aligned text: the parts, then one row per N."""
    served = report.quantization if report.quantization != "none" else "unquantized"
    parts = [(f"base model as served ({served})", report.base_served_bytes),
             ("LoRA slot tables (reserved)", report.slot_table_bytes),
             (f"one fine-tuned copy as served ({served})", report.served_copies_bytes(1)),
             ("one fine-tuned copy in bfloat16", report.bf16_copies_bytes(1)),
             (f"checkpoint as stored ({report.full_copy_dtype})", report.full_copy_bytes)]
    parts += [(f"adapter {name}", size) for name, size in report.adapter_bytes.items()]
    label_width = max(len(label) for label, _ in parts)
    lines = [f"{label.ljust(label_width)}  {_human(size):>12}  ({size:,} bytes)"
             for label, size in parts]
    header = ("N adapters", "loraplex: base + slot tables + N adapters",
              f"N copies ({served})", "N copies (bfloat16)", f"{served} copies / loraplex",
              "bf16 copies / loraplex")
    body = []
    for n in ns:
        ours, same, bf16 = (report.loraplex_bytes(n), report.served_copies_bytes(n),
                            report.bf16_copies_bytes(n))
        body.append((f"{n:,}", _human(ours), _human(same), _human(bf16), f"{same / ours:.2f}x",
                     f"{bf16 / ours:.2f}x"))
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    lines.append("")
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body)
    if report.adapter_bytes:
        lines.append(f"(N adapters cycle through the {len(report.adapter_bytes)} given: "
                     f"{', '.join(report.adapter_bytes)})")
    return "\n".join(lines)


@dataclass(frozen=True)
class ChartSeries:
    """Memory against N adapters (bytes), the lines of the cost chart: loraplex against N fully
    fine-tuned copies, as served and in bfloat16. `loraplex cost` draws it as a PNG, the web
    page as SVG."""

    quantization: str  # how the base and the served copies are stored ("unquantized" if none)
    ns: list[int]  # 1..max_adapters, log-spaced
    loraplex: list[int]
    served_copies: list[int]
    bf16_copies: list[int]


def chart_series(report: CostReport, max_adapters: int = 1000, points: int = 200) -> ChartSeries:
    if max_adapters < 1:
        raise ValueError(f"max_adapters must be >= 1, got {max_adapters}")
    ns = sorted({round(10 ** (math.log10(max_adapters) * i / (points - 1)))
                 for i in range(points)})
    served = report.quantization if report.quantization != "none" else "unquantized"
    return ChartSeries(quantization=served, ns=ns,
                       loraplex=[report.loraplex_bytes(n) for n in ns],
                       served_copies=[report.served_copies_bytes(n) for n in ns],
                       bf16_copies=[report.bf16_copies_bytes(n) for n in ns])


def write_chart(report: CostReport, path: str | Path, max_adapters: int = 1000) -> None:
    """A PNG line chart of memory against N = 1..max_adapters (log-log): loraplex against N
    fully fine-tuned copies."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    series = chart_series(report, max_adapters)
    served, ns = series.quantization, series.ns
    everything = series.loraplex + series.served_copies + series.bf16_copies
    unit, scale = ("GiB", 2**30) if max(everything) >= 2**30 else ("MiB", 2**20)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    ax.plot(ns, [b / scale for b in series.loraplex], label=LORAPLEX_LINE, linewidth=2)
    ax.plot(ns, [b / scale for b in series.served_copies],
            label=f"{FULL_COPIES_LINE} ({served}, as served)", linewidth=2, linestyle="--")
    ax.plot(ns, [b / scale for b in series.bf16_copies], label=f"{FULL_COPIES_LINE} (bfloat16)",
            linewidth=2, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")  # both lines span decades; a linear axis hides the small-N end
    if max_adapters > 1:
        ax.set_xlim(1, max_adapters)
    ax.set_xlabel("number of adapters N (log scale)")
    ax.set_ylabel(f"memory ({unit}, log scale)")
    n = max_adapters
    ax.set_title(f"{served} base + N adapters vs N fine-tuned copies; at N={n:,}: "
                 f"{report.served_copies_bytes(n) / report.loraplex_bytes(n):.1f}x ({served}), "
                 f"{report.bf16_copies_bytes(n) / report.loraplex_bytes(n):.1f}x (bf16)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _human(n: int) -> str:
    """Bytes in MiB below 1 GiB, else GiB, two decimals."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.2f} MiB"


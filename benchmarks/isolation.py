"""Isolation benchmark: can one request, one adapter burst or one client slow another's users?

A real `loraplex serve` on the demo model (SmolLM2-135M-Instruct, NF4, the trained demo adapters)
with `--max-message-mb 16` (so 10 MB prompts reach the server), over gRPC and HTTP. Adapter A
(`uppercase`) gets a steady stream of small chat requests (STREAM_RATE per second, STREAM_TOKENS
new tokens each), and A's time to first token is measured:

- alone: A's stream only;
- (i) big prompts: one 10 MiB prompt per second, alternately over HTTP and gRPC (each refused:
  it cannot fit the context);
- (ii) cold adapters: 50 adapters the server has never loaded (rank 16, all 7 modules, in its
  store) requested at once, one short request each (8 prompt tokens, 1 new token: the load is
  the disturbance, not their compute); three such bursts in turn, 150 adapters in all;
- (iii) a flood: one client keeps 200 requests on adapter B (`pirate`) outstanding (each of
  16-48 new tokens; a new one as soon as one answers), for twice the phase length; compared with
  B keeping the batch as full with max-batch-size - 1 such clients and no queue (equal batch
  occupancy), and run again under `--admission fcfs` (no target: the rule fairness replaces).

Targets (from the isolation issue): in (i) and (ii), A's TTFT p99 <= 2x its p99 alone (in (ii)
over the requests A sent while the 50 loads were served); in (iii), A's served tokens >= 0.9x
what it offers while the flood lasts (tokens A received in the phase over STREAM_RATE x
STREAM_TOKENS x its length: requests still running at its end count against A), and A's TTFT
p99 <= 2x its p99 at equal batch occupancy. A's share of the tokens served is reported beside
(A offers less than its fair share, half).

    .venv/bin/python -m benchmarks.isolation [--quick] [--out PATH]

writes benchmarks/reports/isolation.md (--quick: shorter phases, isolation-quick.md). Needs the
demo model (built by `./dev serve` or `loraplex demo` once); the 50 cold adapters are written
once into ~/.cache/loraplex/bench/isolation-store.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.core_engine import Log, machine
from benchmarks.serving_runner import QueueSampler, adapter_name, build_store, read_metrics
from server.config import EngineConfig, RegistryConfig
from server.tools.demo import default_cache_dir
from server.tools.demo_tasks import prose_questions
from tests.inprocess_server import post_json
from tests.server_process import ServerProcess, start_server

REPORTS = Path("benchmarks/reports")
A, B = "uppercase", "pirate"
STREAM_RATE = 4.0  # A's requests per second
STREAM_TOKENS = 8  # new tokens per A request
BIG_PROMPT_BYTES = 10 << 20
BIG_PROMPT_EVERY = 1.0  # seconds
COLD_ADAPTERS = 50
COLD_BURSTS = 3
FLOOD_REQUESTS = 200  # B's requests outstanding at all times during the flood
FLOOD_TOKENS = (16, 48)  # each B request's new tokens, uniform in this range
WARM = 3.0  # seconds B's clients run before A's stream starts
MAX_BATCH = 64  # the server's default --max-batch-size
BATCH_SEQUENCES = 4  # the decoding batch beside the loads, in the step-time measurement
NICE_LEVELS = (0, 10, 19)
SLOT_WRITE_MB = EngineConfig().max_slot_write_mb_per_step  # the server's defaults
LOAD_THREADS = RegistryConfig().load_workers
LOAD_NICE = RegistryConfig().load_nice
TTFT_RATIO = 2.0
SERVED_RATIO = 0.9


@dataclass
class Sent:
    at: float  # seconds since the phase started
    ttft: float | None = None
    tokens_at: list[float] = field(default_factory=list)  # arrival time of each token
    error: str | None = None


@dataclass
class Phase:
    name: str
    stream: list[Sent]
    windows: list[tuple[float, float]]  # the disturbances, in phase seconds
    running: float = float("nan")  # mean sequences in the batch while it lasted
    notes: list[str] = field(default_factory=list)

    def ttfts(self, in_window: bool = False) -> list[float]:
        """TTFTs of A's requests (in_window: of those sent during a disturbance)."""
        return [s.ttft for s in self.stream if s.ttft is not None
                and (not in_window or any(lo <= s.at <= hi for lo, hi in self.windows))]

    def p99(self, in_window: bool = False) -> float:
        values = self.ttfts(in_window)
        return float(np.percentile(values, 99)) if values else float("nan")

    def p50(self) -> float:
        return float(np.percentile(self.ttfts(), 50))

    @property
    def errors(self) -> int:
        return sum(s.error is not None for s in self.stream)

    def served_ratio(self) -> float:
        """Tokens A received inside the (first) window over what it offered there."""
        lo, hi = self.windows[0]
        got = sum(lo <= t <= hi for s in self.stream for t in s.tokens_at)
        return got / (STREAM_RATE * STREAM_TOKENS * (hi - lo))


# ---- the server --------------------------------------------------------------------------------

def start(store: Path, *extra: str) -> ServerProcess:
    process = start_server("--http-port", "auto", "--metrics-port", "auto", "--max-message-mb",
                           "16", "--store", str(store), "--max-batch-size", str(MAX_BATCH),
                           *extra, timeout=900)
    if not process.port:
        raise RuntimeError("the server did not start:\n" + process.output()[-3000:])
    return process


def served_tokens(samples: dict[str, float]) -> dict[str, float]:
    """Prompt + generated tokens of finished requests per adapter, from /metrics."""
    totals: dict[str, float] = {}
    for kind in ("prompt", "generation"):
        for adapter in (A, B):
            key = f'loraplex_adapter_{kind}_tokens_total{{adapter="{adapter}"}}'
            totals[adapter] = totals.get(adapter, 0.0) + samples.get(key, 0.0)
    return totals


# ---- clients -----------------------------------------------------------------------------------

async def a_stream(client, start: float, questions: list[str], *, seconds: float | None = None,
                   until: asyncio.Future | None = None) -> list[Sent]:
    """A's open-loop stream: request i sent at start + i / STREAM_RATE, for `seconds` or until
    `until` is done; returns once every request sent has answered."""
    async def one(index: int) -> Sent:
        sent = Sent(at=time.perf_counter() - start)
        t0 = time.perf_counter()
        try:
            async for delta in client.stream(questions[index % len(questions)], adapter=A,
                                             chat=True, max_new_tokens=STREAM_TOKENS,
                                             ignore_eos=True):
                now = time.perf_counter()
                if delta.token_ids and sent.ttft is None:
                    sent.ttft = now - t0
                sent.tokens_at += [now - start] * len(delta.token_ids)
        except Exception as exc:  # recorded and reported, never hidden
            sent.error = f"{type(exc).__name__}: {exc}"
        return sent

    tasks = []
    while seconds is None or len(tasks) < seconds * STREAM_RATE:
        await asyncio.sleep(max(0.0, start + len(tasks) / STREAM_RATE - time.perf_counter()))
        if until is not None and until.done():
            break
        tasks.append(asyncio.ensure_future(one(len(tasks))))
    return list(await asyncio.gather(*tasks))


async def big_prompts(client, process: ServerProcess, seconds: float, start: float) -> list[str]:
    """One 10 MiB prompt every BIG_PROMPT_EVERY s, HTTP and gRPC in turn; their answers."""
    from clients._common import LoraplexError

    prompt = "word " * (BIG_PROMPT_BYTES // 5)
    body = json.dumps({"model": A, "prompt": prompt, "max_tokens": 4}).encode()
    answers = []
    for i in range(int(seconds / BIG_PROMPT_EVERY)):
        await asyncio.sleep(max(0.0, start + i * BIG_PROMPT_EVERY - time.perf_counter()))
        if i % 2 == 0:
            status, _, _ = await asyncio.to_thread(post_json, process.http_url + "/v1/completions",
                                                   body)
            answers.append(f"HTTP {status}")
        else:
            try:
                await client.generate(prompt, adapter=A, max_new_tokens=4)
                answers.append("gRPC OK")
            except LoraplexError as exc:
                answers.append(f"gRPC {exc.code.name}")
    return answers


async def cold_burst(client, at: float, first: int) -> float:
    """Adapters first .. first + COLD_ADAPTERS - 1, never loaded, requested at once at `at`;
    returns when the last answered (perf_counter)."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    await asyncio.gather(*(client.generate(prompt_token_ids=list(range(10, 18)),
                                           adapter=adapter_name(first + i), max_new_tokens=1)
                           for i in range(COLD_ADAPTERS)))
    return time.perf_counter()


async def closed_loop(client, workers: int, until: float, questions: list[str]) -> int:
    """`workers` clients on B, each sending its next request when the last one answered."""
    async def worker(index: int) -> int:
        lengths = random.Random(100 + index)  # each B request's new tokens, in FLOOD_TOKENS
        done = 0
        while time.perf_counter() < until:
            await client.generate(questions[(index + done) % len(questions)], adapter=B,
                                  chat=True, max_new_tokens=lengths.randint(*FLOOD_TOKENS),
                                  ignore_eos=True)
            done += 1
        return done

    return sum(await asyncio.gather(*(worker(i) for i in range(workers))))


# ---- phases ------------------------------------------------------------------------------------

class Runner:
    def __init__(self, process: ServerProcess, seconds: float, log: Log):
        self.process, self.seconds, self.log = process, seconds, log
        self.questions = prose_questions()[1]

    def run(self, name: str, body) -> Phase:
        self.log(f"phase {name}")
        port = self.process.metrics_port
        before = served_tokens(read_metrics(port))
        with QueueSampler(port, every=0.5) as sampler:
            phase = asyncio.run(self._with_client(name, body))
        after = served_tokens(read_metrics(port))
        running = [r for r in (s[0] for s in sampler.samples)]
        if running:
            phase.running = float(np.mean(running))
        served = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        if served.get(B):
            phase.notes.append(f"A's share of the tokens served to A and B (prompt + generated, "
                               f"from /metrics): {served[A] / (served[A] + served[B]):.0%}")
        self.log(f"  A: TTFT p50 {phase.p50() * 1e3:.0f} ms, p99 {phase.p99() * 1e3:.0f} ms, "
                 f"{len(phase.stream)} requests, {phase.errors} errors")
        return phase

    async def _with_client(self, name, body) -> Phase:
        from clients import AsyncLoraplexClient

        async with AsyncLoraplexClient(self.process.target, timeout=600) as client:
            return await body(client, name)

    async def alone(self, client, name) -> Phase:
        start = time.perf_counter()
        stream = await a_stream(client, start, self.questions, seconds=self.seconds)
        return Phase(name, stream, [(0.0, self.seconds)])

    async def big(self, client, name) -> Phase:
        start = time.perf_counter()
        stream, answers = await asyncio.gather(
            a_stream(client, start, self.questions, seconds=self.seconds),
            big_prompts(client, self.process, self.seconds, start))
        counts = {a: answers.count(a) for a in sorted(set(answers))}
        return Phase(name, stream, [(0.0, self.seconds)],
                     notes=[f"10 MiB prompts sent: {len(answers)}, answers {counts}"])

    async def cold(self, client, name) -> Phase:
        """COLD_BURSTS bursts of COLD_ADAPTERS adapters each, one after another (each set never
        loaded before), while A's stream runs; A's TTFT p99 pools the requests sent during any
        burst, so it rests on about as many requests as the phase alone."""
        start = time.perf_counter()
        bursts = asyncio.ensure_future(self._bursts(client, start))
        stream = await a_stream(client, start, self.questions, until=bursts)
        windows = bursts.result()
        took = ", ".join(f"{hi - lo:.1f} s" for lo, hi in windows)
        return Phase(name, stream, windows,
                     notes=[f"{COLD_BURSTS} bursts of {COLD_ADAPTERS} cold adapters; each burst's "
                            f"requests all answered after {took}"])

    async def _bursts(self, client, start: float) -> list[tuple[float, float]]:
        windows = []
        for burst in range(COLD_BURSTS):
            at = time.perf_counter() + self.seconds / 4
            done = await cold_burst(client, at, first=burst * COLD_ADAPTERS)
            windows.append((at - start, done - start))
        await asyncio.sleep(self.seconds / 4)
        return windows

    async def occupied(self, client, name) -> Phase:
        return await self._beside_b(client, name, MAX_BATCH - 1)

    async def flooded(self, client, name) -> Phase:
        return await self._beside_b(client, name, FLOOD_REQUESTS)

    async def _beside_b(self, client, name, workers: int) -> Phase:
        """A's stream for 2 x the phase length beside `workers` closed-loop clients on B (started
        WARM s earlier, stopped with A's stream)."""
        seconds = 2 * self.seconds
        until = time.perf_counter() + WARM + seconds
        b_task = asyncio.ensure_future(closed_loop(client, workers, until, self.questions))
        await asyncio.sleep(WARM)
        start = time.perf_counter()
        stream = await a_stream(client, start, self.questions, seconds=seconds)
        b_done = await b_task
        return Phase(name, stream, [(0.0, seconds)],
                     notes=[f"B: {workers} clients each sending its next request when the last "
                            f"answered, {b_done} requests"])


def warm_up(process: ServerProcess, questions: list[str]) -> None:
    """A and B into host RAM and slots, the 4-bit weights repacked: phases start warm."""
    from clients import LoraplexClient

    with LoraplexClient(process.target, timeout=600) as client:
        for adapter in (None, A, B):
            client.generate(questions[0], adapter=adapter, chat=True, max_new_tokens=4)


# ---- the step loop beside background loads (in process) ----------------------------------------

@dataclass
class StepTimes:
    nice: int
    base: list[float]  # seconds per step, the batch alone
    loading: list[float]  # while the COLD_ADAPTERS load on the registry's background threads
    admitting: list[float]  # while their requests join the batch (slot writes)
    load_seconds: float  # burst to the last load done


def measure_steps(model_dir: Path, store: Path, nice_levels: tuple[int, ...], log: Log
                  ) -> list[StepTimes]:
    """Step times of a decoding batch (BATCH_SEQUENCES base-model sequences) on the demo model
    while COLD_ADAPTERS cold adapters load, then while their requests (8 prompt tokens, 1 new
    token) join it. Each nice level gets its own registry (its load threads take the level
    when they start) and its own COLD_ADAPTERS adapters, so every load and slot write is cold."""
    import gc

    from adapters_registry.store import AdapterStore
    from server.engine import threads
    from server.engine.core import GenerationRequest, load_engine_core, make_registry
    from server.engine.sampler import SamplingParams

    finished: set[str] = set()

    def steps(core, count=None, until=None) -> list[float]:
        times = []
        while (count is None or len(times) < count) and (until is None or not until()):
            start = time.perf_counter()
            finished.update(out.request_id for out in core.step() if out.finished)
            times.append(time.perf_counter() - start)
        return times

    config = EngineConfig(model=model_dir, quantize="nf4", device="cpu")
    adapters = AdapterStore(store)
    core = load_engine_core(config, registry=lambda spec: make_registry(spec, 64, store=adapters))
    gc.freeze()  # as the server does once loaded
    batch = [core.add_request(GenerationRequest(
        prompt_token_ids=list(range(10, 50)),
        params=SamplingParams(max_new_tokens=4000, ignore_eos=True)))
        for _ in range(BATCH_SEQUENCES)]
    steps(core, 20)
    results = []
    try:
        for level, nice in enumerate(nice_levels):
            # The registry's load threads and the store's hashing thread at this nice value,
            # as `serve --load-nice` opens them.
            core.registry.close()
            adapters.close()
            adapters = AdapterStore(store, worker_init=functools.partial(threads.background, nice))
            core.registry = make_registry(core.model.spec, 64, store=adapters,
                                          config=RegistryConfig(load_nice=nice))
            base = steps(core, 60)
            names = [adapter_name(level * COLD_ADAPTERS + i) for i in range(COLD_ADAPTERS)]
            burst = time.perf_counter()
            leases = [core.registry.acquire(name) for name in names]
            loading = steps(core, until=lambda: all(f.done() for f in leases))
            load_seconds = time.perf_counter() - burst
            ids = {core.add_request(GenerationRequest(
                prompt_token_ids=list(range(10, 18)), adapter_id=name,
                params=SamplingParams(max_new_tokens=1)), adapter=lease.result())
                for name, lease in zip(names, leases)}
            admitting = steps(core, until=lambda: ids <= finished)
            results.append(StepTimes(nice, base, loading, admitting, load_seconds))
            log(f"  nice {nice}: step ms median alone {_ms(base)}, while loading "
                f"{_ms(loading)}, while admitting {_ms(admitting)}; loads took "
                f"{load_seconds:.1f} s")
    finally:
        for request_id in batch:
            core.abort(request_id)
        core.registry.close()
        adapters.close()
    return results


def _ms(values: list[float], q: float = 50) -> str:
    return f"{np.percentile(values, q) * 1e3:.0f}"


# ---- the report --------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(phases: dict[str, Phase], fcfs: Phase | None, steps: list[StepTimes], command: str,
           seconds: float) -> str:
    alone, big, cold, occupied, fair = (phases[k] for k in
                                        ("alone", "big", "cold", "occupied", "flood"))
    ms = lambda v: f"{v * 1e3:.0f} ms"  # noqa: E731
    cases = [
        ("(i) 10 MiB prompts", f"A's TTFT p99 {ms(big.p99())} <= {TTFT_RATIO}x alone "
         f"({ms(TTFT_RATIO * alone.p99())})", big.p99() <= TTFT_RATIO * alone.p99()),
        ("(ii) 50 cold adapters", f"A's TTFT p99 while they load {ms(cold.p99(True))} "
         f"<= {TTFT_RATIO}x alone ({ms(TTFT_RATIO * alone.p99())})",
         cold.p99(True) <= TTFT_RATIO * alone.p99()),
        ("(iii) flood on B: served", f"A's served tokens {fair.served_ratio():.2f}x what it "
         f"offered >= {SERVED_RATIO}", fair.served_ratio() >= SERVED_RATIO),
        ("(iii) flood on B: TTFT", f"A's TTFT p99 {ms(fair.p99())} <= {TTFT_RATIO}x at equal "
         f"occupancy ({ms(TTFT_RATIO * occupied.p99())})",
         fair.p99() <= TTFT_RATIO * occupied.p99()),
    ]
    lines = [
        "# Isolation: one request, adapter burst or client against another adapter's users",
        "",
        f"Command: `{command}` (`benchmarks/isolation.py`; each phase ~{seconds:.0f} s, A sends "
        f"{STREAM_RATE:g} chat requests/s of {STREAM_TOKENS} new tokens on `{A}`).",
        "",
        "| case | target | result |",
        "|---|---|---|",
        *(f"| {case} | {text} | {verdict(ok)} |" for case, text, ok in cases),
        "",
        "## A's time to first token per phase",
        "",
        "| phase | A requests | errors | TTFT p50 | TTFT p99 | p99 in the disturbance | "
        "mean running |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [*phases.values()] + ([fcfs] if fcfs else [])
    for p in rows:
        lines.append(f"| {p.name} | {len(p.stream)} | {p.errors} | {ms(p.p50())} | "
                     f"{ms(p.p99())} | {ms(p.p99(True))} | {p.running:.1f} |")
    lines += ["", "Notes:"]
    for p in rows:
        lines += [f"- {p.name}: {note}" for note in p.notes]
    if fcfs is not None:
        lines.append(f"- {fcfs.name}: A's served tokens {fcfs.served_ratio():.2f}x what it "
                     f"offered while the flood lasted (fair: {fair.served_ratio():.2f}x)")
    lines += ["", "## The step loop beside a burst of cold adapters", "",
              f"In process, the demo model decoding {BATCH_SEQUENCES} base-model sequences; "
              f"{COLD_ADAPTERS} never-loaded adapters are requested at once (loads on the "
              f"registry's {LOAD_THREADS} background thread(s) at each nice value), then their "
              f"requests (8 "
              f"prompt tokens, 1 new token) join the batch, at most {SLOT_WRITE_MB:g} MiB of "
              f"slot writes per step, the first always (--max-slot-write-mb-per-step: one of "
              f"these adapters a step). "
              f"Step times in ms, median / p90 / max:", "",
              "| load threads' nice | batch alone | while loading | while admitting | "
              "loads took |",
              "|---|---|---|---|---|"]
    for t in steps:
        lines.append(f"| {t.nice} | {_ms(t.base)} / {_ms(t.base, 90)} / {_ms(t.base, 100)} | "
                     f"{_ms(t.loading)} / {_ms(t.loading, 90)} / {_ms(t.loading, 100)} | "
                     f"{_ms(t.admitting)} / {_ms(t.admitting, 90)} / "
                     f"{_ms(t.admitting, 100)} | {t.load_seconds:.1f} s |")
    chosen = next((t for t in steps if t.nice == LOAD_NICE), None)
    if chosen is not None:
        slow = lambda part, q: np.percentile(part, q) / np.percentile(chosen.base, 50)  # noqa: E731
        lines += ["", f"At the server's nice ({LOAD_NICE}) a burst of {COLD_ADAPTERS} cold "
                  f"adapters slows the running batch's median step by "
                  f"{slow(chosen.loading, 50):.2f}x while they load (p90 "
                  f"{slow(chosen.loading, 90):.2f}x) and by {slow(chosen.admitting, 50):.2f}x "
                  f"while they join it (p90 {slow(chosen.admitting, 90):.2f}x), against its "
                  f"median alone."]
    lines += ["", "## What makes it so", "",
              "- (i): a prompt longer than the context can hold (max_model_len x the "
              "vocabulary's longest token x 2 characters) is refused before tokenizing; bodies "
              "are parsed and prompts tokenized on preparation threads, never on the event loop "
              "or the step loop (server/engine/async_engine.py).",
              f"- (ii): adapter loads run on {LOAD_THREADS} background thread(s) (--load-threads, "
              f"one per 4 CPUs) at nice {LOAD_NICE} (--load-nice; a lower value loads cold "
              f"adapters sooner on a busy CPU, at the cost the rows above show) "
              "(server/engine/threads.py), the model's objects are out of the garbage "
              "collector's full passes (gc.freeze once loaded, server/app.py), and at most "
              f"--max-slot-write-mb-per-step ({SLOT_WRITE_MB:g} MiB) of adapters are copied "
              f"into slots before a step, the first always.",
              "- (iii): --admission fair (server/engine/admission.py): the waiting adapter "
              "served the fewest tokens goes first, so A's requests wait for one free place in "
              "the batch, not behind B's queue.",
              "", "## Machine", ""]
    lines += [f"- {name}: {value}" for name, value in machine().items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 s phases, no fcfs run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    seconds = 10.0 if args.quick else 30.0
    out = args.out or REPORTS / ("isolation-quick.md" if args.quick else "isolation.md")
    log = Log()
    cache = default_cache_dir()
    model_dir = cache / "demo" / "smollm2-v1" / "model"
    if not model_dir.is_dir():
        sys.exit(f"{model_dir} is missing: run `./dev serve` or `loraplex demo` once first")
    store = cache / "bench" / "isolation-store"
    store.parent.mkdir(parents=True, exist_ok=True)
    build_store(store, model_dir, COLD_ADAPTERS * max(COLD_BURSTS, len(NICE_LEVELS)), log)

    phases: dict[str, Phase] = {}
    process = start(store)
    try:
        runner = Runner(process, seconds, log)
        warm_up(process, runner.questions)
        for key, name, body in (("alone", "alone", runner.alone),
                                ("big", "(i) 10 MiB prompts", runner.big),
                                ("cold", "(ii) 50 cold adapters", runner.cold),
                                ("occupied", "(iii) equal occupancy, no flood", runner.occupied),
                                ("flood", "(iii) flood on B, fair", runner.flooded)):
            phases[key] = runner.run(name, body)
    finally:
        process.stop()
    fcfs = None
    if not args.quick:
        process = start(store, "--admission", "fcfs")
        try:
            runner = Runner(process, seconds, log)
            warm_up(process, runner.questions)
            fcfs = runner.run("(iii) flood on B, --admission fcfs", runner.flooded)
        finally:
            process.stop()
    log("step times beside cold adapter loads, in process")
    steps = measure_steps(model_dir, store, NICE_LEVELS, log)
    command = "python -m benchmarks.isolation " + shlex.join(sys.argv[1:] if argv is None
                                                              else argv)
    text = report(phases, fcfs, steps, command.strip(), seconds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    log(f"report written to {out}")


if __name__ == "__main__":
    main()

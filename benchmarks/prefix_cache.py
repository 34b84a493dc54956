"""The prefix cache on a chat-style trace: time to first token with and without it, same load.

    .venv/bin/python -m benchmarks.prefix_cache [--rounds 3]   # -> benchmarks/reports/prefix_cache.md

The model is the real demo (`loraplex serve --demo smollm2`: SmolLM2-135M-Instruct, NF4, fp32
compute, the five trained demo adapters), so every task runs under its own adapter. Seeded
workload:

- one system prompt per demo task, 200-500 tokens (random ids: the prompt's content does not
  change the work), served with that task's adapter;
- CONVERSATIONS conversations of TURNS turns, each on one task. Turn k's prompt is the system
  prompt, every earlier user message with the answer the server actually gave, and a new user
  message of 20-60 tokens; each answer is OUTPUT_TOKENS tokens (ignore_eos);
- requests arrive as a Poisson process: arrival i is turn i // CONVERSATIONS of conversation
  i % CONVERSATIONS, sent at its time, or when that conversation's previous answer has arrived
  if that is later (nobody answers before reading).

Capacity: the same conversations all at once (each turn as soon as its previous answer is in)
on a server with --no-prefix-cache: requests per second. The measured rate is 0.7 x that. Each
round then runs the trace at that rate on a fresh server without the cache and on a fresh one
with it (interleaved; a fresh server starts with an empty cache). Target: TTFT p50 without /
with >= 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_name

REPORT = Path("benchmarks/reports/prefix_cache.md")
TASKS = ("json", "sql", "pirate", "one-sentence", "uppercase")
SYSTEM_TOKENS = (200, 500)
USER_TOKENS = (20, 60)
OUTPUT_TOKENS = 24
CONVERSATIONS = 15
TURNS = 3
LOAD = 0.7  # of the no-cache capacity
TARGET = 2.0  # TTFT p50 without the cache / with it
VOCAB = (100, 40_000)  # token ids drawn from here: ordinary text tokens of SmolLM2's vocabulary
THREADS = 2


@dataclass(frozen=True)
class Conversation:
    task: str
    system: list[int]
    users: list[list[int]]  # one message per turn


@dataclass
class Sent:
    conversation: int
    turn: int
    at: float  # seconds since the start
    ttft: float
    latency: float
    tokens: int
    prompt_tokens: int
    cached_tokens: int


def workload(seed: int = 0) -> list[Conversation]:
    rng = np.random.default_rng(seed)
    systems = {task: _tokens(rng, rng.integers(SYSTEM_TOKENS[0], SYSTEM_TOKENS[1] + 1))
               for task in TASKS}
    conversations = []
    for c in range(CONVERSATIONS):
        task = TASKS[c % len(TASKS)]
        users = [_tokens(rng, rng.integers(USER_TOKENS[0], USER_TOKENS[1] + 1))
                 for _ in range(TURNS)]
        conversations.append(Conversation(task, systems[task], users))
    return conversations


def _tokens(rng: np.random.Generator, n) -> list[int]:
    return [int(t) for t in rng.integers(VOCAB[0], VOCAB[1], int(n))]


def poisson_arrivals(rate: float | None, count: int, seed: int = 1) -> list[float]:
    """`count` arrival times at `rate` requests/s; rate None: all at once."""
    if rate is None:
        return [0.0] * count
    return list(np.cumsum(np.random.default_rng(seed).exponential(1 / rate, count)))


async def run_trace(target: str, conversations: list[Conversation], rate: float | None
                    ) -> tuple[list[Sent], float]:
    """Sends every turn of every conversation; returns what each request saw and the seconds
    from the first send to the last answer."""
    from clients import AsyncLoraplexClient

    arrivals = poisson_arrivals(rate, len(conversations) * TURNS)
    answers: dict[tuple[int, int], asyncio.Future] = {}
    loop = asyncio.get_running_loop()
    for c in range(len(conversations)):
        for t in range(TURNS):
            answers[c, t] = loop.create_future()
    async with AsyncLoraplexClient(target, timeout=3600) as client:
        start = time.perf_counter()

        async def turn(index: int) -> Sent:
            c, t = index % len(conversations), index // len(conversations)
            conversation = conversations[c]
            await asyncio.sleep(max(0.0, start + arrivals[index] - time.perf_counter()))
            history = list(conversation.system)
            for earlier in range(t):
                history += conversation.users[earlier] + await answers[c, earlier]
            prompt = history + conversation.users[t]
            sent = time.perf_counter()
            first, tokens, cached = None, [], 0
            async for delta in client.stream(prompt_token_ids=prompt, adapter=conversation.task,
                                             max_new_tokens=OUTPUT_TOKENS, ignore_eos=True):
                if first is None and delta.token_ids:
                    first = time.perf_counter()
                tokens += delta.token_ids
                if delta.cached_prompt_tokens is not None:
                    cached = delta.cached_prompt_tokens
            end = time.perf_counter()
            answers[c, t].set_result(tokens)
            return Sent(c, t, sent - start, first - sent, end - sent, len(tokens), len(prompt),
                        cached)

        sent = await asyncio.gather(*(turn(i) for i in range(len(arrivals))))
        return sent, time.perf_counter() - start


@dataclass
class Run:
    cache: bool
    sent: list[Sent]
    seconds: float

    def ttft(self, q: float) -> float:
        return float(np.percentile([s.ttft for s in self.sent], q))

    @property
    def tokens_per_second(self) -> float:
        return sum(s.tokens for s in self.sent) / self.seconds

    @property
    def hit_ratio(self) -> float:
        return sum(s.cached_tokens for s in self.sent) / sum(s.prompt_tokens for s in self.sent)


def serve(store: Path, cache: bool):
    from tests.server_process import start_server

    flags = ["--demo", "smollm2", "--store", str(store), "--threads", str(THREADS)]
    return start_server(*flags, *([] if cache else ["--no-prefix-cache"]), timeout=900)


def measure(conversations, rate: float | None, cache: bool, log) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        server = serve(Path(tmp) / "store", cache)
        try:
            warm_up(server.target)
            sent, seconds = asyncio.run(run_trace(server.target, conversations, rate))
        finally:
            server.stop()
    run = Run(cache, sent, seconds)
    log(f"  cache {'on ' if cache else 'off'}: TTFT p50 {run.ttft(50):.3f} s, p99 "
        f"{run.ttft(99):.3f} s, {run.tokens_per_second:.1f} tokens/s, hits {run.hit_ratio:.0%}")
    return run


def warm_up(target: str) -> None:
    """Each adapter once, on a prompt no trace request starts with: the first forward repacks
    the 4-bit weights and the adapters load from the store, which no timed request should pay."""
    from clients import LoraplexClient

    with LoraplexClient(target, timeout=600) as client:
        for task in (None, *TASKS):
            client.generate(prompt_token_ids=[1, 2, 3, 4], adapter=task, max_new_tokens=2)


def report(rate: float, capacity: Run, rounds: list[tuple[Run, Run]], command: str) -> str:
    def median(values):
        return statistics.median(values)

    rows = []
    for label, pick in (("without the cache", 0), ("with the cache", 1)):
        runs = [r[pick] for r in rounds]
        rows.append(f"| {label} | {median([r.ttft(50) for r in runs]):.3f} | "
                    f"{median([r.ttft(99) for r in runs]):.3f} | "
                    f"{median([r.tokens_per_second for r in runs]):.1f} | "
                    f"{median([r.hit_ratio for r in runs]):.0%} |")
    ratio = (median([r[0].ttft(50) for r in rounds]) / median([r[1].ttft(50) for r in rounds]))
    ratios_99 = median([r[0].ttft(99) / r[1].ttft(99) for r in rounds])
    verdict = "MET" if ratio >= TARGET else "MISS"
    per_round = [f"| {i + 1} | {off.ttft(50):.3f} | {on.ttft(50):.3f} | {off.ttft(50) / on.ttft(50):.2f} "
                 f"| {off.ttft(99):.3f} | {on.ttft(99):.3f} |" for i, (off, on) in enumerate(rounds)]
    prompt_lengths = [s.prompt_tokens for s in capacity.sent]
    return "\n".join([
        "# Prefix cache: a chat-style trace with and without it",
        "",
        f"`{command}` on {cpu_name()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}; "
        f"the server at --threads {THREADS}. How the trace is made: the module's docstring.",
        "",
        f"Model: SmolLM2-135M-Instruct (NF4, fp32 compute) with the five demo adapters, one per "
        f"task. {CONVERSATIONS} conversations x {TURNS} turns over {len(TASKS)} task system "
        f"prompts of {SYSTEM_TOKENS[0]}-{SYSTEM_TOKENS[1]} tokens; prompts of "
        f"{min(prompt_lengths)}-{max(prompt_lengths)} tokens, {OUTPUT_TOKENS} tokens per answer.",
        "",
        f"Capacity without the cache (every conversation at once): "
        f"{len(capacity.sent) / capacity.seconds:.2f} requests/s. Measured at {LOAD} x that: "
        f"**{rate:.2f} requests/s**, Poisson; medians of {len(rounds)} rounds, the two "
        f"servers interleaved, each fresh (an empty cache).",
        "",
        "| | TTFT p50 (s) | TTFT p99 (s) | tokens/s out | prompt tokens from the cache |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"**TTFT p50 without / with the cache: {ratio:.2f}x (target >= {TARGET}x): {verdict}.** "
        f"p99: {ratios_99:.2f}x (median of the rounds' ratios).",
        "",
        "| round | p50 off (s) | p50 on (s) | ratio | p99 off (s) | p99 on (s) |",
        "|---|---|---|---|---|---|",
        *per_round,
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    conversations = workload()
    log("capacity: every conversation at once, without the cache")
    capacity = measure(conversations, None, cache=False, log=log)
    rate = LOAD * len(capacity.sent) / capacity.seconds
    rounds = []
    for i in range(args.rounds):
        log(f"round {i + 1}/{args.rounds} at {rate:.2f} requests/s")
        off = measure(conversations, rate, cache=False, log=log)
        on = measure(conversations, rate, cache=True, log=log)
        rounds.append((off, on))
    command = "python -m benchmarks.prefix_cache " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    text = report(rate, capacity, rounds, command.strip())
    args.out.write_text(text)
    print(text)
    log(f"report written to {args.out}")


if __name__ == "__main__":
    main()

"""Is this tree slower than an earlier commit? `./dev bench`'s (c) and (d), both trees interleaved.

    .venv/bin/python scripts/bench_against.py REV [--rounds 3] [--out PATH]

REV is checked out in a temporary git worktree. Each round runs one process per tree, REV first,
then this working tree, alternating; each process loads the benchmark's engine once (NF4 base,
32 rank-16 adapters, the model and adapters `./dev bench` builds), warms up, and times (c) base
only and (d) a different adapter per sequence, alternating, PASSES times each. The report gives
every run's tokens/s, the medians and this tree's median over REV's: "no regression" is >= 0.97
for both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THRESHOLD = 0.97
PASSES = 2  # timed (c), (d) passes per process, alternating

DRIVER = r"""
import json, time, torch
import server
from benchmarks import core_engine as ce
assert server.__file__.startswith(TREE), server.__file__
assert ce.load_core.__code__.co_filename.startswith(TREE), ce.load_core.__code__.co_filename
torch.set_num_threads(ce.THREADS)
model_dir, adapters = ce.build_assets(ce.default_cache_dir(), ce.Log())
core = ce.load_core(model_dir, adapters, "float32")
prompts, names = ce.make_prompts(), list(adapters)
configs = {"c": [None] * ce.NUM_PROMPTS, "d": names}
for ids in configs.values():
    ce.generate_loraplex(core, prompts, ce.WARMUP_TOKENS, ids)
result = {key: [] for key in configs}
for _ in range(PASSES):
    for key, ids in configs.items():
        start = time.perf_counter()
        tokens = ce.generate_loraplex(core, prompts, ce.NEW_TOKENS, ids)
        result[key].append(sum(map(len, tokens)) / (time.perf_counter() - start))
print("RESULT " + json.dumps(result))
"""


def run_once(tree: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    code = f"TREE = {str(tree)!r}\nPASSES = {PASSES}\n" + DRIVER
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True,
                          text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"benchmark in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the commit to compare with (e.g. the parent commit)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per tree (>= 3)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    rev = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-against-") as tmp:
        other = Path(tmp) / rev
        subprocess.run(["git", "worktree", "add", "--detach", str(other), rev], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            # The generated gRPC stubs are not committed: the worktree borrows this tree's.
            for stub in (ROOT / "protos/loraplex/v1").glob("*_pb2*.py"):
                target = other / "protos/loraplex/v1" / stub.name
                if not target.exists():
                    target.write_bytes(stub.read_bytes())
            runs = {rev: [], "this tree": []}
            for round_index in range(1, args.rounds + 1):
                for name, tree in ((rev, other), ("this tree", ROOT)):
                    result = run_once(tree)
                    runs[name].append(result)
                    print(f"round {round_index} {name}: (c) {result['c']} tok/s, "
                          f"(d) {result['d']} tok/s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT,
                           check=False, capture_output=True)
    text = report(runs, rev, head, args.rounds)
    print(text)
    if args.out:
        args.out.write_text(text)


def report(runs: dict[str, list[dict[str, float]]], rev: str, head: str, rounds: int) -> str:
    lines = [f"# This tree (on {head}) against {rev}: `./dev bench` (c) and (d)", "",
             f"`.venv/bin/python scripts/bench_against.py {rev} --rounds {rounds}`: {rounds} "
             f"processes per tree, interleaved, {PASSES} timed runs of each config per process; "
             "tokens/s, 32 x 64 new tokens, prefill included.", "",
             f"| config | {rev}: every run | this tree: every run | median {rev} | "
             "median this tree | ratio |", "|---|---|---|---|---|---|"]
    for key in ("c", "d"):
        old = [v for r in runs[rev] for v in r[key]]
        new = [v for r in runs["this tree"] for v in r[key]]
        ratio = statistics.median(new) / statistics.median(old)
        verdict = "ok" if ratio >= THRESHOLD else f"REGRESSION (< {THRESHOLD})"
        lines.append(f"| ({key}) | {' '.join(f'{v:.0f}' for v in old)} | "
                     f"{' '.join(f'{v:.0f}' for v in new)} | {statistics.median(old):.1f} | "
                     f"{statistics.median(new):.1f} | {ratio:.3f} {verdict} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""The long versions of the reliability tests: fuzz, churn, leaks, crash recovery; prints figures.

    .venv/bin/python scripts/soak.py                      # everything, default sizes
    .venv/bin/python scripts/soak.py --only leaks --leak-cycles 1000 --leak-requests 10000
    .venv/bin/python scripts/soak.py --fuzz-scale 10 --churn-minutes 5 --crash-rounds 50
    .venv/bin/python scripts/soak.py --only churn --only leaks --only crash --churn-ops 300 \
        --leak-cycles 800 --leak-requests 2700 --crash-rounds 4    # the suite's sizes

Each part uses the drivers of its test file (tests/test_fuzz_api.py, tests/test_churn.py,
tests/test_leaks.py, tests/test_crash_recovery_e2e.py) with bigger numbers, on the same tiny
model (fuzz, churn, leaks) or demo model (crash), built in a temporary directory. `--json FILE`
also writes the figures as JSON. Exits 1 if any part found a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import TINY_ADAPTERS, TINY_SHAPE  # noqa: E402  (also sets torch threads)

PARTS = ("fuzz", "churn", "leaks", "crash")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=PARTS, help="run only these parts")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--fuzz-scale", type=int, default=10,
                        help="multiplies every fuzz test's number of cases (the suite runs 1)")
    parser.add_argument("--churn-minutes", type=float, default=2.0)
    parser.add_argument("--churn-ops", type=int, default=None,
                        help="stop after this many Admin changes instead (the suite makes 300)")
    parser.add_argument("--churn-workers", type=int, default=3)
    parser.add_argument("--churn-names", type=int, default=16)
    parser.add_argument("--leak-cycles", type=int, default=1000)
    parser.add_argument("--leak-requests", type=int, default=10000)
    parser.add_argument("--crash-rounds", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # e.g. not each load refused for a deleted adapter
    parts = args.only or list(PARTS)
    figures, failed = {}, False
    with tempfile.TemporaryDirectory(prefix="loraplex-soak-") as tmp:
        tmp = Path(tmp)
        for part in parts:
            started = time.monotonic()
            print(f"== {part}", flush=True)
            result, ok = RUNNERS[part](args, tmp)
            result["wall_seconds"] = round(time.monotonic() - started, 1)
            figures[part] = result
            failed |= not ok
            for key, value in result.items():
                print(f"  {key}: {value}", flush=True)
            print(f"  -> {'ok' if ok else 'FAILED'}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    return 1 if failed else 0


def tiny_assets(tmp: Path) -> tuple[Path, dict[str, Path]]:
    """The test suite's tiny model and adapters (tests/conftest.py), built once."""
    from server.tools.demo import write_llama_model, write_lora_adapter

    model = tmp / "tiny-llama"
    adapters = {name: tmp / "tiny-adapters" / name for name in TINY_ADAPTERS}
    if not model.exists():
        write_llama_model(model, **TINY_SHAPE, seed=3)
        for name, kwargs in TINY_ADAPTERS.items():
            write_lora_adapter(adapters[name], base_model_dir=model, init_std=0.2, **kwargs)
    return model, adapters


def run_fuzz(args, tmp: Path) -> tuple[dict, bool]:
    report = tmp / "fuzz.json"
    env = {**os.environ, "LORAPLEX_FUZZ_SCALE": str(args.fuzz_scale),
           "LORAPLEX_FUZZ_SEEDED": "1", "LORAPLEX_FUZZ_REPORT": str(report)}
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_fuzz_api.py", "-q",
                             "-p", "no:cacheprovider", f"--hypothesis-seed={args.seed}"],
                            cwd=REPO, env=env, capture_output=True, text=True)
    codes = json.loads(report.read_text()) if report.exists() else {}
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    cases = {test: sum(counts.values()) for test, counts in codes.items() if test != "findings"}
    if result.returncode:
        print(result.stdout[-6000:], result.stderr[-2000:], sep="\n")
    return {"pytest": summary, "answers": sum(cases.values()), "answers_by_test": cases,
            "status_codes": codes}, result.returncode == 0


def run_churn(args, tmp: Path) -> tuple[dict, bool]:
    from tests.test_churn import ADMIN_TOKEN, STABLE, churn_setup, run_churn, settled, wait_until

    model, adapters = tiny_assets(tmp)
    with churn_setup(model, adapters, tmp / "churn") as (port, core, registry, variants):
        report = asyncio.run(run_churn(
            f"127.0.0.1:{port}", ADMIN_TOKEN, STABLE, variants, names=args.churn_names,
            workers=args.churn_workers, ops=args.churn_ops,
            seconds=None if args.churn_ops else args.churn_minutes * 60, seed=args.seed))
        idle = wait_until(lambda: settled(core, registry))
        figures = {key: value for key, value in asdict(report).items() if key != "reference"}
        figures.update(admin_ops=dict(report.admin_ops), failures=report.failures[:20],
                       mismatches=report.mismatches[:20], seconds=round(report.seconds, 1),
                       host_cache_evictions=registry.cache.evictions,
                       host_loads=registry.loads, slot_writes=core.slots.loads,
                       slot_evictions=core.slots.evictions, settled_after=idle)
    ok = not (report.failures or report.mismatches or report.exhausted) and idle
    return figures, ok


def run_leaks(args, tmp: Path) -> tuple[dict, bool]:
    from tests.test_leaks import (RSS_GROWTH, TENSOR_GROWTH, TENSOR_SLACK, leak_server,
                                  measure_leaks)

    model, adapters = tiny_assets(tmp)
    with leak_server(model, adapters["all-r8"], tmp / "leaks") as (target, core, registry):
        report = measure_leaks(target, core, registry, args.leak_cycles, args.leak_requests)
    ok = (report.rss_growth <= RSS_GROWTH and report.tensors_after <=
          report.tensors_before * (1 + TENSOR_GROWTH) + TENSOR_SLACK)
    return {"cycles": report.cycles, "requests": report.requests,
            "rss_before_mib": round(report.rss_before / 2**20, 1),
            "rss_after_mib": round(report.rss_after / 2**20, 1),
            "rss_growth_percent": round(100 * report.rss_growth, 2),
            "tensors_before": report.tensors_before, "tensors_after": report.tensors_after,
            "host_loads": report.host_loads, "slot_writes": report.slot_writes,
            "outcomes": report.outcomes, "seconds": round(report.seconds, 1)}, ok


def run_crash(args, tmp: Path) -> tuple[dict, bool]:
    from server.tools.demo import build_demo
    from tests.test_crash_recovery_e2e import run_crash_rounds

    cache = tmp / "demo-cache"
    build_demo(cache, progress=None)
    os.environ["LORAPLEX_DEMO"] = "tiny"  # the servers it starts serve that demo
    (tmp / "crash").mkdir()
    report = run_crash_rounds(cache, tmp / "crash", args.crash_rounds, seed=args.seed)
    figures = asdict(report)
    restarts = figures.pop("restart_seconds")
    figures["restart_seconds_max"] = round(max(restarts, default=0), 1)
    return figures, not report.violations


RUNNERS = {"fuzz": run_fuzz, "churn": run_churn, "leaks": run_leaks, "crash": run_crash}

if __name__ == "__main__":
    sys.exit(main())

"""`./dev gpu-check --dry-run`: the prepared GPU check runs on the CPU at tiny sizes, with the
kernels CUDA gets run by Triton's interpreter, so the script a GPU machine runs cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_passes_and_writes_its_report(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "LORAPLEX_VENV": str(Path(sys.executable).parent.parent)}
    done = subprocess.run([str(REPO / "dev"), "gpu-check", "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out.read_text()
    assert "**Dry run**" in report and "**PASS**: 12 of 12 cases within tolerance" in report
    for config in ("(a)", "(b)", "(c)", "(d)"):
        assert f"| {config} |" in report
    assert report.count("target >=") == 3 and "## Profile" in report


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_the_full_check_says_how_to_dry_run():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--dry-run" in done.stderr

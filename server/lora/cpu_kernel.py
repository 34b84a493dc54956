"""The C++ CPU kernel of the batched LoRA op (`csrc/lora_cpu.cpp`), built when an engine starts.

`load()` compiles the source with torch.utils.cpp_extension (-O3 -march=native, OpenMP) into
torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so later
processes on the same machine only load the built library. The build name carries a hash of the
CPU model and flags: a cache shared between different machines never loads a binary built for
another CPU. If the build or the load fails for any reason (no compiler, no ninja, a non-GNU
toolchain), `load()` logs one warning and returns None from then on; callers use PyTorch instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from types import ModuleType

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "lora_cpu.cpp")

_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def _cpu_tag() -> str:
    """A short hash of what -march=native depends on: the CPU model and its feature flags."""
    info = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        info += "".join(sorted(set(lines)))
    except OSError:
        info += platform.processor()
    return hashlib.sha256(info.encode()).hexdigest()[:10]


def _build() -> ModuleType:
    from torch.utils import cpp_extension
    torch_logger = logging.getLogger(cpp_extension.__name__)
    quiet = _OnlyErrors()  # torch's own compiler warnings would add to our single warning
    torch_logger.addFilter(quiet)
    try:
        return cpp_extension.load(name=f"loraplex_lora_cpu_{_cpu_tag()}", sources=[SOURCE],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
    finally:
        torch_logger.removeFilter(quiet)


class _OnlyErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _reason(exc: Exception) -> str:
    """The telling line of a build failure (a compiler error, a missing tool), else the last."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln.lower() or "not found" in ln or "required" in ln:
            return ln
    return lines[-1] if lines else ""


def load() -> ModuleType | None:
    """The compiled kernel module (with `lora_apply_cpu`), or None if it cannot be built."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            start = time.perf_counter()
            try:
                _module = _build()
            except Exception as exc:  # any build or load failure means: use PyTorch
                _failed = True
                logger.warning("LoRA CPU kernel unavailable, using the PyTorch path "
                               "(--lora-kernel torch skips the build): %s: %s",
                               type(exc).__name__, _reason(exc))
            else:
                logger.info("LoRA CPU kernel ready in %.1f s", time.perf_counter() - start)
    return _module

"""C++ extensions built on the machine that runs them (the CPU LoRA kernel, the 4-bit linear).

`NativeModule.load()` compiles its source with torch.utils.cpp_extension (-O3 -march=native,
OpenMP) into torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so
later processes on the same machine only load the built library. The build name carries a hash of
the CPU model and flags: a cache shared between different machines never loads a binary built for
another CPU. If the build or the load fails for any reason (no compiler, no ninja, a non-GNU
toolchain), `load()` logs one warning, naming the fallback, and returns None from then on.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
import time
from types import ModuleType


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


class NativeModule:
    """One C++ source, built at most once per process.

    name: the extension's name (the CPU tag is appended); what: what it is, for the log;
    fallback: what serves instead when it cannot be built, for the one warning."""

    def __init__(self, name: str, source: str, *, what: str, fallback: str,
                 logger: logging.Logger):
        self.name, self.source = name, source
        self.what, self.fallback, self.logger = what, fallback, logger
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self._failed = False

    def _build(self) -> ModuleType:
        from torch.utils import cpp_extension
        torch_logger = logging.getLogger(cpp_extension.__name__)
        quiet = _OnlyErrors()  # torch's own compiler warnings would add to our single warning
        torch_logger.addFilter(quiet)
        try:
            return cpp_extension.load(name=f"{self.name}_{_cpu_tag()}", sources=[self.source],
                                      extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                      extra_ldflags=["-fopenmp"], verbose=False)
        finally:
            torch_logger.removeFilter(quiet)

    def load(self) -> ModuleType | None:
        """The compiled module, or None if it cannot be built."""
        if self._module is not None or self._failed:
            return self._module
        with self._lock:
            if self._module is None and not self._failed:
                start = time.perf_counter()
                try:
                    self._module = self._build()
                except Exception as exc:  # any build or load failure means: the fallback serves
                    self._failed = True
                    self.logger.warning("%s unavailable, %s: %s: %s", self.what, self.fallback,
                                        type(exc).__name__, _reason(exc))
                else:
                    self.logger.info("%s ready in %.1f s", self.what, time.perf_counter() - start)
        return self._module

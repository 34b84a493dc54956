"""Importing the Triton kernels (LoRA, paged attention) for the device an engine serves.

Triton decides once, when it is first imported, whether `triton.jit` compiles kernels for the GPU
or runs them in its interpreter on CPU tensors (`TRITON_INTERPRET=1`): its own library of jit
functions is built then. So the first kernel module imported for a CPU device sets the variable
before Triton is imported, and a process serves one kind of device. The tests run the CUDA
kernels in the interpreter this way (tests/conftest.py sets it before anything imports Triton).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType

log = logging.getLogger(__name__)


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load_kernels(module: str, device_kind: str, *, required: bool, what: str) -> ModuleType | None:
    """Imports `module` (one of ours, holding Triton kernels) for `device_kind` (cuda, or cpu for
    the interpreter). Missing Triton: ValueError when `required`, else one warning and None.
    ValueError too when Triton was already imported for the other kind of device."""
    if device_kind not in ("cpu", "cuda"):
        raise ValueError(f"the Triton {what} run on CUDA (or interpreted on the CPU), "
                         f"not on {device_kind}")
    interpret = device_kind == "cpu"
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    elif interpreting() != interpret:
        raise ValueError(f"Triton was imported for {'CUDA' if interpret else 'CPU'} tensors "
                         f"before the {what} were chosen: for Triton kernels on the CPU, start "
                         f"with TRITON_INTERPRET=1 (one process serves one kind of device)")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if required:
            raise ValueError(f"the Triton {what} need Triton ({exc})") from exc
        log.warning("Triton is not installed (%s): PyTorch serves the %s' work", exc, what)
        return None

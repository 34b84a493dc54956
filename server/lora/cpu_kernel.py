"""The C++ CPU kernel of the batched LoRA op (`csrc/lora_cpu.cpp`), built when an engine starts
(server/native.py says how and where; a failed build leaves the PyTorch path serving)."""

from __future__ import annotations

import logging
import os
from types import ModuleType

from server.native import NativeModule

KERNEL = NativeModule(
    "loraplex_lora_cpu", os.path.join(os.path.dirname(__file__), "csrc", "lora_cpu.cpp"),
    what="LoRA CPU kernel",
    fallback="using the PyTorch path (--lora-kernel torch skips the build)",
    logger=logging.getLogger(__name__))


def load() -> ModuleType | None:
    """The compiled kernel module (with `lora_apply_cpu`), or None if it cannot be built."""
    return KERNEL.load()

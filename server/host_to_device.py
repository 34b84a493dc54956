"""Per-step inputs built on the host and handed to the device without stalling the host."""

from __future__ import annotations

import torch


def upload(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`host` on `device`: to a GPU from pinned memory with a non-blocking copy (the caching host
    allocator keeps the buffer until the copy is done), so building the next step's inputs never
    waits for the device; on the CPU, `host` itself."""
    if torch.device(device).type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)

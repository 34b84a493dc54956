"""One adapter's tensors as validated for serving: what the host cache holds and the engine
writes into a device slot. `adapters_registry.peft_format` builds them from PEFT files."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraModuleWeights:
    a: torch.Tensor  # [r, in], the file's dtype (fp16, bf16 or fp32)
    b: torch.Tensor  # [out, r]
    scale: float
    magnitude: torch.Tensor | None = None  # [out], DoRA's per-output-channel magnitude

    @property
    def nbytes(self) -> int:
        magnitude = self.magnitude.nbytes if self.magnitude is not None else 0
        return self.a.nbytes + self.b.nbytes + magnitude

    def pin(self) -> None:
        """Moves the tensors into page-locked host memory (same values, same bytes)."""
        self.a, self.b = self.a.pin_memory(), self.b.pin_memory()
        if self.magnitude is not None:
            self.magnitude = self.magnitude.pin_memory()


@dataclass
class LoraWeights:
    """One adapter's tensors: decoder modules keyed by (layer index, module name), and the
    vocabulary-side modules when targeted (embed_tokens: a [r, vocab], b [hidden, r];
    lm_head: a [r, hidden], b [vocab, r])."""

    name: str
    rank: int
    modules: dict[tuple[int, str], LoraModuleWeights] = field(default_factory=dict)
    embed_tokens: LoraModuleWeights | None = None
    lm_head: LoraModuleWeights | None = None
    rslora: bool = False  # its scales are lora_alpha / sqrt(r) (what a PEFT merge copies)

    pinned: bool = False  # the tensors are in page-locked memory (`pin`)

    @property
    def nbytes(self) -> int:
        vocab = [m for m in (self.embed_tokens, self.lm_head) if m is not None]
        return sum(m.nbytes for m in [*self.modules.values(), *vocab])

    def pin(self) -> None:
        """Moves every tensor into page-locked host memory, once: copies from there to a GPU
        run asynchronously. Only for a process with a GPU (pinning needs CUDA)."""
        if self.pinned:
            return
        vocab = [m for m in (self.embed_tokens, self.lm_head) if m is not None]
        for module in [*self.modules.values(), *vocab]:
            module.pin()
        self.pinned = True

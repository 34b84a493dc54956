"""Paged KV cache: fixed-size blocks of token positions, handed out to sequences on demand.

Every layer's cache is one flat tensor of `num_blocks * block_size` token rows; a sequence owns a
list of blocks (its block table), and token i of the sequence lives at row
`block_table[i // block_size] * block_size + i % block_size` in every layer.
"""

from __future__ import annotations

import torch


class OutOfBlocks(RuntimeError):
    """Not enough free KV-cache blocks for the request."""


class BlockAllocator:
    """Free list of block ids; the scheduler asks it before admitting or growing a sequence."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVCache:
    """Key and value tensors of all layers. k[layer]: [num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        rows = num_blocks * block_size
        self.k = [torch.zeros(rows, kv_heads, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.v = [torch.zeros(rows, kv_heads, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * num_layers * block_size * kv_heads * head_dim * element

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0–1."""
        return 1.0 - self.allocator.num_free / self.num_blocks

    def rows_of(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache rows of token positions start..end-1 of a sequence with this block table."""
        bs = self.block_size
        return [block_table[i // bs] * bs + i % bs for i in range(start, end)]

"""Paged KV cache: fixed-size blocks of token positions, handed out to sequences on demand.

A sequence owns a list of blocks (its block table); token i of the sequence lives at row
`block_table[i // block_size] * block_size + i % block_size` of every layer's cache. The cache is
head-major, k[layer]: [kv_heads, num_blocks * block_size, head_dim], so reading a sequence's
context copies whole contiguous [block_size, head_dim] runs per head.
"""

from __future__ import annotations

import torch


class BlockAllocator:
    """Free list of block ids; the scheduler asks it before admitting or growing a sequence."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self._free), f"need {n} KV blocks, {len(self._free)} free"  # the scheduler checks
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVCache:
    """Key and value tensors of all layers. k[layer]: [kv_heads, num_blocks * block_size, head_dim]."""

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        rows = num_blocks * block_size
        self.k = [torch.zeros(kv_heads, rows, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.v = [torch.zeros(kv_heads, rows, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores new keys and values. rows: [T] cache rows; k, v: [T, kv_heads, head_dim]."""
        self.k[layer].index_copy_(1, rows, k.transpose(0, 1).to(self.k[layer].dtype))
        self.v[layer].index_copy_(1, rows, v.transpose(0, 1).to(self.v[layer].dtype))

    def read(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Contexts of B sequences. block_tables: [B, n] -> k, v: [B, kv_heads, n * block_size, D]."""
        batch, n = block_tables.shape
        index = block_tables.reshape(-1)
        shape = (self.kv_heads, self.num_blocks, self.block_size, self.head_dim)
        out = (self.kv_heads, batch, n * self.block_size, self.head_dim)
        # Advanced indexing copies these runs faster than index_select(1, ...) on the CPU.
        k = self.k[layer].view(shape)[:, index].view(out).transpose(0, 1)
        v = self.v[layer].view(shape)[:, index].view(out).transpose(0, 1)
        return k, v

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        element = torch.tensor([], dtype=dtype).element_size()
        return 2 * num_layers * block_size * kv_heads * head_dim * element

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def rows_of(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache rows of token positions start..end-1 of a sequence with this block table."""
        bs = self.block_size
        return [block_table[i // bs] * bs + i % bs for i in range(start, end)]

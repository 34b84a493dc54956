"""Paged KV cache: fixed-size blocks of token positions, handed out to sequences on demand, and
the prefix cache over them.

A sequence owns a list of blocks (its block table); token i of the sequence lives at row
`block_table[i // block_size] * block_size + i % block_size` of every layer's cache. The cache is
head-major, k[layer]: [kv_heads, num_blocks * block_size, head_dim], so reading a sequence's
context copies whole contiguous [block_size, head_dim] runs per head.

Prefix cache: a block whose positions are all computed is identified by a chained hash of the
adapter version that computed it (its k and v projections carry that adapter's LoRA), its tokens
and the hash of the block before it (`block_hashes`). A later sequence whose tokens start with
the same blocks under the same adapter version shares them read-only (reference counts) and
computes only the rest. Blocks no running sequence uses keep their content and hash until
allocation needs them, least recently used first: they count as free.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch

from adapters_registry.host_cache import AdapterKey

HASH_BYTES = 16


def block_hashes(tokens: list[int], block_size: int, adapter: AdapterKey | None,
                 known: list[bytes]) -> list[bytes]:
    """The chained hashes of every full block of `tokens` under `adapter` (None: the base
    model), reusing `known` (the hashes of a prefix of them) and computing the rest."""
    hashes = list(known)
    previous = hashes[-1] if hashes else _adapter_seed(adapter)
    for start in range(len(hashes) * block_size, len(tokens) - block_size + 1, block_size):
        block = array("I", tokens[start:start + block_size]).tobytes()
        previous = hashlib.blake2b(previous + block, digest_size=HASH_BYTES).digest()
        hashes.append(previous)
    return hashes


def _adapter_seed(adapter: AdapterKey | None) -> bytes:
    """Where an adapter version's chain starts: its name, version and content digest."""
    key = "" if adapter is None else f"{adapter.name}\0{adapter.version}\0{adapter.digest}"
    return hashlib.blake2b(key.encode(), digest_size=HASH_BYTES).digest()


class BlockAllocator:
    """Block ids with reference counts, and the prefix cache's index over them.

    A block is free (no user, nothing worth keeping), in use (refs > 0: in the block tables of
    running sequences) or cached (refs == 0, a full block with a hash: a later sequence may take
    it; allocation reclaims these least recently used first). `num_free` counts free and cached
    blocks: cached ones never hold admission back.
    """

    def __init__(self, num_blocks: int, *, caching: bool = True):
        self.num_blocks = num_blocks
        self.caching = caching
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()  # refs == 0, least recent first
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._adapter_of: dict[int, AdapterKey | None] = {}  # of hashed blocks
        self.evictions = 0  # cached blocks reclaimed for new content

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Blocks kept for the prefix cache that no sequence uses."""
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        assert n <= self.num_free, f"need {n} KV blocks, {self.num_free} free"  # the scheduler checks
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._cached.popitem(last=False)
                self._forget(block)
                self.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drops one reference to each block. A hashed block nobody uses stays cached; the
        table's last blocks become the least recent, so they are reclaimed before its first."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"KV block {block} freed more often than taken"
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def cached_prefix(self, hashes: Iterable[bytes]) -> list[int]:
        """The blocks holding the longest run of `hashes` from the first (not taken yet)."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def unused(self, blocks: list[int]) -> int:
        """How many of `blocks` no sequence uses (taking them uses up free blocks)."""
        return sum(self._refs[b] == 0 for b in blocks)

    def take(self, blocks: list[int]) -> None:
        """One more reference to each of these cached blocks."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1

    def register(self, block: int, block_hash: bytes, adapter: AdapterKey | None) -> None:
        """`block` is full and computed under `adapter`: later prompts may share it. A hash
        already held by another block (the same prefix computed twice at once) keeps that one."""
        if not self.caching or block_hash in self._block_of or block in self._hash_of:
            return
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        self._adapter_of[block] = adapter

    def forget_adapter(self, stale: Callable[[AdapterKey], bool]) -> None:
        """Unhashes every block computed under an adapter version `stale` says is replaced or
        deleted: no later sequence can share it; cached ones become free."""
        for block in [b for b, a in self._adapter_of.items() if a is not None and stale(a)]:
            self._forget(block)
            if block in self._cached:
                del self._cached[block]
                self._free.append(block)

    def _forget(self, block: int) -> None:
        block_hash = self._hash_of.pop(block, None)
        if block_hash is not None:
            del self._block_of[block_hash]
            del self._adapter_of[block]


class KVCache:
    """Key and value tensors of all layers. k[layer]: [kv_heads, num_blocks * block_size, head_dim]."""

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        rows = num_blocks * block_size
        self.k = [torch.zeros(kv_heads, rows, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.v = [torch.zeros(kv_heads, rows, head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks, caching=prefix_caching)

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

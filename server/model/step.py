"""One packed forward pass over every sequence of a step (prefill chunks and decode tokens mixed).

The T tokens of a step are packed into one row dimension: x: [T, hidden]. The HF modules
(embeddings, norms, MLPs, the wrapped q/k/v/o Linears) run on [T, ...] as they are; attention is
ours, because it reads keys and values from the paged KV cache. Sequences with one new token
(decode) and sequences with several (prefill chunks) form two attention groups. The prefill group
is one batched `scaled_dot_product_attention` call per layer over the gathered contexts; the
decode group is either the same math as two grouped matmuls (`decode_attention`, the CPU's), or
a Triton kernel that reads the cache through the block tables without gathering
(`server/model/triton_attention.py`, CUDA's). `select_decode_attention` chooses once, by device
(`--attention-kernel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from server.config import ATTENTION_KERNEL_CHOICES
from server.engine.kv_cache import KVCache
from server.host_to_device import upload
from server.lora.layer import LoraContext
from server.triton_support import load_kernels


def select_decode_attention(mode: str, device: torch.device | str) -> Callable | None:
    """The paged decode-attention kernel for `mode` on `device`: `auto` = Triton on CUDA, none on
    the CPU; `triton` = Triton anywhere (on a CPU device interpreted: slow, for tests); `torch`
    = none. None: the decode group gathers its contexts and runs `decode_attention`."""
    if mode not in ATTENTION_KERNEL_CHOICES:
        raise ValueError(f"the attention kernel must be one of {ATTENTION_KERNEL_CHOICES}, "
                         f"not {mode!r}")
    kind = torch.device(device).type
    if mode == "torch" or (mode == "auto" and kind != "cuda"):
        return None
    kernels = load_kernels("server.model.triton_attention", kind, required=mode == "triton",
                           what="attention kernels")
    return None if kernels is None else kernels.paged_decode_attention


@dataclass
class SeqChunk:
    """The part of one sequence computed in this step."""

    token_ids: list[int]  # tokens to compute now
    start: int  # position of token_ids[0] in the sequence
    block_table: list[int]  # KV blocks covering positions 0..start+len(token_ids)-1
    slots: list[tuple[int, float]]  # (adapter slot, weight) of each adapter its tokens run
                                    # through: none = base model, several = a cat mixture
    needs_logits: bool  # True when the chunk ends the known tokens (a new token is sampled)
    all_logits: bool = False  # logits of every token of the chunk (prompt log-probabilities)


@dataclass
class AttentionGroup:
    """Sequences attended together: queries padded to Q, contexts read from the cache in blocks."""

    token_index: torch.Tensor  # [B, Q] packed rows of the queries (padding points at row 0)
    valid: torch.Tensor | None  # [B, Q] bool, None when no query is padding
    block_tables: torch.Tensor  # [B, n] KV blocks (padding points at block 0, masked)
    masks: dict  # window (None = full) -> [B, 1, Q, n * block_size] bool, True = may attend
    out_index: torch.Tensor  # [N] packed rows receiving the valid outputs
    rows: slice | None  # the same rows as a slice, when they are contiguous and unpadded
    context_lens: torch.Tensor  # [B] int32, each sequence's last query position + 1


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    token_slots: torch.Tensor  # [T] adapter slot of each token, -1 = base
    token_slots_host: list[int]  # the same on the host: the LoRA mapping groups them there
    token_weights_host: list[float] | None  # [T] each token's weight in that slot; None: all 1
    more_slots: list[tuple[list[int], list[float]]]  # cat mixtures: each token's 2nd, 3rd, ...
                                                     # (slot, weight); -1 = none (host)
    write_rows: torch.Tensor  # [T] KV-cache row receiving each token's key and value
    groups: list[AttentionGroup]
    logit_rows: torch.Tensor  # [N] packed rows whose next-token logits are returned
    logit_slots: list[int]  # [N] adapter slot of each of those rows (host)


def build_step_inputs(chunks: list[SeqChunk], kv: KVCache, windows: set,
                      device: torch.device) -> StepInputs:
    """Packs the chunks' tokens and precomputes, once per step, every index and mask the layers
    share (on the host, then copied to the device without blocking)."""
    ids, positions, slots, rows, logit_rows, logit_slots = [], [], [], [], [], []
    offsets = []
    for chunk in chunks:
        n = len(chunk.token_ids)
        offsets.append(len(ids))
        ids += chunk.token_ids
        positions += range(chunk.start, chunk.start + n)
        slot = chunk.slots[0][0] if chunk.slots else -1
        slots += [slot] * n
        rows += kv.rows_of(chunk.block_table, chunk.start, chunk.start + n)
        if chunk.all_logits:  # each row's logits predict the token after it
            logit_rows += range(len(ids) - n, len(ids))
            logit_slots += [slot] * n
        elif chunk.needs_logits:
            logit_rows.append(len(ids) - 1)
            logit_slots.append(slot)
    weights, more_slots = _slot_weights(chunks, offsets, len(ids))
    decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
    prefill = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
    groups = [_attention_group([chunks[i] for i in members], [offsets[i] for i in members],
                               kv, windows, device)
              for members in (decode, prefill) if members]
    as_long = lambda values: upload(torch.tensor(values, dtype=torch.long), device)  # noqa: E731
    return StepInputs(input_ids=as_long(ids), positions=as_long(positions),
                      token_slots=as_long(slots), token_slots_host=slots,
                      token_weights_host=weights, more_slots=more_slots,
                      write_rows=as_long(rows), groups=groups,
                      logit_rows=as_long(logit_rows), logit_slots=logit_slots)


def _slot_weights(chunks: list[SeqChunk], offsets: list[int], num_tokens: int
                  ) -> tuple[list[float] | None, list[tuple[list[int], list[float]]]]:
    """Each token's weight in its first slot (None: all 1, the usual case) and the passes of
    its further (slot, weight), for the tokens of cat mixtures."""
    if all(len(c.slots) <= 1 and (not c.slots or c.slots[0][1] == 1.0) for c in chunks):
        return None, []
    depth = max(len(c.slots) for c in chunks)
    passes = [([-1] * num_tokens, [1.0] * num_tokens) for _ in range(depth)]
    for chunk, offset in zip(chunks, offsets):
        span = range(offset, offset + len(chunk.token_ids))
        for (slot, weight), (pass_slots, pass_weights) in zip(chunk.slots, passes):
            for t in span:
                pass_slots[t], pass_weights[t] = slot, weight
    return passes[0][1], passes[1:]


def _attention_group(chunks: list[SeqChunk], offsets: list[int], kv: KVCache, windows: set,
                     device: torch.device) -> AttentionGroup:
    q_len = max(len(c.token_ids) for c in chunks)
    num_blocks = max(kv.blocks_needed(c.start + len(c.token_ids)) for c in chunks)
    token_index, query_pos, valid, tables, lengths = [], [], [], [], []
    for chunk, offset in zip(chunks, offsets):
        n, pad = len(chunk.token_ids), q_len - len(chunk.token_ids)
        token_index.append(list(range(offset, offset + n)) + [0] * pad)
        query_pos.append(list(range(chunk.start, chunk.start + n)) + [0] * pad)
        valid.append([True] * n + [False] * pad)
        used = chunk.block_table[:kv.blocks_needed(chunk.start + n)]
        tables.append(used + [0] * (num_blocks - len(used)))
        lengths.append(chunk.start + n)
    query_pos = torch.tensor(query_pos)  # [B, Q]
    key_pos = torch.arange(num_blocks * kv.block_size)  # [L]
    # A query at position p sees keys at positions <= p (causal); this also hides the padding
    # keys beyond each sequence's end. Padding queries (position 0) see key 0 only, never NaN.
    causal = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, Q, L]
    masks = {}
    for window in windows:
        mask = causal
        if window is not None:
            mask = mask & (query_pos[:, :, None] - key_pos[None, None, :] < window)
        masks[window] = upload(mask[:, None], device)  # [B, 1, Q, L]
    flat = [t for row, ok in zip(token_index, valid) for t, v in zip(row, ok) if v]
    padded = not all(all(row) for row in valid)
    contiguous = not padded and flat == list(range(flat[0], flat[0] + len(flat)))
    as_long = lambda values: upload(torch.tensor(values, dtype=torch.long), device)  # noqa: E731
    return AttentionGroup(
        token_index=as_long(token_index),
        valid=upload(torch.tensor(valid), device) if padded else None,
        block_tables=as_long(tables), masks=masks, out_index=as_long(flat),
        rows=slice(flat[0], flat[0] + len(flat)) if contiguous else None,
        context_lens=upload(torch.tensor(lengths, dtype=torch.int32), device))


class ModelRunner:
    """Runs packed steps of a HF Llama-family model whose target Linears are LoRA-wrapped."""

    def __init__(self, hf: torch.nn.Module, kv: KVCache, lora: LoraContext,
                 paged_decode: Callable | None = None):
        """paged_decode: from `select_decode_attention`; None = gather, then `decode_attention`."""
        self.hf = hf
        self.kv = kv
        self.lora = lora
        self.paged_decode = paged_decode
        cfg = hf.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layer_windows = layer_windows(cfg)
        self.windows = set(self.layer_windows)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Runs one step; returns fp32 logits [N, vocab] of the rows in `inputs.logit_rows`."""
        model = self.hf.model
        self.lora.set_step(inputs.token_slots, inputs.logit_slots, inputs.token_slots_host,
                           inputs.token_weights_host, inputs.more_slots)
        h = model.embed_tokens(inputs.input_ids)  # [T, hidden]
        cos, sin = model.rotary_emb(h, inputs.positions[None])  # [1, T, head_dim]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, head_dim]
        for index, layer in enumerate(model.layers):
            residual = h
            h = layer.input_layernorm(h)
            h = residual + self._attention(index, layer.self_attn, h, cos, sin, inputs)
            residual = h
            h = residual + layer.mlp(layer.post_attention_layernorm(h))
        last = model.norm(h[inputs.logit_rows])  # [N, hidden]
        return self.hf.lm_head(last).float()  # [N, vocab]

    def _attention(self, index: int, attn: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        T = h.shape[0]
        q = attn.q_proj(h).view(T, self.num_heads, self.head_dim)
        k = attn.k_proj(h).view(T, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(h).view(T, self.num_kv_heads, self.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        self.kv.write(index, inputs.write_rows, k, v)
        window = self.layer_windows[index]
        out = None if len(inputs.groups) == 1 else torch.empty_like(q)  # [T, heads, D]
        for group in inputs.groups:
            B, Q = group.token_index.shape
            if group.rows is not None:
                qg = q[group.rows].view(B, Q, self.num_heads, self.head_dim)
            else:
                qg = q[group.token_index]  # [B, Q, heads, D]
            if Q == 1 and self.paged_decode is not None:  # straight from the paged cache
                og = self.paged_decode(qg.reshape(B, self.num_heads, self.head_dim),
                                       self.kv.k[index], self.kv.v[index], group.block_tables,
                                       group.context_lens, self.kv.block_size, attn.scaling,
                                       window)[:, None]  # [B, 1, heads, D]
            else:
                kg, vg = self.kv.read(index, group.block_tables)  # [B, kv_heads, L, D]
                if Q == 1:
                    og = decode_attention(qg.transpose(1, 2), kg, vg, group.masks[window],
                                          attn.scaling)
                else:
                    og = F.scaled_dot_product_attention(
                        qg.transpose(1, 2), kg.to(q.dtype), vg.to(q.dtype),
                        attn_mask=group.masks[window], scale=attn.scaling, enable_gqa=True)
                og = og.transpose(1, 2)  # [B, Q, heads, D]
            og = og.reshape(B * Q, self.num_heads, self.head_dim) if group.valid is None else og[group.valid]
            if out is None:  # one group holds every row of the step, in order
                out = og
            elif group.rows is not None:
                out[group.rows] = og
            else:
                out[group.out_index] = og
        return attn.o_proj(out.view(T, self.num_heads * self.head_dim))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of one query per sequence, as two grouped matmuls with fp32 scores.

    q: [B, heads, 1, D], k, v: [B, kv_heads, L, D], mask: [B, 1, 1, L] bool (True = may attend).
    Returns [B, heads, 1, D] in q's dtype. Query head h reads kv head h // (heads / kv_heads), as
    SDPA's enable_gqa. On the CPU, SDPA with a mask is slow for bf16 one-query batches (its flash
    kernel works per (sequence, head) pair); this path does the same math in fp32.
    """
    B, heads, _, D = q.shape
    kv_heads, L = k.shape[1], k.shape[2]
    qg = q.reshape(B, kv_heads, heads // kv_heads, D).float()  # [B, kv_heads, G, D]
    scores = torch.matmul(qg, k.float().transpose(-1, -2)).mul_(scale)  # [B, kv_heads, G, L]
    scores.masked_fill_(~mask.view(B, 1, 1, L), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())  # [B, kv_heads, G, D]
    return out.view(B, heads, 1, D).to(q.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as in HF Llama. x: [T, heads, D]; cos, sin: [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def layer_windows(cfg) -> list[int | None]:
    """Each layer's sliding attention window (None = full attention), as HF configs state it."""
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        window = None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    return [window] * cfg.num_hidden_layers

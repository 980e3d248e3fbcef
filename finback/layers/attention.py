"""Attention over the paged KV cache.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim] that the
runner allocates and attaches to the layer (`Attention.kv_cache`); models never allocate it. A
step's batch is flattened: T tokens from B sequences, each sequence contributing `query_len` new
tokens on top of `context_len` tokens already in its cache (a prefill chunk, or 1 for a decode).
`AttentionMetadata` says where each new token's K/V go (`slot_mapping`) and which cache blocks
each sequence reads (`block_tables`). A backend computes attention from it; the torch backend in
this file is the CPU path and the reference the GPU kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, computed once and shared by all layers."""

    slot_mapping: torch.Tensor          # [T] int64: flat cache slot of each new token (-1: padding, not stored)
    query_lens: list[int]               # per sequence: new tokens this step
    context_lens: list[int]             # per sequence: tokens already in the cache before this step
    block_tables: list[list[int]]       # per sequence: its cache blocks, in order
    block_size: int
    backend: "AttentionBackend | None" = None
    # filled in by the backend's prepare(); backends keep their own precomputed index tensors here
    cache: dict = field(default_factory=dict)

    @property
    def seq_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


class AttentionBackend:
    name = "base"

    def prepare(self, meta: AttentionMetadata, device: torch.device) -> None:
        """Precompute per-step index tensors (once per step, not per layer)."""

    def forward(self, layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new keys/values ([T, Hk, D]) at their slots of the paged cache."""
    _, num_blocks, block_size, hk, d = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, hk, d)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def _slots(block_table: list[int], length: int, block_size: int) -> list[int]:
    out = []
    for pos in range(0, length, block_size):
        base = block_table[pos // block_size] * block_size
        out.extend(range(base, base + min(block_size, length - pos)))
    return out


class TorchAttentionBackend(AttentionBackend):
    """Paged attention with torch ops: correct for any mix of prefill chunks and decodes.

    Decodes (query_len 1) are gathered into one padded batch and computed with one SDPA call;
    prefill chunks are computed one sequence at a time with a causal mask offset by the cached
    context (a fresh prompt with no cached prefix reads its own K/V directly, no gather).
    """

    name = "torch"

    def prepare(self, meta: AttentionMetadata, device: torch.device) -> None:
        decode_rows, decode_tok, prefill = [], [], []
        start = 0
        for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
            if q_len == 1 and ctx > 0:
                decode_rows.append(i)
                decode_tok.append(start)
            else:
                prefill.append((i, start, q_len, ctx))
            start += q_len
        c = meta.cache
        c["prefill"] = []
        for i, s, q_len, ctx in prefill:
            entry = {"start": s, "q_len": q_len, "ctx": ctx}
            if ctx > 0:
                total = ctx + q_len
                entry["slots"] = torch.tensor(_slots(meta.block_tables[i], total, meta.block_size),
                                              dtype=torch.long, device=device)
                # query j (absolute position ctx + j) sees keys 0..ctx + j
                qpos = torch.arange(ctx, total, device=device)[:, None]
                kpos = torch.arange(total, device=device)[None, :]
                entry["mask"] = kpos <= qpos
            c["prefill"].append(entry)
        if decode_rows:
            lens = [meta.context_lens[i] + 1 for i in decode_rows]
            max_len = max(lens)
            slots = torch.empty(len(decode_rows), max_len, dtype=torch.long)
            for r, i in enumerate(decode_rows):
                row = torch.tensor(_slots(meta.block_tables[i], lens[r], meta.block_size))
                slots[r, :lens[r]] = row
                slots[r, lens[r]:] = row[0]  # padding reads a written slot (masked out), never garbage
            mask = torch.arange(max_len)[None, :] < torch.tensor(lens)[:, None]
            c["decode_tok"] = torch.tensor(decode_tok, dtype=torch.long, device=device)
            c["decode_slots"] = slots.to(device)
            c["decode_mask"] = mask[:, None, None, :].to(device)  # [B, 1, 1, L]
        else:
            c["decode_tok"] = None

    def forward(self, layer, q, k, v, meta):
        cache = layer.kv_cache
        write_kv(cache, k, v, meta.slot_mapping)
        _, nb, bs, hk, d = cache.shape
        flat_k = cache[0].view(nb * bs, hk, d)
        flat_v = cache[1].view(nb * bs, hk, d)
        out = torch.empty_like(q)
        gqa = layer.num_heads != layer.num_kv_heads
        for e in meta.cache["prefill"]:
            s, n = e["start"], e["q_len"]
            qi = q[s:s + n].transpose(0, 1)  # [H, n, D]
            if e["ctx"] == 0:
                ki, vi = k[s:s + n].transpose(0, 1), v[s:s + n].transpose(0, 1)
                o = F.scaled_dot_product_attention(qi, ki.to(q.dtype), vi.to(q.dtype), is_causal=True,
                                                   scale=layer.scale, enable_gqa=gqa)
            else:
                ki = flat_k[e["slots"]].transpose(0, 1).to(q.dtype)
                vi = flat_v[e["slots"]].transpose(0, 1).to(q.dtype)
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=e["mask"], scale=layer.scale,
                                                   enable_gqa=gqa)
            out[s:s + n] = o.transpose(0, 1)
        tok = meta.cache["decode_tok"]
        if tok is not None:
            out[tok] = self._decode(layer, q[tok], flat_k, flat_v, meta.cache["decode_slots"],
                                    meta.cache["decode_mask"])
        return out


    @staticmethod
    def _decode(layer, q, flat_k, flat_v, slots, mask):
        """One query per sequence: plain batched matmuls (CPU flash attention is slow for q_len 1).
        q [B, H, D]; slots [B, L]; mask [B, 1, 1, L] -> [B, H, D]."""
        b, h, d = q.shape
        hk = layer.num_kv_heads
        qg = q.view(b, hk, h // hk, d)                               # [B, Hk, G, D]
        k = flat_k[slots].to(q.dtype)                                # [B, L, Hk, D]
        v = flat_v[slots].to(q.dtype)
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float()     # [B, Hk, G, L]
        scores.mul_(layer.scale).masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, v.permute(0, 2, 1, 3)).view(b, h, d)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads over this layer's slice of the paged cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.kv_cache: torch.Tensor | None = None  # attached by the runner

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """The shape of this layer's KV cache tensor (the runner allocates it; MLA layers store a
        latent instead and define their own)."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H*D], k/v: [T, Hk*D] -> [T, H*D]."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache attached")
        return meta.backend.forward(self, q, k, v, meta).reshape(t, self.num_heads * self.head_dim)

"""Multi-head latent attention (DeepSeek-V2/V3/R1) over a paged cache of latents.

Each token's keys and values are compressed into one latent c = RMSNorm(W_DKV x) of kv_lora_rank
(512) values, plus one rotary key k_pe of qk_rope_head_dim (64) shared by all heads. The per-head
keys and values are c expanded through kv_b_proj = [W_UK; W_UV] (per head: qk_nope_head_dim rows of
key, then v_head_dim rows of value). The paged cache stores only what a token contributes:

    kv_cache [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]
             [..., :kv_lora_rank] = normed c,  [..., kv_lora_rank:] = roped k_pe

which is 576 values per token and layer for the real model (vs 2 x 128 x 192 for plain MHA).

Two ways to compute the same attention:
- prefill (and chunks over a cached prefix), not absorbed: expand the latents of the sequence through
  kv_b_proj into per-head K/V and run ordinary causal attention (cheap per token when many queries
  share the expansion);
- decode, absorbed: fold W_UK into the query (q_latent = q_nope W_UK, [H, 512] per token), attend
  directly over the cached latents (score = q_latent . c + q_pe . k_pe; the value is c itself), then
  apply W_UV and o_proj. Nothing is expanded per cached token.
The decode attention has one signature for the torch path here (`mla_decode_ref`) and H5's Triton
kernel on CUDA (`finback.kernels.mla_decode.mla_decode`): (q_latent [B,H,L], q_pe [B,H,R], cache
[NB,BS,L+R], block_tables int32 [B, max_blocks], seq_lens int32 [B], scale) -> [B,H,L].

With a parallel group the heads are split over the ranks (q_b_proj, kv_b_proj column-parallel,
o_proj row-parallel); the down projections and the latent cache are replicated.

CUDA graphs: the per-step index tensors are built on the host (`_plan`) except for a batch of
one-token queries whose tables the attention backend already put on the device (the Triton
backend's `prepare`, and `prepare_static` for a captured decode step: static buffers, padded rows
with slot -1 and seq_len 0). Then the step reads only device tensors: the latent is stored with the
Triton `write_kv` (which skips slot -1) and every row goes through the absorbed decode kernel, whose
grid depends on shapes only; padded rows come out as zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finback.kernels import use_triton
from finback.layers.attention import AttentionMetadata, _slots
from finback.layers.linear import ColumnParallelLinear, RowParallelLinear, _check_shape
from finback.layers.norm import RMSNorm
from finback.layers.quantized import Int4Tensor
from finback.layers.rotary import RotaryEmbedding
from finback.loader.fp8 import BlockFP8Tensor
from finback.runtime.parallel import SINGLE, ParallelGroup

LORA_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm use RMSNorm's default, not the config's


def mla_decode_ref(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Absorbed MLA decode, one query per sequence: softmax(scale * (q_latent . c + q_pe . k_pe)) @ c
    over the first seq_lens[b] cached tokens of block_tables[b]. A row with seq_len 0 is padding and
    gives zeros. Scores and softmax in float32."""
    b, _, lat = q_latent.shape
    _, bs, width = kv_cache.shape
    slots = block_tables.shape[1] * bs
    kv = kv_cache[block_tables.long()].reshape(b, slots, width).to(q_latent.dtype)   # [B, S, L+R]
    valid = torch.arange(slots, device=kv.device)[None, :] < seq_lens.to(kv.device).long()[:, None]   # [B, S]
    kv = kv.masked_fill(~valid[..., None], 0)  # slots never written hold garbage (NaN too): 0 * NaN is NaN
    c, k_pe = kv[..., :lat], kv[..., lat:]
    scores = (torch.matmul(q_latent, c.transpose(1, 2)) + torch.matmul(q_pe, k_pe.transpose(1, 2))).float()
    scores = (scores * scale).masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)   # all-masked (padding) rows -> 0
    return torch.matmul(probs.to(q_latent.dtype), c)


class LatentUpProjection(nn.Module):
    """kv_b_proj: the latent -> per-head [k_nope; v] expansion, weight [H * (nope + v), kv_lora_rank]
    (this rank's heads). Kept as a plain weight (never 4-bit) because decode reads it per head as
    W_UK and W_UV. Loads the Hugging Face tensor whole, or llama.cpp's split halves: shard "k_b"
    [H, kv_lora_rank, nope] (W_UK transposed) and "v_b" [H, v, kv_lora_rank]."""

    def __init__(self, kv_lora_rank: int, num_heads: int, qk_nope_head_dim: int, v_head_dim: int,
                 group: ParallelGroup = SINGLE):
        super().__init__()
        self.group = group
        self.full_heads = num_heads
        self.num_heads = group.shard(num_heads, "attention heads")
        self.nope, self.v, self.rank = qk_nope_head_dim, v_head_dim, kv_lora_rank
        self.weight = nn.Parameter(torch.empty(self.num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if isinstance(loaded, Int4Tensor):
            loaded = loaded.dequantize()
        elif isinstance(loaded, BlockFP8Tensor):  # read per head by decode: kept dense
            loaded = loaded.dequantize(param.dtype)
        h0, hn = self.group.rank * self.num_heads, self.num_heads
        per_head = param.data.view(hn, self.nope + self.v, self.rank)
        if shard_id is None:
            _check_shape("kv_b_proj weight", loaded, (self.full_heads * (self.nope + self.v), self.rank))
            per_head.copy_(loaded.view(self.full_heads, self.nope + self.v, self.rank)[h0:h0 + hn])
        elif shard_id == "k_b":
            _check_shape("attn_k_b weight", loaded, (self.full_heads, self.rank, self.nope))
            per_head[:, :self.nope].copy_(loaded[h0:h0 + hn].transpose(1, 2))
        elif shard_id == "v_b":
            _check_shape("attn_v_b weight", loaded, (self.full_heads, self.v, self.rank))
            per_head[:, self.nope:].copy_(loaded[h0:h0 + hn])
        else:
            raise ValueError(f"kv_b_proj shard must be None, 'k_b' or 'v_b', got {shard_id!r}")

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return F.linear(latent, self.weight)

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, L], W_UV [H, v, L]) as views of the weight."""
        w = self.weight.view(self.num_heads, self.nope + self.v, self.rank)
        return w[:, :self.nope], w[:, self.nope:]


def _plan(meta: AttentionMetadata, block_size: int, device: torch.device) -> dict:
    """Per-step index tensors for MLA, built once per step (by the first MLA layer) whatever the
    attention backend: prefill chunks (with their cache slots and mask when they have a cached
    prefix) and the decode rows (block tables and lengths as the decode kernel takes them)."""
    plan = meta.cache.get("mla")
    if plan is not None:
        return plan
    d = meta.cache.get("decode")
    if d is not None and d["tok"] is None and meta.cache.get("prefill") is None:
        # every row a one-token query, tables already on the device (static under CUDA graphs)
        plan = {"prefill": [], "decode_tok": None, "all_decode": True, "block_tables": d["block_tables"],
                "seq_lens": d["seq_lens"]}
        meta.cache["mla"] = plan
        return plan
    prefill, decode_rows, decode_tok = [], [], []
    start = 0
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
        if q_len == 1 and ctx > 0:
            decode_rows.append(i)
            decode_tok.append(start)
        else:
            entry = {"start": start, "q_len": q_len, "ctx": ctx}
            if ctx > 0:
                total = ctx + q_len
                entry["slots"] = torch.tensor(_slots(meta.block_tables[i], total, block_size), dtype=torch.long,
                                              device=device)
                qpos = torch.arange(ctx, total, device=device)[:, None]
                entry["mask"] = torch.arange(total, device=device)[None, :] <= qpos
            prefill.append(entry)
        start += q_len
    plan = {"prefill": prefill, "decode_tok": None}
    if decode_rows:
        lens = [meta.context_lens[i] + 1 for i in decode_rows]
        width = -(-max(lens) // block_size)
        tables = torch.zeros(len(decode_rows), width, dtype=torch.int32)
        for r, i in enumerate(decode_rows):
            blocks = meta.block_tables[i][:-(-lens[r] // block_size)]
            tables[r, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        plan["decode_tok"] = torch.tensor(decode_tok, dtype=torch.long, device=device)
        plan["block_tables"] = tables.to(device)
        plan["seq_lens"] = torch.tensor(lens, dtype=torch.int32, device=device)
    meta.cache["mla"] = plan
    return plan


class MLAAttention(nn.Module):
    """The whole attention block of a DeepSeek layer: projections, rotary, latent cache, attention,
    output projection. The runner attaches `kv_cache` of `cache_shape(...)`."""

    def __init__(self, hidden_size: int, num_heads: int, q_lora_rank: int | None, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, rotary: RotaryEmbedding,
                 scale: float, bias: bool = False, group: ParallelGroup = SINGLE):
        super().__init__()
        self.num_heads = group.shard(num_heads, "attention heads")
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.nope, self.rope, self.v = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden_size, num_heads * qk, group=group)
        else:
            self.q_a_proj = ColumnParallelLinear(hidden_size, q_lora_rank, bias=bias)  # replicated
            self.q_a_layernorm = RMSNorm(q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(q_lora_rank, num_heads * qk, group=group)
        self.kv_a_proj_with_mqa = ColumnParallelLinear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = LatentUpProjection(kv_lora_rank, num_heads, qk_nope_head_dim, v_head_dim, group)
        self.o_proj = RowParallelLinear(num_heads * v_head_dim, hidden_size, bias=bias, group=group)
        self.rotary = rotary
        self.scale = scale
        self.kv_cache: torch.Tensor | None = None  # attached by the runner

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.kv_lora_rank + self.rope)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("MLA layer has no KV cache attached")
        t, h = x.shape[0], self.num_heads
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(t, h, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe.unsqueeze(1), meta.cache.get("rope"))
        k_pe = k_pe.squeeze(1)
        nb, bs, width = self.kv_cache.shape
        flat = self.kv_cache.view(nb * bs, width)
        entry = torch.cat([latent, k_pe], dim=-1)
        if use_triton(x):  # graph-safe: slot -1 (padding) is skipped on the device
            from finback.kernels.attention import write_kv

            rows, cache = entry.view(t, 1, width), self.kv_cache.view(nb, bs, 1, width)
            write_kv(rows, rows, cache, cache, meta.slot_mapping)  # one cache: "k" and "v" are the same row
        else:
            keep = meta.slot_mapping >= 0
            flat.index_copy_(0, meta.slot_mapping[keep], entry[keep].to(flat.dtype))

        plan = _plan(meta, bs, x.device)
        if plan.get("all_decode"):
            out = self._decode(q_nope, q_pe, plan["block_tables"], plan["seq_lens"])
            return self.o_proj(out.reshape(t, h * self.v))
        out = x.new_empty(t, h, self.v)
        for e in plan["prefill"]:
            s, n = e["start"], e["q_len"]
            if e["ctx"] == 0:
                c, kp, mask = latent[s:s + n], k_pe[s:s + n], None
            else:
                rows = flat[e["slots"]].to(x.dtype)
                c, kp, mask = rows[:, :self.kv_lora_rank], rows[:, self.kv_lora_rank:], e["mask"]
            out[s:s + n] = self._prefill(q_nope[s:s + n], q_pe[s:s + n], c, kp, mask)
        tok = plan["decode_tok"]
        if tok is not None:
            out[tok] = self._decode(q_nope[tok], q_pe[tok], plan["block_tables"], plan["seq_lens"])
        return self.o_proj(out.view(t, h * self.v))

    def _prefill(self, q_nope, q_pe, c, k_pe, mask) -> torch.Tensor:
        """Not absorbed: expand the latents to per-head K/V, causal attention. -> [n, H, v]"""
        length, h = c.shape[0], self.num_heads
        k_nope, v = self.kv_b_proj(c).view(length, h, self.nope + self.v).split([self.nope, self.v], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(length, h, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return o.transpose(0, 1)

    def _decode(self, q_nope, q_pe, block_tables, seq_lens) -> torch.Tensor:
        """Absorbed: q_nope through W_UK into latent space, attend over the cached latents, W_UV.
        [B, H, nope] -> [B, H, v]"""
        w_uk, w_uv = self.kv_b_proj.absorbed()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)           # [B, H, L]
        if use_triton(q_latent):
            from finback.kernels.mla_decode import mla_decode
        else:
            mla_decode = mla_decode_ref
        o = mla_decode(q_latent.contiguous(), q_pe.contiguous(), self.kv_cache, block_tables, seq_lens, self.scale)
        return torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)    # [B, H, v]

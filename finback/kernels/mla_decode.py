"""Absorbed multi-head latent attention (DeepSeek-V2/V3 MLA) for decode, over the paged latent cache.

The cache of one layer is [num_blocks, block_size, kv_lora_rank + rope_dim] (512 + 64 in V3): per
token the normed compressed kv `c` and then the roped `k_pe`. With W_UK absorbed into the query,
one decode token of sequence b and head h has q_latent [512] and q_pe [64], and

    score_j = (q_latent . c_j + q_pe . k_pe_j) * scale,   out = softmax(score) @ c   ([512]);

the latent is the value too, and it is one "KV head" shared by every query head. W_UV is applied by
the caller. Shapes: q_latent [B, H, 512], q_pe [B, H, 64], block_tables int32 [B, max_blocks],
seq_lens int32 [B] -> out [B, H, 512].

The kernel is flash-decoding: stage 1 splits each sequence's context into `num_splits` chunks, and
one program takes a tile of `block_h` heads of one chunk, so each latent row it reads serves all the
heads of its tile (the head tiles of one chunk are neighbours in the grid, so the re-reads hit L2);
it keeps an online softmax and writes the chunk's normalised output and log-sum-exp. Stage 2 merges
the chunks. The grid depends only on shapes (B, H, max_blocks), never on seq_lens values, so the
call can be captured in a CUDA graph; a row with seq_len 0 (batch padding) comes out as zeros.

`mla_decode_ref` is the torch path (CPU) and the reference of the tests. Under Triton's interpreter
the 16-bit dot operands are widened to fp32 (its `tl.dot` multiplies bf16 bits as integers).
"""

from __future__ import annotations

import math

import torch

from finback.kernels import HAS_TRITON, interpreting

__all__ = ["default_num_splits", "mla_decode", "mla_decode_ref"]


def _check(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor) -> None:
    if q_latent.dim() != 3 or q_pe.dim() != 3 or q_latent.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"q_latent {tuple(q_latent.shape)} and q_pe {tuple(q_pe.shape)} must be [B, H, *]")
    b = q_latent.shape[0]
    dl, dr = q_latent.shape[2], q_pe.shape[2]
    if kv_cache.dim() != 3 or kv_cache.shape[2] != dl + dr:
        raise ValueError(f"kv_cache must be [num_blocks, block_size, {dl}+{dr}], got {tuple(kv_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(f"block_tables must be [B={b}, max_blocks] and seq_lens [B], got "
                         f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    if block_tables.dtype not in (torch.int32, torch.int64) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_tables and seq_lens must be integer tensors")


def mla_decode_ref(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Absorbed MLA decode in torch, one sequence at a time, fp32 math; out in q_latent's dtype."""
    _check(q_latent, q_pe, kv_cache, block_tables, seq_lens)
    dl = q_latent.shape[2]
    bs = kv_cache.shape[1]
    out = torch.zeros(q_latent.shape, dtype=torch.float32, device=q_latent.device)
    for b, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        pos = torch.arange(n, device=kv_cache.device)
        rows = kv_cache[block_tables[b, pos // bs].long(), pos % bs].float()      # [n, 576]
        c, k_pe = rows[:, :dl], rows[:, dl:]
        score = (q_latent[b].float() @ c.t() + q_pe[b].float() @ k_pe.t()) * scale
        out[b] = torch.softmax(score, -1) @ c
    return out.to(q_latent.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _mla_split_kernel(q_ptr, qpe_ptr, kv_ptr, bt_ptr, sl_ptr, o_ptr, lse_ptr,
                          H, chunk, scale_log2,
                          stride_qb, stride_qh, stride_pb, stride_ph, stride_kvb, stride_kvs, stride_btb,
                          stride_ob, stride_os, stride_oh, stride_lb, stride_ls,
                          BLOCK_SIZE: tl.constexpr, DL: tl.constexpr, DR: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, WIDEN: tl.constexpr):
        hb = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2)
        seq_len = tl.load(sl_ptr + b)
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        offs_l = tl.arange(0, DL)
        offs_r = tl.arange(0, DR)
        q = tl.load(q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_l[None, :], mask=h_ok[:, None], other=0.0)
        qp = tl.load(qpe_ptr + b * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :], mask=h_ok[:, None],
                     other=0.0)
        if WIDEN:
            q = q.to(tl.float32)
            qp = qp.to(tl.float32)
        m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        lsum = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, DL), dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            ok = pos < end
            blk = tl.load(bt_ptr + b * stride_btb + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
            row = kv_ptr + blk * stride_kvb + (pos % BLOCK_SIZE) * stride_kvs
            c = tl.load(row[:, None] + offs_l[None, :], mask=ok[:, None], other=0.0)          # [BLOCK_N, DL]
            kp = tl.load(row[:, None] + DL + offs_r[None, :], mask=ok[:, None], other=0.0)   # [BLOCK_N, DR]
            if WIDEN:
                c = c.to(tl.float32)
                kp = kp.to(tl.float32)
            s = tl.dot(q, tl.trans(c)) + tl.dot(qp, tl.trans(kp))
            s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            lsum = lsum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
            m = m_new
        has = lsum > 0
        o = acc / tl.where(has, lsum, 1.0)[:, None]
        lse = tl.where(has, m + tl.log2(tl.where(has, lsum, 1.0)), float("-inf"))
        tl.store(o_ptr + b * stride_ob + split * stride_os + offs_h[:, None] * stride_oh + offs_l[None, :], o,
                 mask=h_ok[:, None])
        tl.store(lse_ptr + b * stride_lb + split * stride_ls + offs_h, lse, mask=h_ok)

    @triton.jit
    def _mla_merge_kernel(o_ptr, lse_ptr, out_ptr, num_splits,
                          stride_ob, stride_os, stride_oh, stride_lb, stride_ls,
                          stride_outb, stride_outh,
                          DL: tl.constexpr, SPLITS: tl.constexpr):
        h = tl.program_id(0)
        b = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS)
        s_ok = offs_s < num_splits
        lse = tl.load(lse_ptr + b * stride_lb + offs_s * stride_ls + h, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top > float("-inf"), top, 0.0)       # all chunks empty (seq_len 0): weights 0, out 0
        w = tl.where(lse > float("-inf"), tl.exp2(lse - top), 0.0)
        total = tl.sum(w, 0)
        w = w / tl.where(total > 0, total, 1.0)
        offs_l = tl.arange(0, DL)
        o = tl.load(o_ptr + b * stride_ob + offs_s[:, None] * stride_os + h * stride_oh + offs_l[None, :],
                    mask=(s_ok & (w > 0))[:, None], other=0.0)
        tl.store(out_ptr + b * stride_outb + h * stride_outh + offs_l,
                 tl.sum(o * w[:, None], 0).to(out_ptr.dtype.element_ty))


def default_num_splits(batch: int, num_heads: int, max_context: int, block_h: int = 16, block_n: int = 32,
                       num_sms: int = 132) -> int:
    """Enough (head tile, chunk) programs for about two waves of the GPU, at least one tile per chunk."""
    tiles = batch * -(-num_heads // block_h)
    return max(1, min(64, -(-2 * num_sms // tiles), -(-max_context // block_n)))


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None, num_splits: int | None = None,
               block_h: int = 16, block_n: int = 32, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """The Triton version of `mla_decode_ref` (see the module docstring). Writes into `out` if given."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use mla_decode_ref")
    _check(q_latent, q_pe, kv_cache, block_tables, seq_lens)
    b, h, dl = q_latent.shape
    dr = q_pe.shape[2]
    for name, d in (("latent", dl), ("rope", dr)):
        if d < 16 or d & (d - 1):
            raise ValueError(f"the {name} width must be a power of two >= 16, got {d}")
    if q_latent.stride(2) != 1 or q_pe.stride(2) != 1 or kv_cache.stride(2) != 1:
        raise ValueError("q_latent, q_pe and kv_cache need a contiguous last dimension")
    if block_h < 16 or block_h & (block_h - 1) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError("block_h and block_n must be powers of two >= 16")
    if out is None:
        out = torch.empty(b, h, dl, dtype=q_latent.dtype, device=q_latent.device)
    elif out.shape != q_latent.shape or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q_latent.shape)} with a contiguous last dimension")
    if b == 0 or h == 0:
        return out
    block_size = kv_cache.shape[1]
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q_latent.device).multi_processor_count if q_latent.is_cuda else 132
        num_splits = default_num_splits(b, h, max_context, block_h, block_n, sms)
    chunk = -(-max(1, -(-max_context // num_splits)) // block_n) * block_n
    partial = torch.empty(b, num_splits, h, dl, dtype=torch.float32, device=q_latent.device)
    lse = torch.empty(b, num_splits, h, dtype=torch.float32, device=q_latent.device)
    seq_lens = seq_lens.contiguous()
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    _mla_split_kernel[(triton.cdiv(h, block_h), num_splits, b)](
        q_latent, q_pe, kv_cache, block_tables, seq_lens, partial, lse,
        h, chunk, scale * math.log2(math.e),
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), kv_cache.stride(0),
        kv_cache.stride(1), block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        BLOCK_SIZE=block_size, DL=dl, DR=dr, BLOCK_H=block_h, BLOCK_N=block_n, WIDEN=interpreting(),
        num_warps=num_warps, num_stages=num_stages)
    _mla_merge_kernel[(h, b)](
        partial, lse, out, num_splits,
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        DL=dl, SPLITS=max(2, triton.next_power_of_2(num_splits)), num_warps=4)
    return out

"""Routed-expert matmuls that read GGUF blocks where they lie: llama.cpp's stacked expert tensors
(ffn_{gate,up,down}_exps, [E, N, K] of any GGUF type: IQ1_S, IQ2_XXS, Q2_K ...) are multiplied by the
rows routed to each expert, and no expert is ever dequantized in memory.

`gguf_moe_matmul(a, data, qtype, k, align, a_row_div, out, row_weights)`: for every routed row r (a
(token, slot) pair) out[r] = a[r // a_row_div] @ W[e(r)]^T (times row_weights[r]), with W the expert
e(r) of `data` (uint8 [E, N, K/QK*block_bytes], rows of an expert may be a strided view: a
rank's slice). `align` is `finback.kernels.fused_moe.moe_align(topk_ids, E, block_m)`: rows sorted by
expert and padded so that every block of block_m rows has one expert, computed on the device (no host
sync, so a decode step with it can be captured in a CUDA graph). One program takes one such block
and one tile of N: it decodes the expert's [BN, BK] weight tile in registers with the GGUF kernels'
`_tile` (finback/kernels/gguf.py: every type they take), and feeds it to tl.dot with the gathered
rows of `a`, fp32 accumulation. At decode most blocks hold one real row: the work is the weight
bytes of the routed experts, read once per block.

`gguf_experts_ref(x, gate, up, down, topk_weights, topk_ids)` is the whole routed SwiGLU on the torch
path (dequantize each routed expert's blocks when a token needs it, float32 matmul), the CPU path and
the reference; `gguf_experts(...)` is the same on the kernels. `gguf_moe_matmul_ref` is the one-matmul
reference the kernel test compares with.
"""

from __future__ import annotations

import torch

from finback.kernels import HAS_TRITON, interpreting
from finback.kernels.fused_moe import MoEAlignment, moe_align
from finback.kernels.gguf import _GROUPS, KERNEL_TYPES, _check, _table, gguf_matmul_ref

__all__ = ["gguf_experts", "gguf_experts_ref", "gguf_moe_matmul", "gguf_moe_matmul_ref"]


def _check_stack(a: torch.Tensor, data: torch.Tensor, qtype, k: int, types=KERNEL_TYPES):
    if data.dim() != 3 or data.dtype != torch.uint8 or data.stride(-1) != 1:
        raise ValueError(f"expert blocks must be uint8 [E, N, bytes per row] with contiguous rows, got "
                         f"{data.dtype} {tuple(data.shape)}")
    if a.dim() != 2:
        raise ValueError(f"activations must be [rows, K], got shape {tuple(a.shape)}")
    return _check(a, data[0], qtype, k, None, types=types)


def gguf_moe_matmul_ref(a: torch.Tensor, data: torch.Tensor, qtype, k: int, topk_ids: torch.Tensor,
                        a_row_div: int, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[T*top_k, N] in a's dtype: row r = a[r // a_row_div] @ dequantize(W[topk_ids.flat[r]])^T in float32
    (times row_weights[r]); only the experts that rows route to are dequantized."""
    from finback.loader.quants import SUPPORTED_TYPES

    qt, n = _check_stack(a, data, qtype, k, SUPPORTED_TYPES)
    ids = topk_ids.reshape(-1).long()
    out = torch.zeros(ids.numel(), n, dtype=torch.float32, device=a.device)
    for e in torch.unique(ids).tolist():
        if not 0 <= e < data.shape[0]:
            raise ValueError(f"expert id {e} outside [0, {data.shape[0]})")
        rows = (ids == e).nonzero().flatten()
        out[rows] = gguf_matmul_ref(a[rows // a_row_div].float(), data[e], qt, k)
    if row_weights is not None:
        out *= row_weights.reshape(-1, 1).float()
    return out.to(a.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from finback.kernels.gguf import _tile

    @triton.jit
    def _gguf_moe_kernel(a_ptr, w_ptr, h_ptr, t_ptr, c_ptr, rw_ptr, sorted_ids_ptr, expert_ids_ptr, post_pad_ptr,
                         N, K, num_valid, a_row_div, stride_am, stride_we, stride_wn, stride_cm,
                         QT: tl.constexpr, GS: tl.constexpr, HAS_MIN: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                         WIDEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        grid_n = tl.cdiv(N, BN)
        pm = pid // grid_n
        pn = pid % grid_n
        if pm * BM >= tl.load(post_pad_ptr):
            return
        expert = tl.load(expert_ids_ptr + pm).to(tl.int64)
        rows = tl.load(sorted_ids_ptr + pm * BM + tl.arange(0, BM))
        row_ok = rows < num_valid
        a_rows = a_ptr + (rows // a_row_div).to(tl.int64)[:, None] * stride_am
        rn = pn * BN + tl.arange(0, BN)
        nmask = rn < N
        row_off = expert * stride_we + rn.to(tl.int64) * stride_wn
        NG: tl.constexpr = BK // GS
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            g = k0 // GS + tl.arange(0, NG)
            q, sc, mn = _tile(w_ptr, h_ptr, t_ptr, row_off, nmask, g, g < K // GS, QT, GS)
            if HAS_MIN:
                w = q * sc[:, :, None] - mn[:, :, None]
            else:
                w = q * sc[:, :, None]
            kk = k0 + tl.arange(0, BK)
            x = tl.load(a_rows + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
            if WIDEN:  # the interpreter's tl.dot mishandles 16-bit tiles
                x = x.to(tl.float32)
            acc = tl.dot(x, tl.trans(tl.reshape(w.to(x.dtype), (BN, BK))), acc)
        if MUL_WEIGHT:
            acc = acc * tl.load(rw_ptr + rows, mask=row_ok, other=0.0)[:, None]
        cs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + rn[None, :]
        tl.store(cs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & nmask[None, :])


def gguf_moe_matmul(a: torch.Tensor, data: torch.Tensor, qtype, k: int, align: MoEAlignment, a_row_div: int,
                    out: torch.Tensor, row_weights: torch.Tensor | None = None, *, block_n: int = 64,
                    block_k: int = 32, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """The kernel (see the module docstring). out: [T*top_k, N] with contiguous rows (a column slice of
    a wider buffer is fine); row_weights: [T*top_k] float32 or None. The block size is align's (the
    sorted rows per block: len(sorted_ids) // len(expert_ids))."""
    if not HAS_TRITON:
        raise RuntimeError("the GGUF expert kernel needs triton (use gguf_moe_matmul_ref on CPU)")
    if a.dim() == 2 and a.stride(1) != 1:
        a = a.contiguous()
    qt, n = _check_stack(a, data, qtype, k)
    rows = out.shape[0]
    if out.dim() != 2 or out.shape[1] != n or out.stride(1) != 1:
        raise ValueError(f"out must be [rows, {n}] with contiguous rows, got {tuple(out.shape)}")
    if block_k % 32 or block_k & (block_k - 1) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError("block_k must be a power of two >= 32 and block_n a power of two >= 16")
    block_m = align.sorted_ids.numel() // max(1, align.expert_ids.numel())
    if rows == 0 or n == 0:
        return out
    gs, has_min = _GROUPS[qt]
    rw = row_weights.reshape(-1).float().contiguous() if row_weights is not None else out
    grid = (align.expert_ids.numel() * triton.cdiv(n, block_n),)
    _gguf_moe_kernel[grid](
        a, data, data.view(torch.float16), _table(qt, data), out, rw,
        align.sorted_ids, align.expert_ids, align.num_tokens_post_padded,
        n, k, rows, a_row_div, a.stride(0), data.stride(0), data.stride(1), out.stride(0),
        QT=int(qt), GS=gs, HAS_MIN=has_min, MUL_WEIGHT=row_weights is not None,
        WIDEN=interpreting() and a.dtype != torch.float32, BM=block_m, BN=block_n, BK=block_k,
        num_warps=num_warps, num_stages=num_stages)
    return out


def gguf_experts_ref(x: torch.Tensor, gate, up, down, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                     ) -> torch.Tensor:
    """x [T, H]; gate, up [E, I, H] and down [E, H, I] as (blocks uint8 [E, rows, bytes], qtype) pairs;
    -> [T, H] = sum over slots of weight * down[e] @ (silu(gate[e] @ x) * (up[e] @ x)), in x's dtype."""
    t, kk = topk_ids.shape
    g = gguf_moe_matmul_ref(x, gate[0], gate[1], x.shape[1], topk_ids, kk).float()
    u = gguf_moe_matmul_ref(x, up[0], up[1], x.shape[1], topk_ids, kk).float()
    h = (torch.nn.functional.silu(g) * u).to(x.dtype)
    y = gguf_moe_matmul_ref(h, down[0], down[1], h.shape[1], topk_ids, 1, topk_weights).float()
    return y.view(t, kk, -1).sum(1).to(x.dtype)


def gguf_experts(x: torch.Tensor, gate, up, down, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 block_m: int | None = None, **kernel_args) -> torch.Tensor:
    """gguf_experts_ref on the kernels: one alignment, three expert matmuls (gate and up into one
    [T*k, 2I] buffer, SiLU-and-mul, down with the routing weights), a sum over the k slots. No host
    sync."""
    from finback.layers.activation import silu_and_mul

    t, kk = topk_ids.shape
    h_dim = x.shape[1]
    i_dim = gate[0].shape[1]
    if block_m is None:
        block_m = 16 if t * kk <= 16 * gate[0].shape[0] else 32
    align = moe_align(topk_ids, gate[0].shape[0], block_m)
    inter = torch.empty(t * kk, 2 * i_dim, dtype=x.dtype, device=x.device)
    gguf_moe_matmul(x, gate[0], gate[1], h_dim, align, kk, inter[:, :i_dim], **kernel_args)
    gguf_moe_matmul(x, up[0], up[1], h_dim, align, kk, inter[:, i_dim:], **kernel_args)
    h = silu_and_mul(inter)
    partial = torch.empty(t * kk, h_dim, dtype=x.dtype, device=x.device)
    gguf_moe_matmul(h, down[0], down[1], i_dim, align, 1, partial, topk_weights.reshape(-1).float(), **kernel_args)
    return partial.view(t, kk, h_dim).sum(1, dtype=torch.float32).to(x.dtype)

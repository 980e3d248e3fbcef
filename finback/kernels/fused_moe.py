"""Fused mixture-of-experts for DeepSeek-V3: routed tokens through their experts' SwiGLU MLPs.

Shapes (the contract with `finback/layers/moe.py`): x [T, H]; w13 [E, 2*I, H] (gate rows, then up
rows); w2 [E, H, I]; topk_weights [T, k] fp32; topk_ids [T, k] int32. Out [T, H] =
sum_j topk_weights[t, j] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])), e = topk_ids[t, j].

How the GPU path runs (three launches plus a sum, no host sync, so it can be captured in a CUDA graph):
1. `moe_align` sorts the T*k (token, slot) pairs by expert and pads each expert's run to a multiple
   of `block_m`, so every block of `block_m` rows belongs to one expert. Padding rows hold the
   sentinel T*k. The buffer has room for the worst case, T*k + min(E, T*k) * (block_m - 1) rows;
   blocks past the real end (`num_tokens_post_padded`) return at once.
2. `_moe_gemm_kernel` (GATED): for a block of rows and a tile of I, it loads the gate and up tiles of
   that expert's w13, multiplies the gathered x rows by both, and writes silu(gate) * up to an
   intermediate [T*k, I] at each row's (token, slot) index.
3. `_moe_gemm_kernel` (not GATED): intermediate rows @ w2[e].T, times the row's routing weight, into
   [T*k, H]; then a torch sum over the k slots (fp32) gives [T, H].

Weights are bf16/fp16/fp32, or block-FP8 (w [E, N, K] e4m3 + scales [E, N/128, K/128], DeepSeek-V3's
checkpoint format). With FP8 the activations (x, then the intermediate) are quantized per row per
128 channels (`fp8_gemm.act_quant_fp8`) and the kernel runs `tl.dot` on fp8 operands, applying both
scales per 128-deep step, as `fp8_gemm` does.

Other weight formats (GGUF blocks) plug in through `fused_moe_dequant`: a callback dequantizes the
experts this batch uses to the compute dtype, and the dense kernels run on them. It needs one host
sync (which experts are used), so it is not for CUDA graphs.

`fused_moe_ref` is the torch path (CPU) and the reference the tests compare with. Under Triton's
interpreter (CPU tests) 16-bit dot operands are widened to fp32 first (WIDEN): the interpreter's
`tl.dot` multiplies the raw bits of bf16 tiles as integers (triton 3.9).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from finback.kernels import HAS_TRITON, interpreting
from finback.kernels.fp8_gemm import (
    FP8_BLOCK,
    act_quant_fp8,
    act_quant_fp8_ref,
    fp8_block_dequant_ref,
)

__all__ = [
    "MoEAlignment",
    "fused_moe",
    "fused_moe_dequant",
    "fused_moe_ref",
    "moe_align",
    "moe_align_ref",
]


class MoEAlignment(NamedTuple):
    sorted_ids: torch.Tensor         # [capacity] int32: flat (token * k + slot) index per row; T*k = padding
    expert_ids: torch.Tensor         # [capacity // block_m] int32: expert of each row block (-1 past the end)
    num_tokens_post_padded: torch.Tensor  # [1] int32: rows in use (a multiple of block_m)


def _check_routing(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if num_experts < 1 or block_m < 1:
        raise ValueError("num_experts and block_m must be positive")


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Rows sorted by expert, each expert's run padded to a multiple of block_m (torch ops, no host sync).

    Ids outside [0, num_experts) are not checked here (that would sync); `fused_moe` checks them
    when asked to (`check_ids=True`).
    """
    _check_routing(topk_ids, num_experts, block_m)
    dev = topk_ids.device
    n = topk_ids.numel()
    capacity = n + min(num_experts, n) * (block_m - 1)
    capacity = -(-capacity // block_m) * block_m
    flat = topk_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.sort(flat, stable=True).indices                  # flat indices grouped by expert
    expert_of = flat[order]
    rank = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[expert_of]
    dest = (padded_end - padded)[expert_of] + rank
    sorted_ids = torch.full((capacity,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, capacity, block_m, device=dev)
    expert_ids = torch.searchsorted(padded_end, block_start, right=True)
    total = padded_end[-1:]
    expert_ids = torch.where(block_start < total, expert_ids, -1).to(torch.int32)
    return MoEAlignment(sorted_ids, expert_ids, total.to(torch.int32))


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Plain-Python statement of `moe_align`'s result, for the tests."""
    _check_routing(topk_ids, num_experts, block_m)
    flat = topk_ids.reshape(-1).tolist()
    n = len(flat)
    capacity = n + min(num_experts, n) * (block_m - 1)
    capacity = -(-capacity // block_m) * block_m
    rows: list[int] = []
    experts: list[int] = []
    for e in range(num_experts):
        mine = [i for i, x in enumerate(flat) if x == e]
        if mine:
            mine += [n] * (-len(mine) % block_m)
            rows += mine
            experts += [e] * (len(mine) // block_m)
    used = len(rows)
    rows += [n] * (capacity - used)
    experts += [-1] * (capacity // block_m - len(experts))
    i32 = torch.int32
    return MoEAlignment(torch.tensor(rows, dtype=i32), torch.tensor(experts, dtype=i32), torch.tensor([used], dtype=i32))


# ----------------------------------------------------------------------------- torch reference

def _check_moe(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    t, h = x.shape
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("w13 must be [E, 2*I, H] and w2 [E, H, I]")
    e, two_i, h13 = w13.shape
    if h13 != h or two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"x {tuple(x.shape)}, w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit "
                         "x [T, H], w13 [E, 2*I, H], w2 [E, H, I]")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != t:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must both be [T={t}, k]")
    fp8 = w13.dtype == torch.float8_e4m3fn
    if fp8 != (w2.dtype == torch.float8_e4m3fn) or fp8 != (w13_scale is not None) or fp8 != (w2_scale is not None):
        raise ValueError("block-FP8 experts need both weights float8_e4m3fn and both scales; others need neither")
    if fp8:
        i = two_i // 2
        if h % FP8_BLOCK or i % FP8_BLOCK:
            raise ValueError(f"block-FP8 experts need H and I multiples of {FP8_BLOCK}, got H={h}, I={i}")
        for name, w, s in (("w13", w13, w13_scale), ("w2", w2, w2_scale)):
            want = (e, w.shape[1] // FP8_BLOCK, w.shape[2] // FP8_BLOCK)
            if tuple(s.shape) != want:
                raise ValueError(f"{name}_scale must be {want}, got {tuple(s.shape)}")


def _fake_quant(a: torch.Tensor) -> torch.Tensor:
    q, s = act_quant_fp8_ref(a)
    return (q.float().view(a.shape[0], -1, FP8_BLOCK) * s[..., None]).view(a.shape)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE in torch, expert by expert, fp32 math; with FP8 weights it quantizes the activations
    exactly as the kernels do (x, then the intermediate rounded to x's dtype)."""
    _check_moe(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    fp8 = w13_scale is not None
    t, h = x.shape
    i = w13.shape[1] // 2
    out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
    xa = _fake_quant(x) if fp8 else x.float()
    for e in topk_ids.unique().tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        a13 = fp8_block_dequant_ref(w13[e], w13_scale[e], dtype=torch.float32) if fp8 else w13[e].float()
        a2 = fp8_block_dequant_ref(w2[e], w2_scale[e], dtype=torch.float32) if fp8 else w2[e].float()
        gu = xa[tok] @ a13.t()
        inter = (F.silu(gu[:, :i]) * gu[:, i:]).to(x.dtype)
        inter = _fake_quant(inter) if fp8 else inter.float()
        out.index_add_(0, tok, (inter @ a2.t()) * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _moe_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, w_ptr,
                         sorted_ids_ptr, expert_ids_ptr, post_pad_ptr,
                         N, K, num_valid, a_row_div,
                         stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
                         GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, FP8: tl.constexpr, WIDEN: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """c[row] = a[row // a_row_div] @ b[e].T (GATED: silu(first N rows) * next N rows of b[e]),
        for the rows of one expert block; MUL_WEIGHT multiplies by w[row]."""
        pid = tl.program_id(0)
        grid_n = tl.cdiv(N, BLOCK_N)
        pm = pid // grid_n
        pn = pid % grid_n
        if pm * BLOCK_M >= tl.load(post_pad_ptr):
            return
        expert = tl.load(expert_ids_ptr + pm).to(tl.int64)
        rows = tl.load(sorted_ids_ptr + pm * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = rows < num_valid
        a_rows = (rows // a_row_div).to(tl.int64)
        offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            up_ptrs = b_ptrs + N * stride_bn
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FP8:
            as_ptrs = as_ptr + a_rows * stride_asm
            bs_ptrs = bs_ptr + expert * stride_bse + (offs_n // BLOCK_K) * stride_bsn
            if GATED:
                bs_up_ptrs = bs_ptrs + (N // BLOCK_K) * stride_bsn
        for kb in range(tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if WIDEN:
                a = a.to(tl.float32)
            if FP8:
                sa = tl.load(as_ptrs + kb, mask=row_ok, other=0.0)
                sb = tl.load(bs_ptrs + kb, mask=n_ok, other=0.0)
                acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
            else:
                acc = tl.dot(a, b.to(a.dtype), acc)
            if GATED:
                bu = tl.load(up_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
                if FP8:
                    sbu = tl.load(bs_up_ptrs + kb, mask=n_ok, other=0.0)
                    acc_up += tl.dot(a, bu) * sa[:, None] * sbu[None, :]
                else:
                    acc_up = tl.dot(a, bu.to(a.dtype), acc_up)
                up_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if MUL_WEIGHT:
            acc = acc * tl.load(w_ptr + rows, mask=row_ok, other=0.0)[:, None]
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _default_block_m(num_rows: int, num_experts: int) -> int:
    per_expert = num_rows / max(1, min(num_experts, num_rows))
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              *, block_m: int | None = None, block_n: int = 64, block_k: int | None = None,
              num_warps: int = 4, num_stages: int = 3, check_ids: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton MoE (see the module docstring); same arguments and result as `fused_moe_ref`
    (written into `out` [T, H] when given)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use fused_moe_ref")
    _check_moe(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    fp8 = w13_scale is not None
    t, h = x.shape
    e, two_i, _ = w13.shape
    i = two_i // 2
    k = topk_ids.shape[1]
    if check_ids and topk_ids.numel() and not bool(((topk_ids >= 0) & (topk_ids < e)).all()):
        raise ValueError(f"topk_ids must lie in [0, {e})")
    if out is None:
        out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if t == 0 or k == 0:
        return out.zero_()
    if block_m is None:
        block_m = _default_block_m(t * k, e)
    if block_k is None:
        block_k = FP8_BLOCK if fp8 else 64
    if fp8 and (block_k != FP8_BLOCK or FP8_BLOCK % block_n):
        raise ValueError(f"block-FP8 experts need block_k = {FP8_BLOCK} and block_n dividing it")
    if not fp8 and (w13.dtype != x.dtype or w2.dtype != x.dtype):
        raise ValueError(f"dense expert weights must have x's dtype {x.dtype}, got {w13.dtype} and {w2.dtype}")
    x = x.contiguous()
    w13 = w13.contiguous()
    w2 = w2.contiguous()
    align = moe_align(topk_ids, e, block_m)
    num_blocks = align.expert_ids.numel()
    weights = topk_weights.reshape(-1).float().contiguous()
    inter = torch.empty(t * k, i, dtype=x.dtype, device=x.device)
    partial = torch.empty(t * k, h, dtype=x.dtype, device=x.device)

    def gemm(a, a_s, b, b_s, c, n, kk, div, gated):
        _moe_gemm_kernel[(num_blocks * triton.cdiv(n, block_n),)](
            a, a_s if fp8 else weights, b, b_s if fp8 else weights, c, weights,  # weights: unused pointer
            align.sorted_ids, align.expert_ids, align.num_tokens_post_padded,
            n, kk, t * k, div,
            a.stride(0), a_s.stride(0) if fp8 else 0, b.stride(0), b.stride(1),
            b_s.stride(0) if fp8 else 0, b_s.stride(1) if fp8 else 0, c.stride(0),
            GATED=gated, MUL_WEIGHT=not gated, FP8=fp8, WIDEN=interpreting() and not fp8,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)

    if fp8:
        xq, xs = act_quant_fp8(x)
        gemm(xq, xs, w13, w13_scale.float().contiguous(), inter, i, h, k, True)
        iq, is_ = act_quant_fp8(inter)
        gemm(iq, is_, w2, w2_scale.float().contiguous(), partial, h, i, 1, False)
    else:
        gemm(x, None, w13, None, inter, i, h, k, True)
        gemm(inter, None, w2, None, partial, h, i, 1, False)
    return out.copy_(partial.view(t, k, h).sum(1, dtype=torch.float32))


def fused_moe_dequant(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                      dequant: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                      **kernel_args) -> torch.Tensor:
    """MoE over experts stored in any format: `dequant(expert_ids [n] int64)` returns those experts'
    (w13 [n, 2*I, H], w2 [n, H, I]) in x's dtype; only the experts this batch routes to are
    dequantized. One host sync (the set of used experts): not CUDA-graph capturable."""
    _check_routing(topk_ids, num_experts, 1)
    used, local_ids = torch.unique(topk_ids.long(), return_inverse=True)
    if used.numel() and (int(used[0]) < 0 or int(used[-1]) >= num_experts):
        raise ValueError(f"topk_ids must lie in [0, {num_experts})")
    w13, w2 = dequant(used)
    return fused_moe(x, w13, w2, topk_weights, local_ids.to(torch.int32), **kernel_args)

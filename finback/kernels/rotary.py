"""Rotary position embedding of q and k in one kernel (NeoX / Hugging Face "rotate half" layout).

Reads the float32 cos/sin tables of finback/layers/rotary.py ([max_position, D/2]) at each token's
position, so no per-step [T, D] cos/sin tensors are built. As in the reference, cos and sin are
rounded to the activations' dtype; the rotation itself is computed in float32 and rounded once
(the reference rounds after each multiply and the add, so bf16 results differ by about one step).
One program per token rotates all its query and key heads; out may be q/k themselves (in place).
"""

from __future__ import annotations

import torch

from finback.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's computation: x * cos + rotate_half(x) * sin, in x's dtype."""
    c = torch.cat((cos[positions], cos[positions]), -1).unsqueeze(1).to(q.dtype)
    s = torch.cat((sin[positions], sin[positions]), -1).unsqueeze(1).to(q.dtype)

    def rot(x):
        half = x.shape[-1] // 2
        return x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s

    return rot(q), rot(k)


if HAS_TRITON:

    @triton.jit
    def _rotate(x_ptr, o_ptr, t, stride_xt, stride_xh, stride_ot, stride_oh, c, s,
                NH: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
        heads = tl.arange(0, H_PAD)
        offs = tl.arange(0, HALF_PAD)
        mask = (heads < NH)[:, None] & (offs < HALF)[None, :]
        src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + offs[None, :]
        x1 = tl.load(src, mask=mask, other=0.0)
        x2 = tl.load(src + HALF, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        dst = o_ptr + t * stride_ot + heads[:, None] * stride_oh + offs[None, :]
        tl.store(dst, (a * c - b * s).to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (b * c + a * s).to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(pos_ptr, q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                       HQ: tl.constexpr, HQ_PAD: tl.constexpr, HK: tl.constexpr, HK_PAD: tl.constexpr,
                       HALF: tl.constexpr, HALF_PAD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        offs = tl.arange(0, HALF_PAD)
        dtype = qo_ptr.dtype.element_ty
        c = tl.load(cos_ptr + pos * HALF + offs, mask=offs < HALF, other=0.0).to(dtype).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + pos * HALF + offs, mask=offs < HALF, other=0.0).to(dtype).to(tl.float32)[None, :]
        _rotate(q_ptr, qo_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh, c, s, HQ, HQ_PAD, HALF, HALF_PAD)
        _rotate(k_ptr, ko_ptr, t, stride_kt, stride_kh, stride_kot, stride_koh, c, s, HK, HK_PAD, HALF, HALF_PAD)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D] rotated by the positions' (int [T]) rows of the float32 cos/sin
    tables [max_pos, D/2]. Returns (q_out, k_out), new tensors unless given (q/k for in place)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, H, D] with one T and D")
    t, hq, d = q.shape
    half = d // 2
    if d % 2:
        raise ValueError(f"head_dim {d} is odd")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != half or cos.dtype != torch.float32:
        raise ValueError(f"cos/sin must be float32 [max_pos, {half}], got {cos.dtype} {tuple(cos.shape)}")
    if not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("cos/sin tables must be contiguous")
    if positions.shape != (t,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int [{t}], got {positions.dtype} {tuple(positions.shape)}")
    q_out = torch.empty_like(q) if q_out is None else q_out
    k_out = torch.empty_like(k) if k_out is None else k_out
    if q_out.shape != q.shape or k_out.shape != k.shape or q_out.dtype != k_out.dtype:
        raise ValueError("q_out/k_out must have q's/k's shapes and one dtype")
    if min(x.stride(-1) for x in (q, k, q_out, k_out)) != 1:
        raise ValueError("q, k and the outputs must be contiguous in the head dimension")
    if t:
        hk = k.shape[1]
        _rotary_kernel[(t,)](positions, q, k, q_out, k_out, cos, sin, q.stride(0), q.stride(1), k.stride(0),
                             k.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
                             HQ=hq, HQ_PAD=triton.next_power_of_2(hq), HK=hk, HK_PAD=triton.next_power_of_2(hk),
                             HALF=half, HALF_PAD=triton.next_power_of_2(half), num_warps=4)
    return q_out, k_out

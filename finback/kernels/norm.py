"""RMSNorm kernels: plain, and fused with the residual add that precedes it in every decoder layer.

Semantics are those of finback/layers/norm.py (the references here): the sum of squares is taken in
float32, the normalised row is cast back to the input dtype and then scaled by the weight. The fused
form does in one pass what the layer does in three (add, norm, multiply): `residual += x`, then
`x = norm(residual)`, both in place, so a decoder layer reads and writes each hidden row once.
One program per row; a row of up to 64K elements fits one block.
"""

from __future__ import annotations

import torch

from finback.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place: (norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps,
                         ADD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        # float32 math with a rounding to the storage dtype wherever torch's bf16/fp16 ops round
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if ADD:
            r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
            tl.store(r_ptr + row * stride_r + offs, x, mask=mask)
        h = x.to(tl.float32)
        h = (h * tl.rsqrt(tl.sum(h * h, 0) / n + eps)).to(x.dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        y = w.to(out_ptr.dtype.element_ty).to(tl.float32) * h.to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[-1] != n or t.stride(-1) != 1:
        raise ValueError(f"{name} must end in a contiguous dimension of {n}, got {tuple(t.shape)}")
    try:
        return t.view(-1, n)
    except RuntimeError:
        raise ValueError(f"{name} {tuple(t.shape)} cannot be viewed as rows of {n}") from None


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    if weight.dim() != 1:
        raise ValueError(f"weight must be 1-D, got {tuple(weight.shape)}")
    n = weight.shape[0]
    if x.device != weight.device:
        raise ValueError("x and weight must be on one device")
    if n > 65536:
        raise ValueError(f"rows of {n} elements are too long for one block")
    return n


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of x, into `out` (new if None) of dtype promote(weight, x)."""
    n = _check(x, weight)
    x2 = _rows("x", x, n)
    dtype = torch.result_type(weight, x)
    out = torch.empty(x.shape, dtype=dtype, device=x.device) if out is None else out
    if out.shape != x.shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(x.shape)}")
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, x2.stride(0), x2.stride(0), n, n, eps,  # out: rows of n
                                         ADD=False, BLOCK=triton.next_power_of_2(n),
                                         num_warps=4 if n <= 4096 else 8)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual <- x + residual, x <- norm(residual). Returns (x, residual).
    x, residual and weight must share one dtype (the result is written into x)."""
    n = _check(x, weight)
    if x.shape != residual.shape or x.dtype != residual.dtype or x.dtype != weight.dtype:
        raise ValueError(f"x {x.dtype} {tuple(x.shape)}, residual {residual.dtype} {tuple(residual.shape)} and "
                         f"weight {weight.dtype} must agree")
    x2, r2 = _rows("x", x, n), _rows("residual", residual, n)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, x2, x2.stride(0), r2.stride(0), x2.stride(0), n, eps,
                                         ADD=True, BLOCK=triton.next_power_of_2(n),
                                         num_warps=4 if n <= 4096 else 8)
    return x, residual

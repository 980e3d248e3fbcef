"""SiLU-and-multiply on the fused gate/up projection: x = [gate, up] along the last dimension ->
silu(gate) * up, one read of x and one write of half its size (torch does it in three passes).

Rounding follows the reference (finback/layers/activation.py): silu is computed in float32 and
rounded to x's dtype, then multiplied by `up` in that dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finback.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


if HAS_TRITON:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + n + offs, mask=mask, other=0.0)
        # float32 math, rounded to x's dtype where torch's ops round (after silu, after the product)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2N] -> [..., N]."""
    if x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"x must end in a contiguous dimension of even size, got {tuple(x.shape)}")
    n = x.shape[-1] // 2
    try:
        x2 = x.view(-1, 2 * n)
    except RuntimeError:
        raise ValueError(f"x {tuple(x.shape)} cannot be viewed as rows") from None
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device) if out is None else out
    if out.shape != (*x.shape[:-1], n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*x.shape[:-1], n)}")
    rows = x2.shape[0]
    if rows and n:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x2, out, x2.stride(0), n, n, BLOCK=block, num_warps=4)
    return out

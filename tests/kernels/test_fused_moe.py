"""Fused MoE kernels against their torch references (Triton's interpreter on CPU, compiled on CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from finback.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

from finback.kernels.fp8_gemm import FP8_MAX, fp8_block_dequant_ref  # noqa: E402
from finback.kernels.fused_moe import (  # noqa: E402
    fused_moe,
    fused_moe_dequant,
    fused_moe_ref,
    moe_align,
    moe_align_ref,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _routing(t: int, e: int, k: int, gen: torch.Generator):
    logits = torch.randn(t, e, generator=gen)
    w, ids = torch.softmax(logits, -1).topk(k, -1)
    return w.to(DEV), ids.to(torch.int32).to(DEV)


@pytest.mark.parametrize("t,e,k,block_m", [(1, 8, 2, 16), (9, 5, 3, 4), (40, 16, 4, 16), (3, 64, 8, 16)])
def test_moe_align(t, e, k, block_m):
    gen = torch.Generator().manual_seed(t * 100 + e)
    _, ids = _routing(t, e, k, gen)
    got = moe_align(ids, e, block_m)
    want = moe_align_ref(ids.cpu(), e, block_m)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


def test_moe_reference_is_the_definition():
    """fused_moe_ref against the formula written token by token."""
    gen = torch.Generator().manual_seed(7)
    t, h, i, e, k = 3, 8, 6, 4, 2
    x = torch.randn(t, h, generator=gen, dtype=torch.float64)
    w13 = torch.randn(e, 2 * i, h, generator=gen, dtype=torch.float64)
    w2 = torch.randn(e, h, i, generator=gen, dtype=torch.float64)
    tw, ids = (a.cpu() for a in _routing(t, e, k, gen))
    want = torch.zeros(t, h, dtype=torch.float64)
    for tok in range(t):
        for j in range(k):
            ex = int(ids[tok, j])
            g, u = (w13[ex] @ x[tok]).split(i)
            want[tok] += float(tw[tok, j]) * (w2[ex] @ (F.silu(g) * u))
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, tw, ids), want, rtol=1e-5, atol=1e-5)  # fp32 math


@pytest.mark.parametrize("dtype,t,h,i,e,k,block_m", [
    (torch.float32, 5, 64, 48, 6, 2, None),
    (torch.float32, 33, 32, 80, 8, 3, 16),       # I not a multiple of the tile, several blocks per expert
    (torch.bfloat16, 7, 128, 64, 16, 4, None),
])
def test_fused_moe_dense(dtype, t, h, i, e, k, block_m):
    gen = torch.Generator().manual_seed(11 + t)
    x = torch.randn(t, h, generator=gen).to(dtype).to(DEV)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) / h ** 0.5).to(dtype).to(DEV)
    w2 = (torch.randn(e, h, i, generator=gen) / i ** 0.5).to(dtype).to(DEV)
    tw, ids = _routing(t, e, k, gen)
    got = torch.full((t, h), float("nan"), dtype=dtype, device=DEV)
    fused_moe(x, w13, w2, tw, ids, block_m=block_m, block_n=32, block_k=32, check_ids=True, out=got)
    want = fused_moe_ref(x, w13, w2, tw, ids)
    assert got.dtype == dtype and not got.isnan().any()
    # fp32: tf32 tensor cores on CUDA; bf16: the intermediate and the per-slot partials are rounded to bf16
    tol = 2e-2 if dtype == torch.bfloat16 or DEV == "cuda" else 1e-4
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.float().abs().max().item())


def _fp8_experts(e, n, kk, gen):
    w = (torch.randn(e, n, kk, generator=gen) * 64).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    s = (torch.rand(e, n // 128, kk // 128, generator=gen) + 0.5) / (64 * kk ** 0.5)
    return w.to(DEV), s.to(DEV)


@pytest.mark.parametrize("t,k", [(1, 2), (6, 3)])
def test_fused_moe_fp8(t, k):
    gen = torch.Generator().manual_seed(21 + t)
    h, i, e = 256, 128, 4
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(DEV)
    w13, s13 = _fp8_experts(e, 2 * i, h, gen)
    w2, s2 = _fp8_experts(e, h, i, gen)
    tw, ids = _routing(t, e, k, gen)
    got = torch.full((t, h), float("nan"), dtype=x.dtype, device=DEV)
    fused_moe(x, w13, w2, tw, ids, s13, s2, block_n=64, out=got)
    want = fused_moe_ref(x, w13, w2, tw, ids, s13, s2)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.float().abs().max().item())


def test_fused_moe_dequant_plug():
    """Experts in a format the kernels do not read (here block-FP8) go through a dequantizing callback."""
    gen = torch.Generator().manual_seed(31)
    t, h, i, e, k = 4, 128, 128, 6, 2
    x = torch.randn(t, h, generator=gen).to(DEV)
    w13, s13 = _fp8_experts(e, 2 * i, h, gen)
    w2, s2 = _fp8_experts(e, h, i, gen)
    tw, ids = _routing(t, e, k, gen)
    asked = []

    def dequant(sel):
        asked.append(sel.tolist())
        return (fp8_block_dequant_ref(w13[sel], s13[sel], dtype=x.dtype),
                fp8_block_dequant_ref(w2[sel], s2[sel], dtype=x.dtype))

    got = fused_moe_dequant(x, tw, ids, e, dequant, block_n=32, block_k=32)
    assert asked == [sorted(set(ids.flatten().tolist()))]
    dense13 = fp8_block_dequant_ref(w13, s13, dtype=torch.float32)
    dense2 = fp8_block_dequant_ref(w2, s2, dtype=torch.float32)
    want = fused_moe_ref(x, dense13, dense2, tw, ids)
    tol = 2e-2 if DEV == "cuda" else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_bad_input():
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(2, 32, device=DEV)
    w13 = torch.randn(3, 16, 32, device=DEV)
    w2 = torch.randn(3, 32, 8, device=DEV)
    tw, ids = _routing(2, 3, 2, gen)
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe(x, w13, w2[:, :, :4], tw, ids)
    with pytest.raises(ValueError, match=r"must both be \[T=2, k\]"):
        fused_moe(x, w13, w2, tw[:, :1], ids)
    with pytest.raises(ValueError, match="lie in"):
        fused_moe(x, w13, w2, tw, ids + 3, check_ids=True)
    with pytest.raises(ValueError, match="both scales"):
        fused_moe(x, w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn), tw, ids)
    with pytest.raises(ValueError, match="x's dtype"):
        fused_moe(x, w13.double(), w2.double(), tw, ids)

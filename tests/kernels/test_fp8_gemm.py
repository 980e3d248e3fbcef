"""Block-FP8 kernels against their torch references (Triton's interpreter on CPU, compiled on CUDA).

Triton's interpreter loads float8_e4m3fn tensors and runs tl.dot on them, so every case runs on CPU;
the quantization kernel rounds to the e4m3 grid itself, so it is compared bit for bit.
"""

import pytest
import torch

from finback.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

from finback.kernels.fp8_gemm import (  # noqa: E402
    FP8_MAX,
    act_quant_fp8,
    act_quant_fp8_ref,
    fp8_block_dequant,
    fp8_block_dequant_ref,
    fp8_block_gemm,
    fp8_block_gemm_ref,
    fp8_block_linear,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _fp8_weight(n: int, k: int, gen: torch.Generator, batch: tuple[int, ...] = ()):
    w = (torch.randn(*batch, n, k, generator=gen) * 100).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    s = torch.rand(*batch, -(-n // 128), -(-k // 128), generator=gen) * 1e-3 + 1e-4
    return w.to(DEV), s.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_bit_exact(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 384, generator=gen) * torch.logspace(-8, 3, 5)[:, None]   # rows of very different range
    x[1, 128:256] = 0                                                              # an all-zero group
    x[2, 5] = 448.0                                                                # exactly e4m3's max
    x = x.to(dtype).to(DEV)
    q = torch.full((5, 384), float("nan")).to(torch.float8_e4m3fn).to(DEV)
    s = torch.full((5, 3), float("nan"), device=DEV)
    act_quant_fp8(x, out=q, scale_out=s)
    rq, rs = act_quant_fp8_ref(x)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(rs[1, 1], torch.tensor(1.0, device=DEV))
    assert torch.all(rs == torch.exp2(torch.log2(rs).round()))                  # powers of two
    deq = (rq.float().view(5, 3, 128) * rs[..., None]).view(5, 384)
    half_step = torch.maximum(x.float().abs() * 2 ** -4, (rs * 2 ** -10).repeat_interleave(128, -1))
    assert ((deq - x.float()).abs() <= half_step).all()                         # within half an e4m3 step
    assert (rq.float().abs().amax(-1) > 224).all()                               # the range is used


def test_round_to_e4m3_ties_and_carries():
    # values halfway between e4m3 neighbours, and just below a power of two (mantissa carry)
    vals = torch.tensor([7.75, 7.9, 0.5625 + 0.03125, 2 ** -7 + 2 ** -10, 3 * 2 ** -10, 447.0, 0.0, -7.9, 440.0] +
                        [1.0] * 119).to(DEV)
    vals[-1] = 448.0                                        # pins the scale to 1
    q = torch.full((1, 128), float("nan")).to(torch.float8_e4m3fn).to(DEV)
    act_quant_fp8(vals[None], out=q)
    rq, _ = act_quant_fp8_ref(vals[None])
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("batch,n,k", [((), 200, 256), ((3,), 128, 384)])
def test_dequant(batch, n, k):
    gen = torch.Generator().manual_seed(2)
    w, s = _fp8_weight(n, k, gen, batch)
    out = torch.full((*batch, n, k), float("nan"), dtype=torch.bfloat16, device=DEV)
    fp8_block_dequant(w, s, out=out)
    ref = fp8_block_dequant_ref(w, s)
    if DEV == "cuda":
        assert torch.equal(out, ref)
    else:  # Triton's interpreter truncates fp32 -> bf16 instead of rounding: one bf16 step apart at most
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("m,n,k,block_n", [(1, 256, 256, 128), (37, 200, 384, 64), (16, 96, 128, 32)])
def test_gemm(m, n, k, block_n):
    gen = torch.Generator().manual_seed(3)
    w, s = _fp8_weight(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    fp8_block_gemm(x, w, s, out=out, block_n=block_n)
    ref = fp8_block_gemm_ref(x, w, s)
    # same quantized operands; only the fp32 summation order and the bf16 rounding of the output differ
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2 * ref.float().abs().max().item())
    exact = x.float() @ fp8_block_dequant_ref(w, s, dtype=torch.float32).t()
    rel = (out.float() - exact).norm() / exact.norm()
    assert rel < 0.05, rel                                  # activation quantization costs a few percent at most


def test_linear_paths_agree():
    gen = torch.Generator().manual_seed(4)
    w, s = _fp8_weight(130, 256, gen)
    x = torch.randn(2, 3, 256, generator=gen).to(DEV)
    bias = torch.randn(130, generator=gen).to(DEV)
    y = fp8_block_linear(x, w, s, bias)
    ref = x @ fp8_block_dequant_ref(w, s, dtype=torch.float32).t() + bias
    assert y.shape == (2, 3, 130) and y.dtype == x.dtype
    assert ((y - ref).norm() / ref.norm()) < 0.05


def test_bad_input():
    gen = torch.Generator().manual_seed(5)
    w, s = _fp8_weight(128, 256, gen)
    with pytest.raises(ValueError, match="multiple of the quantization group"):
        act_quant_fp8(torch.randn(2, 100, device=DEV))
    with pytest.raises(ValueError, match="needs scales of shape"):
        fp8_block_dequant(w, s[:, :1])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_block_gemm(torch.randn(2, 256, device=DEV), w.float(), s)
    with pytest.raises(ValueError, match="expects K=256"):
        fp8_block_gemm(torch.randn(2, 128, device=DEV), w, s)

"""RMSNorm (plain and fused with the residual add), SiLU-and-multiply and rotary kernels against their
torch references (Triton's interpreter on CPU, compiled on CUDA).

float32 is compared to rounding noise. bf16 is compared to two bf16 steps (the ops round twice): the
interpreter rounds float32 -> bf16 toward zero where compiled code (and torch) rounds to nearest.
"""

import pytest
import torch

from finback.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

from finback.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from finback.kernels.norm import (  # noqa: E402
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from finback.kernels.rotary import rotary, rotary_ref  # noqa: E402
from finback.layers.rotary import RotaryEmbedding  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2 ** -6, "atol": 2 ** -6}}


def _close(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 96, generator=gen) * torch.logspace(-3, 2, 5)[:, None]).to(dtype).to(DEV)
    w = torch.randn(96, generator=gen).to(dtype).to(DEV)
    out = torch.full_like(x, float("nan"))
    assert rms_norm(x, w, 1e-6, out=out) is out
    _close(out, rms_norm_ref(x, w, 1e-6), dtype)


def test_rms_norm_promotes_like_the_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, generator=gen).to(torch.bfloat16).to(DEV)
    w = torch.randn(64, generator=gen).to(DEV)               # float32 weight on bf16 activations
    out = rms_norm(x, w, 1e-5)
    _close(out, rms_norm_ref(x, w, 1e-5), torch.bfloat16)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_in_place(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 200, generator=gen).to(dtype).to(DEV)
    r = torch.randn(7, 200, generator=gen).to(dtype).to(DEV)
    w = torch.randn(200, generator=gen).to(dtype).to(DEV)
    want_x, want_r = fused_add_rms_norm_ref(x, r, w, 1e-6)
    x2, r2 = x.clone(), r.clone()
    got_x, got_r = fused_add_rms_norm(x2, r2, w, 1e-6)
    assert got_x is x2 and got_r is r2
    _close(got_r, want_r, dtype)
    _close(got_x, want_x, dtype)
    if dtype == torch.float32:
        assert torch.equal(got_r, want_r)                   # one float32 add: the same bits


def test_rms_norm_rejects_bad_input():
    x = torch.randn(2, 32, device=DEV)
    with pytest.raises(ValueError, match="contiguous dimension of 48"):
        rms_norm(x, torch.ones(48, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="must agree"):
        fused_add_rms_norm(x, x.to(torch.bfloat16), torch.ones(32, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="out must be"):
        rms_norm(x, torch.ones(32, device=DEV), 1e-6, out=torch.empty(2, 31, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 2 * 1500, generator=gen) * 4).to(dtype).to(DEV)   # several column blocks, a ragged one
    out = torch.full((2, 3, 1500), float("nan"), dtype=dtype, device=DEV)
    assert silu_and_mul(x, out=out) is out
    _close(out, silu_and_mul_ref(x), dtype)
    assert silu_and_mul(x[:0]).shape == (0, 3, 1500)


def test_silu_and_mul_rejects_bad_input():
    with pytest.raises(ValueError, match="even size"):
        silu_and_mul(torch.randn(2, 7, device=DEV))
    with pytest.raises(ValueError, match="out must be"):
        silu_and_mul(torch.randn(2, 8, device=DEV), out=torch.empty(2, 8, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_on_qkv_views(dtype):
    """q and k as the model has them: strided views of one fused QKV output; Llama-3 scaled tables."""
    rope = RotaryEmbedding(64, 512, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    gen = torch.Generator().manual_seed(4)
    qkv = (torch.randn(9, (6 + 2 + 2) * 64, generator=gen) * 3).to(dtype).to(DEV)
    q, k, _ = qkv.split([6 * 64, 2 * 64, 2 * 64], dim=-1)
    q, k = q.view(9, 6, 64), k.view(9, 2, 64)
    pos = torch.tensor([0, 1, 2, 100, 101, 511, 7, 8, 300], device=DEV)
    cos, sin = rope.cos.to(DEV), rope.sin.to(DEV)
    want_q, want_k = rotary_ref(pos, q, k, cos, sin)
    assert torch.equal(want_q, rope(pos.cpu(), q.cpu(), k.cpu())[0].to(DEV))   # the reference is the layer
    qo = torch.full_like(want_q, float("nan"))
    ko = torch.full_like(want_k, float("nan"))
    rotary(pos, q, k, cos, sin, qo, ko)
    # the reference rounds each product in bf16, so near-cancelling sums are off by steps of the inputs
    tol = TOL[dtype]["atol"] * qkv.abs().max().item()
    torch.testing.assert_close(qo.float(), want_q.float(), rtol=TOL[dtype]["rtol"], atol=tol)
    torch.testing.assert_close(ko.float(), want_k.float(), rtol=TOL[dtype]["rtol"], atol=tol)
    rotary(pos.to(torch.int32), q, k, cos, sin, q, k)                           # in place, through the views
    assert torch.equal(q, qo) and torch.equal(k, ko)


def test_rotary_head_dim_not_a_power_of_two():
    rope = RotaryEmbedding(80, 64, 10000.0)
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(4, 3, 80, generator=gen).to(DEV), torch.randn(4, 1, 80, generator=gen).to(DEV)
    pos = torch.tensor([0, 5, 63, 2], device=DEV)
    qo = torch.full_like(q, float("nan"))
    ko = torch.full_like(k, float("nan"))
    rotary(pos, q, k, rope.cos.to(DEV), rope.sin.to(DEV), qo, ko)
    want_q, want_k = rotary_ref(pos, q, k, rope.cos.to(DEV), rope.sin.to(DEV))
    _close(qo, want_q, torch.float32)
    _close(ko, want_k, torch.float32)


def test_rotary_rejects_bad_input():
    q, k = torch.randn(3, 4, 64, device=DEV), torch.randn(3, 2, 64, device=DEV)
    cos = torch.randn(16, 32, device=DEV)
    with pytest.raises(ValueError, match="float32"):
        rotary(torch.arange(3, device=DEV), q, k, cos.half(), cos.half())
    with pytest.raises(ValueError, match="positions"):
        rotary(torch.arange(3, device=DEV).float(), q, k, cos, cos)
    with pytest.raises(ValueError, match="one T and D"):
        rotary(torch.arange(3, device=DEV), q, k[:2], cos, cos)

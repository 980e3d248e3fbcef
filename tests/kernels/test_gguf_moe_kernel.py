"""The GGUF expert kernel (expert-grouped matmul over stacked GGUF blocks) against its torch reference
(dequantize each routed expert, float32 matmul), on fresh random valid blocks of the types DeepSeek
GGUFs give their experts and more, with NaN-poisoned outputs; and the whole routed SwiGLU on the
kernels against `gguf_experts_ref`. On CPU the kernel runs under Triton's interpreter.

Tolerance as in test_gguf_kernels: |y - ref| <= rel * (|a| @ |W|^T) + 1e-6, rel 1e-5 in fp32."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from finback.kernels import HAS_TRITON
from finback.kernels.fused_moe import moe_align
from finback.kernels.gguf_moe import gguf_experts, gguf_experts_ref, gguf_moe_matmul, gguf_moe_matmul_ref
from finback.loader.quants import dequantize
from finback.loader.random_blocks import random_blocks

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = [T.IQ1_S, T.IQ2_XXS, T.Q2_K, T.Q4_K, T.Q6_K, T.Q8_0, T.IQ4_XS]


def _stack(qtype, e: int, n: int, k: int, gen) -> torch.Tensor:
    return random_blocks(qtype, (e, n, k), gen, scale=0.05).view(e, n, -1).to(DEVICE)


def _bound(a, data, qtype, k, ids, div):
    b = torch.empty(ids.numel(), data.shape[1])
    for r, e in enumerate(ids.reshape(-1).tolist()):
        w = dequantize(data[e].contiguous().view(-1).cpu(), qtype, (data.shape[1], k))
        b[r] = a[r // div].float().cpu().abs() @ w.abs().T
    return b


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_moe_matmul_matches_reference(qtype):
    gen = torch.Generator().manual_seed(int(qtype))
    e, n, k, t, top = 5, 20, 256, 3, 2  # 20 rows: a partial N tile of 16
    data = _stack(qtype, e, n, k, gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:top] for _ in range(t)]).to(torch.int32).to(DEVICE)
    align = moe_align(ids, e, 16)
    for div, rows_in in ((top, t), (1, t * top)):  # gate/up: token rows; down: one row per (token, slot)
        a = torch.randn(rows_in, k, generator=gen).to(DEVICE)
        w = torch.rand(t * top, generator=gen).to(DEVICE) if div == 1 else None
        out = torch.full((t * top, n), float("nan"), device=DEVICE)
        gguf_moe_matmul(a, data, qtype, k, align, div, out, w, block_n=16)
        ref = gguf_moe_matmul_ref(a, data, qtype, k, ids, div, w)
        assert not torch.isnan(out).any()
        bound = 1e-5 * _bound(a, data, qtype, k, ids, div) * (1 if w is None else w.cpu()[:, None]) + 1e-6
        err = (out - ref).abs().cpu()
        assert (err <= bound).all(), f"{qtype.name}: max error {err.max():.3g}"


def test_strided_rank_slice_and_column_slice_out():
    """A rank's slice of the rows (a strided view of the stack) written into half of a wider buffer."""
    gen = torch.Generator().manual_seed(3)
    e, n, k = 4, 32, 512
    full = _stack(T.Q4_K, e, n, k, gen)
    part = full[:, 16:32]  # rows 16..31 of every expert
    ids = torch.tensor([[3, 1], [1, 0]], dtype=torch.int32, device=DEVICE)
    a = torch.randn(2, k, generator=gen).to(DEVICE)
    buf = torch.full((4, 40), float("nan"), device=DEVICE)
    gguf_moe_matmul(a, part, T.Q4_K, k, moe_align(ids, e, 16), 2, buf[:, 8:24], block_n=16)
    ref = gguf_moe_matmul_ref(a, full, T.Q4_K, k, ids, 2)[:, 16:32]
    torch.testing.assert_close(buf[:, 8:24], ref, rtol=1e-4, atol=1e-4)
    assert torch.isnan(buf[:, :8]).all() and torch.isnan(buf[:, 24:]).all()


def test_routed_swiglu_on_kernels_matches_reference():
    """IQ1_S gate and up, IQ2_XXS down (the 1.6-bit R1 mix); an expert no token routes to."""
    gen = torch.Generator().manual_seed(11)
    e, h, i, t, top = 6, 256, 256, 4, 2
    gate, up = _stack(T.IQ1_S, e, i, h, gen), _stack(T.IQ1_S, e, i, h, gen)
    down = _stack(T.IQ2_XXS, e, h, i, gen)
    ids = torch.tensor([[0, 2], [2, 4], [4, 0], [1, 2]], dtype=torch.int32, device=DEVICE)
    weights = torch.rand(t, top, generator=gen).to(DEVICE)
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    parts = [(gate, T.IQ1_S), (up, T.IQ1_S), (down, T.IQ2_XXS)]
    y = gguf_experts(x, *parts, weights, ids, block_n=16)
    ref = gguf_experts_ref(x, *parts, weights, ids)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_bad_calls():
    data = torch.zeros(2, 4, 50, dtype=torch.uint8)  # IQ1_S: 50 bytes per 256 values
    ids = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="uint8 \\[E, N, bytes per row\\]"):
        gguf_moe_matmul_ref(torch.zeros(1, 256), data[0], T.IQ1_S, 256, ids, 1)
    with pytest.raises(ValueError, match="rows of K = 512 hold"):
        gguf_moe_matmul_ref(torch.zeros(1, 512), data, T.IQ1_S, 512, ids, 1)
    with pytest.raises(ValueError, match="expert id 2 outside"):
        gguf_moe_matmul_ref(torch.zeros(1, 256), data, T.IQ1_S, 256, ids + 2, 1)

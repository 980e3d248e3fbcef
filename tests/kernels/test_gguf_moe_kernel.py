"""The GGUF expert kernels (the expert-grouped matmul over stacked GGUF blocks and the decode GEMV)
against their torch reference (dequantize each routed expert, float32 matmul), on fresh random valid
blocks of the types DeepSeek GGUFs give their experts and more, with NaN-poisoned outputs; and the whole
routed SwiGLU on the kernels (both paths) against `gguf_experts_ref`. On CPU the kernels run under
Triton's interpreter.

Tolerance as in test_gguf_kernels: |y - ref| <= rel * (|a| @ |W|^T) + 1e-6, rel 1e-5 in fp32."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from finback.kernels import HAS_TRITON
from finback.kernels.fused_moe import moe_align
from finback.kernels.gguf_moe import (gguf_experts, gguf_experts_ref, gguf_moe_gemv, gguf_moe_matmul,
                                      gguf_moe_matmul_ref)
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


def _check_gemv(out, a, data, qtype, k, ids, div, w=None, order=None, **kw):
    ref = gguf_moe_matmul_ref(a, data, qtype, k, ids, div, w)
    gguf_moe_gemv(a, data, qtype, k, ids, div, out, w, row_order=order, **kw)
    assert not torch.isnan(out).any()
    bound = 1e-5 * _bound(a, data, qtype, k, ids, div) * (1 if w is None else w.cpu()[:, None]) + 1e-6
    err = (out - ref).abs().cpu()
    assert (err <= bound).all(), f"{qtype.name}: max error {err.max():.3g}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_moe_gemv_matches_reference(qtype):
    """Gate/up form (a row per token, a_row_div = top_k) and down form (a row per routed row, routing
    weights); 20 rows: a partial N tile; K = 3 super-blocks under 512-wide steps: a partial last step
    (word types re-read their last unit there, x is zero); rows visited in a given order; IQ1_S and
    IQ2_XXS also on `_tile` (word_loads=False)."""
    gen = torch.Generator().manual_seed(100 + int(qtype))
    e, n, k, t, top = 5, 20, 768, 3, 2
    data = _stack(qtype, e, n, k, gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:top] for _ in range(t)]).to(torch.int32).to(DEVICE)
    a = torch.randn(t, k, generator=gen).to(DEVICE)
    _check_gemv(torch.full((t * top, n), float("nan"), device=DEVICE), a, data, qtype, k, ids, top, block_n=8,
                block_k=512)
    a = torch.randn(t * top, k, generator=gen).to(DEVICE)
    w = torch.rand(t * top, generator=gen).to(DEVICE)
    order = torch.sort(ids.reshape(-1), stable=True).indices
    _check_gemv(torch.full((t * top, n), float("nan"), device=DEVICE), a, data, qtype, k, ids.long(), 1, w, order,
                block_n=4, block_k=256)
    if qtype in (T.IQ1_S, T.IQ2_XXS):  # the generic decoder on the 671B's expert types too
        _check_gemv(torch.full((t * top, n), float("nan"), device=DEVICE), a, data, qtype, k, ids, 1, w,
                    block_n=8, block_k=256, word_loads=False)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.IQ2_XXS], ids=lambda t: t.name)
def test_moe_gemv_pair_rank_slice_and_column_slice_out(qtype):
    """Gate and up as a pair of rank slices (strided views of wider stacks) in one launch, into the
    middle columns of a wider buffer; a Q6_K stack whose rows are not 4-byte aligned takes `_tile`."""
    gen = torch.Generator().manual_seed(7)
    e, n, k = 4, 32, 512
    gate, up = _stack(qtype, e, n, k, gen), _stack(qtype, e, n, k, gen)
    ids = torch.tensor([[3, 1], [1, 0]], dtype=torch.int32, device=DEVICE)
    a = torch.randn(2, k, generator=gen).to(DEVICE)
    buf = torch.full((4, 40), float("nan"), device=DEVICE)
    gguf_moe_gemv(a, (gate[:, 16:24], up[:, 16:24]), qtype, k, ids, 2, buf[:, 8:24], block_n=4, block_k=256)
    ref = torch.cat([gguf_moe_matmul_ref(a, w, qtype, k, ids, 2)[:, 16:24] for w in (gate, up)], 1)
    torch.testing.assert_close(buf[:, 8:24], ref, rtol=1e-4, atol=1e-4)
    assert torch.isnan(buf[:, :8]).all() and torch.isnan(buf[:, 24:]).all()
    odd = _stack(T.Q6_K, e, 8, 256, gen)  # 210-byte rows
    out = torch.full((4, 8), float("nan"), device=DEVICE)
    _check_gemv(out, a[:, :256], odd, T.Q6_K, 256, ids, 2, block_n=8, block_k=256)


@pytest.mark.parametrize("gemv", [True, False], ids=["gemv", "mma"])
def test_routed_swiglu_paths_match_reference(gemv):
    """IQ1_S gate and up, IQ2_XXS down (the 1.6-bit R1 mix) on the GEMV path (4 tokens: rows in expert
    order, gate and up in one launch) and the expert-grouped MMA path; an expert no token routes to."""
    gen = torch.Generator().manual_seed(12)
    e, h, i, t, top = 6, 256, 256, 4, 2
    gate, up = _stack(T.IQ1_S, e, i, h, gen), _stack(T.IQ1_S, e, i, h, gen)
    down = _stack(T.IQ2_XXS, e, h, i, gen)
    ids = torch.tensor([[0, 2], [2, 4], [4, 0], [2, 1]], dtype=torch.int32, device=DEVICE)
    weights = torch.rand(t, top, generator=gen).to(DEVICE)
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    parts = [(gate, T.IQ1_S), (up, T.IQ1_S), (down, T.IQ2_XXS)]
    y = gguf_experts(x, *parts, weights, ids, gemv=gemv, block_n=16)
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
    a, out = torch.zeros(1, 256), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="uint8 \\[E, N, bytes per row\\]"):
        gguf_moe_gemv(a, data[0], T.IQ1_S, 256, ids, 1, out)
    with pytest.raises(ValueError, match="need 1 / a_row_div = 1 / 1 rows of a, got 2"):
        gguf_moe_gemv(torch.zeros(2, 256), data, T.IQ1_S, 256, ids, 1, out)
    with pytest.raises(ValueError, match="out must be a float \\[1, 4\\]"):
        gguf_moe_gemv(a, data, T.IQ1_S, 256, ids, 1, torch.zeros(1, 8))
    with pytest.raises(ValueError, match="out must be a float \\[1, 8\\]"):  # a pair writes 2N columns
        gguf_moe_gemv(a, (data, data), T.IQ1_S, 256, ids, 1, out)
    with pytest.raises(ValueError, match="one shape and strides"):
        gguf_moe_gemv(a, (data, data[:, :2]), T.IQ1_S, 256, ids, 1, torch.zeros(1, 8))
    with pytest.raises(ValueError, match="topk_ids must be int32 or int64"):
        gguf_moe_gemv(a, data, T.IQ1_S, 256, ids.float(), 1, out)
    with pytest.raises(ValueError, match="row_weights must hold 1 values"):
        gguf_moe_gemv(a, data, T.IQ1_S, 256, ids, 1, out, torch.ones(2))
    with pytest.raises(ValueError, match="row_order must be 1 int32/int64"):
        gguf_moe_gemv(a, data, T.IQ1_S, 256, ids, 1, out, row_order=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        gguf_moe_gemv(a, data, T.IQ1_S, 256, ids, 1, out, block_k=48)
    with pytest.raises(ValueError, match="no GGUF matmul for F16"):
        gguf_moe_gemv(a, data, T.F16, 256, ids, 1, out)

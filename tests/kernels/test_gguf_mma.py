"""The tensor-core GGUF matmul for Q4_K, Q6_K and Q8_0 (finback/kernels/gguf_mma.py) against the torch
reference (dequantize, then a float32 matmul), on fresh random valid blocks with NaN-poisoned outputs;
under Triton's interpreter on CPU, compiled on a GPU.

Tolerance as tests/kernels/test_gguf_kernels.py: |y - ref| <= rel * (|x| @ |W|^T) + 1e-6, rel 1e-5
for float32 x (the weights stay float32: input_precision="ieee"), 1e-2 for bf16 x (weights rounded
to bf16 for the tensor cores, bf16 output).
"""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from finback.kernels import HAS_TRITON
from finback.kernels.gguf import _LOCKS
from finback.loader.quants import dequantize
from finback.loader.random_blocks import random_blocks

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = [T.Q4_K, T.Q6_K, T.Q8_0]


def _mma(*args, **kw):
    from finback.kernels.gguf_mma import gguf_mma

    return gguf_mma(*args, **kw)


def _blocks(qtype, n, k, gen):
    return random_blocks(qtype, (n, k), gen, scale=0.05).to(DEVICE)


def _check(y, x, data, qtype, k, rel=1e-5):
    w = dequantize(data.contiguous().view(-1).cpu(), qtype, (data.shape[0], k))
    ref = x.float().cpu() @ w.T
    y = y.float().cpu()
    assert not torch.isnan(y).any()
    err = (y - ref).abs()
    bound = rel * (x.float().cpu().abs() @ w.abs().T) + 1e-6
    assert (err <= bound).all(), f"{qtype.name}: max error {err.max():.3g}"


def _poisoned(m, n, dtype=torch.float32):
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matches_reference_swapped_and_not_with_partial_tiles(qtype):
    gen = torch.Generator().manual_seed(int(qtype))
    n, k = 36, 512  # a partial weight-row tile; two 256-value super-blocks
    data = _blocks(qtype, n, k, gen)
    for m, kw in ((5, {}), (16, {"swap": False}), (17, {}), (40, {"swap": True, "block_m": 32}), (70, {"block_m": 64})):
        x = torch.randn(m, k, generator=gen).to(DEVICE)
        _check(_mma(x, data, qtype, k, out=_poisoned(m, n), **kw), x, data, qtype, k)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_split_k_is_deterministic_and_rearms_its_counters(qtype):
    gen = torch.Generator().manual_seed(7)
    n, k = 64, 1024
    data = _blocks(qtype, n, k, gen)
    x = torch.randn(9, k, generator=gen).to(DEVICE)
    first = _mma(x, data, qtype, k, out=_poisoned(9, n), split_k=4)
    _check(first, x, data, qtype, k)
    again = _mma(x, data, qtype, k, out=_poisoned(9, n), split_k=4)
    assert torch.equal(first, again)
    assert not _LOCKS[first.device].any()  # every tile's counter is back at zero for the next call


def test_q8_0_rows_that_are_not_a_multiple_of_its_step():
    gen = torch.Generator().manual_seed(5)
    for k in (96, 576):  # 3 blocks; SmolLM2's hidden size (4.5 steps of 128)
        data = _blocks(T.Q8_0, 20, k, gen)
        x = torch.randn(6, k, generator=gen).to(DEVICE)
        _check(_mma(x, data, T.Q8_0, k, out=_poisoned(6, 20), split_k=2), x, data, T.Q8_0, k)


def test_bf16_strided_weight_rows_and_a_column_slice_of_out():
    gen = torch.Generator().manual_seed(3)
    n, k = 48, 768
    big = _blocks(T.Q4_K, 2 * n, k, gen)
    data = big[::2]  # every other row: a strided view
    x = torch.randn(24, k, generator=gen).to(DEVICE).bfloat16()
    out = torch.full((24, n + 8), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    y = _mma(x, data, T.Q4_K, k, out=out[:, 4:4 + n])
    _check(y, x, data, T.Q4_K, k, rel=1e-2)
    assert out[:, :4].isnan().all() and out[:, 4 + n:].isnan().all()  # nothing written outside the slice


def test_bad_calls():
    gen = torch.Generator().manual_seed(0)
    data = _blocks(T.Q4_K, 16, 256, gen)
    x = torch.randn(5, 256).to(DEVICE)
    with pytest.raises(ValueError, match="no GGUF matmul for Q2_K"):
        _mma(x, _blocks(T.Q2_K, 16, 256, gen), T.Q2_K, 256)
    with pytest.raises(ValueError, match="K = 512"):
        _mma(torch.randn(5, 512).to(DEVICE), data, T.Q4_K, 512)
    with pytest.raises(ValueError, match="power of two"):
        _mma(x, data, T.Q4_K, 256, block_n=48)
    assert _mma(x[:0], data, T.Q4_K, 256).shape == (0, 16)
    raw = torch.zeros(16 * 144 + 2, dtype=torch.uint8, device=DEVICE)
    raw[2:].copy_(data.reshape(-1))
    shifted = raw[2:].view(16, 144)  # rows at 2 mod 4: Q4_K's int32 words cannot be read
    with pytest.raises(ValueError, match="not aligned"):
        _mma(x, shifted, T.Q4_K, 256)

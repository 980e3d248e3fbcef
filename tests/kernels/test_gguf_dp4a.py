"""The int8-activation (dp4a) GGUF GEMV against its torch references, on fresh random valid blocks
(finback/loader/random_blocks.py) with NaN-poisoned outputs. On CPU the kernels run under Triton's
interpreter, which takes the byte-by-byte integer version of dp4a (exact, like the instruction).

Tolerances: against gguf_gemv_q8_ref (the same int8 activations, float32 matmul) only float32
summation order differs: |y - ref| <= 1e-5 * (|x_q| @ |W|^T) + 1e-6 (bf16 outputs: 1e-2 of it).
Against the float reference gguf_matmul_ref the activation rounding adds at most
(0.5 / 127) * sum over blocks b of amax_b * sum_{i in b} |W_i|.
"""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from finback.kernels import HAS_TRITON
from finback.kernels.gguf import _LOCKS, gguf_matmul_ref
from finback.loader.quants import dequantize
from finback.loader.random_blocks import random_blocks

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

if HAS_TRITON:
    from finback.kernels.gguf_dp4a import Q8_TYPES, gguf_gemv_q8, gguf_gemv_q8_ref, quantize_q8, quantize_q8_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = [T.Q4_K, T.Q6_K, T.Q8_0, T.Q2_K, T.IQ1_S]


def _blocks(qtype, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return random_blocks(qtype, (n, k), gen, scale=0.05).to(DEVICE)


def _weights(data, qtype, k):
    return dequantize(data.contiguous().view(-1), qtype, (data.shape[0], k))


def _check(y, x, data, qtype, k, rel=1e-5):
    assert not torch.isnan(y).any()
    ref = gguf_gemv_q8_ref(x.float(), data, qtype, k)
    q, d, _ = quantize_q8_ref(x)
    xq = (q.float().view(x.shape[0], -1, 32) * d[:, :, None]).view(x.shape)
    bound = rel * (xq.abs() @ _weights(data, qtype, k).abs().T) + 1e-6
    err = (y.float() - ref).abs()
    assert (err <= bound).all(), f"{qtype.name}: max error {err.max():.3g} over a bound of {bound.min():.3g}"


def _poisoned(m, n, dtype=torch.float32):
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)


def test_quantize_matches_reference_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 256, generator=gen) * 3
    x[1] = 0.0  # every block zero: d = 0, q = 0, s = 0
    x[2, 40] = 1e4  # one large value: the rest of its block rounds to 0
    x[3] = -x[3].abs()  # all negative
    x[4, :32] = torch.arange(32) - 15.5  # amax 15.5: d = 15.5/127, halves land near .5
    x[4, 32:64] = torch.arange(-16, 16) + 0.5
    x[4, 64] = 127.0  # d = 1 exactly: x/d = k + 0.5 exactly, rounded away from zero
    x[4, 65:96] = torch.arange(31) - 15 + 0.5
    x = x.to(DEVICE)
    for xx in (x, x.bfloat16(), x.half()):
        q, d, s = quantize_q8(xx)
        qr, dr, sr = quantize_q8_ref(xx)
        assert q.dtype == torch.int8 and d.dtype == s.dtype == torch.float32
        assert torch.equal(q, qr) and torch.equal(d, dr) and torch.equal(s, sr)
    q, d, s = quantize_q8(x)
    blocks = x.view(5, -1, 32)
    assert (q[1] == 0).all() and (d[1] == 0).all() and (s[1] == 0).all()
    assert q[2, 40] == 127 and (q[2, 32:64].abs().sum() == 127)
    assert (q[3] <= 0).all()
    halves = torch.arange(31) - 15 + (torch.arange(31) >= 15).long()  # -14.5 -> -15 ... 0.5 -> 1 ... 15.5 -> 16
    assert torch.equal(q[4, 65:96].cpu(), halves.to(torch.int8))
    err = (q.float().view(5, -1, 32) * d[:, :, None] - blocks).abs()
    assert (err <= d[:, :, None] * (0.5 + 1e-5)).all()  # |x - d q| <= d / 2
    assert torch.equal(s, d * q.float().view(5, -1, 32).sum(2))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gemv_matches_reference(qtype):
    """M = 1..4 (3 is padded to 4 rows), N = 20 (a partial 8-row tile), K of two super-blocks, 256-value
    steps split two ways (the last split sums the partials), then the default tiles."""
    gen = torch.Generator().manual_seed(int(qtype))
    n, k = 20, 512
    data = _blocks(qtype, n, k, gen)
    for m in (1, 2, 3, 4):
        x = torch.randn(m, k, generator=gen).to(DEVICE)
        y = gguf_gemv_q8(x, data, qtype, k, out=_poisoned(m, n), block_n=8, block_k=256, split_k=2)
        _check(y, x, data, qtype, k)
    _check(gguf_gemv_q8(x, data, qtype, k), x, data, qtype, k)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_float_reference_error_is_the_activation_rounding(qtype):
    """|y - x @ W^T| <= (0.5/127) * sum_b amax_b * sum_{i in b} |W_i| (+ float32 rounding)."""
    gen = torch.Generator().manual_seed(100 + int(qtype))
    n, m, k = 16, 2, 512
    data = _blocks(qtype, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    x[1, 7] = 20.0  # an outlier: its block's other values lose precision
    y = gguf_gemv_q8(x, data, qtype, k, out=_poisoned(m, n))
    w = _weights(data, qtype, k)
    amax = x.abs().view(m, -1, 32).amax(2)  # [M, K/32]
    wsum = w.abs().view(n, -1, 32).sum(2)  # [N, K/32]
    bound = (0.5 / 127) * (amax @ wsum.T) * (1 + 1e-4) + 2e-5 * (x.abs() @ w.abs().T) + 1e-6
    err = (y - gguf_matmul_ref(x, data, qtype, k)).abs()
    assert (err <= bound).all(), f"{qtype.name}: max error {err.max():.3g}"
    assert err.max() > 0  # the activations really are int8


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q2_K], ids=lambda t: t.name)
def test_strided_rows_column_slice_out_and_bf16(qtype):
    """A column slice of the blocks (row stride > row bytes; Q6_K's slice starts at 2 mod 4), an output
    that is a column slice of a wider tensor, bf16 activations and output."""
    gen = torch.Generator().manual_seed(7 + int(qtype))
    n, k = 12, 512
    full = _blocks(qtype, n, 4 * 256, gen)
    bpb = full.shape[1] // 4
    data = full[:, bpb:3 * bpb]  # super-blocks 1 and 2
    x = torch.randn(3, k, generator=gen).to(DEVICE)
    wide = torch.full((3, n + 8), float("nan"), device=DEVICE)
    gguf_gemv_q8(x, data, qtype, k, out=wide[:, 4:4 + n], block_n=4, block_k=256)
    _check(wide[:, 4:4 + n], x, data, qtype, k)
    assert torch.isnan(wide[:, :4]).all() and torch.isnan(wide[:, 4 + n:]).all()
    xb = x.bfloat16()
    y = gguf_gemv_q8(xb, data, qtype, k, out=_poisoned(3, n, torch.bfloat16))
    _check(y, xb, data, qtype, k, rel=1e-2)


@pytest.mark.parametrize("qtype, shift", [(T.Q4_K, 2), (T.Q4_K, 4), (T.Q2_K, 2)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_rows_not_aligned(qtype, shift):
    """Blocks whose rows start at 2 mod 4 bytes (words from int16 pairs), or Q4_K rows at 4 mod 16 (no
    16-byte vectors): same result."""
    gen = torch.Generator().manual_seed(11)
    n, k = 8, 512
    data = _blocks(qtype, n, k, gen)
    buf = torch.empty(data.numel() + shift, dtype=torch.uint8, device=DEVICE)
    odd = buf[shift:].view(n, -1)
    odd.copy_(data)
    assert odd.data_ptr() % 16 == shift
    x = torch.randn(2, k, generator=gen).to(DEVICE)
    _check(gguf_gemv_q8(x, odd, qtype, k, out=_poisoned(2, n), block_n=4), x, odd, qtype, k)


@pytest.mark.parametrize("qtype, k, block_k, split_k", [(T.Q8_0, 96, 64, 2), (T.Q4_K, 768, 512, 1),
                                                        (T.Q6_K, 768, 256, 3), (T.IQ1_S, 768, 512, 2)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_k_not_a_multiple_of_the_step(qtype, k, block_k, split_k):
    """The last K step runs past K (or its split): those units re-read real blocks, x is zero there."""
    gen = torch.Generator().manual_seed(5 + k)
    n = 8
    data = _blocks(qtype, n, k, gen)
    x = torch.randn(2, k, generator=gen).to(DEVICE)
    y = gguf_gemv_q8(x, data, qtype, k, out=_poisoned(2, n), block_n=4, block_k=block_k, split_k=split_k)
    _check(y, x, data, qtype, k)


def test_split_k_is_deterministic_rearms_counters_and_takes_shared_q8():
    gen = torch.Generator().manual_seed(3)
    qtype, n, k = T.Q4_K, 24, 1024
    data = _blocks(qtype, n, k, gen)
    x = torch.randn(2, k, generator=gen).to(DEVICE)
    y1 = gguf_gemv_q8(x, data, qtype, k, split_k=4, block_n=8, block_k=256)
    y2 = gguf_gemv_q8(x, data, qtype, k, split_k=4, block_n=8, block_k=256, q8=quantize_q8(x))
    assert torch.equal(y1, y2)
    assert not _LOCKS[y1.device].any()
    _check(y1, x, data, qtype, k)


def test_bad_calls():
    gen = torch.Generator().manual_seed(0)
    data = _blocks(T.Q4_K, 16, 256, gen)
    x = torch.randn(2, 256).to(DEVICE)
    with pytest.raises(ValueError, match="no GGUF matmul for Q5_K.*supported: IQ1_S, Q2_K, Q4_K, Q6_K, Q8_0"):
        gguf_gemv_q8(x, _blocks(T.Q5_K, 16, 256, gen), T.Q5_K, 256)
    with pytest.raises(ValueError, match="1 to 4 rows"):
        gguf_gemv_q8(torch.randn(5, 256).to(DEVICE), data, T.Q4_K, 256)
    with pytest.raises(ValueError, match="K = 128"):
        gguf_gemv_q8(x[:, :128], data, T.Q4_K, 128)
    with pytest.raises(ValueError, match="block_k must be"):
        gguf_gemv_q8(x, data, T.Q4_K, 256, block_k=32)
    with pytest.raises(ValueError, match="out must be"):
        gguf_gemv_q8(x, data, T.Q4_K, 256, out=torch.empty(2, 16, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="q8 must be"):
        gguf_gemv_q8(x, data, T.Q4_K, 256, q8=quantize_q8(x[:1]))
    with pytest.raises(ValueError, match="x must be"):
        quantize_q8(torch.randn(2, 48).to(DEVICE))
    with pytest.raises(ValueError, match="x must be"):
        quantize_q8_ref(torch.ones(2, 64, dtype=torch.int32))
    assert Q8_TYPES == frozenset(TYPES)

"""The GGUF block matmul kernels (GEMV and GEMM, every type they take) against the torch reference
(dequantize, then a float32 matmul), on fresh random valid blocks (finback/loader/random_blocks.py:
every quant, index and sign field random, scales finite), with NaN-poisoned outputs. On CPU the
kernels run under Triton's interpreter.

Tolerance: both sides accumulate in float32 (in different orders), so |y - ref| <= 1e-5 * (|x| @ |W|^T)
+ 1e-6; bf16 activations and outputs (and bf16 weights in GEMM's tl.dot) are held to 1e-2 of it.
"""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from finback.kernels import HAS_TRITON
from finback.kernels.gguf import _LOCKS, KERNEL_TYPES, gguf_gemm, gguf_gemv, gguf_matmul_ref
from finback.loader.quants import dequantize
from finback.loader.random_blocks import random_blocks

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _blocks(qtype, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return random_blocks(qtype, (n, k), gen, scale=0.05).to(DEVICE)


def _bound(x, data, qtype, k):
    w = dequantize(data.contiguous().view(-1), qtype, (data.shape[0], k))
    return x.float().abs() @ w.abs().T


def _check(y, x, data, qtype, k, rel=1e-5):
    ref = gguf_matmul_ref(x.float(), data, qtype, k)
    assert not torch.isnan(y).any()
    err = (y.float() - ref).abs()
    bound = rel * _bound(x, data, qtype, k) + 1e-6
    assert (err <= bound).all(), f"{qtype.name}: max error {err.max():.3g}, bound {bound.min():.3g}"


def _poisoned(m, n, dtype=torch.float32):
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("qtype", sorted(KERNEL_TYPES), ids=lambda t: t.name)
def test_kernels_match_reference(qtype):
    gen = torch.Generator().manual_seed(int(qtype))
    n, k = 36, 512  # 36 rows: a partial row tile in every kernel; two 256-value blocks
    data = _blocks(qtype, n, k, gen)
    # gguf_gemv: M = 1, 2 on CUDA cores, 3 on the MMA path; 5 forced onto CUDA cores (M padded to 8)
    for m, kw in ((1, {}), (2, {}), (3, {}), (5, {"mma": False})):
        x = torch.randn(m, k, generator=gen).to(DEVICE)
        _check(gguf_gemv(x, data, qtype, k, out=_poisoned(m, n), split_k=2, **kw), x, data, qtype, k)
    x = torch.randn(17, k, generator=gen).to(DEVICE)  # a partial M tile; split K in the other tests
    _check(gguf_gemm(x, data, qtype, k, out=_poisoned(17, n), split_k=1), x, data, qtype, k)


WORD_TYPES = [T.Q4_K, T.Q6_K, T.Q8_0, T.Q2_K, T.IQ1_S]  # the types with a word-load decoder


@pytest.mark.parametrize("qtype", WORD_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("blocks", [3, 4])
def test_word_paths_partial_tiles_and_splits(qtype, blocks):
    """K = 3 or 4 super-blocks (256 values) and 512-value K steps: the last step is half past K (its
    units re-read the last real one; x is zero there); 2 and 3 K splits (the last split reduces).
    Q6_K rows of an odd block count are not 4-byte aligned (the generic decoder takes them); with 4
    blocks every other block starts at 2 mod 4 (funnelled words)."""
    gen = torch.Generator().manual_seed(int(qtype) * 10 + blocks)
    n, k = 20, 256 * blocks
    data = _blocks(qtype, n, k, gen)
    for m, kw in ((1, {"block_n": 8, "split_k": 2}), (2, {"block_n": 4, "split_k": 3}),
                  (4, {"mma": True, "block_n": 16, "split_k": 3}),
                  (4, {"mma": True, "block_n": 32, "swap": False, "split_k": 2})):
        x = torch.randn(m, k, generator=gen).to(DEVICE)
        _check(gguf_gemv(x, data, qtype, k, out=_poisoned(m, n), block_k=512, **kw), x, data, qtype, k)
    x = torch.randn(20, k, generator=gen).to(DEVICE)
    for kw in ({"block_m": 16, "block_n": 16, "split_k": 3}, {"block_m": 32, "block_n": 16, "swap": True}):
        _check(gguf_gemm(x, data, qtype, k, out=_poisoned(20, n), block_k=256, **kw), x, data, qtype, k)


def test_split_k_is_deterministic_and_rearms_its_counters():
    gen = torch.Generator().manual_seed(3)
    qtype, n, k = T.Q4_K, 24, 1024
    data = _blocks(qtype, n, k, gen)
    x = torch.randn(1, k, generator=gen).to(DEVICE)
    y1 = gguf_gemv(x, data, qtype, k, split_k=4, block_n=8)
    y2 = gguf_gemv(x, data, qtype, k, split_k=4, block_n=8)
    assert torch.equal(y1, y2)
    assert not _LOCKS[y1.device].any()  # every tile's counter is back at zero for the next call


def test_unaligned_blocks_take_the_byte_path():
    """Q4_K blocks whose rows start at 2 mod 4 bytes cannot be read as int32 words: same result."""
    gen = torch.Generator().manual_seed(11)
    qtype, n, k = T.Q4_K, 16, 512
    data = _blocks(qtype, n, k, gen)
    buf = torch.empty(data.numel() + 2, dtype=torch.uint8, device=DEVICE)
    odd = buf[2:].view(n, -1)
    odd.copy_(data)
    assert odd.data_ptr() % 4 == 2
    x = torch.randn(2, k, generator=gen).to(DEVICE)
    _check(gguf_gemv(x, odd, qtype, k, out=_poisoned(2, n)), x, odd, qtype, k)
    _check(gguf_gemm(x, odd, qtype, k, out=_poisoned(2, n)), x, odd, qtype, k)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1, T.IQ4_NL], ids=lambda t: t.name)
def test_k_not_a_multiple_of_the_tile(qtype):
    """32-value blocks: K = 96 leaves a partial K tile (masked groups) in both kernels; two K splits."""
    gen = torch.Generator().manual_seed(5)
    n, k = 16, 96
    data = _blocks(qtype, n, k, gen)
    x = torch.randn(2, k, generator=gen).to(DEVICE)
    _check(gguf_gemv(x, data, qtype, k, out=_poisoned(2, n)), x, data, qtype, k)
    _check(gguf_gemm(x, data, qtype, k, out=_poisoned(2, n), block_k=64, split_k=2), x, data, qtype, k)


def test_strided_weight_and_output_and_bf16():
    """A column slice of the blocks (row stride > row bytes), an output that is a column slice of a
    wider tensor, bf16 activations (the interpreter widens them to fp32 for tl.dot, whose bf16 tiles
    it mishandles); the GEMV's default split count."""
    gen = torch.Generator().manual_seed(7)
    qtype, n, k = T.Q4_K, 32, 768
    full = _blocks(qtype, n, k, gen)
    data = full[:, 144:144 * 3]  # super-blocks 1 and 2: K = 512
    k = 512
    x = torch.randn(16, k, generator=gen).to(DEVICE)
    wide = torch.full((16, n + 8), float("nan"), device=DEVICE)
    gguf_gemv(x, data, qtype, k, out=wide[:, 4:4 + n])
    _check(wide[:, 4:4 + n], x, data, qtype, k)
    assert torch.isnan(wide[:, :4]).all() and torch.isnan(wide[:, 4 + n:]).all()
    xb = x.bfloat16()
    for m in (1, 16):  # CUDA cores (bf16 x read as fp32), the MMA path (bf16 weights into tl.dot)
        y = gguf_gemv(xb[:m], data, qtype, k, out=_poisoned(m, n, torch.bfloat16))
        _check(y, xb[:m], data, qtype, k, rel=1e-2)
    y = gguf_gemm(xb, data, qtype, k, out=_poisoned(16, n, torch.bfloat16))
    _check(y, xb, data, qtype, k, rel=1e-2)


def test_bad_calls():
    gen = torch.Generator().manual_seed(0)
    data = _blocks(T.Q4_K, 16, 256, gen)
    x = torch.randn(2, 256).to(DEVICE)
    with pytest.raises(ValueError, match="K = 128"):
        gguf_gemv(x[:, :128], data, T.Q4_K, 128)
    with pytest.raises(ValueError, match="x must be"):
        gguf_gemm(x[:, :128], data, T.Q4_K, 256)
    with pytest.raises(ValueError, match="no GGUF matmul for F16"):
        gguf_gemv(x, data, T.F16, 256)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gguf_gemv(torch.randn(17, 256).to(DEVICE), data, T.Q4_K, 256)
    with pytest.raises(ValueError, match="out must be"):
        gguf_gemm(x, data, T.Q4_K, 256, out=torch.empty(2, 15, device=DEVICE))
    with pytest.raises(ValueError, match="hold 144 bytes"):
        gguf_gemm(x, data[:, :100], T.Q4_K, 256)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.IQ2_XXS], ids=lambda t: t.name)
def test_prefill_sized_batches_with_the_default_tiles(qtype):
    """M > 256 takes the 128-row tiles (128 x 64 on 4 warps) that the H100 sweep chose: a partial M tile,
    a partial N tile, the default configuration throughout."""
    gen = torch.Generator().manual_seed(7 + int(qtype))
    n, k = 36, 512
    data = _blocks(qtype, n, k, gen)
    x = torch.randn(260, k, generator=gen).to(DEVICE)
    _check(gguf_gemm(x, data, qtype, k, out=_poisoned(260, n)), x, data, qtype, k)

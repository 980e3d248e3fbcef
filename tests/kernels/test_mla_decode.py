"""Absorbed MLA decode kernel against its torch reference (Triton's interpreter on CPU, compiled on CUDA)."""

import pytest
import torch

from finback.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

from finback.kernels.mla_decode import default_num_splits, mla_decode, mla_decode_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seq_lens, h, dl, dr, block_size, dtype, seed, extra_blocks=3):
    gen = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    max_blocks = max(1, max(-(-n // block_size) for n in seq_lens)) + 1      # a spare column in the table
    num_blocks = b * max_blocks + extra_blocks
    kv = torch.randn(num_blocks, block_size, dl + dr, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)[: b * max_blocks].view(b, max_blocks)  # scattered blocks
    q = torch.randn(b, h, dl, generator=gen) * 0.2
    qp = torch.randn(b, h, dr, generator=gen) * 0.2
    return (q.to(dtype).to(DEV), qp.to(dtype).to(DEV), kv.to(dtype).to(DEV), perm.to(torch.int32).to(DEV),
            torch.tensor(seq_lens, dtype=torch.int32, device=DEV))


@pytest.mark.parametrize("seq_lens,h,block_size,dtype,splits,block_h", [
    ([1, 37, 0, 70], 4, 16, torch.float32, None, 16),     # H below the head tile; a padding row (seq_len 0)
    ([100, 5], 20, 8, torch.float32, 3, 16),             # two head tiles, the second partly masked
    ([64, 129, 3], 32, 16, torch.bfloat16, 5, 32),       # more splits than some sequences have chunks
    ([50], 16, 64, torch.bfloat16, 1, 16),               # one split: no merge across chunks
])
def test_mla_decode(seq_lens, h, block_size, dtype, splits, block_h):
    dl, dr = 64, 16
    q, qp, kv, bt, sl = _case(seq_lens, h, dl, dr, block_size, dtype, seed=sum(seq_lens) + h)
    scale = (dl + dr) ** -0.5 * 1.7
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEV)
    mla_decode(q, qp, kv, bt, sl, scale, out=out, num_splits=splits, block_h=block_h, block_n=16)
    ref = mla_decode_ref(q, qp, kv, bt, sl, scale)
    tol = 1e-4 if dtype == torch.float32 and DEV == "cpu" else 2e-2    # CUDA fp32 dots use tf32
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    for i, n in enumerate(seq_lens):
        if n == 0:
            assert torch.equal(out[i].float(), torch.zeros_like(out[i].float()))


def test_mla_decode_real_widths_small_batch():
    """DeepSeek-V3's 512 + 64 latent, one sequence spanning several splits."""
    q, qp, kv, bt, sl = _case([45], 16, 512, 64, 16, torch.bfloat16, seed=5)
    scale = 192 ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)
    mla_decode(q, qp, kv, bt, sl, scale, out=out, num_splits=2, block_n=16)
    torch.testing.assert_close(out.float(), mla_decode_ref(q, qp, kv, bt, sl, scale).float(), rtol=2e-2, atol=2e-2)


def test_reference_matches_unabsorbed_attention():
    """The reference is attention with K = [c, k_pe] and V = c, written out directly."""
    q, qp, kv, bt, sl = (t.cpu() for t in _case([9, 4], 3, 32, 16, 4, torch.float64, seed=9))
    scale = 0.3
    ref = mla_decode_ref(q, qp, kv, bt, sl, scale)
    for b, n in enumerate(sl.tolist()):
        rows = torch.stack([kv[bt[b, j // 4], j % 4] for j in range(n)])
        k, v = rows, rows[:, :32]
        w = torch.softmax(torch.cat([q[b], qp[b]], -1) @ k.t() * scale, -1)
        torch.testing.assert_close(ref[b], w @ v, rtol=1e-5, atol=1e-6)     # the reference computes in fp32


def test_default_splits():
    assert default_num_splits(1, 128, 8192) == 33            # 8 head tiles: ~2 waves of 132 SMs
    assert default_num_splits(64, 128, 8192) == 1
    assert default_num_splits(1, 16, 40) == 2                 # never more chunks than the context has


def test_bad_input():
    q, qp, kv, bt, sl = _case([3], 16, 64, 16, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="kv_cache must be"):
        mla_decode(q, qp, kv[..., :70], bt, sl, 1.0)
    with pytest.raises(ValueError, match="block_tables must be"):
        mla_decode(q, qp, kv, bt[:, None], sl, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        mla_decode(q[..., :48], qp, kv[..., :64], bt, sl, 1.0)

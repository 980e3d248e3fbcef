"""Paged attention kernels (decode, prefill, KV write) against their torch references, and the Triton
backend against the torch backend on one cache (Triton's interpreter on CPU, compiled on CUDA).

Shapes are tiny: H=4 query heads over Hk=2 KV heads, D=64, block size 16, contexts up to ~70 tokens
spread over shuffled blocks; block-table entries past a sequence's end point at blocks that do not
exist, so reading them would fail.
"""

import pytest
import torch

from finback.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

from finback.kernels.attention import (  # noqa: E402
    decode_workspace,
    paged_decode,
    paged_decode_ref,
    paged_prefill,
    paged_prefill_ref,
    write_kv,
    write_kv_ref,
)
from finback.layers.attention import Attention, AttentionMetadata, TorchAttentionBackend  # noqa: E402
from finback.layers.triton_attention import TritonAttentionBackend  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
H, HK, D, BS, NB = 4, 2, 64, 16, 24
SCALE = D ** -0.5
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2}}


def _cache(gen, dtype):
    k = torch.randn(NB, BS, HK, D, generator=gen).to(dtype).to(DEV)
    v = torch.randn(NB, BS, HK, D, generator=gen).to(dtype).to(DEV)
    return k, v


def _tables(gen, lens, width=6):
    """int32 [B, width]: distinct shuffled blocks for each sequence's tokens, 10_000+ (no such block)
    after them."""
    perm = torch.randperm(NB, generator=gen).tolist()
    rows = []
    for n in lens:
        used = -(-n // BS)
        rows.append([perm.pop() for _ in range(used)] + [10_000 + j for j in range(width - used)])
    return torch.tensor(rows, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_skips_padding(dtype):
    gen = torch.Generator().manual_seed(0)
    kc, vc = _cache(gen, dtype)
    k = torch.randn(6, HK, D, generator=gen).to(dtype).to(DEV)
    v = torch.randn(6, HK, D, generator=gen).to(dtype).to(DEV)
    slots = torch.tensor([3, -1, 17, NB * BS - 1, -1, 40], device=DEV)
    want_k, want_v = kc.clone(), vc.clone()
    write_kv_ref(k, v, want_k, want_v, slots)
    write_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    # the cache as one [2, ...] tensor (the layer's layout): halves are strided views
    kv = torch.stack([kc, vc])
    k2 = torch.randn(6, HK, D, generator=gen).to(dtype).to(DEV)
    write_kv(k2, k2, kv[0], kv[1], slots)
    write_kv_ref(k2, k2, want_k, want_v, slots)
    assert torch.equal(kv[0], want_k) and torch.equal(kv[1], want_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,splits", [([70, 1, 0], 1), ([70, 1, 0], 3), ([33, 64, 17], 4), ([5], 8)])
def test_paged_decode(dtype, lens, splits):
    gen = torch.Generator().manual_seed(sum(lens) + splits)
    kc, vc = _cache(gen, dtype)
    tables = _tables(gen, lens)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(len(lens), H, D, generator=gen).to(dtype).to(DEV)
    out = torch.full_like(q, float("nan"))
    paged_decode(q, kc, vc, tables, seq_lens, SCALE, out, num_splits=splits, block_n=16)
    want = paged_decode_ref(q, kc, vc, tables, seq_lens, SCALE)
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))   # padding row: zeros, not NaN


def test_paged_decode_reuses_its_workspace():
    """The same launch (shapes, splits, workspace) with new lengths: what a CUDA graph replay does."""
    gen = torch.Generator().manual_seed(5)
    kc, vc = _cache(gen, torch.float32)
    tables = _tables(gen, [70, 70])
    ws = decode_workspace(2, H, D, 3, DEV)
    q = torch.randn(2, H, D, generator=gen).to(DEV)
    out = torch.empty_like(q)
    seq_lens = torch.empty(2, dtype=torch.int32, device=DEV)
    for lens in ([70, 2], [0, 49]):
        seq_lens.copy_(torch.tensor(lens))
        out.fill_(float("nan"))
        paged_decode(q, kc, vc, tables, seq_lens, SCALE, out, num_splits=3, workspace=ws)
        torch.testing.assert_close(out, paged_decode_ref(q, kc, vc, tables, seq_lens, SCALE), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_m", [16, 64])
def test_paged_prefill(dtype, block_m):
    # a chunk after a cached prefix, a fresh prompt spanning tiles, a one-token chunk
    ctx, new = [30, 0, 20], [5, 37, 1]
    lens = [c + n for c, n in zip(ctx, new)]
    gen = torch.Generator().manual_seed(block_m)
    kc, vc = _cache(gen, dtype)
    tables = _tables(gen, lens)
    qsl = torch.tensor([0, 5, 42, 43], dtype=torch.int32, device=DEV)
    q = torch.randn(43, H, D, generator=gen).to(dtype).to(DEV)
    out = torch.full_like(q, float("nan"))
    args = (kc, vc, tables, qsl, torch.tensor(lens, dtype=torch.int32, device=DEV),
            torch.tensor(ctx, dtype=torch.int32, device=DEV), SCALE)
    paged_prefill(q, *args, out=out, block_m=block_m, block_n=16)
    torch.testing.assert_close(out.float(), paged_prefill_ref(q, *args).float(), **TOL[dtype])


def test_kernels_reject_bad_input():
    kc = torch.zeros(NB, BS, HK, D, device=DEV)
    tables = torch.zeros(2, 3, dtype=torch.int32, device=DEV)
    q = torch.zeros(2, H, D, device=DEV)
    lens = torch.ones(2, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        paged_decode(q, kc, kc, tables, lens.long(), SCALE)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_decode(torch.zeros(2, 3, D, device=DEV), kc, kc, tables, lens, SCALE)
    with pytest.raises(ValueError, match="share a dtype"):
        paged_decode(q.double(), kc, kc, tables, lens, SCALE)
    with pytest.raises(ValueError, match="block_tables must be"):
        paged_decode(q, kc, kc, tables.long(), lens, SCALE)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill(q, kc, kc, tables, lens, lens, lens, SCALE)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(q[:, :HK], q[:, :HK], kc, kc, torch.zeros(3, dtype=torch.long, device=DEV))


# ---------------------------------------------------------------- the backend


def _layer(dtype):
    layer = Attention(H, HK, D, SCALE)
    layer.kv_cache = torch.randn(2, NB, BS, HK, D).to(dtype).to(DEV)
    return layer


def _meta(backend, ctx, new, tables):
    slots = [tables[i][p // BS] * BS + p % BS for i in range(len(ctx)) for p in range(ctx[i], ctx[i] + new[i])]
    return AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=DEV), query_lens=new,
                             context_lens=ctx, block_tables=tables, block_size=BS, backend=backend)


@pytest.mark.parametrize("dtype,ctx,new", [
    # decodes, a prefill chunk over a cached prefix, a one-token prompt, a fresh prompt (the caches
    # start with random contents, so every cached prefix is "written")
    (torch.float32, [40, 18, 0, 65, 0], [1, 21, 1, 1, 9]),
    (torch.bfloat16, [40, 18, 0, 65, 0], [1, 21, 1, 1, 9]),
    (torch.float32, [40, 70, 3], [1, 1, 1]),            # decodes only: no gather
    (torch.float32, [0, 33], [17, 30]),                 # prefills only: no gather
])
def test_backend_matches_torch(dtype, ctx, new):
    gen = torch.Generator().manual_seed(7)
    perm = torch.randperm(NB, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(-(-(c + n) // BS))] for c, n in zip(ctx, new)]
    t = sum(new)
    q = torch.randn(t, H, D, generator=gen).to(dtype).to(DEV)
    k = torch.randn(t, HK, D, generator=gen).to(dtype).to(DEV)
    v = torch.randn(t, HK, D, generator=gen).to(dtype).to(DEV)
    outs, caches = [], []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        layer = _layer(dtype)
        torch.manual_seed(0)
        layer.kv_cache.copy_(torch.randn(layer.kv_cache.shape).to(dtype))
        meta = _meta(backend, ctx, new, tables)
        backend.prepare(meta, torch.device(DEV))
        outs.append(backend.forward(layer, q, k, v, meta))
        caches.append(layer.kv_cache)
    assert torch.equal(caches[0], caches[1])
    torch.testing.assert_close(outs[1].float(), outs[0].float(), **TOL[dtype])


def test_static_decode_buffers_pad_and_refill():
    backend = TritonAttentionBackend()
    bufs = backend.alloc_static(max_num_seqs=4, max_blocks_per_seq=6, device=torch.device(DEV))
    ptrs = {k: b.data_ptr() for k, b in bufs.items() if torch.is_tensor(b)}
    gen = torch.Generator().manual_seed(8)
    for ctx in ([30, 64], [5, 17, 50], [3]):      # three steps through the same buffers (both stagings), bucket of 4
        new = [1] * len(ctx)
        perm = torch.randperm(NB, generator=gen).tolist()
        tables = [[perm.pop() for _ in range(-(-(c + 1) // BS))] for c in ctx]
        q = torch.randn(4, H, D, generator=gen).to(DEV)
        k = torch.randn(4, HK, D, generator=gen).to(DEV)
        v = torch.randn(4, HK, D, generator=gen).to(DEV)
        layer = _layer(torch.float32)
        before = layer.kv_cache.clone()
        meta = _meta(backend, ctx, new, tables)
        backend.prepare_static(meta, bufs, batch_size=4)
        assert meta.slot_mapping.shape == (4,) and meta.slot_mapping[len(ctx):].eq(-1).all()
        out = backend.forward(layer, q, k, v, meta)
        ref_layer = _layer(torch.float32)
        ref_layer.kv_cache.copy_(before)
        ref_meta = _meta(TorchAttentionBackend(), ctx, new, tables)
        ref_meta.backend.prepare(ref_meta, torch.device(DEV))
        n = len(ctx)
        want = ref_meta.backend.forward(ref_layer, q[:n], k[:n], v[:n], ref_meta)
        assert torch.equal(layer.kv_cache, ref_layer.kv_cache)   # padding rows stored nothing
        torch.testing.assert_close(out[:n], want, **TOL[torch.float32])
        assert torch.equal(out[n:], torch.zeros_like(out[n:]))
    assert ptrs == {k: b.data_ptr() for k, b in bufs.items() if torch.is_tensor(b)}
    with pytest.raises(ValueError, match="decode-only"):
        backend.prepare_static(_meta(backend, [3], [2], [[0]]), bufs, batch_size=4)
    with pytest.raises(ValueError, match="bucket"):
        backend.prepare_static(_meta(backend, [3] * 3, [1] * 3, [[0]] * 3), bufs, batch_size=2)

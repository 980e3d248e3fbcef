"""Paged attention kernels for the GPU path: decode (flash-decoding), prefill (causal, over a cached
prefix) and the KV-cache write, each with the torch reference it is tested against.

The cache is finback's: per layer k_cache / v_cache of shape [num_blocks, block_size, Hk, D] (the two
halves of the layer's [2, ...] tensor); a sequence's tokens live in the blocks its row of
`block_tables` lists, in order. Grouped-query attention: query head h reads KV head h // (H // Hk).

- `paged_decode`: one query per sequence. One program handles all G = H / Hk query heads of one KV
  head over one split of the sequence, so every K/V tile is read once per group; partial
  (max, sum, acc) per split go to a scratch buffer and a second kernel reduces them. The grid and
  the split count depend only on shapes: how much of the sequence a split covers is computed on the
  device from `seq_lens`, so the call can be captured in a CUDA graph and replayed with new lengths.
  A row with seq_len 0 (batch padding) gets zeros.
- `paged_prefill`: the new tokens of each sequence attend causally to the whole sequence (cached
  prefix + the new tokens, which must already be in the cache); flash-attention tiling with online
  softmax, one program per (query tile, sequence, head).
- `write_kv`: stores new K/V at their flat slots (block * block_size + offset); slot -1 is a padding
  token and is skipped, which is what a padded CUDA-graph batch needs (a torch index_copy cannot skip).

Softmax runs in float32 in the exp2 domain (scores pre-multiplied by scale * log2(e)).
"""

from __future__ import annotations

import torch

from finback.kernels import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- torch references

def _gather_seq(k_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from a paged cache -> [length, Hk, D]."""
    bs = k_cache.shape[1]
    nblocks = -(-length // bs)
    return k_cache[block_table[:nblocks].long()].flatten(0, 1)[:length]


def _attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, qpos: torch.Tensor) -> torch.Tensor:
    """q [n, H, D] at absolute positions qpos over k/v [L, Hk, D] (causal) -> [n, H, D], float32 math."""
    g = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(g, dim=1)
    v = v.float().repeat_interleave(g, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    keep = torch.arange(k.shape[0], device=q.device)[None, :] <= qpos[:, None]
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)


def paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, out=None):
    """Reference for `paged_decode` (q [B, H, D] -> [B, H, D]; seq_len 0 -> zeros)."""
    out = torch.empty_like(q) if out is None else out
    for b, n in enumerate(seq_lens.tolist()):
        if n == 0:
            out[b] = 0
            continue
        k = _gather_seq(k_cache, block_tables[b], n)
        v = _gather_seq(v_cache, block_tables[b], n)
        out[b] = _attend_ref(q[b:b + 1], k, v, scale, torch.tensor([n - 1], device=q.device))[0]
    return out


def paged_prefill_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, context_lens, scale, out=None):
    """Reference for `paged_prefill` (q [T, H, D] -> [T, H, D])."""
    out = torch.empty_like(q) if out is None else out
    qsl = query_start_loc.tolist()
    for b, (n, ctx) in enumerate(zip(seq_lens.tolist(), context_lens.tolist())):
        s, e = qsl[b], qsl[b + 1]
        if e == s:
            continue
        k = _gather_seq(k_cache, block_tables[b], n)
        v = _gather_seq(v_cache, block_tables[b], n)
        out[s:e] = _attend_ref(q[s:e], k, v, scale, torch.arange(ctx, ctx + e - s, device=q.device))
    return out


def write_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Reference for `write_kv`: index_copy of the tokens whose slot is not -1."""
    nb, bs, hk, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(nb * bs, hk, d).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(nb * bs, hk, d).index_copy_(0, slots, v[keep].to(v_cache.dtype))


# ----------------------------------------------------------------------------- checks

def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [num_blocks, block_size, Hk, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"q ({q.dtype}) and the caches ({k_cache.dtype}, {v_cache.dtype}) must share a dtype")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous in the head dimension")
    h, d = q.shape[-2:]
    hk = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"head_dim of q ({d}) and of the cache ({k_cache.shape[3]}) differ")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim {d} is not supported (a power of two >= 16)")
    if h % hk:
        raise ValueError(f"{h} query heads are not a multiple of {hk} KV heads")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2:
        raise ValueError("block_tables must be a 2-D int32 tensor")
    if not (q.device == k_cache.device == v_cache.device == block_tables.device):
        raise ValueError("q, caches and block_tables must be on one device")


def _int32(name: str, t: torch.Tensor, n: int) -> None:
    if t.dtype != torch.int32 or t.shape != (n,):
        raise ValueError(f"{name} must be int32 of shape ({n},), got {t.dtype} {tuple(t.shape)}")


# ----------------------------------------------------------------------------- decode

if HAS_TRITON:

    @triton.jit
    def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
        # Triton's CPU interpreter multiplies bf16/fp16 operands wrongly (it matmuls their raw bits),
        # so under the interpreter the operands go up to float32 first; compiled code uses them as is.
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision=PREC)
        return out

    @triton.jit
    def _decode_split_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, m_ptr, l_ptr, acc_ptr, scale_log2,
                             stride_qb, stride_qh, stride_kb, stride_kt, stride_kh,
                             stride_vb, stride_vt, stride_vh, stride_bt,
                             NUM_HEADS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                             BS: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                             PREC: tl.constexpr, UPCAST: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b)
        n_tiles = tl.cdiv(seq_len, BLOCK_N)
        per_split = tl.cdiv(n_tiles, NUM_SPLITS)
        t0 = split * per_split
        t1 = tl.minimum(t0 + per_split, n_tiles)

        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        heads = kvh * G + offs_g
        gmask = offs_g < G
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=gmask[:, None], other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for t in range(t0, t1):
            pos = t * BLOCK_N + offs_n
            valid = pos < seq_len
            page = tl.load(bt_ptr + b * stride_bt + pos // BS, mask=valid, other=0).to(tl.int64)
            within = (pos % BS).to(tl.int64)
            k = tl.load(k_ptr + (page * stride_kb + within * stride_kt + kvh * stride_kh)[:, None] + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + (page * stride_vb + within * stride_vt + kvh * stride_vh)[:, None] + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
            m_i = m_new
        row = (b * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(m_ptr + row, m_i, mask=gmask)
        tl.store(l_ptr + row, l_i, mask=gmask)
        tl.store(acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])

    @triton.jit
    def _decode_reduce_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, stride_oh,
                              NUM_HEADS: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                              S_PAD: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D)
        smask = offs_s < NUM_SPLITS
        row = (b * NUM_HEADS + h) * NUM_SPLITS + offs_s
        m = tl.load(m_ptr + row, mask=smask, other=float("-inf"))
        l = tl.load(l_ptr + row, mask=smask, other=0.0)
        m_max = tl.max(m, 0)
        m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # seq_len 0: every split is empty
        w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)  # empty splits weigh 0
        total = tl.sum(l * w, 0)
        acc = tl.load(acc_ptr + row[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], 0)
        o = tl.where(total > 0, o / tl.where(total > 0, total, 1.0), 0.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


def default_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132,
                       block_n: int = 64) -> int:
    """Splits per sequence so that batch * Hk * splits programs fill the GPU about twice, without
    splits shorter than one tile of the longest sequence. A function of shapes only (graph-safe)."""
    want = max(1, -(-2 * num_sms // max(1, batch * num_kv_heads)))
    return max(1, min(want, -(-max_seq_len // block_n), 64))


def decode_workspace(batch: int, num_heads: int, head_dim: int, num_splits: int, device) -> tuple[torch.Tensor, ...]:
    """Scratch for `paged_decode`: per (row, head, split) the running max, sum and accumulator."""
    m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device)
    return m, torch.empty_like(m), torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32,
                                               device=device)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None, num_splits: int = 4,
                 workspace: tuple[torch.Tensor, ...] | None = None, block_n: int = 64,
                 num_warps: int = 4) -> torch.Tensor:
    """Attention of one query per sequence over its paged context. q [B, H, D]; block_tables int32
    [B, max_blocks]; seq_lens int32 [B] on the device (tokens in the cache, this step's included).
    Returns `out` [B, H, D]. `workspace` (from `decode_workspace`) may be passed to avoid allocating."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got {tuple(q.shape)}")
    _check_cache(q, k_cache, v_cache, block_tables)
    bsz, h, d = q.shape
    hk, bs = k_cache.shape[2], k_cache.shape[1]
    _int32("seq_lens", seq_lens, bsz)
    if block_tables.shape[0] != bsz:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for a batch of {bsz}")
    if num_splits < 1:
        raise ValueError("num_splits must be >= 1")
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError("out must have q's shape and be contiguous in the head dimension")
    if bsz == 0:
        return out
    m, l, acc = workspace if workspace is not None else decode_workspace(bsz, h, d, num_splits, q.device)
    if acc.shape != (bsz, h, num_splits, d) or not acc.is_contiguous():
        raise ValueError(f"workspace is for {tuple(acc.shape)}, need ({bsz}, {h}, {num_splits}, {d})")
    g = h // hk
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(bsz, hk, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, m, l, acc, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=h, G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, BS=bs, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, PREC=prec, UPCAST=interpreting(), num_warps=num_warps)
    _decode_reduce_kernel[(bsz, h)](m, l, acc, out, out.stride(0), out.stride(1), NUM_HEADS=h, D=d,
                                    NUM_SPLITS=num_splits, S_PAD=triton.next_power_of_2(num_splits),
                                    num_warps=4)
    return out


# ----------------------------------------------------------------------------- prefill

if HAS_TRITON:

    @triton.jit
    def _prefill_tile(q, acc, m_i, l_i, kpos, end, qpos, b, kvh, k_ptr, v_ptr, bt_ptr, scale_log2,
                      stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
                      D: tl.constexpr, BS: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
                      UPCAST: tl.constexpr):
        """One key tile of the online softmax; MASKED: the tile crosses the causal diagonal or the end."""
        offs_d = tl.arange(0, D)
        kvalid = kpos < end
        if MASKED:
            page = tl.load(bt_ptr + b * stride_bt + kpos // BS, mask=kvalid, other=0).to(tl.int64)
        else:
            page = tl.load(bt_ptr + b * stride_bt + kpos // BS).to(tl.int64)
        within = (kpos % BS).to(tl.int64)
        k_off = (page * stride_kb + within * stride_kt + kvh * stride_kh)[:, None] + offs_d[None, :]
        v_off = (page * stride_vb + within * stride_vt + kvh * stride_vh)[:, None] + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptr + k_off, mask=kvalid[:, None], other=0.0)
            v = tl.load(v_ptr + v_off, mask=kvalid[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + k_off)
            v = tl.load(v_ptr + v_off)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * scale_log2
        if MASKED:
            s = tl.where(kvalid[None, :] & (kpos[None, :] <= qpos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every query
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        return acc, m_new, l_i

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, ctx_lens_ptr, scale_log2,
                        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh,
                        stride_vb, stride_vt, stride_vh, stride_bt,
                        G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        mt = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        if mt * BLOCK_M >= q_len:
            return
        ctx = tl.load(ctx_lens_ptr + b)
        seq_len = tl.load(seq_lens_ptr + b)
        kvh = h // G
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        mmask = offs_m < q_len
        tok = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=mmask[:, None], other=0.0)
        qpos = ctx + offs_m
        # keys this tile can see: up to the position of its last query (never past the sequence);
        # the whole tiles below the first query's position are visible to every query: no masks there
        end = tl.minimum(seq_len, ctx + tl.minimum((mt + 1) * BLOCK_M, q_len))
        full = (ctx + mt * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(0, full, BLOCK_N):
            acc, m_i, l_i = _prefill_tile(q, acc, m_i, l_i, n0 + offs_n, end, qpos, b, kvh, k_ptr, v_ptr, bt_ptr,
                                          scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                          stride_vh, stride_bt, D, BS, False, PREC, UPCAST)
        for n0 in range(full, end, BLOCK_N):
            acc, m_i, l_i = _prefill_tile(q, acc, m_i, l_i, n0 + offs_n, end, qpos, b, kvh, k_ptr, v_ptr, bt_ptr,
                                          scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                          stride_vh, stride_bt, D, BS, True, PREC, UPCAST)
        o = acc / l_i[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, context_lens: torch.Tensor, scale: float,
                  out: torch.Tensor | None = None, max_query_len: int | None = None,
                  block_m: int = 64, block_n: int = 64, num_warps: int | None = None,
                  num_stages: int = 2) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (rows query_start_loc[b]:query_start_loc[b+1] of
    q [T, H, D]) over its whole context in the cache (context_lens[b] cached + the new tokens, already
    written; seq_lens[b] = their sum). int32 index tensors on q's device. Returns `out` [T, H, D].
    `max_query_len` sizes the grid; without it it is read from query_start_loc (a device sync)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H, D], got {tuple(q.shape)}")
    _check_cache(q, k_cache, v_cache, block_tables)
    bsz = block_tables.shape[0]
    _int32("query_start_loc", query_start_loc, bsz + 1)
    _int32("seq_lens", seq_lens, bsz)
    _int32("context_lens", context_lens, bsz)
    t, h, d = q.shape
    hk, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError("out must have q's shape and be contiguous in the head dimension")
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if bsz else 0
    if t == 0 or bsz == 0 or max_query_len == 0:
        return out
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(max_query_len, block_m), bsz, h)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, context_lens, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        G=h // hk, D=d, BS=bs, BLOCK_M=block_m, BLOCK_N=block_n, PREC=prec, UPCAST=interpreting(),
        num_warps=num_warps or (4 if d <= 64 else 8), num_stages=num_stages)
    return out


# ----------------------------------------------------------------------------- KV write

if HAS_TRITON:

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_cb, stride_ct, stride_ch, stride_db, stride_dt, stride_dh,
                         HK: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, HD_PAD: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t)
        if slot < 0:
            return
        blk = slot // BS
        off = slot % BS
        offs = tl.arange(0, HD_PAD)
        head = offs // D
        dim = offs % D
        mask = offs < HK * D
        k = tl.load(k_ptr + t * stride_kt + head * stride_kh + dim, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + head * stride_vh + dim, mask=mask)
        tl.store(kc_ptr + blk * stride_cb + off * stride_ct + head * stride_ch + dim,
                 k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + blk * stride_db + off * stride_dt + head * stride_dh + dim,
                 v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k/v [T, Hk, D] at their flat slots (int64 [T]; -1 = padding, not stored). Graph-safe."""
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != k_cache.shape[2:] or k_cache.shape != v_cache.shape:
        raise ValueError(f"k/v {tuple(k.shape)}/{tuple(v.shape)} do not fit caches {tuple(k_cache.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if min(k.stride(-1), v.stride(-1), k_cache.stride(-1), v_cache.stride(-1)) != 1:
        raise ValueError("k, v and the caches must be contiguous in the head dimension")
    t, hk, d = k.shape
    if t == 0:
        return
    _write_kv_kernel[(t,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                           v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                           HK=hk, D=d, BS=k_cache.shape[1], HD_PAD=triton.next_power_of_2(hk * d), num_warps=4)


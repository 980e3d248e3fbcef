"""Tensor-core matmul on GGUF blocks for the types of Q4_K_M and Q8_0 files: x[M, K] @ W^T, M >= 5.

`finback.kernels.gguf._mm_kernel` decodes a weight tile through `_w_parts`, a broadcast over 4-5 small
axes flattened to [BN, BK]: its sm_90 main loop spends 13-45 instructions per weight (Q4_K 16 at
64 x 128, Q6_K 32-45, and spills at 128 x 64), which caps it far below the tensor cores. Here each
type is decoded the way its bytes lie, as 2-D [BN, 32] tiles of 32 consecutive values:

  Q4_K  per 64-value chunk c of a super-block, the 32 qs bytes 16 + 32c.. are one [BN, 32] uint8 load
        (16-byte vectors: 144-byte blocks keep rows 16-byte aligned); low nibbles are values
        64c + 0..31 (sub-block 2c), high nibbles 64c + 32..63 (2c + 1). w = (d sc) q - (dmin m).
  Q6_K  per 128-value half h: ql bytes 64h.. and 64h + 32.. and qh bytes 128 + 32h.. ([BN, 32] each,
        2-byte loads: 210-byte blocks are only 2-byte aligned); its four 32-value quarters p are
        (ql[32 (p % 2) + l] >> 4 (p // 2)) & 15 | ((qh[l] >> 2p) & 3) << 4, minus 32; int8 scales
        per 16 values. w = d sc (q - 32).
  Q8_0  per block: 32 int8 after the fp16 d (2-byte loads). w = d q.

Each [BN, 32] tile is scaled in fp32 (one FMA per weight), rounded to x's dtype and fed to tl.dot with
the matching [BM, 32] columns of x (bf16/fp16: tensor cores; fp32: input_precision="ieee").
SWAP puts the weight rows on the MMA's M side (tl.dot(w, x^T)): a 16-row x tile then wastes nothing
of the MMA for 5-16 rows of x. Programs that share a weight tile run next to each other (M tiles
fastest), so it comes from DRAM once and from L2 for the others. Split K and its deterministic sum
are `gguf._store`'s.

Reference: `gguf.gguf_matmul_ref` (dequantize, then a float32 matmul); the kernel differs by rounding
the dequantized weight to x's dtype (none for fp32 x) and the accumulation order.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from finback.kernels import HAS_TRITON, interpreting
from finback.kernels.gguf import _check, _plan_split, _require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from finback.kernels.gguf import _Q4_K, _Q6_K, _Q8_0, _float, _mm_pids, _store

T = GGMLQuantizationType

# type -> (values per loop step (Q8_0: at most; K decides), bytes per block, values per block)
_STEP: dict[GGMLQuantizationType, tuple[int, int, int]] = {
    T.Q4_K: (256, 144, 256), T.Q6_K: (128, 210, 256), T.Q8_0: (128, 34, 32),
}
MMA_TYPES: frozenset[GGMLQuantizationType] = frozenset(_STEP)


def mma_takes(data: torch.Tensor, qtype) -> bool:
    """Whether gguf_mma takes these blocks: its types, rows aligned as its loads need (Q4_K's int32 words:
    4 bytes; Q6_K's and Q8_0's int16 pairs: 2)."""
    qt = GGMLQuantizationType(int(qtype))
    if qt not in MMA_TYPES:
        return False
    a = 4 if qt == T.Q4_K else 2
    return data.data_ptr() % a == 0 and (data.shape[0] <= 1 or data.stride(0) % a == 0)


if HAS_TRITON:
    @triton.jit
    def _dot(acc, w, x_rows, rm_ok, kk, xdt, SWAP: tl.constexpr, PREC: tl.constexpr, WIDEN: tl.constexpr):
        """acc += x[:, kk] @ w^T for the 32 columns kk (w [BN, 32] fp32, rounded to x's dtype first)."""
        x = tl.load(x_rows + kk[None, :], mask=rm_ok[:, None], other=0.0)
        if WIDEN:  # the interpreter's tl.dot mishandles 16-bit tiles
            x = x.to(tl.float32)
            wt = w
        else:
            wt = w.to(xdt)
        if SWAP:
            return tl.dot(wt, tl.trans(x), acc, input_precision=PREC)
        else:
            return tl.dot(x, tl.trans(wt), acc, input_precision=PREC)

    @triton.jit
    def _blocks_at(row_off, k, BLOCK_VALUES: tl.constexpr, BLOCK_BYTES: tl.constexpr, ALIGN: tl.constexpr):
        """Byte offsets [BN] of the block holding value k in each row (row_off [BN]: the rows' offsets)."""
        return tl.multiple_of(row_off + (k // BLOCK_VALUES) * BLOCK_BYTES, ALIGN)

    @triton.jit
    def _q4k_fetch(w_ptr, h_ptr, w32_ptr, base, l32):
        """The loads of one Q4_K super-block of BN rows (base [BN] byte offsets): d, dmin, the 12 scale bytes
        as three int32 words, and the 128 qs bytes as four [BN, 32] runs (uint8, 16-byte vectors)."""
        d = tl.load(h_ptr + base // 2)
        dmin = tl.load(h_ptr + base // 2 + 1)
        sw0 = tl.load(w32_ptr + base // 4 + 1)  # scale bytes 0-3: sc[0..3] (+ high bits of sc[4..7])
        sw1 = tl.load(w32_ptr + base // 4 + 2)  # bytes 4-7: m[0..3] (+ high bits of m[4..7])
        sw2 = tl.load(w32_ptr + base // 4 + 3)  # bytes 8-11: low nibbles sc[4..7], high m[4..7]
        q0 = tl.load(w_ptr + (base + 16)[:, None] + l32[None, :])
        q1 = tl.load(w_ptr + (base + 48)[:, None] + l32[None, :])
        q2 = tl.load(w_ptr + (base + 80)[:, None] + l32[None, :])
        q3 = tl.load(w_ptr + (base + 112)[:, None] + l32[None, :])
        return d, dmin, sw0, sw1, sw2, q0, q1, q2, q3

    @triton.jit
    def _q4k_use(acc, blk, x_rows, rm_ok, k0, l32, xdt, SWAP: tl.constexpr, PREC: tl.constexpr,
                 WIDEN: tl.constexpr):
        """acc += the super-block `blk` (from _q4k_fetch) times x's columns k0..k0+255: per 64-value chunk c
        the low nibbles are sub-block 2c, the high 2c + 1; w = (d sc) q - (dmin m), 6-bit sc and m."""
        d, dmin, sw0, sw1, sw2, q0, q1, q2, q3 = blk
        d = d.to(tl.float32)
        dmin = dmin.to(tl.float32)
        for c in tl.static_range(4):
            if c == 0:
                q = q0.to(tl.int32)
            elif c == 1:
                q = q1.to(tl.int32)
            elif c == 2:
                q = q2.to(tl.int32)
            else:
                q = q3.to(tl.int32)
            for t in tl.static_range(2):
                if c < 2:  # sub-block 2c + t < 4
                    sc = (sw0 >> (16 * c + 8 * t)) & 63
                    mn = (sw1 >> (16 * c + 8 * t)) & 63
                else:
                    sh = 16 * (c - 2) + 8 * t
                    sc = ((sw2 >> sh) & 15) | (((sw0 >> (sh + 6)) & 3) << 4)
                    mn = ((sw2 >> (sh + 4)) & 15) | (((sw1 >> (sh + 6)) & 3) << 4)
                w = _float((q >> (4 * t)) & 15, 0.0) * (d * _float(sc, 0.0))[:, None] - (dmin * _float(mn, 0.0))[:, None]
                acc = _dot(acc, w, x_rows, rm_ok, k0 + 64 * c + 32 * t + l32, xdt, SWAP, PREC, WIDEN)
        return acc

    @triton.jit
    def _mma_kernel(x_ptr, w_ptr, h_ptr, h16_ptr, w32_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_w, stride_ym, k_split,
                    QT: tl.constexpr, STEP: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_VALUES: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr,
                    PREC: tl.constexpr, WIDEN: tl.constexpr, ALIGN: tl.constexpr, PREFETCH: tl.constexpr):
        pid, pid_k, pid_m, pid_n = _mm_pids(M, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        row_off = tl.multiple_of(tl.minimum(rn, N - 1).to(tl.int64) * stride_w, ALIGN)  # rows past N re-read N-1
        rm = pid_m * BM + tl.arange(0, BM)
        rm_ok = rm < M
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        l32 = tl.arange(0, 32)
        l16 = tl.arange(0, 16)
        hi16 = (l32 >= 16)[None, :]
        xdt = x_ptr.dtype.element_ty
        if SWAP:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        if QT == _Q4_K and PREFETCH:
            cur = _q4k_fetch(w_ptr, h_ptr, w32_ptr, _blocks_at(row_off, k_lo, BLOCK_VALUES, BLOCK_BYTES, ALIGN), l32)
        for k0 in range(k_lo, k_hi, STEP):
            base = _blocks_at(row_off, k0, BLOCK_VALUES, BLOCK_BYTES, ALIGN)  # [BN] the step's (first) block
            if QT == _Q4_K:
                if PREFETCH:  # this step's blocks were loaded during the last one; load the next step's now
                    k_next = tl.minimum(k0 + STEP, k_hi - STEP)  # the last step re-loads itself (unused)
                    nxt = _q4k_fetch(w_ptr, h_ptr, w32_ptr, _blocks_at(row_off, k_next, BLOCK_VALUES, BLOCK_BYTES, ALIGN),
                                     l32)
                    acc = _q4k_use(acc, cur, x_rows, rm_ok, k0, l32, xdt, SWAP, PREC, WIDEN)
                    cur = nxt
                else:
                    acc = _q4k_use(acc, _q4k_fetch(w_ptr, h_ptr, w32_ptr, base, l32), x_rows, rm_ok, k0, l32, xdt,
                                   SWAP, PREC, WIDEN)
            elif QT == _Q6_K:
                # int16 loads (2-byte aligned blocks): each holds bytes 2e, 2e + 1 of a 32-byte run
                hf = (k0 // 128) % 2
                hb = base // 2
                qa = tl.load(h16_ptr + (hb + 32 * hf)[:, None] + l16[None, :]).to(tl.int32)
                qb = tl.load(h16_ptr + (hb + 32 * hf + 16)[:, None] + l16[None, :]).to(tl.int32)
                qh = tl.load(h16_ptr + (hb + 64 + 16 * hf)[:, None] + l16[None, :]).to(tl.int32)
                d = tl.load(h_ptr + hb + 104).to(tl.float32)
                for p in tl.static_range(4):
                    if p % 2 == 0:
                        lo = qa
                    else:
                        lo = qb
                    v = ((lo >> (4 * (p // 2))) & 0x0F0F) | (((qh >> (2 * p)) & 0x0303) << 4)  # two 6-bit quants
                    q = tl.reshape(tl.join(_float(v & 255, 32.0), _float((v >> 8) & 255, 32.0)), (BN, 32))
                    sa = tl.load(w_ptr + base + 192 + 8 * hf + 2 * p).to(tl.int32)
                    sb = tl.load(w_ptr + base + 193 + 8 * hf + 2 * p).to(tl.int32)
                    sa = (sa - ((sa >> 7) << 8)).to(tl.float32) * d  # int8
                    sb = (sb - ((sb >> 7) << 8)).to(tl.float32) * d
                    w = q * tl.where(hi16, sb[:, None], sa[:, None])
                    acc = _dot(acc, w, x_rows, rm_ok, k0 + 32 * p + l32, xdt, SWAP, PREC, WIDEN)
            else:
                tl.static_assert(QT == _Q8_0, "gguf_mma takes Q4_K, Q6_K and Q8_0")
                for b in tl.static_range(STEP // 32):  # STEP // 32 blocks of 34 bytes
                    hb = base // 2 + 17 * b
                    v = tl.load(h16_ptr + (hb + 1)[:, None] + l16[None, :]).to(tl.int32) ^ 0x8080  # int8 + 128
                    q = tl.reshape(tl.join(_float(v & 255, 128.0), _float((v >> 8) & 255, 128.0)), (BN, 32))
                    d = tl.load(h_ptr + hb).to(tl.float32)
                    acc = _dot(acc, q * d[:, None], x_rows, rm_ok, k0 + 32 * b + l32, xdt, SWAP, PREC, WIDEN)
        if SWAP:
            acc = tl.trans(acc)
        _store(acc, y_ptr, ws_ptr, lock_ptr, pid, pid_k, rm, rn, M, N, stride_ym, SPLIT)


def gguf_mma(x: torch.Tensor, data: torch.Tensor, qtype, k: int, out: torch.Tensor | None = None, *,
             block_m: int | None = None, block_n: int | None = None, swap: bool | None = None,
             split_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
             prefetch: bool | None = None) -> torch.Tensor:
    """y = x @ W^T (x [M, K] float, W as GGUF blocks `data`, uint8 [N, K/QK*block_bytes], rows may be a
    strided view) for W in Q4_K, Q6_K or Q8_0, in x's dtype (into `out`, which may be a column slice).

    Defaults (tiles from an H100 sweep): Q4_K up to 16 rows of x a 16-row tile on the MMA's N side
    (swap) against 64 weight rows on 4 warps, up to 256 rows 32/64 of them (swap) against 128 weight rows
    on 8 warps with the register prefetch, above 128 x 256 tiles on 8 warps; Q6_K and Q8_0 16 x 64 tiles
    up to 16 rows, 32/64-row tiles (swap) against 64 weight rows up to 256, 128 x 128 above, on 4 warps.
    split_k: programs per output tile along K (default: enough for ~2 programs per SM when there are
    fewer tiles than SMs)."""
    _require_triton()
    qt, n = _check(x, data, qtype, k, out, types=MMA_TYPES)
    if not mma_takes(data, qt):
        raise ValueError(f"{qt.name} blocks at byte {data.data_ptr()} with row stride {data.stride(0)} are not "
                         f"aligned for gguf_mma (use finback.kernels.gguf.gguf_gemm)")
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    step, block_bytes, block_values = _STEP[qt]
    # defaults from bench/gguf_mma.py --sweep on an H100 (7B shapes, M = 8, 64, 512; bench/README.md)
    q4 = qt == T.Q4_K
    if block_m is None:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 256 else 128
    if swap is None:  # rows of x on the MMA's N side
        swap = (q4 or m > 16) and m <= 256
    if block_n is None:
        block_n = 256 if q4 and m > 256 else 128 if (q4 and m > 16) or m > 256 else 64
    if num_warps is None:
        num_warps = 8 if q4 and m > 16 else 4
    if num_stages is None:
        num_stages = 2 if q4 and (m <= 16 or m > 256) else 3
    if prefetch is None:  # Q4_K only: the next super-block's loads issued before this one's math
        prefetch = q4 and 16 < m <= 256
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if qt == T.Q8_0:  # 4 blocks a step where K allows (K is only a multiple of 32)
        step = 128 if k % 128 == 0 else 64 if k % 64 == 0 else 32
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k, k_split, ws, locks = _plan_split(out, k, step, tiles, split_k)
    align = 16 if data.data_ptr() % 16 == 0 and data.stride(0) % 16 == 0 and qt == T.Q4_K else 2
    widen = interpreting() and x.dtype != torch.float32
    _mma_kernel[(tiles, split_k)](
        x, data, data.view(torch.float16), data.view(torch.int16), data.view(torch.int32) if qt == T.Q4_K else data, out, ws, locks, m, n, k, x.stride(0), data.stride(0), out.stride(0),
        k_split, QT=int(qt), STEP=step, BLOCK_BYTES=block_bytes, BLOCK_VALUES=block_values, BM=block_m, BN=block_n,
        SWAP=swap, SPLIT=split_k > 1, PREC="ieee" if x.dtype == torch.float32 or widen else "tf32", WIDEN=widen,
        ALIGN=align, PREFETCH=bool(prefetch), num_warps=num_warps, num_stages=num_stages)
    return out


__all__ = ["MMA_TYPES", "gguf_mma", "mma_takes"]

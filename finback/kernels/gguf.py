"""Matmuls that read GGUF quantized blocks directly: y[M, N] = x[M, K] @ W^T, W never dequantized in
memory.

W [N, K] is kept as llama.cpp stores it: each row is K/QK blocks of the type's bytes (uint8
[N, K/QK*block_bytes], rows may be a strided view). A block splits into groups of GS values that share
one scale (and, for some types, one min): w = scale * q - min with q a small integer. Kernels take a
tile of whole groups, decode q, scale and min in registers, and never write W back.

- `gguf_gemv` (decode, M <= 16): split-K over a grid of (N / BN, splits) programs, each reading its
  weight bytes once and keeping every row of x's dot products in fp32: per group it sums q * x in
  fp32, then applies the group's scale and min once (sum(w x) = scale * sum(q x) - min * sum(x)).
  Splits write fp32 partials, summed in a fixed order (deterministic).
- `gguf_gemm` (prefill, large M): per (M tile, N tile) program, decodes a [BN, BK] weight tile into
  registers (w = scale * q - min, the same fp32 operations as the reference dequantization) and feeds
  it to tl.dot in x's dtype (bf16 on the GPU path; tensor cores), fp32 accumulation. Programs that
  share a weight tile run next to each other (the tile comes from L2 for all but the first); when
  there are too few output tiles to fill the GPU, K is split as in the GEMV.
- `gguf_matmul_ref`: `finback.loader.quants.dequantize` then a float32 torch matmul. It is the
  reference the kernels are tested against and the CPU path.

Integers are turned into floats by placing them in a float's mantissa (bits | 0x4B000000 is the
float 2**23 + q) and subtracting, which is exact and avoids slow int-to-float conversions. fp16
fields are read through a float16 view of the same bytes (every fp16 field sits at an even offset).

Block layouts are ggml-common.h's (the same offsets `finback/loader/quants.py` decodes):
  Q8_0  34 B / 32: d | qs int8[32]                        Q4_0 18 B / 32: d | qs[16] (lo: 0-15, hi: 16-31)
  Q4_1  20 B / 32: d | m | qs[16]                         Q5_0 22 B / 32: d | qh u32 | qs[16]
  Q5_1  24 B / 32: d | m | qh u32 | qs[16]
  Q2_K  84 B / 256: scales[16] (lo4 sc, hi4 m) | qs[64] | d | dmin             groups of 16
  Q3_K 110 B / 256: hmask[32] | qs[64] | scales[12] (6-bit, -32) | d            groups of 16
  Q4_K 144 B / 256: d | dmin | scales[12] (6-bit sc and m) | qs[128]            groups of 32
  Q5_K 176 B / 256: d | dmin | scales[12] | qh[32] | qs[128]                    groups of 32
  Q6_K 210 B / 256: ql[128] | qh[64] | scales int8[16] | d                      groups of 16
IQ types (i-quants) read their codebooks (finback/loader/iq_grids.py, passed as int8 bytes) with
gathers that stay in L1; each branch of `_tile` states its layout. IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS,
IQ3_S, IQ1_S, IQ1_M, IQ4_NL and IQ4_XS are taken.

Default tile sizes were picked from ptxas's register counts for sm_90 (no spills; GEMV ~50-100
registers, GEMM 64x64x32 on 4 warps and 128x64x32 on 8), not yet from timings: bench/gguf_kernels.py
--sweep times alternatives.
"""

from __future__ import annotations

import functools

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from finback.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

T = GGMLQuantizationType

# type -> (values per group sharing a scale, whether it has a min)
_GROUPS: dict[GGMLQuantizationType, tuple[int, bool]] = {
    T.Q8_0: (32, False), T.Q4_0: (32, False), T.Q4_1: (32, True), T.Q5_0: (32, False), T.Q5_1: (32, True),
    T.Q2_K: (16, True), T.Q3_K: (16, False), T.Q4_K: (32, True), T.Q5_K: (32, True), T.Q6_K: (16, False),
    T.IQ2_XXS: (32, False), T.IQ2_XS: (16, False), T.IQ2_S: (16, False), T.IQ3_XXS: (32, False),
    T.IQ3_S: (32, False), T.IQ1_S: (32, True), T.IQ1_M: (16, False), T.IQ4_NL: (32, False), T.IQ4_XS: (32, False),
}
KERNEL_TYPES: frozenset[GGMLQuantizationType] = frozenset(_GROUPS)

GEMV_MAX_M = 16


def _check(x: torch.Tensor, data: torch.Tensor, qtype, k: int, out: torch.Tensor | None,
           types=KERNEL_TYPES) -> tuple[GGMLQuantizationType, int]:
    """Validate a call; returns (qtype, N)."""
    try:
        qt = GGMLQuantizationType(int(qtype))
    except (ValueError, TypeError):
        raise ValueError(f"not a GGUF tensor type: {qtype!r}") from None
    if qt not in types:
        raise ValueError(f"no GGUF matmul for {qt.name} (supported: {', '.join(sorted(t.name for t in types))})")
    qk, bpb = GGML_QUANT_SIZES[qt]
    if k <= 0 or k % qk:
        raise ValueError(f"{qt.name}: K = {k} is not a positive multiple of its block size {qk}")
    if data.dtype != torch.uint8 or data.dim() != 2 or data.stride(1) != 1:
        raise ValueError(f"weight blocks must be a uint8 [N, bytes] tensor with contiguous rows, got "
                         f"{data.dtype} {tuple(data.shape)} strides {data.stride()}")
    if data.shape[1] != k // qk * bpb:
        raise ValueError(f"{qt.name} rows of K = {k} hold {k // qk * bpb} bytes, got {data.shape[1]}")
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be [M, {k}] with contiguous rows, got {tuple(x.shape)} strides {x.stride()}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if x.device != data.device:
        raise ValueError(f"x is on {x.device} but the weight blocks on {data.device}")
    n = data.shape[0]
    if out is not None and (tuple(out.shape) != (x.shape[0], n) or out.dtype != x.dtype
                            or out.device != x.device or (out.numel() and out.stride(1) != 1)):
        raise ValueError(f"out must be a {x.dtype} [{x.shape[0]}, {n}] tensor on {x.device} with contiguous "
                         f"rows, got {out.dtype} {tuple(out.shape)} on {out.device}")
    return qt, n


# ----------------------------------------------------------------------------- torch reference

def gguf_matmul_ref(x: torch.Tensor, data: torch.Tensor, qtype, k: int, out: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """x [M, K] @ dequantize(W)^T in float32, returned in x's dtype (into `out` if given)."""
    from finback.loader.quants import SUPPORTED_TYPES, dequantize

    qt, n = _check(x, data, qtype, k, out, types=SUPPORTED_TYPES)
    w = dequantize(data.contiguous().view(-1), qt, (n, k))
    y = x.float() @ w.T
    if out is None:
        return y.to(x.dtype)
    out.copy_(y)
    return out


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:
    _Q4_0 = tl.constexpr(int(T.Q4_0))
    _Q4_1 = tl.constexpr(int(T.Q4_1))
    _Q5_0 = tl.constexpr(int(T.Q5_0))
    _Q5_1 = tl.constexpr(int(T.Q5_1))
    _Q8_0 = tl.constexpr(int(T.Q8_0))
    _Q2_K = tl.constexpr(int(T.Q2_K))
    _Q3_K = tl.constexpr(int(T.Q3_K))
    _Q4_K = tl.constexpr(int(T.Q4_K))
    _Q5_K = tl.constexpr(int(T.Q5_K))
    _Q6_K = tl.constexpr(int(T.Q6_K))
    _IQ2_XXS = tl.constexpr(int(T.IQ2_XXS))
    _IQ2_XS = tl.constexpr(int(T.IQ2_XS))
    _IQ2_S = tl.constexpr(int(T.IQ2_S))
    _IQ3_XXS = tl.constexpr(int(T.IQ3_XXS))
    _IQ3_S = tl.constexpr(int(T.IQ3_S))
    _IQ1_S = tl.constexpr(int(T.IQ1_S))
    _IQ1_M = tl.constexpr(int(T.IQ1_M))
    _IQ4_NL = tl.constexpr(int(T.IQ4_NL))
    _IQ4_XS = tl.constexpr(int(T.IQ4_XS))

    @triton.jit
    def _u8(w_ptr, off, mask):
        return tl.load(w_ptr + off, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _f16(h_ptr, off, mask):
        """The fp16 field at byte offset `off` (even) as float32."""
        return tl.load(h_ptr + off // 2, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _float(u, bias: tl.constexpr):
        """float(u) - bias for integers 0 <= u < 2**23, exactly: u in the mantissa of 2**23."""
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)

    @triton.jit
    def _u16(w_ptr, off, mask):
        return _u8(w_ptr, off, mask) | (_u8(w_ptr, off + 1, mask) << 8)

    @triton.jit
    def _signed(v, sidx, k):
        """v negated where bit k of ksigns_iq2xs[sidx] is set (sidx 7 bits; bit 7 = their parity)."""
        p = sidx ^ (sidx >> 4)
        p ^= p >> 2
        p ^= p >> 1
        return tl.where((((sidx | ((p & 1) << 7)) >> k) & 1) != 0, -v, v)

    @triton.jit
    def _k4_scales(w_ptr, h_ptr, base, j, m2):
        """Q4_K/Q5_K: d*sc and dmin*m of group j (0..7) from the 12 scale bytes (get_scale_min_k4)."""
        jj = (j % 4)[None, :]
        qa = _u8(w_ptr, base + 4 + jj, m2)
        qb = _u8(w_ptr, base + 8 + jj, m2)
        qc = _u8(w_ptr, base + 12 + jj, m2)
        low = (j < 4)[None, :]
        sc = tl.where(low, qa & 63, (qc & 15) | ((qa >> 6) << 4))
        mn = tl.where(low, qb & 63, (qc >> 4) | ((qb >> 6) << 4))
        return _f16(h_ptr, base, m2) * sc.to(tl.float32), _f16(h_ptr, base + 2, m2) * mn.to(tl.float32)

    @triton.jit
    def _tile(w_ptr, h_ptr, t_ptr, row_off, rmask, g, gmask, QT: tl.constexpr, GS: tl.constexpr):
        """Groups g [NG] of rows at byte offsets row_off [BN]: q [BN, NG, GS] float32 and scale, min
        [BN, NG], with w = scale * q - min. Masked rows and groups give zeros. t_ptr: the IQ types'
        codebook as int8 bytes (row idx of a W-value grid at idx*W)."""
        i = tl.arange(0, GS)
        m2 = rmask[:, None] & gmask[None, :]
        m3 = m2[:, :, None]
        zero = tl.zeros((row_off.shape[0], g.shape[0]), dtype=tl.float32)
        if QT == _Q8_0:
            base = row_off[:, None] + (g * 34)[None, :]
            sc = _f16(h_ptr, base, m2)
            mn = zero
            q = _float(_u8(w_ptr, base[:, :, None] + 2 + i[None, None, :], m3) ^ 0x80, 128.0)
        elif QT == _Q4_0 or QT == _Q4_1:
            bpb: tl.constexpr = 18 if QT == _Q4_0 else 20
            base = row_off[:, None] + (g * bpb)[None, :]
            sc = _f16(h_ptr, base, m2)
            nib = (_u8(w_ptr, base[:, :, None] + (bpb - 16) + (i % 16)[None, None, :], m3)
                   >> (4 * (i // 16))[None, None, :]) & 15
            if QT == _Q4_0:
                mn = zero
                q = _float(nib, 8.0)
            else:
                mn = -_f16(h_ptr, base + 2, m2)
                q = _float(nib, 0.0)
        elif QT == _Q5_0 or QT == _Q5_1:
            bpb: tl.constexpr = 22 if QT == _Q5_0 else 24
            base = row_off[:, None] + (g * bpb)[None, :]
            b3 = base[:, :, None]
            sc = _f16(h_ptr, base, m2)
            nib = (_u8(w_ptr, b3 + (bpb - 16) + (i % 16)[None, None, :], m3) >> (4 * (i // 16))[None, None, :]) & 15
            hb = (_u8(w_ptr, b3 + (bpb - 20) + (i // 8)[None, None, :], m3) >> (i % 8)[None, None, :]) & 1
            if QT == _Q5_0:
                mn = zero
                q = _float(nib | (hb << 4), 16.0)
            else:
                mn = -_f16(h_ptr, base + 2, m2)
                q = _float(nib | (hb << 4), 0.0)
        elif QT == _Q4_K or QT == _Q5_K:
            bpb: tl.constexpr = 144 if QT == _Q4_K else 176
            j = g % 8
            base = row_off[:, None] + ((g // 8) * bpb)[None, :]
            b3 = base[:, :, None]
            sc, mn = _k4_scales(w_ptr, h_ptr, base, j, m2)
            # value j*32 + i: nibble j%2 of qs byte (j//2)*32 + i
            at = (bpb - 128) + ((j // 2) * 32)[:, None] + i[None, :]
            u = (_u8(w_ptr, b3 + at[None, :, :], m3) >> (4 * (j % 2))[None, :, None]) & 15
            if QT == _Q5_K:  # bit j of qh byte i is bit 4
                u |= ((_u8(w_ptr, b3 + 16 + i[None, None, :], m3) >> j[None, :, None]) & 1) << 4
            q = _float(u, 0.0)
        elif QT == _Q2_K or QT == _Q3_K:
            bpb: tl.constexpr = 84 if QT == _Q2_K else 110
            qs: tl.constexpr = 16 if QT == _Q2_K else 32
            j = g % 16
            base = row_off[:, None] + ((g // 16) * bpb)[None, :]
            b3 = base[:, :, None]
            e = j[:, None] * 16 + i[None, :]  # value in the block
            # value e: bits 2*((e//32)%4) of qs byte (e//128)*32 + e%32
            crumb = (_u8(w_ptr, b3 + (qs + (e // 128) * 32 + e % 32)[None, :, :], m3)
                     >> (2 * ((e // 32) % 4))[None, :, :]) & 3
            if QT == _Q2_K:
                s = _u8(w_ptr, base + j[None, :], m2)
                dd = _f16(h_ptr, base + 80, m2)
                sc = dd * (s & 15).to(tl.float32)
                mn = _f16(h_ptr, base + 82, m2) * (s >> 4).to(tl.float32)
                q = _float(crumb, 0.0)
            else:
                # scale j: low 4 bits from byte 96 + j%8 (nibble j//8), high 2 from byte 104 + j%4
                lo = (_u8(w_ptr, base + 96 + (j % 8)[None, :], m2) >> (4 * (j // 8))[None, :]) & 15
                hi = (_u8(w_ptr, base + 104 + (j % 4)[None, :], m2) >> (2 * (j // 4))[None, :]) & 3
                sc = _f16(h_ptr, base + 108, m2) * ((lo | (hi << 4)) - 32).to(tl.float32)
                mn = zero
                # bit e//32 of hmask byte e%32 set: q = crumb, else crumb - 4
                hb = (_u8(w_ptr, b3 + (e % 32)[None, :, :], m3) >> (e // 32)[None, :, :]) & 1
                q = _float(crumb | (hb << 2), 4.0)
        elif QT == _IQ2_XXS or QT == _IQ3_XXS:
            # d | IQ2_XXS: per group j of 32, 4 grid idx bytes (8 values each) then uint32 aux;
            # IQ3_XXS: 64 grid idx bytes (4 values each), then 8 uint32 aux.  aux: sign idx of the
            # 8-value row r in bits 7r..7r+6, scale s in bits 28..31: d * (0.5 + s) * (1/4 | 1/2)
            bpb: tl.constexpr = 66 if QT == _IQ2_XXS else 98
            j = g % 8
            base = row_off[:, None] + ((g // 8) * bpb)[None, :]
            b3 = base[:, :, None]
            at = (6 + 8 * j) if QT == _IQ2_XXS else (66 + 4 * j)
            aux = _u16(w_ptr, base + at[None, :], m2) | (_u16(w_ptr, base + at[None, :] + 2, m2) << 16)
            s = ((aux >> 28) & 15).to(tl.float32)
            sc = _f16(h_ptr, base, m2) * (0.5 + s) * (0.25 if QT == _IQ2_XXS else 0.5)
            mn = zero
            r = i // 8
            if QT == _IQ2_XXS:
                idx = _u8(w_ptr, b3 + (2 + 8 * j)[None, :, None] + r[None, None, :], m3)
                v = tl.load(t_ptr + idx * 8 + (i % 8)[None, None, :])
            else:
                idx = _u8(w_ptr, b3 + (2 + 8 * j)[None, :, None] + (i // 4)[None, None, :], m3)
                v = tl.load(t_ptr + idx * 4 + (i % 4)[None, None, :])
            q = _signed(v.to(tl.int32), (aux[:, :, None] >> (7 * r)[None, None, :]) & 127,
                        (i % 8)[None, None, :]).to(tl.float32)
        elif QT == _IQ2_XS or QT == _IQ2_S:
            # d | IQ2_XS: 32 uint16 (grid idx: low 9 bits, sign idx: high 7) | 16 scale nibbles at 66;
            # IQ2_S: qs[32] | sign bytes[32] | qh[8] (idx bits 8-9) | 16 scale nibbles at 74.
            # 16 groups of 16 (two 8-value rows): d * (0.5 + s) * 0.25
            bpb: tl.constexpr = 74 if QT == _IQ2_XS else 82
            j = g % 16
            base = row_off[:, None] + ((g // 16) * bpb)[None, :]
            b3 = base[:, :, None]
            s = (_u8(w_ptr, base + (bpb - 8) + (j // 2)[None, :], m2) >> (4 * (j % 2))[None, :]) & 15
            sc = _f16(h_ptr, base, m2) * (0.5 + s.to(tl.float32)) * 0.25
            mn = zero
            row = (2 * j)[:, None] + (i // 8)[None, :]  # [NG, GS]: the 8-value row in the block
            k = (i % 8)[None, None, :]
            if QT == _IQ2_XS:
                word = _u16(w_ptr, b3 + (2 + 2 * row)[None, :, :], m3)
                v = tl.load(t_ptr + (word & 511) * 8 + k)
                q = _signed(v.to(tl.int32), word >> 9, k).to(tl.float32)
            else:
                hi = (_u8(w_ptr, b3 + (66 + row // 4)[None, :, :], m3) >> (2 * (row % 4))[None, :, :]) & 3
                idx = _u8(w_ptr, b3 + (2 + row)[None, :, :], m3) | (hi << 8)
                v = tl.load(t_ptr + idx * 8 + k).to(tl.int32)
                neg = (_u8(w_ptr, b3 + (34 + row)[None, :, :], m3) >> k) & 1
                q = tl.where(neg != 0, -v, v).to(tl.float32)
        elif QT == _IQ3_S:
            # d | qs[64] (grid idx, 4 values each) | qh[8] (idx bit 8) | sign bytes[32] | 8 scale
            # nibbles at 106.  8 groups of 32: d * (1 + 2s)
            j = g % 8
            base = row_off[:, None] + ((g // 8) * 110)[None, :]
            b3 = base[:, :, None]
            s = (_u8(w_ptr, base + 106 + (j // 2)[None, :], m2) >> (4 * (j % 2))[None, :]) & 15
            sc = _f16(h_ptr, base, m2) * (1 + 2 * s).to(tl.float32)
            mn = zero
            t = (8 * j)[:, None] + (i // 4)[None, :]  # [NG, GS]: grid idx number in the block
            hi = (_u8(w_ptr, b3 + (66 + t // 8)[None, :, :], m3) >> (t % 8)[None, :, :]) & 1
            idx = _u8(w_ptr, b3 + (2 + t)[None, :, :], m3) | (hi << 8)
            v = tl.load(t_ptr + idx * 4 + (i % 4)[None, None, :]).to(tl.int32)
            neg = (_u8(w_ptr, b3 + (74 + 4 * j)[None, :, None] + (i // 8)[None, None, :], m3)
                   >> (i % 8)[None, None, :]) & 1
            q = tl.where(neg != 0, -v, v).to(tl.float32)
        elif QT == _IQ1_S:
            # d | qs[32] | 8 uint16 qh at 34: bits 3r..3r+2 high bits of row r's grid idx, 12..14
            # scale s, 15 delta sign.  8 groups of 32: (d * (2s + 1)) * (grid +- 1/8)
            j = g % 8
            base = row_off[:, None] + ((g // 8) * 50)[None, :]
            b3 = base[:, :, None]
            qh = _u16(w_ptr, base + 34 + (2 * j)[None, :], m2)
            sc = _f16(h_ptr, base, m2) * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
            mn = -sc * tl.where((qh & 0x8000) != 0, -0.125, 0.125)
            r = i // 8
            idx = (_u8(w_ptr, b3 + (2 + 4 * j)[None, :, None] + r[None, None, :], m3)
                   | (((qh[:, :, None] >> (3 * r)[None, None, :]) & 7) << 8))
            q = tl.load(t_ptr + idx * 8 + (i % 8)[None, None, :]).to(tl.float32)
        elif QT == _IQ1_M:
            # qs[32] | qh[16] (a nibble per 8-value row: idx bits 8..10, bit 3 delta sign) | 4 uint16
            # scale words: three-bit scales, 4 per word; fp16 d from the words' top nibbles.
            # 16 groups of 16: (d * (2s + 1)) * (grid +- 1/8)
            j = g % 16
            base = row_off[:, None] + ((g // 16) * 56)[None, :]
            b3 = base[:, :, None]
            dbits = ((_u16(w_ptr, base + 48, m2) >> 12) | ((_u16(w_ptr, base + 50, m2) >> 12) << 4)
                     | ((_u16(w_ptr, base + 52, m2) >> 12) << 8) | ((_u16(w_ptr, base + 54, m2) >> 12) << 12))
            d = dbits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            s = (_u16(w_ptr, base + 48 + (2 * (j // 4))[None, :], m2) >> (3 * (j % 4))[None, :]) & 7
            sc = d * (2 * s + 1).to(tl.float32)
            mn = zero
            row = (2 * j)[:, None] + (i // 8)[None, :]
            nib = (_u8(w_ptr, b3 + (32 + row // 2)[None, :, :], m3) >> (4 * (row % 2))[None, :, :]) & 15
            idx = _u8(w_ptr, b3 + row[None, :, :], m3) | ((nib & 7) << 8)
            v = tl.load(t_ptr + idx * 8 + (i % 8)[None, None, :]).to(tl.float32)
            q = v + tl.where((nib & 8) != 0, -0.125, 0.125)
        elif QT == _IQ4_NL or QT == _IQ4_XS:
            # IQ4_NL, blocks of 32: d | qs[16] (value i: nibble i//16 of byte i%16).  IQ4_XS: d |
            # scales_h u16 | scales_l[4] | qs[128]; group j of 32: 6-bit scale (nibble j of scales_l,
            # bits 2j..2j+1 of scales_h on top) - 32, values nibbles of bytes 8+16j...  kvalues[q]
            if QT == _IQ4_NL:
                base = row_off[:, None] + (g * 18)[None, :]
                sc = _f16(h_ptr, base, m2)
                at = 2 + (i % 16)[None, None, :]
            else:
                j = g % 8
                base = row_off[:, None] + ((g // 8) * 136)[None, :]
                lo = (_u8(w_ptr, base + 4 + (j // 2)[None, :], m2) >> (4 * (j % 2))[None, :]) & 15
                hi = (_u16(w_ptr, base + 2, m2) >> (2 * j)[None, :]) & 3
                sc = _f16(h_ptr, base, m2) * ((lo | (hi << 4)) - 32).to(tl.float32)
                at = (8 + 16 * j)[None, :, None] + (i % 16)[None, None, :]
            mn = zero
            nib = (_u8(w_ptr, base[:, :, None] + at, m3) >> (4 * (i // 16))[None, None, :]) & 15
            q = tl.load(t_ptr + nib).to(tl.float32)
        else:
            tl.static_assert(QT == _Q6_K, "unsupported GGUF type")
            j = g % 16
            base = row_off[:, None] + ((g // 16) * 210)[None, :]
            b3 = base[:, :, None]
            s = _u8(w_ptr, base + 192 + j[None, :], m2)
            sc = _f16(h_ptr, base + 208, m2) * (s - ((s >> 7) << 8)).to(tl.float32)
            mn = zero
            e = j[:, None] * 16 + i[None, :]
            a = e // 128
            r = e % 128
            # value a*128 + r: nibble r//64 of ql byte a*64 + r%64, bits 2*(r//32) of qh byte a*32 + r%32
            lo = (_u8(w_ptr, b3 + (a * 64 + r % 64)[None, :, :], m3) >> (4 * (r // 64))[None, :, :]) & 15
            hi = (_u8(w_ptr, b3 + (128 + a * 32 + r % 32)[None, :, :], m3) >> (2 * (r // 32))[None, :, :]) & 3
            q = _float(lo | (hi << 4), 32.0)
        return q, sc, mn

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, h_ptr, t_ptr, y_ptr, M, N, K, stride_xm, stride_w, stride_ys, stride_ym, k_split,
                     QT: tl.constexpr, GS: tl.constexpr, HAS_MIN: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        NG: tl.constexpr = BK // GS
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        row_off = rows.to(tl.int64) * stride_w
        mi = tl.arange(0, BM)
        i = tl.arange(0, GS)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        for k0 in range(k_lo, k_hi, BK):
            g = k0 // GS + tl.arange(0, NG)
            gmask = g < k_hi // GS
            q, sc, mn = _tile(w_ptr, h_ptr, t_ptr, row_off, rmask, g, gmask, QT, GS)
            kk = (g * GS)[:, None] + i[None, :]
            for m in tl.static_range(BM):  # rows past M re-read row M-1; their sums are not stored
                xm = tl.load(x_ptr + tl.minimum(m, M - 1) * stride_xm + kk, mask=gmask[:, None], other=0.0)
                xm = xm.to(tl.float32)
                part = tl.sum(q * xm[None, :, :], axis=2) * sc
                if HAS_MIN:
                    part -= mn * tl.sum(xm, axis=1)[None, :]
                acc += tl.where(mi[:, None] == m, tl.sum(part, axis=1)[None, :], 0.0)
        ys = y_ptr + pid_k * stride_ys + mi[:, None] * stride_ym + rows[None, :]
        tl.store(ys, acc.to(y_ptr.dtype.element_ty), mask=(mi[:, None] < M) & rmask[None, :])

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, h_ptr, t_ptr, y_ptr, M, N, K, stride_xm, stride_w, stride_ys, stride_ym,
                     k_split,
                     QT: tl.constexpr, GS: tl.constexpr, HAS_MIN: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BM)
        pid_m = pid % num_m  # programs that share a weight tile run next to each other
        pid_n = pid // num_m
        NG: tl.constexpr = BK // GS
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        nmask = rn < N
        row_off = rn.to(tl.int64) * stride_w
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        for k0 in range(k_lo, k_hi, BK):
            g = k0 // GS + tl.arange(0, NG)
            q, sc, mn = _tile(w_ptr, h_ptr, t_ptr, row_off, nmask, g, g < k_hi // GS, QT, GS)
            if HAS_MIN:
                w = q * sc[:, :, None] - mn[:, :, None]
            else:
                w = q * sc[:, :, None]
            kk = k0 + tl.arange(0, BK)
            x = tl.load(x_rows + kk[None, :], mask=(rm < M)[:, None] & (kk < k_hi)[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(tl.reshape(w.to(x.dtype), (BN, BK))), acc)
        ys = y_ptr + pid_k * stride_ys + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(ys, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & nmask[None, :])


def _table(qt: GGMLQuantizationType, data: torch.Tensor) -> torch.Tensor:
    """The codebook an IQ type's kernel reads, as int8 bytes on data's device (data itself otherwise:
    the argument is then unused)."""
    from finback.loader import iq_grids

    if qt in (T.IQ4_NL, T.IQ4_XS):
        return iq_grids.kvalues_iq4nl(data.device, torch.int8)
    if qt.name.startswith("IQ"):
        return iq_grids.packed_grid(qt, data.device).view(torch.int8)
    return data


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("the GGUF block kernels need triton (use gguf_matmul_ref on CPU)")


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _splits(out: torch.Tensor, split_k: int | None, tiles: int, per_sm: int, k: int, block_k: int):
    """Split K so that tiles * splits fills the GPU (about per_sm programs per SM) unless split_k is
    given. Returns (where the kernel writes, splits, K per split, split stride, row stride): `out`
    itself for one split, else an fp32 [splits, M, N] buffer of partials."""
    k_blocks = triton.cdiv(k, block_k)
    if split_k is None:
        split_k = triton.cdiv(per_sm * _num_sms(out.device), tiles)
    split_k = max(1, min(int(split_k), k_blocks))
    k_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_split)
    if split_k == 1:
        return out, 1, k_split, 0, out.stride(0)
    m, n = out.shape
    return torch.empty(split_k, m, n, dtype=torch.float32, device=out.device), split_k, k_split, m * n, n


def gguf_gemv(x: torch.Tensor, data: torch.Tensor, qtype, k: int, out: torch.Tensor | None = None, *,
              split_k: int | None = None, block_n: int = 8, block_k: int = 256, num_warps: int = 4
              ) -> torch.Tensor:
    """y = x @ W^T for M <= 16 rows of x, W as GGUF blocks `data` (uint8 [N, K/QK*block_bytes]).

    split_k: how many programs share one row tile's K (default: enough for ~4 programs per SM).
    block_k must be a multiple of 32 (every type's group size divides it)."""
    _require_triton()
    qt, n = _check(x, data, qtype, k, out)
    m = x.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"gguf_gemv takes at most {GEMV_MAX_M} rows of x, got {m} (use gguf_gemm)")
    if block_k % 32 or block_k & (block_k - 1) or block_n & (block_n - 1):
        raise ValueError("block_k must be a power of two >= 32 and block_n a power of two")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    gs, has_min = _GROUPS[qt]
    n_tiles = triton.cdiv(n, block_n)
    y, split_k, k_split, stride_ys, stride_ym = _splits(out, split_k, n_tiles, 4, k, block_k)
    bm = triton.next_power_of_2(m)
    _gemv_kernel[(n_tiles, split_k)](
        x, data, data.view(torch.float16), _table(qt, data), y, m, n, k, x.stride(0), data.stride(0),
        stride_ys, stride_ym, k_split,
        QT=int(qt), GS=gs, HAS_MIN=has_min, BM=bm, BN=block_n, BK=block_k, num_warps=num_warps)
    if split_k > 1:  # partials summed in a fixed order: the same bits every call
        out.copy_(y.sum(0))
    return out


def gguf_gemm(x: torch.Tensor, data: torch.Tensor, qtype, k: int, out: torch.Tensor | None = None, *,
              block_m: int | None = None, block_n: int = 64, block_k: int = 32, num_warps: int | None = None,
              num_stages: int = 3, split_k: int | None = None) -> torch.Tensor:
    """y = x @ W^T for any M, W as GGUF blocks: a decoded weight tile per program, tl.dot in x's dtype.

    split_k: programs per output tile along K (fp32 partials, summed in a fixed order); default: 1,
    or enough for ~2 programs per SM when the output has fewer tiles than that (small M and N)."""
    _require_triton()
    qt, n = _check(x, data, qtype, k, out)
    m = x.shape[0]
    if block_k % 32 or block_k & (block_k - 1) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError("block_k must be a power of two >= 32 and block_n a power of two >= 16")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if block_m is None:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 256 else 128
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    gs, has_min = _GROUPS[qt]
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    y, split_k, k_split, stride_ys, stride_ym = _splits(out, split_k, tiles, 2, k, block_k)
    _gemm_kernel[(tiles, split_k)](
        x, data, data.view(torch.float16), _table(qt, data), y, m, n, k, x.stride(0), data.stride(0),
        stride_ys, stride_ym, k_split,
        QT=int(qt), GS=gs, HAS_MIN=has_min, BM=block_m, BN=block_n, BK=block_k,
        num_warps=num_warps, num_stages=num_stages)
    if split_k > 1:
        out.copy_(y.sum(0))
    return out

"""Matmuls that read GGUF quantized blocks directly: y[M, N] = x[M, K] @ W^T, W never dequantized in
memory.

W [N, K] is kept as llama.cpp stores it: each row is K/QK blocks of the type's bytes (uint8
[N, K/QK*block_bytes], rows may be a strided view). A block splits into groups of GS values that share
one scale (and, for some types, one min): w = scale * q - min with q a small integer. Kernels decode a
tile of whole groups in registers and never write W back.

Decoding: `_w_parts` reads Q4_K, Q6_K, Q8_0, Q2_K and IQ1_S (what Q4_K_M files and the small 671B
quants hold) as whole words: int32 loads (Q4_K, Q2_K, Q6_K; Q6_K's 210-byte blocks start at 2 mod 4
every other block, their words are funnelled from two aligned ones) or int16 loads (Q8_0, IQ1_S), one
per 2-4 quant bytes, coalesced along the row, then shifts and masks in registers. The tile is a
broadcast over small axes (unit, group, word, byte) whose row-major order is K order, so it flattens
to [BN, BK] without a permutation. Every other type (and rows that are not 4-byte aligned) goes
through `_tile`, a per-value byte gather (also the routed-expert kernel's decoder, gguf_moe.py).

- `gguf_gemv` (decode, M <= 16). M < GEMV_MMA_MIN_M: `_gemv_kernel` on CUDA cores: per step a
  [BN, BK] weight tile, one fp32 accumulator per (row of x, weight): one FMA per weight and row, the
  sum over K once after the loop. Larger M: `_mm_kernel` with a 16-row x tile and the weight rows on
  the MMA's M side ("swap AB": tl.dot(w, x^T)).
- `gguf_gemm` (prefill): `_mm_kernel`, a decoded [BN, BK] weight tile per step fed to tl.dot in x's
  dtype (bf16: tensor cores; fp32: input_precision="ieee", exact fp32 and not TF32), fp32
  accumulation; programs that share a weight tile run next to each other (it comes from L2 for all
  but the first).
- Both split K when there are too few output tiles to fill the GPU: the splits write fp32 partials,
  and the one that finishes last (a per-tile arrival counter) sums them in split order, so the
  result is deterministic and one launch does it all (CUDA-graph friendly; counters re-arm).
- `gguf_matmul_ref`: `finback.loader.quants.dequantize` then a float32 torch matmul. It is the
  reference the kernels are tested against and the CPU path.

The layers (`finback.layers.gguf_linear.gguf_matmul`) use these kernels for every type but send
1-4 rows of 16-bit activations of the dp4a types to `gguf_dp4a.gguf_gemv_q8`, and 5 or more rows of
Q4_K, Q6_K and Q8_0 (what Q4_K_M and Q8_0 files hold) to `gguf_mma.gguf_mma`, whose per-type 2-D
decoders cost 1.3-2.3x fewer instructions per weight (sm_90, main loop) than `_w_parts` here.

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

Default tiles were picked from the sm_90 machine code (register counts without spills, instructions
per weight in the main loop, compiled offline with triton's ptxas), not yet from timings:
bench/gguf_kernels.py --sweep times alternatives.
"""

from __future__ import annotations

import functools

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from finback.kernels import HAS_TRITON, interpreting

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
GEMV_MMA_MIN_M = 3  # gguf_gemv's CUDA-core kernel below this many rows of x, tensor cores from it


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
    def _w_parts(w_ptr, h_ptr, w32_ptr, t_ptr, row_off, k0, k_hi, QT: tl.constexpr, BK: tl.constexpr,
                 UNIT: tl.constexpr, G: tl.constexpr, A: tl.constexpr, B: tl.constexpr):
        """Values k0..k0+BK of the rows at byte offsets row_off, read as whole words: int32 loads (Q4_K,
        Q2_K, Q6_K; rows 4-byte aligned) or int16 loads (Q8_0, IQ1_S), one per 4 or 2 quant bytes,
        quants split out with shifts and masks in registers. Returns q [BN, U, G, A, B] (float32
        quants; row-major over (U, G, A, B) is the values' order, U units of UNIT values; UNIT, G, A, B
        are the type's `_PARTS` entry) and the scale
        and min [BN, U, G] of each (unit, G) group: w = scale * q - min (min: zeros where the type has
        none). kidx [U, G, A, B]: the values' offsets from k0. Units past k_hi re-read the last one
        (finite weights; x is 0 there)."""
        U: tl.constexpr = BK // UNIT
        gu = tl.minimum(k0 // UNIT + tl.arange(0, U), k_hi // UNIT - 1)  # the units, clamped to K
        t2 = tl.arange(0, 2)
        if QT == _Q4_K:
            # unit: a 64-value chunk c of a super-block = qs bytes 32c..32c+31 (8 words); low nibble of
            # byte 4w+t is value 4w+t of sub-block 2c, the high nibble the same of sub-block 2c+1
            c = gu % 4
            base = row_off[:, None] + ((gu // 4) * 144)[None, :]  # [BN, U]
            b3 = base[:, :, None]
            j = (2 * c)[:, None] + t2[None, :]  # [U, 2] sub-block
            jj = (j % 4)[None, :, :]
            qa = tl.load(w_ptr + b3 + 4 + jj).to(tl.int32)
            qb = tl.load(w_ptr + b3 + 8 + jj).to(tl.int32)
            qc = tl.load(w_ptr + b3 + 12 + jj).to(tl.int32)
            low = (j < 4)[None, :, :]
            s6 = tl.where(low, qa & 63, (qc & 15) | ((qa >> 6) << 4))
            m6 = tl.where(low, qb & 63, (qc >> 4) | ((qb >> 6) << 4))
            hb = base // 2
            sc = tl.load(h_ptr + hb).to(tl.float32)[:, :, None] * s6.to(tl.float32)  # [BN, U, 2]
            mn = tl.load(h_ptr + hb + 1).to(tl.float32)[:, :, None] * m6.to(tl.float32)
            wd = tl.load(w32_ptr + (base // 4 + 4 + (8 * c)[None, :])[:, :, None] + tl.arange(0, 8)[None, None, :])
            sh = 4 * t2[:, None, None] + 8 * tl.arange(0, 4)[None, None, :]  # [2 (nibble), 1, 4 (byte)]
            q = _float((wd[:, :, None, :, None] >> sh[None, None, :, :, :]) & 15, 0.0)  # [BN, U, 2, 8, 4]
        elif QT == _Q2_K:
            # unit: 32 values u of a super-block: qs bytes 32*(u//4) + l, bits 2*(u%4); l = 16p + 4w + t
            # (word w of half p), group 2u + p
            u = gu % 8
            base = row_off[:, None] + ((gu // 8) * 84)[None, :]
            s = tl.load(w_ptr + base[:, :, None] + (2 * u)[None, :, None] + t2[None, None, :]).to(tl.int32)
            hb = base // 2
            sc = tl.load(h_ptr + hb + 40).to(tl.float32)[:, :, None] * (s & 15).to(tl.float32)
            mn = tl.load(h_ptr + hb + 41).to(tl.float32)[:, :, None] * (s >> 4).to(tl.float32)
            widx = (4 * t2)[:, None] + tl.arange(0, 4)[None, :]  # [2, 4]
            wd = tl.load(w32_ptr + (base // 4 + 4 + (8 * (u // 4))[None, :])[:, :, None, None] + widx[None, None, :, :])
            sh = (2 * (u % 4))[:, None, None, None] + 8 * tl.arange(0, 4)[None, None, None, :]  # [U, 1, 1, 4]
            q = _float((wd[:, :, :, :, None] >> sh[None, :, :, :, :]) & 3, 0.0)  # [BN, U, 2, 4, 4]
        elif QT == _Q6_K:
            # unit: 32 values u of a super-block, a = u//4, r = 32*(u%4) + l: low nibble (u%4)//2 of ql
            # byte 64a + 32*(u%2) + l, bits 2*(u%4) of qh byte 32a + l; l = 16p + 4w + t (byte t of word
            # w of half p); group 2u + p (int8 scale). A 210-byte block starts at 2 mod 4 every other
            # block: its words are then funnelled from two aligned ones.
            u = gu % 8
            a = u // 4
            up = u % 4
            base = row_off[:, None] + ((gu // 8) * 210)[None, :]
            s = tl.load(w_ptr + base[:, :, None] + 192 + (2 * u)[None, :, None] + t2[None, None, :]).to(tl.int32)
            sc = tl.load(h_ptr + base // 2 + 104).to(tl.float32)[:, :, None] * (s - ((s >> 7) << 8)).to(tl.float32)
            mn = sc
            widx = (4 * t2)[:, None] + tl.arange(0, 4)[None, :]  # [2, 4]
            odd = ((base & 2) != 0)[:, :, None, None]
            bw = (base // 4)[:, :, None, None] + widx[None, None, :, :]
            at = bw + (16 * a + 8 * (up % 2))[None, :, None, None]
            lo = tl.where(odd, ((tl.load(w32_ptr + at) >> 16) & 0xFFFF) | (tl.load(w32_ptr + at + 1) << 16),
                          tl.load(w32_ptr + at))
            at = bw + (32 + 8 * a)[None, :, None, None]
            hi = tl.where(odd, ((tl.load(w32_ptr + at) >> 16) & 0xFFFF) | (tl.load(w32_ptr + at + 1) << 16),
                          tl.load(w32_ptr + at))
            shl = (4 * (up // 2))[:, None, None, None] + 8 * tl.arange(0, 4)[None, None, None, :]  # [U, 1, 1, 4]
            shh = (2 * up)[:, None, None, None] + 8 * tl.arange(0, 4)[None, None, None, :]
            v = (((lo[:, :, :, :, None] >> shl[None, :, :, :, :]) & 15)
                 | (((hi[:, :, :, :, None] >> shh[None, :, :, :, :]) & 3) << 4))
            q = _float(v, 32.0)  # [BN, U, 2, 4, 4]
        elif QT == _Q8_0:
            # unit: a block, d | 32 int8: value 2p + t is byte t of halfword 1 + p
            hb = (row_off[:, None] + (gu * 34)[None, :]) // 2
            sc = tl.load(h_ptr + hb).to(tl.float32)[:, :, None]  # [BN, U, 1]
            mn = sc
            hw = tl.load(h_ptr + hb[:, :, None, None] + 1 + tl.arange(0, 16)[None, None, None, :])
            hw = hw.to(tl.int16, bitcast=True).to(tl.int32)  # [BN, U, 1, 16]
            q = _float(((hw[:, :, :, :, None] >> (8 * t2)[None, None, None, None, :]) & 255) ^ 128, 128.0)
        else:
            tl.static_assert(QT == _IQ1_S, "no word-load path for this type")
            # unit: group j of 32 = 4 grid rows r of 8; d | qs[32] | qh u16[8] at 34: row r's index is
            # qs byte 4j + r | bits 3r..3r+2 of qh[j] << 8; qh bits 12..14 scale s, 15 delta sign.
            # A grid row is 8 int8 in two int32 (t_ptr: the packed grid as int32)
            j = gu % 8
            base = row_off[:, None] + ((gu // 8) * 50)[None, :]
            hb = base // 2
            qh = tl.load(h_ptr + hb + 17 + j[None, :]).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            sc = (tl.load(h_ptr + hb).to(tl.float32) * (2 * ((qh >> 12) & 7) + 1).to(tl.float32))[:, :, None]
            mn = sc
            delta = tl.where((qh & 0x8000) != 0, -0.125, 0.125)
            r = tl.arange(0, 4)
            idx = (tl.load(w_ptr + (base + 2 + 4 * j[None, :])[:, :, None] + r[None, None, :]).to(tl.int32)
                   | (((qh[:, :, None] >> (3 * r)[None, None, :]) & 7) << 8))  # [BN, U, 4]
            g = tl.load(t_ptr + 2 * idx[:, :, :, None] + t2[None, None, None, :])  # [BN, U, 4, 2]
            v = ((g[:, :, :, :, None] << (24 - 8 * tl.arange(0, 4))[None, None, None, None, :]) >> 24) + 1
            q = _float(v, 1.0) + delta[:, :, None, None, None]  # [BN, U, 4, 2, 4]
        kidx = (((BK // U) * tl.arange(0, U))[:, None, None, None] + ((A * B) * tl.arange(0, G))[None, :, None, None]
                + (B * tl.arange(0, A))[None, None, :, None] + tl.arange(0, B)[None, None, None, :])
        return q, sc, mn, kidx

    @triton.jit
    def _w_fast(w_ptr, h_ptr, w32_ptr, t_ptr, row_off, k0, k_hi, QT: tl.constexpr, BK: tl.constexpr,
                UNIT: tl.constexpr, G: tl.constexpr, A: tl.constexpr, B: tl.constexpr):
        """The weights [BN, BK] (float32, K in order) of `_w_parts`."""
        q, sc, mn, kidx = _w_parts(w_ptr, h_ptr, w32_ptr, t_ptr, row_off, k0, k_hi, QT, BK, UNIT, G, A, B)
        if QT == _Q4_K or QT == _Q2_K:
            w = q * sc[:, :, :, None, None] - mn[:, :, :, None, None]
        else:
            w = q * sc[:, :, :, None, None]
        return tl.reshape(w, (row_off.shape[0], BK))

    @triton.jit
    def _fma_parts(acc, q, sc, mn, kidx, x_ptr, k0, k_hi, QT: tl.constexpr, EVEN_K: tl.constexpr):
        """One K step of the one-row CUDA-core GEMV on `_w_parts` output: acc [G, B, BN, U, A] +=
        w * x (one FMA per weight), x the values k0 + kidx of the row at x_ptr (zeros from k_hi)."""
        if QT == _Q4_K or QT == _Q2_K:  # the word-load types with a min
            w = q * sc[:, :, :, None, None] - mn[:, :, :, None, None]
        else:
            w = q * sc[:, :, :, None, None]
        kx = k0 + kidx
        if EVEN_K:
            xv = tl.load(x_ptr + kx).to(tl.float32)
        else:
            xv = tl.load(x_ptr + kx, mask=kx < k_hi, other=0.0).to(tl.float32)
        # the axes that share a loaded word (G, B) outermost: each thread then keeps a word's values in
        # its registers (Triton gives threads the innermost axes)
        return acc + tl.permute(w, (2, 4, 0, 1, 3)) * tl.permute(xv, (1, 3, 0, 2))[:, :, None, :, :]

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, h_ptr, w32_ptr, t_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_w,
                     stride_ym, k_split,
                     QT: tl.constexpr, GS: tl.constexpr, HAS_MIN: tl.constexpr, FAST: tl.constexpr,
                     UNIT: tl.constexpr, G: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr):
        """CUDA-core GEMV for BM (static, padded M) rows of x. Word-load types: one fp32 accumulator per
        (row of x, weight), so w * x is one FMA per weight and row and K is summed once after the loop
        (M = 1 keeps the tile in `_w_parts`'s shape, x loaded in it). Others (`_tile`): per group
        scale * sum(q x) - min * sum(x)."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid * BN + tl.arange(0, BN)
        row_off = tl.minimum(rn, N - 1).to(tl.int64) * stride_w
        mi = tl.arange(0, BM)
        x_rows = x_ptr + tl.minimum(mi, M - 1).to(tl.int64) * stride_xm  # rows past M re-read row M-1
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        if FAST:
            if BM == 1:
                acc = tl.zeros((G, B, BN, BK // UNIT, A), dtype=tl.float32)  # q's axes permuted as below
            else:
                acc = tl.zeros((BM, BN, BK), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BK):
                if BM == 1:
                    q, sc, mn, kidx = _w_parts(w_ptr, h_ptr, w32_ptr, t_ptr, row_off, k0, k_hi, QT, BK, UNIT, G, A, B)
                    acc = _fma_parts(acc, q, sc, mn, kidx, x_ptr, k0, k_hi, QT, EVEN_K)
                else:
                    w = _w_fast(w_ptr, h_ptr, w32_ptr, t_ptr, row_off, k0, k_hi, QT, BK, UNIT, G, A, B)
                    kx = k0 + tl.arange(0, BK)
                    if EVEN_K:
                        xv = tl.load(x_rows[:, None] + kx[None, :]).to(tl.float32)
                    else:
                        xv = tl.load(x_rows[:, None] + kx[None, :], mask=kx[None, :] < k_hi, other=0.0).to(tl.float32)
                    acc += w[None, :, :] * xv[:, None, :]
            if BM == 1:
                out = tl.sum(tl.sum(tl.sum(tl.sum(acc, axis=4), axis=3), axis=1), axis=0)[None, :]
            else:
                out = tl.sum(acc, axis=2)
        else:
            out = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BK):
                g = k0 // GS + tl.arange(0, BK // GS)
                gmask = g < k_hi // GS
                q, sc, mn = _tile(w_ptr, h_ptr, t_ptr, row_off, rn >= 0, g, gmask, QT, GS)
                kx = (g * GS)[:, None] + tl.arange(0, GS)[None, :]
                for m in tl.static_range(BM):
                    xv = tl.load(x_ptr + tl.minimum(m, M - 1) * stride_xm + kx, mask=gmask[:, None], other=0.0)
                    xv = xv.to(tl.float32)
                    s = tl.sum(q * xv[None, :, :], axis=2) * sc  # [BN, NG]
                    if HAS_MIN:
                        s -= mn * tl.sum(xv, axis=1)[None, :]
                    out += tl.where(mi[:, None] == m, tl.sum(s, axis=1)[None, :], 0.0)
        _store(out, y_ptr, ws_ptr, lock_ptr, pid, pid_k, mi, rn, M, N, stride_ym, SPLIT)

    @triton.jit
    def _store(acc, y_ptr, ws_ptr, lock_ptr, pid, pid_k, rm, rn, M, N, stride_ym, SPLIT: tl.constexpr):
        """acc [BM, BN] (fp32) into y; split K: fp32 partials, and the split that finishes last sums
        them in split order (deterministic), writes y and re-arms the tile's counter for the next call."""
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        ys = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        if SPLIT:
            mn = (pid_k * 0).to(tl.int64) + M * N  # int64 stride between splits
            parts = ws_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
            tl.store(parts + pid_k * mn, acc, mask=mask)
            tl.debug_barrier()
            if tl.atomic_add(lock_ptr + pid, 1) == tl.num_programs(1) - 1:
                tot = tl.zeros(acc.shape, dtype=tl.float32)
                for s in range(0, tl.num_programs(1)):
                    tot += tl.load(parts + s * mn, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(ys, tot.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(lock_ptr + pid, 0)
        else:
            tl.store(ys, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _mm_pids(M, BM: tl.constexpr):
        """(tile, K split, M tile, N tile) of a matmul program over grid (M tiles x N tiles, splits): the M
        tiles fastest, so the programs that share a weight tile run next to each other (it comes from L2
        for all but the first)."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        return pid, tl.program_id(1), pid % num_m, pid // num_m

    @triton.jit
    def _mm_kernel(x_ptr, w_ptr, h_ptr, w32_ptr, t_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_w,
                   stride_ym, k_split,
                   QT: tl.constexpr, GS: tl.constexpr, HAS_MIN: tl.constexpr, FAST: tl.constexpr,
                   UNIT: tl.constexpr, G: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr,
                   PREC: tl.constexpr, WIDEN: tl.constexpr, EVEN_K: tl.constexpr):
        pid, pid_k, pid_m, pid_n = _mm_pids(M, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        row_off = tl.minimum(rn, N - 1).to(tl.int64) * stride_w  # rows past N re-read row N-1, not stored
        rm = pid_m * BM + tl.arange(0, BM)
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        if SWAP:  # weight rows are the MMA's M side: small M wastes nothing of a 64-row MMA
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        for k0 in range(k_lo, k_hi, BK):
            if FAST:
                w = _w_fast(w_ptr, h_ptr, w32_ptr, t_ptr, row_off, k0, k_hi, QT, BK, UNIT, G, A, B)
            else:
                g = k0 // GS + tl.arange(0, BK // GS)
                q, sc, mn = _tile(w_ptr, h_ptr, t_ptr, row_off, rn >= 0, g, g < k_hi // GS, QT, GS)
                if HAS_MIN:
                    w = tl.reshape(q * sc[:, :, None] - mn[:, :, None], (BN, BK))
                else:
                    w = tl.reshape(q * sc[:, :, None], (BN, BK))
            kk = k0 + tl.arange(0, BK)
            if EVEN_K:  # no mask along K: x's loads vectorize
                x = tl.load(x_rows + kk[None, :], mask=(rm < M)[:, None], other=0.0)
            else:
                x = tl.load(x_rows + kk[None, :], mask=(rm < M)[:, None] & (kk < k_hi)[None, :], other=0.0)
            if WIDEN:  # the interpreter's tl.dot mishandles 16-bit tiles
                x = x.to(tl.float32)
            w = w.to(x.dtype)
            if SWAP:
                acc = tl.dot(w, tl.trans(x), acc, input_precision=PREC)
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        if SWAP:
            acc = tl.trans(acc)
        _store(acc, y_ptr, ws_ptr, lock_ptr, pid, pid_k, rm, rn, M, N, stride_ym, SPLIT)

# types with a word-load decoder (`_w_parts`) -> (whether it needs 4-byte aligned rows, UNIT values per
# unit, and the (G, A, B) axes a unit's quants come in)
_PARTS: dict[GGMLQuantizationType, tuple[bool, int, int, int, int]] = {
    T.Q4_K: (True, 64, 2, 8, 4), T.Q2_K: (True, 32, 2, 4, 4), T.Q6_K: (True, 32, 2, 4, 4),
    T.Q8_0: (False, 32, 1, 16, 2), T.IQ1_S: (False, 32, 4, 2, 4),
}


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


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile arrival counters of split-K calls: zero between calls (the last split re-arms its own).
    One buffer per device, grown on demand: calls on one device must not overlap (one stream)."""
    buf = _LOCKS.get(device)
    if buf is None or buf.numel() < n:
        buf = _LOCKS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def _plan_split(out: torch.Tensor, k: int, step: int, tiles: int, split_k: int | None
                ) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Split K for a launch of `tiles` output tiles over K in steps of `step` values: (programs per tile,
    values per program (a multiple of step), the fp32 partials workspace and arrival counters; both
    `out` itself when there is no split). split_k None: split only to fill the GPU (~2 programs per
    SM), keeping >= 2 steps per program."""
    m, n = out.shape
    k_iters = triton.cdiv(k, step)
    if split_k is None:
        sms = _num_sms(out.device)
        split_k = 1 if tiles >= sms else min(triton.cdiv(2 * sms, tiles), max(1, k_iters // 2))
    split_k = max(1, min(int(split_k), k_iters))
    k_split = triton.cdiv(k_iters, split_k) * step
    split_k = triton.cdiv(k, k_split)
    if split_k > 1:
        return split_k, k_split, torch.empty(split_k, m, n, dtype=torch.float32, device=out.device), \
            _locks(out.device, tiles)
    return split_k, k_split, out, out


def _matmul(x: torch.Tensor, data: torch.Tensor, qt: GGMLQuantizationType, k: int, out: torch.Tensor, *,
            block_m: int, block_n: int, block_k: int, swap: bool, split_k: int | None, num_warps: int,
            num_stages: int, mma: bool = True) -> torch.Tensor:
    """Launch `_mm_kernel` (mma) or `_gemv_kernel` on x [M, K] -> out [M, N]."""
    low_n = 16 if mma else 1
    if block_k < 32 or block_k & (block_k - 1) or block_n < low_n or block_n & (block_n - 1) \
            or block_m < low_n or block_m & (block_m - 1):
        raise ValueError(f"block_k must be a power of two >= 32, block_m and block_n powers of two >= {low_n} "
                         f"(got {block_m}, {block_n}, {block_k})")
    m, n = out.shape
    if m == 0 or n == 0:
        return out
    gs, has_min = _GROUPS[qt]
    words, unit, g, a, b = _PARTS.get(qt, (False, 32, 1, 1, 1))
    fast = qt in _PARTS and block_k % unit == 0 and (
        not words or (data.data_ptr() % 4 == 0 and data.stride(0) % 4 == 0))
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k, k_split, ws, locks = _plan_split(out, k, block_k, tiles, split_k)
    if fast and qt == T.IQ1_S:
        from finback.loader import iq_grids

        table = iq_grids.packed_grid(qt, data.device).view(torch.int32)
    else:
        table = _table(qt, data)
    args = (x, data, data.view(torch.float16), data.view(torch.int32) if fast and words else data, table, out, ws,
            locks, m, n, k, x.stride(0), data.stride(0), out.stride(0), k_split)
    if mma:
        widen = interpreting() and x.dtype != torch.float32
        _mm_kernel[(tiles, split_k)](
            *args, QT=int(qt), GS=gs, HAS_MIN=has_min, FAST=fast, UNIT=unit, G=g, A=a, B=b, BM=block_m, BN=block_n,
            BK=block_k, SWAP=swap,
            SPLIT=split_k > 1, PREC="ieee" if x.dtype == torch.float32 or widen else "tf32", WIDEN=widen,
            EVEN_K=k % block_k == 0, num_warps=num_warps, num_stages=num_stages)
    else:
        _gemv_kernel[(tiles, split_k)](
            *args, QT=int(qt), GS=gs, HAS_MIN=has_min, FAST=fast, UNIT=unit, G=g, A=a, B=b, BM=block_m,
            BN=block_n, BK=block_k, SPLIT=split_k > 1, EVEN_K=k % block_k == 0, num_warps=num_warps, num_stages=num_stages)
    return out


def gguf_gemv(x: torch.Tensor, data: torch.Tensor, qtype, k: int, out: torch.Tensor | None = None, *,
              split_k: int | None = None, block_n: int | None = None, block_k: int | None = None,
              num_warps: int | None = None, num_stages: int = 2, mma: bool | None = None, swap: bool = True
              ) -> torch.Tensor:
    """y = x @ W^T for M <= 16 rows of x, W as GGUF blocks `data` (uint8 [N, K/QK*block_bytes]).

    mma=False (default for M < GEMV_MMA_MIN_M): `_gemv_kernel` on CUDA cores, block_n x block_k weights
    per step (default 16 x 256, 4 warps: 32 weights per thread, the layout whose reductions stay in
    registers). mma=True: `_mm_kernel` with a 16-row tile of x (rows past M read as zeros) and block_n
    (default 128 x 64, 8 warps) weight rows on the MMA's M side (swap). Either splits K
    when there are too few row tiles to fill the GPU (split_k: programs per row tile; default ~2
    programs per SM, >= 2 K steps each)."""
    _require_triton()
    qt, n = _check(x, data, qtype, k, out)
    m = x.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"gguf_gemv takes at most {GEMV_MAX_M} rows of x, got {m} (use gguf_gemm)")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if mma is None:
        mma = m >= GEMV_MMA_MIN_M
    if mma:
        return _matmul(x, data, qt, k, out, block_m=16, block_n=block_n or 128, block_k=block_k or 64, swap=swap,
                       split_k=split_k, num_warps=num_warps or 8, num_stages=num_stages)
    # defaults from the Q4_K sweep on an H100 (bench/gguf_kernels.py --sweep, 7B shapes, M=1): 512-wide K
    # steps on 2 warps, 4 rows per program below N=4096 and 8 above, were 10-42% faster than 16x256 / 4
    return _matmul(x, data, qt, k, out, block_m=triton.next_power_of_2(max(m, 1)),
                   block_n=block_n or (4 if n < 4096 else 8), block_k=block_k or 512, swap=False, split_k=split_k,
                   num_warps=num_warps or 2, num_stages=num_stages, mma=False)


def gguf_gemm(x: torch.Tensor, data: torch.Tensor, qtype, k: int, out: torch.Tensor | None = None, *,
              block_m: int | None = None, block_n: int | None = None, block_k: int = 64, num_warps: int | None = None,
              num_stages: int = 3, split_k: int | None = None, swap: bool = False) -> torch.Tensor:
    """y = x @ W^T for any M, W as GGUF blocks: a decoded weight tile per program, tl.dot in x's dtype.

    split_k: programs per output tile along K (fp32 partials, summed in a fixed order); default: 1,
    or enough for ~2 programs per SM when the output has fewer tiles than the GPU has SMs."""
    _require_triton()
    qt, n = _check(x, data, qtype, k, out)
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if block_m is None:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 256 else 128
    if block_n is None:
        # the Q4_K sweep on an H100 (M=512, every 7B shape): 128x64 tiles on 4 warps beat 128x128 on 8 by 7-26%
        block_n = 64 if block_m == 128 else 128
    if num_warps is None:
        num_warps = 8 if block_m * block_n >= 64 * 128 and block_m != 128 else 4
    return _matmul(x, data, qt, k, out, block_m=block_m, block_n=block_n, block_k=block_k, swap=swap,
                   split_k=split_k, num_warps=num_warps, num_stages=num_stages)

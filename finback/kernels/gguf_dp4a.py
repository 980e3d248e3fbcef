"""Decode GEMV on GGUF blocks with int8 activations and integer dot products (dp4a), llama.cpp's mmvq.

`finback.kernels.gguf.gguf_gemv` turns every weight into a float and does one FMA per weight: it is
instruction-bound at decode (13-44% of copy bandwidth on an H100). Here the activation rows are first
quantized to int8 in blocks of 32 ("Q8_1": `quantize_q8`), then each weight word is unpacked into four
int8 lanes in registers and multiplied with four activations by one `dp4a` (4 int8 x int8 MACs into an
int32), and the float scales are applied once per scale group.

Activations: per block b of 32 values, d_b = amax_b / 127, q_i = round(x_i / d_b) (half away from
zero, as llama.cpp's roundf; d_b = 0 gives q = 0), s_b = d_b * sum_b(q_i). So x_i ~ d_b q_i.

Per weight scale group G (GS values inside one activation block b), with isum_G = sum_G wq_i * q_i
exact in int32 (wq: the packed integer quants) and xsum_G = sum_G q_i (a dp4a with 0x01010101):
  Q8_0  w = d q (q int8, GS 32)                 y += (d * d_b) * isum
  Q4_K  w = (d sc_G) q - (dmin m_G) (q 0..15)   y += (d sc_G * d_b) * isum - (dmin m_G) * s_b
  Q2_K  w = (d sc_G) q - (dmin m_G) (q 0..3,    y += (d sc_G * d_b) * isum - (dmin m_G) * (d_b * xsum_G)
        GS 16: s_b covers two groups)
  Q6_K  w = (d sc_G) (q - 32) (q 0..63, GS 16)  y += (d sc_G * d_b) * (isum - 32 xsum_G)
  IQ1_S w = D_G (g + delta_G) (g in {-1,0,1}    y += D_G * (d_b * isum + delta_G * s_b)
        from the grid, D_G = d (2s+1), delta_G = +-1/8)
Unsigned quants (Q4_K, Q2_K, Q6_K) use dp4a.u32.s32, signed ones (Q8_0, IQ1_S grid rows) dp4a.s32.s32.
Under Triton's interpreter (no inline asm) a constexpr switch takes a byte-by-byte integer version of
the same sum: both are exact, so they agree bit for bit.

Error: against `gguf_gemv_q8_ref` (quantize_q8_ref, x rebuilt as q * d_b, dequantized W, float32
matmul) only float32 rounding differs: |y - ref| <= 1e-5 (|x_q| @ |W|^T) + 1e-6. Against the float
reference `gguf_matmul_ref` the activation rounding adds |x_i - d_b q_i| <= d_b / 2, so
|y - y_float| <= (0.5 / 127) * sum_b amax_b * sum_{i in b} |W_i| (plus float32 rounding).

Kernel layout: grid (cdiv(N, BN), split_k); a program owns BN weight rows and walks its K range in
steps of BK values: U = BK/UNIT units of NG scale groups of V runs of 4 int32 words (4 values a word,
K order within a group). Tiles are [BM, NG, V, BN, U, 4]: Triton gives threads the innermost axes a
load cannot vectorize, so with BN * U >= 32 * num_warps every thread owns whole (row, unit) pairs and
keeps their groups, words and the M <= 4 rows of x (a broadcast axis: each decoded word feeds all of
them) in registers; the sums over words are in-thread adds, and the x words are loaded per weight row
(from L1) so they share the weights' layout (no shared-memory conversion in the loop). Aligned Q4_K
rows are read as 16-byte vectors, Q2_K as int32 words, Q6_K (210-byte blocks) and Q8_0 (34) as int16
pairs; IQ1_S gathers 8-byte grid rows. Split K sums fp32 partials in split order in the last program to
arrive (gguf.py's `_store`: deterministic, CUDA-graph safe).

Default tile: 8 rows x 512 values on 2 warps, the smallest with BN * U >= 64 for Q4_K. Its sm_90 main
loop (compiled offline: triton 3.9 + ptxas) has no barrier or shuffle and spends per weight, M = 1:
Q4_K 2.7 instructions, Q8_0 1.9, IQ1_S 2.9, Q2_K 3.6, Q6_K 5.7 (M = 4: Q4_K 4.8 for four rows), where
gguf_gemv's loop at the same tile spends Q4_K 8, Q6_K 16, Q8_0 10. Not yet timed: bench/gguf_dp4a.py
sweeps tiles and split K.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from finback.kernels import HAS_TRITON, interpreting
from finback.kernels.gguf import _check, _num_sms, _plan_split, _require_triton, gguf_matmul_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from finback.kernels.gguf import _store

T = GGMLQuantizationType

QK8 = 32  # activation values per int8 block
MAX_M = 4
SPLIT_WARPS_PER_SM = 16  # default split K: up to this many warps per SM in all (a guess, not yet timed)
# type -> (UNIT values per unit, NG groups per unit, V runs of 4 int32 words per group)
_UNITS: dict[GGMLQuantizationType, tuple[int, int, int]] = {
    T.Q4_K: (64, 2, 2), T.Q6_K: (32, 2, 1), T.Q8_0: (32, 1, 2), T.Q2_K: (32, 2, 1), T.IQ1_S: (32, 1, 2),
}
Q8_TYPES: frozenset[GGMLQuantizationType] = frozenset(_UNITS)


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 2 or not x.is_floating_point() or x.shape[1] % QK8 or (x.numel() and x.stride(1) != 1):
        raise ValueError(f"x must be a floating [M, K] tensor with contiguous rows and K a multiple of {QK8}, "
                         f"got {x.dtype} {tuple(x.shape)} strides {x.stride()}")


# ----------------------------------------------------------------------------- torch references

def quantize_q8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q int8 [M, K], d float32 [M, K/32], s float32 [M, K/32]): per block of 32,
    d = amax/127, q = round(x/d) half away from zero (0 where d = 0), s = d * sum(q)."""
    _check_x(x)
    m, k = x.shape
    xb = x.float().reshape(m, k // QK8, QK8)
    amax = xb.abs().amax(dim=2)
    d = amax / torch.full_like(amax, 127.0)  # a tensor divisor: torch on CUDA turns "/ 127" into "* (1/127)"
    v = xb / torch.where(d == 0, 1.0, d)[:, :, None]
    t = torch.trunc(v)
    q = t + torch.sign(v) * ((v - t).abs() >= 0.5)
    return q.to(torch.int8).reshape(m, k), d, d * q.sum(dim=2)


def gguf_gemv_q8_ref(x: torch.Tensor, data: torch.Tensor, qtype, k: int, out: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """What `gguf_gemv_q8` computes: x quantized by quantize_q8_ref and rebuilt (q * d), dequantized W,
    a float32 matmul; in x's dtype (into `out` if given)."""
    from finback.loader.quants import SUPPORTED_TYPES

    _check(x, data, qtype, k, out, types=SUPPORTED_TYPES)
    q, d, _ = quantize_q8_ref(x)
    xd = (q.float().reshape(x.shape[0], -1, QK8) * d[:, :, None]).reshape(x.shape)
    y = gguf_matmul_ref(xd, data, qtype, k)
    if out is None:
        return y.to(x.dtype)
    out.copy_(y)
    return out


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:
    from finback.kernels.gguf import _IQ1_S, _Q2_K, _Q4_K, _Q6_K, _Q8_0  # the types as constexprs

    @triton.jit
    def _quantize_kernel(x_ptr, q_ptr, d_ptr, s_ptr, K, stride_xm, NB: tl.constexpr):
        """Row program_id(0), blocks of 32 NB at a time."""
        m = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1) * NB + tl.arange(0, NB)
        bmask = b < K // 32
        offs = b[:, None] * 32 + tl.arange(0, 32)[None, :]
        x = tl.load(x_ptr + m * stride_xm + offs, mask=bmask[:, None], other=0.0).to(tl.float32)
        d = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full((NB,), 127.0, tl.float32))
        v = tl.math.div_rn(x, tl.where(d == 0, 1.0, d)[:, None])
        t = v.to(tl.int32)  # toward zero; |v| <= 127
        r = v - t.to(tl.float32)  # exact
        q = t + (r >= 0.5).to(tl.int32) - (r <= -0.5).to(tl.int32)
        tl.store(q_ptr + m * K + offs, q.to(tl.int8), mask=bmask[:, None])
        tl.store(d_ptr + m * (K // 32) + b, d, mask=bmask)
        tl.store(s_ptr + m * (K // 32) + b, d * tl.sum(q, axis=1).to(tl.float32), mask=bmask)

    @triton.jit
    def _dp4a(a, b, SIGNED: tl.constexpr, DP4A: tl.constexpr):
        """sum over the 4 bytes t of a_t * b_t (int32), a's bytes unsigned (SIGNED: signed), b's signed."""
        if DP4A:
            if SIGNED:
                return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, 0;", "=r,r,r", [a, b],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            else:
                return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, 0;", "=r,r,r", [a, b],
                                                 dtype=tl.int32, is_pure=True, pack=1)
        else:
            s = (a & 0) + (b & 0)  # broadcast zeros
            for t in tl.static_range(4):
                if SIGNED:
                    av = (a << (24 - 8 * t)) >> 24
                else:
                    av = (a >> (8 * t)) & 255
                s += av * ((b << (24 - 8 * t)) >> 24)
            return s

    @triton.jit
    def _word(w32_ptr, hw_ptr, base, unit_off, word_off, ALIGNED: tl.constexpr):
        """The int32 at byte base + unit_off + word_off of the blocks (all even): one load (ALIGNED: all
        multiples of 4) or two int16 loads. The terms are scaled apart so that the per-word constants
        word_off become address immediates."""
        if ALIGNED:
            return tl.load(w32_ptr + (base // 4 + unit_off // 4) + word_off // 4)
        else:
            h = (base // 2 + unit_off // 2) + word_off // 2
            return (tl.load(hw_ptr + h).to(tl.int32) & 0xFFFF) | (tl.load(hw_ptr + h + 1).to(tl.int32) << 16)

    @triton.jit
    def _u8(w_ptr, off):
        return tl.load(w_ptr + off).to(tl.int32)

    @triton.jit
    def _weights(w_ptr, hw_ptr, h_ptr, w32_ptr, t32_ptr, row_off, gu, QT: tl.constexpr, NG: tl.constexpr,
                 V: tl.constexpr, ALIGNED: tl.constexpr):
        """Units gu [U] of rows at byte offsets row_off [BN]: the packed quants wq [NG or 1, V, BN, U, 4]
        (int8x4 words; word 4v + i of group g) and per group the float scale and min/delta [NG or 1, BN,
        U] of the module docstring's table (Q8_0/Q6_K: min unused).

        Layout: Triton spreads threads over the innermost axes of a load whose elements it cannot read
        as one vector, so such loads are shaped [.., 4 words, BN, U] (the words stay in one thread)
        and permuted at the end; only aligned Q4_K words are loaded as 16-byte vectors directly in the
        final shape. Either way a thread keeps whole groups: no cross-thread sums."""
        W: tl.constexpr = 4 * V
        g = tl.arange(0, NG)[:, None, None, None, None]
        w = 4 * tl.arange(0, V)[None, :, None, None, None] + tl.arange(0, 4)[None, None, :, None, None]
        l4 = 4 * (W * g + w)  # [NG, V, 4, 1, 1]: byte of each word in its unit
        g3 = tl.arange(0, NG)[:, None, None]
        VEC: tl.constexpr = QT == _Q4_K and ALIGNED
        if QT == _Q4_K:
            # unit: 64 values c = gu % 4 = qs bytes 16 + 32c..: group 0 the low nibbles (sub-block 2c),
            # group 1 the high (2c + 1)
            c = gu % 4
            base = row_off[:, None] + ((gu // 4) * 144)[None, :]  # [BN, U]
            if VEC:  # rows 16-byte aligned (144-byte blocks): runs of 4 words are vector loads
                wv = tl.permute(w, (0, 1, 3, 4, 2))  # [1, V, 1, 1, 4]
                at = tl.multiple_of(base // 4 + 4 + 8 * c[None, :], [4, 4])  # [BN, U] word index
                wd = tl.load(w32_ptr + at[None, None, :, :, None] + wv)
            else:
                wd = _word(w32_ptr, hw_ptr, base[None, None, None, :, :], 16 + (32 * c)[None, None, None, None, :],
                           4 * w, False)
            wq = (wd >> (4 * g)) & 0x0F0F0F0F
            b3 = base[None, :, :]
            jj = ((2 * c)[None, None, :] + g3) % 4  # [NG, 1, U]: sub-block j = 2c + g, scale bytes j % 4
            qa = _u8(w_ptr, b3 + 4 + jj)
            qb = _u8(w_ptr, b3 + 8 + jj)
            qc = _u8(w_ptr, b3 + 12 + jj)
            low = (c < 2)[None, None, :]  # j < 4
            s6 = tl.where(low, qa & 63, (qc & 15) | ((qa >> 6) << 4))
            m6 = tl.where(low, qb & 63, (qc >> 4) | ((qb >> 6) << 4))
            hb = b3 // 2
            sc = tl.load(h_ptr + hb).to(tl.float32) * s6.to(tl.float32)
            mn = tl.load(h_ptr + hb + 1).to(tl.float32) * m6.to(tl.float32)
        elif QT == _Q2_K:
            # unit: 32 values u = gu % 8: 2-bit fields 2*(u%4) of qs bytes 16 + 32*(u//4)..; group 2u + g
            u = gu % 8
            base = row_off[:, None] + ((gu // 8) * 84)[None, :]
            wd = _word(w32_ptr, hw_ptr, base[None, None, None, :, :], 16 + (32 * (u // 4))[None, None, None, None, :],
                       l4, ALIGNED)
            wq = (wd >> (2 * (u % 4))[None, None, None, None, :]) & 0x03030303
            b3 = base[None, :, :]
            s = _u8(w_ptr, b3 + (2 * u)[None, None, :] + g3)
            sc = tl.load(h_ptr + b3 // 2 + 40).to(tl.float32) * (s & 15).to(tl.float32)
            mn = tl.load(h_ptr + b3 // 2 + 41).to(tl.float32) * (s >> 4).to(tl.float32)
        elif QT == _Q6_K:
            # unit: 32 values u = gu % 8 (a = u // 4, p = u % 4): low nibble p // 2 of ql bytes
            # 64a + 32*(p%2).., bits 2p of qh bytes 128 + 32a..; group 2u + g has int8 scale byte 192 + 2u + g
            u = gu % 8
            a = (u // 4)[None, None, None, None, :]
            p = (u % 4)[None, None, None, None, :]
            base = row_off[:, None] + ((gu // 8) * 210)[None, :]
            b5 = base[None, None, None, :, :]
            lo = _word(w32_ptr, hw_ptr, b5, 64 * a + 32 * (p % 2), l4, False)
            hi = _word(w32_ptr, hw_ptr, b5, 128 + 32 * a, l4, False)
            wq = ((lo >> (4 * (p // 2))) & 0x0F0F0F0F) | (((hi >> (2 * p)) & 0x03030303) << 4)
            b3 = base[None, :, :]
            s = _u8(w_ptr, b3 + 192 + (2 * u)[None, None, :] + g3)
            sc = tl.load(h_ptr + b3 // 2 + 104).to(tl.float32) * (s - ((s >> 7) << 8)).to(tl.float32)
            mn = sc
        elif QT == _Q8_0:
            # unit: a block, d | 32 int8
            base = row_off[:, None] + (gu * 34)[None, :]
            wq = _word(w32_ptr, hw_ptr, base[None, None, None, :, :], 2, l4, False)
            sc = tl.load(h_ptr + base[None, :, :] // 2).to(tl.float32)  # NG = 1
            mn = sc
        else:
            tl.static_assert(QT == _IQ1_S, "no dp4a GEMV for this GGUF type")
            # unit: group j = gu % 8 of 32: grid row r = w // 2 is words w, w + 1; d | qs[32] | qh u16[8]
            # at 34: row r's grid index is qs byte 4j + r | bits 3r..3r+2 of qh[j] << 8; qh bits 12..14
            # the scale s, bit 15 the delta's sign. A grid row is two int32 of int8 (t32_ptr).
            j = gu % 8
            base = row_off[:, None] + ((gu // 8) * 50)[None, :]
            b3 = base[None, :, :]
            qh = tl.load(hw_ptr + b3 // 2 + 17 + j[None, None, :]).to(tl.int32) & 0xFFFF  # [1, BN, U]
            sc = tl.load(h_ptr + b3 // 2).to(tl.float32) * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
            mn = tl.where((qh & 0x8000) != 0, -0.125, 0.125)
            # rows [1, V, 2, BN, U] (row 2v + i), their two words an innermost pair: 8-byte loads
            r = 2 * tl.arange(0, V)[None, :, None, None, None] + tl.arange(0, 2)[None, None, :, None, None]
            idx = (_u8(w_ptr, base[None, None, None, :, :] + 2 + (4 * j)[None, None, None, None, :] + r)
                   | (((qh[:, None, None, :, :] >> (3 * r)) & 7) << 8))
            wq = tl.load(t32_ptr + 2 * idx[:, :, :, :, :, None] + tl.arange(0, 2)[None, None, None, None, None, :])
            wq = tl.reshape(tl.permute(wq, (0, 1, 3, 4, 2, 5)), (1, V, wq.shape[3], wq.shape[4], 4))
        if not VEC and QT != _IQ1_S:
            wq = tl.permute(wq, (0, 1, 3, 4, 2))
        return wq, sc, mn

    @triton.jit
    def _q8_gemv_kernel(xq_ptr, dx_ptr, sx_ptr, w_ptr, hw_ptr, h_ptr, w32_ptr, t32_ptr, y_ptr, ws_ptr, lock_ptr,
                        M, N, K, stride_w, stride_ym, k_split,
                        QT: tl.constexpr, UNIT: tl.constexpr, NG: tl.constexpr, V: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ALIGNED: tl.constexpr,
                        SIGNED: tl.constexpr, DP4A: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr):
        """y[:, rows] = x_q8 @ W[rows]^T: xq int8 [M, K] read as int32 words, its block scales dx, sx
        [M, K/32]; W's blocks through the byte (w), int16 (hw), fp16 (h) and int32 (w32) views. Tiles
        are [BM, NG, V, BN, U, 4] (see `_weights`); the sums over V and the 4 words stay in a thread."""
        U: tl.constexpr = BK // UNIT
        GS: tl.constexpr = UNIT // NG
        W: tl.constexpr = 4 * V
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid * BN + tl.arange(0, BN)
        row_off = tl.minimum(rn, N - 1).to(tl.int64) * stride_w  # rows past N re-read row N-1, not stored
        mi = tl.arange(0, BM)
        xrow = tl.minimum(mi, M - 1).to(tl.int64)  # rows past M re-read row M-1, not stored
        xq_rows = (xq_ptr + xrow * (K // 4))[:, None, None, None, None, None]
        dx_rows = (xrow * (K // 32))[:, None, None, None]
        g = tl.arange(0, NG)[:, None, None, None, None]
        kw = W * g + 4 * tl.arange(0, V)[None, :, None, None, None] + tl.arange(0, 4)[None, None, None, None, :]
        g4 = tl.arange(0, NG)[None, :, None, None]
        ones = tl.full((1, 1, 1, 1, 1, 1), 0x01010101, tl.int32)
        acc = tl.zeros((BM, NG, BN, U), dtype=tl.float32)
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        for k0 in range(k_lo, k_hi, BK):
            gr = k0 // UNIT + tl.arange(0, U)
            gu = tl.minimum(gr, k_hi // UNIT - 1)  # units past the split re-read its last; x is 0 there
            # x words [NG, V, BN, U, 4]: a copy per weight row (from L1), so they take the weights' layout
            xoff = tl.broadcast_to(((UNIT // 4) * gr)[None, None, None, :, None] + kw, (NG, V, BN, U, 4))
            boff = dx_rows + (UNIT * gr[None, None, None, :] + GS * g4) // 32  # [BM, NG, 1, U]
            if EVEN_K:
                xw = tl.load(xq_rows + xoff[None])
                dx = tl.load(dx_ptr + boff)
                sx = tl.load(sx_ptr + boff)
            else:
                ok = (gr < k_hi // UNIT)[None, None, None, :]
                xw = tl.load(xq_rows + xoff[None], mask=ok[:, :, :, None, :, None], other=0)
                dx = tl.load(dx_ptr + boff, mask=ok, other=0.0)
                sx = tl.load(sx_ptr + boff, mask=ok, other=0.0)
            wq, sc, mn = _weights(w_ptr, hw_ptr, h_ptr, w32_ptr, t32_ptr, row_off, gu, QT, NG, V, ALIGNED)
            isum = tl.sum(tl.sum(_dp4a(wq[None], xw, SIGNED, DP4A), axis=5), axis=2)  # [BM, NG, BN, U]
            if QT == _Q2_K or QT == _Q6_K:  # 16-value groups: x sums per group [BM, NG, 1, U]
                xs = tl.sum(tl.sum(_dp4a(ones, xw, True, DP4A), axis=5), axis=2)
                if QT == _Q6_K:
                    isum -= 32 * xs
            if QT == _Q4_K:
                acc += isum.to(tl.float32) * (sc[None] * dx) - mn[None] * sx
            elif QT == _Q2_K:
                acc += isum.to(tl.float32) * (sc[None] * dx) - mn[None] * (dx * xs.to(tl.float32))
            elif QT == _IQ1_S:
                acc += sc[None] * (dx * isum.to(tl.float32) + mn[None] * sx)
            else:
                acc += isum.to(tl.float32) * (sc[None] * dx)
        out = tl.sum(tl.sum(acc, axis=3), axis=1)
        _store(out, y_ptr, ws_ptr, lock_ptr, pid, pid_k, mi, rn, M, N, stride_ym, SPLIT)


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton quantize_q8_ref: x [M, K] (float32/bf16/fp16, contiguous rows) -> (q int8 [M, K],
    d float32 [M, K/32], s float32 [M, K/32]), bit-equal to the reference."""
    _require_triton()
    _check_x(x)
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    d = torch.empty(m, k // QK8, dtype=torch.float32, device=x.device)
    s = torch.empty_like(d)
    if m and k:
        nb = 32
        _quantize_kernel[(m, triton.cdiv(k // QK8, nb))](x, q, d, s, k, x.stride(0), NB=nb, num_warps=4)
    return q, d, s


def gguf_gemv_q8(x: torch.Tensor, data: torch.Tensor, qtype, k: int, out: torch.Tensor | None = None, *,
                 block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                 split_k: int | None = None, num_stages: int = 2,
                 q8: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """y = x @ W^T for M <= 4 rows of x (int8-quantized by quantize_q8), W as GGUF blocks `data`
    (uint8 [N, K/QK*block_bytes], rows may be strided), in x's dtype (into `out`, which may be a column
    slice). q8: quantize_q8(x) already computed (shared by the layers that read the same x).

    block_n weight rows per program (default 8), block_k values per step (default 512), num_warps
    (default 2); keep block_n * block_k / UNIT >= 32 * num_warps (UNIT: 64 values for Q4_K, else 32)
    or threads share a group. split_k: programs per row tile along K (default: enough for
    SPLIT_WARPS_PER_SM warps per SM, at most one per K step): a memory-bound loop needs many loads in
    flight, and 1.5B-sized layers have too few row tiles to give them."""
    _require_triton()
    qt, n = _check(x, data, qtype, k, out, types=Q8_TYPES)
    m = x.shape[0]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"gguf_gemv_q8 takes 1 to {MAX_M} rows of x, got {m}")
    unit, ng, v = _UNITS[qt]
    block_n = block_n or 8
    block_k = block_k or 512
    num_warps = num_warps or 2
    if block_k < unit or block_k & (block_k - 1) or block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"{qt.name}: block_k must be a power of two >= {unit} and block_n a power of two "
                         f"(got {block_n}, {block_k})")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    if q8 is None:
        q8 = quantize_q8(x)
    xq, dx, sx = q8
    if tuple(xq.shape) != (m, k) or xq.dtype != torch.int8 or not xq.is_contiguous() or xq.device != x.device or any(
            tuple(t.shape) != (m, k // QK8) or t.dtype != torch.float32 or not t.is_contiguous() or t.device != x.device
            for t in (dx, sx)):
        raise ValueError("q8 must be quantize_q8(x): contiguous int8 [M, K] and float32 [M, K/32] twice")
    align = 16 if qt == T.Q4_K else 4  # Q4_K: 16-byte vectors (the kernel is told so), Q2_K: int32 words
    aligned = data.data_ptr() % align == 0 and data.stride(0) % align == 0 and data.shape[1] % 4 == 0
    tiles = triton.cdiv(n, block_n)
    if split_k is None:
        split_k = triton.cdiv(SPLIT_WARPS_PER_SM * _num_sms(out.device), tiles * num_warps)
    split_k, k_split, ws, locks = _plan_split(out, k, block_k, tiles, split_k)
    if qt == T.IQ1_S:
        from finback.loader import iq_grids

        table = iq_grids.packed_grid(qt, data.device).view(torch.int32)
    else:
        table = data
    _q8_gemv_kernel[(tiles, split_k)](
        xq.view(torch.int32), dx, sx, data, data.view(torch.int16), data.view(torch.float16),
        data.view(torch.int32) if aligned else data, table, out, ws, locks,
        m, n, k, data.stride(0), out.stride(0), k_split,
        QT=int(qt), UNIT=unit, NG=ng, V=v, BM=triton.next_power_of_2(m), BN=block_n, BK=block_k,
        ALIGNED=aligned, SIGNED=qt in (T.Q8_0, T.IQ1_S), DP4A=not interpreting(), SPLIT=split_k > 1,
        EVEN_K=k % block_k == 0, num_warps=num_warps, num_stages=num_stages)
    return out


__all__ = ["Q8_TYPES", "gguf_gemv_q8", "gguf_gemv_q8_ref", "quantize_q8", "quantize_q8_ref"]

"""Dequantize GGUF tensor data in torch.

`dequantize(data, qtype, shape)` turns the raw bytes of one GGUF tensor into float32. The result is
bit-for-bit what `gguf.quants.dequantize` (gguf-py, numpy) returns: every formula below performs the
same float32 operations in the same order as gguf-py (for example Q4_K is `(d*sc)*q - (dmin*m)`,
with the subtraction rounded separately, never fused), and fp16 -> fp32 is exact (NaN bits included).

Work is vectorized over blocks and done in chunks of blocks, so the extra memory beyond the output
is a few hundred KB per thread on CPU (under ~100 MB on an accelerator, where a chunk is 16M
values) whatever the tensor size. On CPU, large tensors are split over
`torch.get_num_threads()` threads.

Block layouts (QK_K = 256) are those of ggml-common.h; each decoder names the byte ranges it reads.
The IQ types' codebooks and sign tables live in finback/loader/iq_grids.py.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
import threading
from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from finback.loader import iq_grids

__all__ = [
    "SUPPORTED_TYPES",
    "UnsupportedQuantType",
    "dequantize",
    "type_nbytes",
]

T = GGMLQuantizationType


class UnsupportedQuantType(ValueError):
    """A GGUF tensor type this module cannot dequantize (yet)."""

    def __init__(self, qtype: object):
        self.qtype = qtype
        name = qtype.name if isinstance(qtype, GGMLQuantizationType) else repr(qtype)
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        super().__init__(
            f"unsupported GGUF tensor type {name}: finback can dequantize {supported}"
        )


def _as_qtype(qtype: object) -> GGMLQuantizationType:
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, bool) or not isinstance(qtype, int):
        raise UnsupportedQuantType(qtype)
    try:
        return GGMLQuantizationType(int(qtype))
    except ValueError:
        raise UnsupportedQuantType(qtype) from None


def type_nbytes(qtype: GGMLQuantizationType | int, shape: tuple[int, ...]) -> int:
    """Bytes a GGUF tensor of `shape` (torch order, last dim = row length) and `qtype` occupies."""
    qt = _as_qtype(qtype)
    if qt not in GGML_QUANT_SIZES:
        raise UnsupportedQuantType(qt)
    block_size, type_size = GGML_QUANT_SIZES[qt]
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in tensor shape {shape}")
    row = shape[-1] if shape else 1
    if row % block_size != 0:
        raise ValueError(
            f"{qt.name} tensor row length {row} (shape {shape}) is not a multiple of "
            f"its block size {block_size}"
        )
    return math.prod(shape) // block_size * type_size


# --------------------------------------------------------------------------- helpers
#
# Performance notes (CPU). ATen runs an elementwise op on one thread below 32768 elements and opens
# an OpenMP parallel region above; thousands of small parallel regions are slow, and very slow when
# the cores are shared with other processes (threads wait at each region's barrier). So every op here
# stays below that size: a "super-chunk" (a work unit, ~8 sub-chunks) first decodes its per-block
# scales in a few ops, then each sub-chunk (< 32768 values) unpacks and scales its quants. Parallelism
# comes from our own worker threads taking whole super-chunks (torch releases the GIL inside ops).
# Torch also pays per row of an op's innermost dimension, so short rows (16 or 32 bytes) are avoided
# where it matters: 1- and 2-bit fields are unpacked on int64 words (8 bytes at once, one shift and
# mask per plane; the mask drops any bits a shift carries over from the neighbouring byte).
# Every product here is exact in float32 (fp16 d has 11 significant bits, scale * quant at most 13),
# so the only rounding is the final +m / -dmin*m, exactly as in gguf-py.

_GRAIN = 32768  # at::internal::GRAIN_SIZE
_SUB_ELEMS = _GRAIN - 1  # values per sub-chunk on CPU
_SUPER = 8  # sub-chunks per super-chunk (per-block scale tensors stay < _GRAIN elements)
_ACCEL_ELEMS = 16 << 20  # values per chunk on an accelerator (64 MB of float32 output)

_CONST_CACHE: dict[tuple, torch.Tensor] = {}


def _const(values, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small cached constant tensor (shift amounts, masks)."""
    key = (tuple(values) if isinstance(values, (list, tuple)) else values, dtype, shape, str(device))
    t = _CONST_CACHE.get(key)
    if t is None:
        t = torch.tensor(values, dtype=dtype, device=device).reshape(shape)
        _CONST_CACHE[key] = t
    return t


def _u64(pattern: int) -> int:
    """A repeated-byte uint64 mask as the int64 value with the same bits."""
    return pattern - (1 << 64) if pattern >= 1 << 63 else pattern


M01 = _u64(0x0101010101010101)
M03 = _u64(0x0303030303030303)
M0F = _u64(0x0F0F0F0F0F0F0F0F)


def _f16s(blocks: torch.Tensor, at: int, k: int) -> torch.Tensor:
    """The k consecutive fp16 values at byte `at` of each block, as exact float32 (n, k)."""
    raw = blocks[:, at : at + 2 * k].clone(memory_format=torch.contiguous_format)
    return raw.view(torch.float16).float()


def _words(blocks: torch.Tensor, at: int, nbytes: int) -> torch.Tensor:
    """Bytes [at, at+nbytes) of each block (nbytes % 8 == 0) as an aligned int64 tensor (n, nbytes/8)."""
    raw = blocks[:, at : at + nbytes].clone(memory_format=torch.contiguous_format)
    return raw.view(torch.int64)


def _fields(words: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """words (n, *g, w) int64 -> uint8 (n, *g, len(shifts), 8*w): byte i of plane s is
    (byte i >> shifts[s]) & mask, for a mask that keeps only bits below 8 - max(shifts)."""
    sh = _const(shifts, torch.int64, (len(shifts), 1), words.device)
    planes = (words.unsqueeze(-2) >> sh).bitwise_and_(_const(mask, torch.int64, (), words.device))
    return planes.view(torch.uint8)


def _subs(n: int, sub: int):
    for s in range(0, n, sub):
        yield s, min(n, s + sub)


def _k4_scale_min(blocks: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: bytes 4..16 hold 8 6-bit scales and 8 6-bit mins (get_scale_min_k4);
    d = (n, 2) float32 [d, dmin]. Returns float32 (n, 2, 8): [:, 0] = d*sc, [:, 1] = dmin*m."""
    n = blocks.shape[0]
    sb = blocks[:, 4:16].reshape(n, 3, 4)
    dq, mq, mdq = sb[:, 0], sb[:, 1], sb[:, 2]
    sm = torch.empty((n, 2, 2, 4), dtype=torch.uint8, device=blocks.device)
    torch.bitwise_and(dq, 0x3F, out=sm[:, 0, 0])
    torch.bitwise_or(mdq & 0x0F, (dq >> 2) & 0x30, out=sm[:, 0, 1])
    torch.bitwise_and(mq, 0x3F, out=sm[:, 1, 0])
    torch.bitwise_or(mdq >> 4, (mq >> 2) & 0x30, out=sm[:, 1, 1])
    return d.unsqueeze(2) * sm.view(n, 2, 8).float()


# --------------------------------------------------------------------------- decoders
# Each decoder gets `blocks` (n, type_size) uint8, writes `out` (n, block_size) float32, and does
# its elementwise work in sub-chunks of `sub` blocks. Products are float32 and rounded like numpy's:
# the scale products (d * sc) are computed first, then (d*sc) * q, then +/- (dmin*m).


def _deq_f32(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    for s, e in _subs(blocks.shape[0], sub):
        out[s:e].view(torch.uint8).copy_(blocks[s:e])


def _deq_f16(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # numpy: data.view(float16).astype(float32), exact. numpy keeps a signaling NaN signaling while
    # torch quiets it, so NaNs (rare: only if the file holds them) are rebuilt from their bits.
    aligned = blocks.storage_offset() % 2 == 0
    for s, e in _subs(blocks.shape[0], sub):
        b = blocks[s:e] if aligned else blocks[s:e].clone()
        h = b.view(torch.float16)
        o = out[s:e]
        o.copy_(h)
        total = float(o.sum())  # NaN if any value is NaN (or, rarely, from inf - inf)
        if total != total:
            nan = torch.isnan(o)
            hb = h.view(torch.int16).to(torch.int32)[nan]
            o.view(torch.int32)[nan] = ((hb & 0x8000) << 16) | 0x7F800000 | ((hb & 0x03FF) << 13)


def _deq_bf16(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # numpy: (int16 -> int32) << 16, viewed as float32: a pure bit move.
    aligned = blocks.storage_offset() % 2 == 0
    for s, e in _subs(blocks.shape[0], sub):
        b = blocks[s:e] if aligned else blocks[s:e].clone()
        iv = out[s:e].view(torch.int32)
        iv.copy_(b.view(torch.int16))
        iv.bitwise_left_shift_(16)


def _deq_q8_0(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | qs:32 (int8).  numpy: x * d
    d = _f16s(blocks, 0, 1)
    for s, e in _subs(blocks.shape[0], sub):
        o = out[s:e]
        o.copy_(blocks[s:e, 2:].view(torch.int8))
        o.mul_(d[s:e])


def _nib16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """16 bytes at `at` -> (n, 32) uint8: value k<16 is the low nibble of byte k, k>=16 the high
    nibble of byte k-16."""
    w = _words(blocks, at, 16)
    m = _const(M0F, torch.int64, (), w.device)
    hi = (w >> _const(4, torch.int64, (), w.device)).bitwise_and_(m)
    return torch.cat([w & m, hi], dim=1).view(torch.uint8)


def _nib_rows(src: torch.Tensor) -> torch.Tensor:
    """Bytes (n, G, L) -> uint8 (n, G*2*L): group g holds the L low nibbles, then the L high ones."""
    dev = src.device
    lo = src & _const(15, torch.uint8, (), dev)
    hi = src >> _const(4, torch.uint8, (), dev)
    return torch.stack([lo, hi], dim=2).view(src.shape[0], -1)


def _deq_q4_0(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | qs:16.  d * (q - 8)
    d = _f16s(blocks, 0, 1)
    for s, e in _subs(blocks.shape[0], sub):
        q = _nib16(blocks[s:e], 2).view(torch.int8).sub_(8)
        o = out[s:e]
        o.copy_(q)
        o.mul_(d[s:e])


def _deq_q4_1(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | m:2 | qs:16.  (d * q) + m
    dm = _f16s(blocks, 0, 2)
    d, m = dm[:, 0:1], dm[:, 1:2]
    for s, e in _subs(blocks.shape[0], sub):
        o = out[s:e]
        o.copy_(_nib16(blocks[s:e], 4))
        o.mul_(d[s:e]).add_(m[s:e])


def _q5_values(blocks: torch.Tensor, qh_at: int) -> torch.Tensor:
    """5-bit values (n, 32) uint8 of Q5_0/Q5_1: nibbles from the 16 bytes after qh, and bit k of the
    little-endian uint32 qh as bit 4 of value k."""
    n = blocks.shape[0]
    dev = blocks.device
    q = _nib16(blocks, qh_at + 4)
    qh = blocks[:, qh_at : qh_at + 4].clone(memory_format=torch.contiguous_format).view(torch.int32)
    bits = (qh >> _const(tuple(range(32)), torch.int32, (1, 32), dev)).bitwise_and_(1)
    q |= bits.to(torch.uint8).view(n, 32) << 4
    return q


def _deq_q5_0(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | qh:4 | qs:16.  d * (q - 16)
    d = _f16s(blocks, 0, 1)
    for s, e in _subs(blocks.shape[0], sub):
        q = _q5_values(blocks[s:e], 2).view(torch.int8).sub_(16)
        o = out[s:e]
        o.copy_(q)
        o.mul_(d[s:e])


def _deq_q5_1(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | m:2 | qh:4 | qs:16.  (d * q) + m
    dm = _f16s(blocks, 0, 2)
    d, m = dm[:, 0:1], dm[:, 1:2]
    for s, e in _subs(blocks.shape[0], sub):
        o = out[s:e]
        o.copy_(_q5_values(blocks[s:e], 4))
        o.mul_(d[s:e]).add_(m[s:e])


def _crumbs64(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """64 bytes at `at` -> (n, 256) uint8 2-bit values: value j*128 + s*32 + i is bits 2s..2s+1 of
    byte j*32 + i (the Q2_K/Q3_K qs and Q6_K qh layout)."""
    n = blocks.shape[0]
    return _fields(_words(blocks, at, 64).view(n, 2, 4), (0, 2, 4, 6), M03).view(n, 256)


def _bits32(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """32 bytes at `at` -> (n, 256) uint8 bits: value s*32 + i is bit s of byte i."""
    n = blocks.shape[0]
    return _fields(_words(blocks, at, 32), tuple(range(8)), M01).view(n, 256)


def _deq_q2_k(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # scales:16 | qs:64 | d:2 | dmin:2.  (d*(sc&15)) * q - (dmin*(sc>>4)), 16 groups of 16
    n = blocks.shape[0]
    dd = _f16s(blocks, 80, 2)
    scales = blocks[:, 0:16]
    dl = (dd[:, 0:1] * (scales & 0xF).float()).unsqueeze(2)
    ml = (dd[:, 1:2] * (scales >> 4).float()).unsqueeze(2)
    for s, e in _subs(n, sub):
        o = out[s:e].view(e - s, 16, 16)
        o.copy_(_crumbs64(blocks[s:e], 16).view(e - s, 16, 16))
        o.mul_(dl[s:e]).sub_(ml[s:e])


def _deq_q3_k(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # hmask:32 | qs:64 | scales:12 | d:2.  (d * (sc6 - 32)) * (ql - 4*(1-hbit)), 16 groups of 16
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16s(blocks, 108, 1)
    sb = blocks[:, 96:108]
    sc = torch.empty((n, 4, 4), dtype=torch.uint8, device=dev)
    lo, hi = sb[:, 0:8], sb[:, 8:12]
    # scale k (0..15): low 4 bits from byte k%8 (nibble k//8), high 2 bits from byte 8 + k%4
    # (bits 2*(k//4)).
    lo4 = torch.cat([lo & 0x0F, lo >> 4], dim=1).view(n, 4, 4)
    hi2 = hi.unsqueeze(1) >> _const((0, 2, 4, 6), torch.uint8, (1, 4, 1), dev)
    torch.bitwise_or(lo4, (hi2 & 0x03) << 4, out=sc)
    scf = (sc.view(n, 16).view(torch.int8) - 32).float()
    dl = (d * scf).unsqueeze(2)
    for s, e in _subs(n, sub):
        b = blocks[s:e]
        q = _crumbs64(b, 32)
        q -= _bits32(b, 0).bitwise_xor_(1) << 2  # uint8 wraps; viewed as int8 it is ql - 4*(1-h)
        o = out[s:e].view(e - s, 16, 16)
        o.copy_(q.view(torch.int8).view(e - s, 16, 16))
        o.mul_(dl[s:e])


def _deq_q4_k(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | dmin:2 | scales:12 | qs:128.  (d*sc) * q - (dmin*m), 8 groups of 32
    n = blocks.shape[0]
    sm = _k4_scale_min(blocks, _f16s(blocks, 0, 2))
    dl, ml = sm[:, 0].unsqueeze(2), sm[:, 1].unsqueeze(2)
    for s, e in _subs(n, sub):
        k = e - s
        q = _nib_rows(blocks[s:e, 16:144].view(k, 4, 32))
        o = out[s:e].view(k, 8, 32)
        o.copy_(q.view(k, 8, 32))
        o.mul_(dl[s:e]).sub_(ml[s:e])


def _deq_q5_k(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | dmin:2 | scales:12 | qh:32 | qs:128.  (d*sc) * q - (dmin*m), 8 groups of 32
    n = blocks.shape[0]
    sm = _k4_scale_min(blocks, _f16s(blocks, 0, 2))
    dl, ml = sm[:, 0].unsqueeze(2), sm[:, 1].unsqueeze(2)
    for s, e in _subs(n, sub):
        k = e - s
        b = blocks[s:e]
        q = _nib_rows(b[:, 48:176].view(k, 4, 32))
        q |= _bits32(b, 16) << 4
        o = out[s:e].view(k, 8, 32)
        o.copy_(q.view(k, 8, 32))
        o.mul_(dl[s:e]).sub_(ml[s:e])


def _deq_q6_k(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # ql:128 | qh:64 | scales:16 (int8) | d:2.  (d*sc) * (q - 32), 16 groups of 16
    n = blocks.shape[0]
    d = _f16s(blocks, 208, 1)
    dl = (d * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(2)
    for s, e in _subs(n, sub):
        k = e - s
        b = blocks[s:e]
        # low 4 bits: value a*128 + h*64 + i is nibble h of ql byte a*64 + i
        q = _nib_rows(b[:, 0:128].view(k, 2, 64))
        q |= _crumbs64(b, 128) << 4
        q = q.view(torch.int8).sub_(32)
        o = out[s:e].view(k, 16, 16)
        o.copy_(q.view(k, 16, 16))
        o.mul_(dl[s:e])


# --------------------------------------------------------------------------- IQ types
# IQ blocks hold indices into fixed codebooks (finback/loader/iq_grids.py), sign patterns and 4-bit
# group scales. Every product below is exact in float32 (fp16 d: 11 bits; group scale: <= 5 bits;
# grid value: <= 6 bits; IQ4 codebook: 7 bits; IQ1 grid+delta: 4 bits), so results are bit-equal to
# gguf-py's whatever the order. The order is still gguf-py's (IQ4_XS aside: its lookup lands in the
# output first), so a non-finite d gives NaN/inf in the same places. Lookups are embedding-style
# gathers of whole codebook rows.


def _raw(blocks: torch.Tensor, at: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes [at, at+nbytes) of each block, aligned and viewed as `dtype` (n, nbytes/itemsize)."""
    return blocks[:, at : at + nbytes].clone(memory_format=torch.contiguous_format).view(dtype)


def _u16(blocks: torch.Tensor, at: int, k: int) -> torch.Tensor:
    """k little-endian uint16 at byte `at` of each block, as int32 (n, k)."""
    return _raw(blocks, at, 2 * k, torch.int16).to(torch.int32).bitwise_and_(0xFFFF)


def _u32(blocks: torch.Tensor, at: int, k: int) -> torch.Tensor:
    """k little-endian uint32 at byte `at` of each block, as int64 (n, k)."""
    return _raw(blocks, at, 4 * k, torch.int32).to(torch.int64).bitwise_and_(0xFFFFFFFF)


def _nibbles(src: torch.Tensor) -> torch.Tensor:
    """Bytes (n, L) -> uint8 (n, 2L): value 2j is the low nibble of byte j, 2j+1 the high one."""
    return torch.stack([src & 0x0F, src >> 4], dim=2).view(src.shape[0], -1)


def _shifted(x: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """x (n, k) integer -> (n, k*len(shifts)): entry k*S + s is (x[k] >> shifts[s]) & mask."""
    sh = _const(shifts, x.dtype, (1, 1, len(shifts)), x.device)
    return (x.unsqueeze(2) >> sh).bitwise_and_(mask).view(x.shape[0], -1)


def _byte_signs(device: torch.device) -> torch.Tensor:
    """float32 [256, 8]: entry [b, k] = -1 where bit k of byte b is set, else +1."""
    key = ("byte_signs", str(device))
    t = _CONST_CACHE.get(key)
    if t is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        t = (1 - 2 * bits).to(torch.float32).to(device)
        _CONST_CACHE[key] = t
    return t


def _rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of a [N, W] table at integer indices idx (any shape): (*idx.shape, W)."""
    return torch.nn.functional.embedding(idx.long(), table)


def _scale_half(d: torch.Tensor, s: torch.Tensor, last: float) -> torch.Tensor:
    """gguf-py's d * (0.5 + s) * last for 4-bit group scales s (n, k)."""
    return d * (0.5 + s.float()) * last


def _deq_iq2_xxs(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | 8 x (grid idx:4 bytes, aux:uint32).  aux: four 7-bit sign indices, scale in bits 28..31.
    # value (g, r, k) = (d*(0.5+s_g)*0.25) * grid[idx_gr][k] * sign[sidx_gr][k]
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16s(blocks, 0, 1)
    aux = _u32(blocks, 2, 16).view(n, 8, 2)[:, :, 1]
    db = _scale_half(d, aux >> 28, 0.25).view(n, 8, 1, 1)
    sidx = _shifted(aux, (0, 7, 14, 21), 0x7F)
    grid, signs = iq_grids.grid(T.IQ2_XXS, dev), iq_grids.sign_table(dev)
    for s, e in _subs(n, sub):
        k = e - s
        idx = blocks[s:e, 2:66].reshape(k, 8, 2, 4)[:, :, 0]
        o = out[s:e].view(k, 8, 4, 8)
        torch.mul(db[s:e], _rows(grid, idx), out=o)
        o.mul_(_rows(signs, sidx[s:e].view(k, 8, 4)))


def _deq_iq2_xs(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | qs:32 x uint16 (grid idx: low 9 bits, sign idx: high 7) | scales:8 (16 nibbles).
    # 16 groups of 16 values (2 grid rows each).
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16s(blocks, 0, 1)
    db = _scale_half(d, _nibbles(blocks[:, 66:74]), 0.25).view(n, 16, 1, 1)
    grid, signs = iq_grids.grid(T.IQ2_XS, dev), iq_grids.sign_table(dev)
    for s, e in _subs(n, sub):
        k = e - s
        qs = _u16(blocks[s:e], 2, 32)
        o = out[s:e].view(k, 16, 2, 8)
        torch.mul(db[s:e], _rows(grid, qs & 511).view(k, 16, 2, 8), out=o)
        o.mul_(_rows(signs, qs >> 9).view(k, 16, 2, 8))


def _deq_iq2_s(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | qs:32 | signs:32 | qh:8 | scales:8.  grid idx j = qs[j] | ((qh[j/4] >> 2(j%4)) & 3) << 8;
    # sign bit k of byte j negates value 8j+k; 16 groups of 16 values.
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16s(blocks, 0, 1)
    db = _scale_half(d, _nibbles(blocks[:, 74:82]), 0.25).view(n, 16, 1, 1)
    grid, signs = iq_grids.grid(T.IQ2_S, dev), _byte_signs(dev)
    for s, e in _subs(n, sub):
        k = e - s
        b = blocks[s:e]
        idx = b[:, 2:34].to(torch.int32) | (_shifted(b[:, 66:74].to(torch.int32), (0, 2, 4, 6), 3) << 8)
        o = out[s:e].view(k, 16, 2, 8)
        torch.mul(db[s:e], _rows(grid, idx).view(k, 16, 2, 8), out=o)
        o.mul_(_rows(signs, b[:, 34:66]).view(k, 16, 2, 8))


def _deq_iq3_xxs(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | qs:64 (grid idx, 4 values each) | 8 x uint32 aux (four 7-bit sign indices, scale in
    # bits 28..31).  8 groups of 32 values: (d*(0.5+s)*0.5) * grid * sign.
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16s(blocks, 0, 1)
    aux = _u32(blocks, 66, 8)
    db = _scale_half(d, aux >> 28, 0.5).view(n, 8, 1, 1)
    sidx = _shifted(aux, (0, 7, 14, 21), 0x7F)
    grid, signs = iq_grids.grid(T.IQ3_XXS, dev), iq_grids.sign_table(dev)
    for s, e in _subs(n, sub):
        k = e - s
        o = out[s:e].view(k, 8, 4, 8)
        torch.mul(db[s:e], _rows(grid, blocks[s:e, 2:66]).view(k, 8, 4, 8), out=o)
        o.mul_(_rows(signs, sidx[s:e].view(k, 8, 4)))


def _deq_iq3_s(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | qs:64 | qh:8 | signs:32 | scales:4.  grid idx j = qs[j] | bit (j%8) of qh[j/8] << 8
    # (4 values each); sign bit k of byte j negates value 8j+k; 8 groups of 32: d*(1+2s).
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16s(blocks, 0, 1)
    db = (d * (1 + 2 * _nibbles(blocks[:, 106:110]))).view(n, 8, 1, 1)
    grid, signs = iq_grids.grid(T.IQ3_S, dev), _byte_signs(dev)
    for s, e in _subs(n, sub):
        k = e - s
        b = blocks[s:e]
        idx = b[:, 2:66].to(torch.int32) | (_shifted(b[:, 66:74].to(torch.int32), tuple(range(8)), 1) << 8)
        o = out[s:e].view(k, 8, 4, 8)
        torch.mul(db[s:e], _rows(grid, idx).view(k, 8, 4, 8), out=o)
        o.mul_(_rows(signs, b[:, 74:106]).view(k, 8, 4, 8))


def _iq1_delta(neg: torch.Tensor) -> torch.Tensor:
    """+-IQ1_DELTA (float32) where the sign bit `neg` (0 or nonzero) says."""
    dev = neg.device
    return torch.where(neg != 0, _const(-iq_grids.IQ1_DELTA, torch.float32, (), dev),
                       _const(iq_grids.IQ1_DELTA, torch.float32, (), dev))


def _deq_iq1_s(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | qs:32 | qh:8 x uint16.  qh[g]: bits 3r..3r+2 = high bits of grid idx 4g+r, bits 12..14 =
    # scale s, bit 15 = delta sign.  8 groups of 32: (d*(2s+1)) * (grid + delta).
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16s(blocks, 0, 1)
    qh = _u16(blocks, 34, 8)
    dl = (d * (2 * ((qh >> 12) & 7) + 1)).view(n, 8, 1, 1)
    delta = _iq1_delta(qh & 0x8000).view(n, 8, 1, 1)
    hi = _shifted(qh, (0, 3, 6, 9), 7) << 8
    grid = iq_grids.grid(T.IQ1_S, dev)
    for s, e in _subs(n, sub):
        k = e - s
        idx = blocks[s:e, 2:34].to(torch.int32) | hi[s:e]
        o = out[s:e].view(k, 8, 4, 8)
        torch.add(_rows(grid, idx).view(k, 8, 4, 8), delta[s:e], out=o)
        o.mul_(dl[s:e])


def _deq_iq1_m(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # qs:32 | qh:16 | scales:4 x uint16.  The fp16 d is the top nibbles of the 4 scale words (word w
    # gives bits 4w..4w+3); the low 12 bits of each word are four 3-bit scales (16 groups of 16).
    # qh byte j: low nibble for grid idx 2j, high nibble for 2j+1 (bits 0..2: idx bits 8..10,
    # bit 3: delta sign of that 8-value row).  value = (d*(2s+1)) * (grid + delta).
    n = blocks.shape[0]
    dev = blocks.device
    sc = _u16(blocks, 48, 4)
    top = (sc & 0xF000) >> _const((12, 8, 4, 0), torch.int32, (1, 4), dev)
    dbits = top[:, 0] | top[:, 1] | top[:, 2] | top[:, 3]
    d = (dbits - ((dbits >> 15) << 16)).to(torch.int16).view(torch.float16).float().view(n, 1)
    dl = (d * (2 * _shifted(sc, (0, 3, 6, 9), 7) + 1)).view(n, 8, 2, 1, 1)
    nib = _nibbles(blocks[:, 32:48])
    delta = _iq1_delta(nib & 8).view(n, 8, 2, 2, 1)
    hi = (nib & 7).to(torch.int32) << 8
    grid = iq_grids.grid(T.IQ1_M, dev)
    for s, e in _subs(n, sub):
        k = e - s
        idx = blocks[s:e, 0:32].to(torch.int32) | hi[s:e]
        o = out[s:e].view(k, 8, 2, 2, 8)
        torch.add(_rows(grid, idx).view(k, 8, 2, 2, 8), delta[s:e], out=o)
        o.mul_(dl[s:e])


def _deq_iq4_nl(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | qs:16 (block of 32: value k<16 is the low nibble of byte k, k>=16 the high nibble of
    # byte k-16).  d * kvalues[q]
    d = _f16s(blocks, 0, 1)
    kv = iq_grids.kvalues_iq4nl(blocks.device)
    for s, e in _subs(blocks.shape[0], sub):
        o = out[s:e]
        torch.index_select(kv, 0, _nib16(blocks[s:e], 2).view(-1).long(), out=o.view(-1))
        o.mul_(d[s:e])


def _deq_iq4_xs(blocks: torch.Tensor, out: torch.Tensor, sub: int) -> None:
    # d:2 | scales_h:uint16 | scales_l:4 | qs:128.  8 groups of 32; 6-bit scale g = nibble g of
    # scales_l (low nibble first) | bits 2g..2g+1 of scales_h << 4, minus 32; group g's values are
    # the 16 low nibbles of bytes 16g.. then the 16 high ones.  (d * sc) * kvalues[q] (exact, so
    # computed as kvalues[q] * (d * sc))
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16s(blocks, 0, 1)
    sh = _shifted(_u16(blocks, 2, 1), tuple(range(0, 16, 2)), 3)
    sc = (_nibbles(blocks[:, 4:8]).to(torch.int32) | (sh << 4)) - 32
    dl = (d * sc.float()).view(n, 8, 1)
    kv = iq_grids.kvalues_iq4nl(dev)
    for s, e in _subs(n, sub):
        k = e - s
        q = _nib_rows(blocks[s:e, 8:136].view(k, 8, 16))
        o = out[s:e]
        torch.index_select(kv, 0, q.view(-1).long(), out=o.view(-1))
        o.view(k, 8, 32).mul_(dl[s:e])


_DECODERS: dict[GGMLQuantizationType, Callable[[torch.Tensor, torch.Tensor, int], None]] = {
    T.F32: _deq_f32,
    T.F16: _deq_f16,
    T.BF16: _deq_bf16,
    T.Q8_0: _deq_q8_0,
    T.Q4_0: _deq_q4_0,
    T.Q4_1: _deq_q4_1,
    T.Q5_0: _deq_q5_0,
    T.Q5_1: _deq_q5_1,
    T.Q2_K: _deq_q2_k,
    T.Q3_K: _deq_q3_k,
    T.Q4_K: _deq_q4_k,
    T.Q5_K: _deq_q5_k,
    T.Q6_K: _deq_q6_k,
    T.IQ1_S: _deq_iq1_s,
    T.IQ1_M: _deq_iq1_m,
    T.IQ2_XXS: _deq_iq2_xxs,
    T.IQ2_XS: _deq_iq2_xs,
    T.IQ2_S: _deq_iq2_s,
    T.IQ3_XXS: _deq_iq3_xxs,
    T.IQ3_S: _deq_iq3_s,
    T.IQ4_NL: _deq_iq4_nl,
    T.IQ4_XS: _deq_iq4_xs,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_DECODERS)

# A tensor with fewer super-chunks than this per thread is decoded on the calling thread alone.
_MIN_UNITS_PER_THREAD = 2

_pool = None
_pool_lock = threading.Lock()


def _forget_pool_after_fork() -> None:
    # A forked child has none of the parent's threads: a pool inherited from it would never run.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _get_pool(n: int):
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n:  # noqa: SLF001
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="finback-dequant")
        return _pool


def _run_chunks(decoder, blocks: torch.Tensor, flat: torch.Tensor, sub: int, unit: int) -> None:
    """Decode `blocks` into `flat` in work units of `unit` blocks (sub-chunks of `sub`)."""
    n_blocks = blocks.shape[0]
    n_units = -(-n_blocks // unit)

    def work(counter) -> None:
        for i in counter:  # itertools.count.__next__ is atomic under the GIL
            start = i * unit
            if start >= n_blocks:
                return
            stop = min(n_blocks, start + unit)
            decoder(blocks[start:stop], flat[start:stop], sub)

    n_threads = 1
    if blocks.device.type == "cpu":
        n_threads = min(torch.get_num_threads(), n_units // _MIN_UNITS_PER_THREAD)
    counter = itertools.count()
    if n_threads <= 1:
        work(counter)
        return
    pool = _get_pool(n_threads - 1)
    futures = [pool.submit(work, counter) for _ in range(n_threads - 1)]
    try:
        work(counter)
    finally:
        for f in futures:
            f.result()


def dequantize(
    data: torch.Tensor,
    qtype: GGMLQuantizationType | int,
    shape: tuple[int, ...],
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize the raw bytes of one GGUF tensor to float32.

    data:  contiguous 1-D torch.uint8 tensor holding exactly `type_nbytes(qtype, shape)` bytes.
    qtype: a gguf.GGMLQuantizationType (or its int value); see SUPPORTED_TYPES.
    shape: tensor shape in torch order; the last dim is ggml's ne[0], the row length, which must be
           a multiple of the type's block size.
    out:   optional contiguous float32 tensor of `shape` (on data's device) to write into.

    Returns a new float32 tensor of `shape` (or `out`), equal bit for bit to
    `gguf.quants.dequantize(data.numpy(), qtype)`. Raises UnsupportedQuantType for other types and
    ValueError for data of the wrong dtype, layout or size.
    """
    qt = _as_qtype(qtype)
    decoder = _DECODERS.get(qt)
    if decoder is None:
        raise UnsupportedQuantType(qt)
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"dequantize expects a torch.Tensor of raw bytes, got {type(data).__name__}")
    if data.dtype != torch.uint8:
        raise ValueError(f"dequantize expects torch.uint8 raw bytes, got {data.dtype}")
    if data.dim() != 1:
        raise ValueError(f"dequantize expects a 1-D byte tensor, got shape {tuple(data.shape)}")
    if not data.is_contiguous():
        raise ValueError("dequantize expects a contiguous byte tensor (got a strided view)")
    shape = tuple(int(s) for s in shape)
    nbytes = type_nbytes(qt, shape)
    if data.numel() != nbytes:
        raise ValueError(
            f"{qt.name} tensor of shape {shape} needs {nbytes} bytes, got {data.numel()}"
        )

    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=data.device)
    else:
        if (
            out.dtype != torch.float32
            or tuple(out.shape) != shape
            or not out.is_contiguous()
            or out.device != data.device
        ):
            raise ValueError(
                f"out must be a contiguous float32 tensor of shape {shape} on {data.device}"
            )
    if nbytes == 0:
        return out

    block_size, type_size = GGML_QUANT_SIZES[qt]
    n_blocks = nbytes // type_size
    blocks = data.view(n_blocks, type_size)
    flat = out.view(n_blocks, block_size)
    if data.device.type == "cpu":
        sub = max(1, _SUB_ELEMS // block_size)
        unit = sub * _SUPER
    else:  # accelerators: big chunks, few launches
        sub = unit = max(1, _ACCEL_ELEMS // block_size)
    _run_chunks(decoder, blocks, flat, sub, unit)
    return out


# --------------------------------------------------------------------------- 4-bit groups
INT4_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q4_K})


def int4_groups(data: torch.Tensor, qtype, shape: tuple[int, ...]):
    """A Q4_0 / Q4_1 / Q4_K tensor as 4-bit codes with a scale and an offset per group of 32:
    w = (q - 8) * scale + zero, with q uint8 [N, K] in 0..15 and scale/zero float32 [N, K/32].

    This is the layout of torch's int4 CPU matmul, so 4-bit GGUF weights stay 4-bit in memory.
    Up to float32 rounding it equals `dequantize` (Q4_1: d*q + m = (q-8)*d + (m + 8d); Q4_K:
    (d*sc)*q - dmin*m = (q-8)*(d*sc) + (8*d*sc - dmin*m))."""
    qtype = _as_qtype(qtype)
    if qtype not in INT4_TYPES:
        raise UnsupportedQuantType(qtype)
    n_rows, k = (int(math.prod(shape[:-1])), int(shape[-1])) if len(shape) > 1 else (1, int(shape[0]))
    block, size = GGML_QUANT_SIZES[qtype]
    if k % block or data.numel() != n_rows * k // block * size:
        raise ValueError(f"{qtype.name} data of {data.numel()} bytes does not fit shape {tuple(shape)}")
    blocks = data.reshape(-1, size)
    if qtype == T.Q4_0:
        q = _nib16(blocks, 2)
        scale = _f16s(blocks, 0, 1)
        zero = torch.zeros_like(scale)
    elif qtype == T.Q4_1:
        q = _nib16(blocks, 4)
        dm = _f16s(blocks, 0, 2)
        scale, zero = dm[:, 0:1], dm[:, 1:2] + 8 * dm[:, 0:1]
    else:
        nb = blocks.shape[0]
        q = _nib_rows(blocks[:, 16:144].reshape(nb, 4, 32))
        sm = _k4_scale_min(blocks, _f16s(blocks, 0, 2))
        scale, zero = sm[:, 0], 8 * sm[:, 0] - sm[:, 1]
    return (q.reshape(n_rows, k), scale.reshape(n_rows, k // 32).contiguous(),
            zero.reshape(n_rows, k // 32).contiguous())

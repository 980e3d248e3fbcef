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

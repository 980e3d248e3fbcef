"""Quantize float32 weights into GGUF tensor bytes.

`quantize(x, qtype)` returns the bytes of `x` in exactly the block layout of ggml / gguf-py, shaped
(rows, bytes_per_row), ready for `gguf.GGUFWriter.add_tensor(name, q, raw_dtype=qtype)`.

F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are delegated to `gguf.quants.quantize` (bit-exact
with llama.cpp's reference quantizers). The K-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K use our own
simple round-to-nearest quantizers: no importance matrix and no search over scales, so their error
is somewhat larger than llama-quantize's, but the bytes decode with any GGUF reader.

  Q2_K/Q4_K/Q5_K: per sub-block min/max (min clamped to <= 0), scale = (max - min) / qmax, the
                  sub-block scales and -mins quantized to 4 bits (Q2_K) or 6 bits (Q4_K/Q5_K,
                  packed as llama.cpp's get_scale_min_k4 reads them) against fp16 super-block
                  scales d and dmin.
  Q3_K/Q6_K:      symmetric; the value of largest magnitude in a sub-block maps to the most
                  negative level (-4 / -32), sub-block scales are signed 6-bit (Q3_K) / 8-bit (Q6_K)
                  multiples of one fp16 d per super-block.
After the scales are rounded, the levels are recomputed against the scales the decoder will see.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf import quants as _gq

__all__ = ["QUANTIZE_TYPES", "quantize"]

T = GGMLQuantizationType

_DELEGATED = frozenset({T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1})

_F16_MAX = np.float32(65504.0)
_CHUNK_BLOCKS = 8192  # 2M values per chunk


def _f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (n,) -> (fp16 bytes (n, 2), the float32 value the decoder will read)."""
    h = np.clip(v, -_F16_MAX, _F16_MAX).astype(np.float16)
    return h.view(np.uint8).reshape(-1, 2), h.astype(np.float32)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, np.float32(0), a / np.where(b == 0, np.float32(1), b))


def _rint_clip(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.rint(v), lo, hi).astype(np.int32)


def _asym(xb: np.ndarray, qmax: int, smax: int) -> tuple:
    """Affine quantization of sub-blocks xb (n, S, L) as d*sc*q - dmin*m.

    Returns (d bytes, dmin bytes, sc (n,S), m (n,S), q (n,S,L)), all ints in range.
    """
    mn = np.minimum(xb.min(axis=-1), 0)
    mx = xb.max(axis=-1)
    scale = (mx - mn) / np.float32(qmax)
    d_b, d = _f16(scale.max(axis=-1) / np.float32(smax))
    dm_b, dmin = _f16((-mn).max(axis=-1) / np.float32(smax))
    sc = _rint_clip(_div(scale, d[:, None]), 0, smax)
    m = _rint_clip(_div(-mn, dmin[:, None]), 0, smax)
    s_eff = (d[:, None] * sc.astype(np.float32))[..., None]
    m_eff = (dmin[:, None] * m.astype(np.float32))[..., None]
    q = _rint_clip(_div(xb + m_eff, s_eff), 0, qmax)
    return d_b, dm_b, sc, m, q


def _sym(xb: np.ndarray, qneg: int, sneg: int) -> tuple:
    """Symmetric quantization of sub-blocks xb (n, S, L) as d*sc*q, q in [-qneg, qneg-1],
    sc in [-sneg, sneg-1]. Returns (d bytes, sc (n,S), q (n,S,L))."""
    n, S, _ = xb.shape
    imax = np.abs(xb).argmax(axis=-1)[..., None]
    vmax = np.take_along_axis(xb, imax, axis=-1)[..., 0]  # signed value of largest magnitude
    scale = vmax / np.float32(-qneg)
    jmax = np.abs(scale).argmax(axis=-1)[:, None]
    smax = np.take_along_axis(scale, jmax, axis=-1)[:, 0]
    d_b, d = _f16(smax / np.float32(-sneg))
    sc = _rint_clip(_div(scale, d[:, None]), -sneg, sneg - 1)
    s_eff = (d[:, None] * sc.astype(np.float32))[..., None]
    q = _rint_clip(_div(xb, s_eff), -qneg, qneg - 1)
    return d_b, sc, q


def _pack_bits(v: np.ndarray, bits: int) -> np.ndarray:
    """v (n, k, B) small ints -> (n, B) uint8 with v[:, s] at bit s*bits."""
    out = np.zeros(v.shape[:1] + v.shape[2:], dtype=np.uint8)
    for s in range(v.shape[1]):
        out |= (v[:, s].astype(np.uint8) << np.uint8(s * bits))
    return out


def _k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit scales and mins (n, 8) -> the 12 bytes get_scale_min_k4 unpacks."""
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    b0 = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    b1 = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([b0, b1, b2], axis=1)


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d_b, dm_b, sc, m, q = _asym(blocks.reshape(n, 16, 16), 3, 15)
    scales = (sc | (m << 4)).astype(np.uint8)
    qs = _pack_bits(q.reshape(n, 2, 4, 32).transpose(0, 2, 1, 3).reshape(n, 4, 64), 2)
    return np.concatenate([scales, qs, d_b, dm_b], axis=1)


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d_b, sc, q = _sym(blocks.reshape(n, 16, 16), 4, 32)
    Q = (q + 4).reshape(n, QK_K)  # 0..7
    S = (sc + 32).astype(np.uint8)  # 0..63
    hmask = _pack_bits((Q >> 2).reshape(n, 8, 32), 1)
    qs = _pack_bits((Q & 3).reshape(n, 2, 4, 32).transpose(0, 2, 1, 3).reshape(n, 4, 64), 2)
    low = (S[:, :8] & 15) | ((S[:, 8:] & 15) << 4)
    high = _pack_bits((S >> 4).reshape(n, 4, 4), 2)
    return np.concatenate([hmask, qs, low, high, d_b], axis=1)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d_b, dm_b, sc, m, q = _asym(blocks.reshape(n, 8, 32), 15, 63)
    qs = _pack_bits(q.reshape(n, 4, 2, 32).transpose(0, 2, 1, 3).reshape(n, 2, 128), 4)
    return np.concatenate([d_b, dm_b, _k4_scales(sc, m), qs], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d_b, dm_b, sc, m, q = _asym(blocks.reshape(n, 8, 32), 31, 63)
    qh = _pack_bits(q >> 4, 1)
    qs = _pack_bits((q & 15).reshape(n, 4, 2, 32).transpose(0, 2, 1, 3).reshape(n, 2, 128), 4)
    return np.concatenate([d_b, dm_b, _k4_scales(sc, m), qh, qs], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d_b, sc, q = _sym(blocks.reshape(n, 16, 16), 32, 128)
    Q = (q + 32).reshape(n, QK_K)  # 0..63
    ql = _pack_bits((Q & 15).reshape(n, 2, 2, 64).transpose(0, 2, 1, 3).reshape(n, 2, 128), 4)
    qh = _pack_bits((Q >> 4).reshape(n, 2, 4, 32).transpose(0, 2, 1, 3).reshape(n, 4, 64), 2)
    scales = sc.astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, scales, d_b], axis=1)


_OWN = {T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}

QUANTIZE_TYPES: frozenset[GGMLQuantizationType] = frozenset(_DELEGATED | set(_OWN))


def quantize(x: np.ndarray, qtype: GGMLQuantizationType | int) -> np.ndarray:
    """Quantize float32 `x` (rows, row_length) to GGUF bytes of `qtype`.

    Returns uint8 of shape (rows, bytes_per_row) (for N-D input, (*x.shape[:-1], bytes_per_row)).
    The row length must be a multiple of the type's block size, and x must be finite.
    Raises ValueError for a type it cannot write (see QUANTIZE_TYPES) or bad input.
    """
    try:
        qt = GGMLQuantizationType(int(qtype))
    except ValueError:
        raise ValueError(f"unknown GGML quantization type {qtype!r}") from None
    if qt not in QUANTIZE_TYPES:
        raise ValueError(
            f"cannot quantize to {qt.name}: finback writes "
            + ", ".join(sorted(t.name for t in QUANTIZE_TYPES))
        )
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError("quantize needs at least a 1-D array")
    x = x.astype(np.float32, copy=False)
    block_size, type_size = GGML_QUANT_SIZES[qt]
    if x.shape[-1] % block_size != 0:
        raise ValueError(
            f"row length {x.shape[-1]} is not a multiple of the {qt.name} block size {block_size}"
        )
    if not np.isfinite(x).all():
        raise ValueError("quantize needs finite values (found NaN or inf)")
    row_bytes = x.shape[-1] // block_size * type_size
    out_shape = (*x.shape[:-1], row_bytes)

    if qt in _DELEGATED:
        q = _gq.quantize(np.ascontiguousarray(x), qt)
        return np.ascontiguousarray(q).view(np.uint8).reshape(out_shape)

    fn = _OWN[qt]
    blocks = np.ascontiguousarray(x).reshape(-1, block_size)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        stop = min(blocks.shape[0], start + _CHUNK_BLOCKS)
        out[start:stop] = fn(blocks[start:stop])
    return out.reshape(out_shape)

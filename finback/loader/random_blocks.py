"""Random, valid GGUF tensor data of any supported type, for tests and benchmarks.

`random_blocks(qtype, shape)` returns the raw bytes of a tensor (uint8 [rows, bytes_per_row]) that
looks like a real weight: every quant, index and sign field is uniformly random (so every codebook
row and sign pattern occurs), and the fp16 scale fields are finite, vary from block to block, and
are set so that the dequantized weights have a standard deviation close to `scale`. Types with a
min/offset field (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) get mins that centre the weights near zero.
With it a benchmark builds, say, a 671B-shaped IQ1_S expert without downloading one.

The calibration is exact arithmetic plus one fp16 rounding: the blocks are first built with
unit-sized scale fields, a sample of them is dequantized, and every scale field is multiplied by
scale / std(sample) (dequantization is linear in the scale fields together).
"""

from __future__ import annotations

import math

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from finback.loader.quants import (
    SUPPORTED_TYPES,
    UnsupportedQuantType,
    _as_qtype,
    dequantize,
    type_nbytes,
)

__all__ = ["random_blocks"]

T = GGMLQuantizationType

# fp16 fields per type: (byte offset of d, [(byte offset, multiple of d) of a min field]).
# A min's multiple centres the weights: it is minus the mean of the quants' unsigned value range
# (Q4_1: d*q + m, q in 0..15 -> m = -7.5 d) or, where the min is subtracted, the mean quant
# (Q4_K: (d*sc)*q - dmin*m with sc, m of the same range -> dmin = 7.5 d).
_FIELDS: dict[GGMLQuantizationType, tuple[int, tuple[tuple[int, float], ...]]] = {
    T.Q8_0: (0, ()),
    T.Q4_0: (0, ()),
    T.Q4_1: (0, ((2, -7.5),)),
    T.Q5_0: (0, ()),
    T.Q5_1: (0, ((2, -15.5),)),
    T.Q2_K: (80, ((82, 1.5),)),
    T.Q3_K: (108, ()),
    T.Q4_K: (0, ((2, 7.5),)),
    T.Q5_K: (0, ((2, 15.5),)),
    T.Q6_K: (208, ()),
    T.IQ1_S: (0, ()),
    T.IQ2_XXS: (0, ()),
    T.IQ2_XS: (0, ()),
    T.IQ2_S: (0, ()),
    T.IQ3_XXS: (0, ()),
    T.IQ3_S: (0, ()),
    T.IQ4_NL: (0, ()),
    T.IQ4_XS: (0, ()),
}

_CALIBRATION_BLOCKS = 4096


def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 (n,) -> the fp16 bit patterns as uint8 (n, 2) (little-endian)."""
    return values.to(torch.float16).view(torch.uint8).view(-1, 2)


def _set_scales(blocks: torch.Tensor, qtype: GGMLQuantizationType, d: torch.Tensor) -> None:
    """Write d (float32 (n,), rounded to fp16) and the matching min fields into each block."""
    if qtype == T.IQ1_M:
        # d's 16 bits live in the top nibbles of the four uint16 scale words at bytes 48..55
        # (word w holds d bits 4w..4w+3); the low 12 bits of each word stay as they are.
        bits = _f16_bytes(d).view(torch.int16).to(torch.int32).view(-1) & 0xFFFF
        for w in range(4):
            hi = blocks[:, 49 + 2 * w]
            hi.copy_((hi & 0x0F) | (((bits >> (4 * w)) & 0xF) << 4).to(torch.uint8))
        return
    at, mins = _FIELDS[qtype]
    blocks[:, at : at + 2] = _f16_bytes(d)
    for m_at, mult in mins:
        blocks[:, m_at : m_at + 2] = _f16_bytes(d * mult)


def random_blocks(
    qtype: GGMLQuantizationType | int,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    scale: float = 0.02,
) -> torch.Tensor:
    """Raw bytes of a random `qtype` tensor of torch-order `shape`: uint8 [rows, bytes_per_row] on
    CPU, where rows = prod(shape[:-1]) and bytes_per_row = type_nbytes(qtype, (shape[-1],)).

    Dequantized, the values are finite with a standard deviation close to `scale` (within a few
    percent for tensors of a few blocks or more). F32/F16/BF16 hold normal(0, scale) values.
    Raises UnsupportedQuantType for types finback cannot dequantize and ValueError for a bad shape
    or scale."""
    qt = _as_qtype(qtype)
    if qt not in SUPPORTED_TYPES:
        raise UnsupportedQuantType(qt)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("shape must have at least one dimension")
    row_bytes = type_nbytes(qt, (shape[-1],))  # checks the block size
    rows = math.prod(shape[:-1])
    n = rows * shape[-1]

    if qt in (T.F32, T.F16, T.BF16):
        dt = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[qt]
        vals = torch.randn(n, generator=generator).mul_(scale).to(dt)
        return vals.view(torch.uint8).view(rows, row_bytes)

    block_size, type_size = GGML_QUANT_SIZES[qt]
    n_blocks = n // block_size
    blocks = torch.randint(0, 256, (n_blocks, type_size), generator=generator, dtype=torch.uint8)
    if n_blocks == 0:
        return blocks.view(rows, row_bytes)
    unit = torch.rand(n_blocks, generator=generator).add_(0.5)  # per-block d in [0.5, 1.5)
    _set_scales(blocks, qt, unit)
    k = min(n_blocks, _CALIBRATION_BLOCKS)
    sample = dequantize(blocks[:k].reshape(-1), qt, (k * block_size,)).double()
    std = float(sample.std(correction=0))
    if std == 0:  # every sampled weight is zero (only plausible for a block or two)
        std = 1.0
    _set_scales(blocks, qt, unit * (scale / std))
    return blocks.view(rows, row_bytes)

"""The lookup tables of llama.cpp's IQ ("i-quant") GGUF types, as torch tensors.

IQ types do not store weights as plain integers: a block holds indices into a fixed codebook
("grid") of 4- or 8-value vectors, 7-bit indices into a table of sign patterns, and a 4-bit scale
per group. The tables are those of ggml-common.h (iq2xxs_grid, iq2xs_grid, iq2s_grid, iq3xxs_grid,
iq3s_grid, iq1s_grid, ksigns_iq2xs, kvalues_iq4nl); the values are taken from gguf-py (a finback
dependency, whose dequantization finback matches bit for bit), so there is one source of truth.

Each table is built once on CPU from gguf-py and then cached per (table, device, dtype); the
returned tensors are shared: never write into them.

API (qtype: a gguf.GGMLQuantizationType or its int value):

- `grid(qtype, device="cpu", dtype=torch.float32) -> Tensor[N, W]`: row i is codebook vector i,
  entry k its k-th value (exact in any float dtype and in int8). N, W = `GRID_SHAPES[qtype]`:

      IQ2_XXS  (256, 8)   values in {8, 25, 43}
      IQ2_XS   (512, 8)   values in {8, 25, 43}
      IQ2_S    (1024, 8)  values in {8, 25, 43}
      IQ3_XXS  (256, 4)   values in {4, 12, 20, 28, 36, 44, 52, 62}
      IQ3_S    (512, 4)   values in {1, 3, 5, 7, 9, 11, 13, 15}
      IQ1_S    (2048, 8)  values in {-1, 0, 1}   (IQ1_M uses the same grid)

- `packed_grid(qtype, device="cpu") -> Tensor[N]`: the same grid packed as llama.cpp stores it:
  int64 for W == 8, int32 for W == 4, with value k in byte k (little-endian) as an int8 (so for
  IQ1_S the byte 0xFF is -1). Bit for bit the uint64/uint32 tables of ggml-common.h (read as
  signed). Handy for a kernel that loads one word per index and unpacks bytes with shifts.

- `ksigns(device="cpu") -> uint8 Tensor[128]`: ksigns_iq2xs. A 7-bit sign index s selects the byte
  ksigns[s] (s plus an even-parity bit 7); bit k set means value k of the 8-value group is negated.

- `sign_table(device="cpu", dtype=torch.float32) -> Tensor[128, 8]`: the same expanded:
  entry [s, k] is -1 if bit k of ksigns[s] is set, else +1.

- `kvalues_iq4nl(device="cpu", dtype=torch.float32) -> Tensor[16]`: the non-linear 4-bit codebook
  of IQ4_NL and IQ4_XS: (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113).

- `IQ1_DELTA = 0.125`: the offset IQ1_S/IQ1_M add to each grid value (sign from a per-group bit).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as _gq

__all__ = [
    "GRID_SHAPES",
    "IQ1_DELTA",
    "grid",
    "ksigns",
    "kvalues_iq4nl",
    "packed_grid",
    "sign_table",
]

T = GGMLQuantizationType

# gguf-py's class holding each type's grid (IQ1_M's class copies IQ1_S's tables).
_GRID_CLASS = {
    T.IQ2_XXS: _gq.IQ2_XXS,
    T.IQ2_XS: _gq.IQ2_XS,
    T.IQ2_S: _gq.IQ2_S,
    T.IQ3_XXS: _gq.IQ3_XXS,
    T.IQ3_S: _gq.IQ3_S,
    T.IQ1_S: _gq.IQ1_S,
    T.IQ1_M: _gq.IQ1_S,
}

GRID_SHAPES: dict[GGMLQuantizationType, tuple[int, int]] = {
    qt: tuple(cls.grid_shape) for qt, cls in _GRID_CLASS.items()
}

IQ1_DELTA = 0.125

_cache: dict[tuple, torch.Tensor] = {}
_lock = threading.RLock()  # builders may fetch other cached tables


def _grid_qtype(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType:
    try:
        qt = GGMLQuantizationType(int(qtype))
    except (TypeError, ValueError):
        raise ValueError(f"not a GGUF tensor type: {qtype!r}") from None
    if qt not in _GRID_CLASS:
        names = ", ".join(t.name for t in _GRID_CLASS)
        raise ValueError(f"{qt.name} has no IQ grid (grids exist for {names})")
    return qt


def _cached(key: tuple, build) -> torch.Tensor:
    t = _cache.get(key)
    if t is None:
        with _lock:
            t = _cache.get(key)
            if t is None:
                t = build()
                _cache[key] = t
    return t


def _base_grid(qt: GGMLQuantizationType) -> torch.Tensor:
    """float32 [N, W] on CPU, from gguf-py."""
    cls = _GRID_CLASS[qt]

    def build() -> torch.Tensor:
        cls.init_grid()
        g = np.ascontiguousarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
        return torch.from_numpy(g.copy())

    return _cached(("grid", cls.__name__, "cpu", torch.float32), build)


def grid(
    qtype: GGMLQuantizationType | int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Codebook of an IQ type: [N, W] values (see the module docstring)."""
    qt = _grid_qtype(qtype)
    device = torch.device(device)
    base = _base_grid(qt)
    return _cached(
        ("grid", _GRID_CLASS[qt].__name__, str(device), dtype),
        lambda: base.to(dtype).to(device),
    )


def packed_grid(qtype: GGMLQuantizationType | int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Codebook of an IQ type packed as llama.cpp's table: int64 [N] (W=8) or int32 [N] (W=4)."""
    qt = _grid_qtype(qtype)
    device = torch.device(device)
    n, w = GRID_SHAPES[qt]

    def build() -> torch.Tensor:
        b = _base_grid(qt).to(torch.int8).contiguous()  # [N, W], byte k = value k
        return b.view(torch.int64 if w == 8 else torch.int32).reshape(n).to(device)

    return _cached(("packed", _GRID_CLASS[qt].__name__, str(device)), build)


def ksigns(device: torch.device | str = "cpu") -> torch.Tensor:
    """ksigns_iq2xs: uint8 [128]."""
    device = torch.device(device)
    return _cached(
        ("ksigns", str(device)),
        lambda: torch.frombuffer(bytearray(_gq.IQ2_XXS.ksigns), dtype=torch.uint8).to(device),
    )


def sign_table(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[128, 8] of +1/-1: entry [s, k] = -1 where bit k of ksigns[s] is set."""
    device = torch.device(device)

    def build() -> torch.Tensor:
        bits = (ksigns().unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
        return (1 - 2 * bits.to(torch.float32)).to(dtype).to(device)

    return _cached(("signs", str(device), dtype), build)


def kvalues_iq4nl(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The IQ4_NL / IQ4_XS codebook: [16] values."""
    device = torch.device(device)
    return _cached(
        ("kvalues", str(device), dtype),
        lambda: torch.tensor(_gq.IQ4_NL.kvalues, dtype=torch.float32).to(dtype).to(device),
    )

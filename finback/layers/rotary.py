"""Rotary position embeddings (NeoX / Hugging Face "rotate half" layout, or DeepSeek's interleaved
pairs), with the scalings the family uses: none, linear, Llama 3 (wavelength-dependent), YaRN
(DeepSeek-V3/R1: interpolation blended by a ramp over the dimensions, cos/sin scaled by its attention
factor), or explicit per-frequency factors as llama.cpp stores them in GGUF (`rope_freqs.weight`).

cos/sin are computed in float32 exactly as transformers computes them (inv_freq * position, one
multiply per element), cached for all positions, and indexed by position at run time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from finback.kernels import use_triton


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None,
                  freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_factors is not None:
        return inv_freq / freq_factors.float()
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, base, scaling)
    raise ValueError(f"rope scaling {kind!r} is not supported")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(head_dim: int, base: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN: extrapolated frequencies for the fast dimensions, interpolated (divided by factor) for
    the slow ones, a linear ramp between the correction dimensions of beta_fast and beta_slow
    rotations over the original context (rounded outward unless `truncate` is false)."""
    factor = float(scaling["factor"])
    orig = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolate = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor YaRN puts on cos and sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    (1 for DeepSeek-V3, whose two are equal), or `attention_factor` when the config gives it; 1 for
    the other scalings."""
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
    return yarn_mscale(factor)


def softmax_mscale(scaling: dict[str, Any] | None) -> float:
    """What DeepSeek multiplies the softmax scale by under YaRN: mscale(factor, mscale_all_dim)^2
    (1 without YaRN or without mscale_all_dim)."""
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default" or not (scaling or {}).get("mscale_all_dim"):
        return 1.0
    m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
    return m * m


class RotaryEmbedding(nn.Module):
    """`interleaved`: the rotated pairs are (x0, x1), (x2, x3), ... (DeepSeek's layout) instead of
    (x_i, x_{i+D/2}); the output is then in halves layout (evens rotated, then odds), as transformers
    computes it: q and k get the same permutation, so their dot products are unchanged."""

    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: dict[str, Any] | None = None, interleaved: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.base = base
        self.scaling = scaling
        self.interleaved = interleaved
        self._build(rope_inv_freq(head_dim, base, scaling))

    def _build(self, inv_freq: torch.Tensor) -> None:
        t = torch.arange(self.max_position, dtype=torch.int64).float()
        freqs = t[:, None] * inv_freq[None, :]
        factor = rope_attention_factor(self.scaling)
        cos, sin = freqs.cos(), freqs.sin()
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        self.register_buffer("cos", cos, persistent=False)  # [max_pos, head_dim/2]
        self.register_buffer("sin", sin, persistent=False)

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        """Use llama.cpp's explicit frequency factors (GGUF `rope_freqs.weight`)."""
        if factors.numel() != self.head_dim // 2:
            raise ValueError(f"rope_freqs has {factors.numel()} values, expected {self.head_dim // 2}")
        device = self.cos.device
        self._build(rope_inv_freq(self.head_dim, self.base, None, factors.reshape(-1).cpu()))
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D] cos and sin for these positions (computed once per step, shared by layers)."""
        cos = self.cos[positions]
        sin = self.sin[positions]
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(dtype)
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(dtype)
        return cos, sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin=None):
        """q: [T, Hq, D], k: [T, Hk, D]; returns rotated copies in the input dtype."""
        if use_triton(q) and not self.interleaved and self.cos.dtype == torch.float32:
            from finback.kernels.rotary import rotary  # one kernel, reading the float32 tables by position

            return rotary(positions, q, k, self.cos, self.sin)
        cos, sin = cos_sin if cos_sin is not None else self.cos_sin(positions, q.dtype)
        if self.interleaved:
            return _apply_interleaved(q, cos, sin), _apply_interleaved(k, cos, sin)
        return _apply(q, cos, sin), _apply(k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

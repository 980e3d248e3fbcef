"""Rotary position embeddings (NeoX / Hugging Face "rotate half" layout), with the scalings the
family uses: none, linear, Llama 3 (wavelength-dependent), or explicit per-frequency factors as
llama.cpp stores them in GGUF (`rope_freqs.weight`).

cos/sin are computed in float32 exactly as transformers computes them (inv_freq * position, one
multiply per element), cached for all positions, and indexed by position at run time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


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
    raise ValueError(f"rope scaling {kind!r} is not supported")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: dict[str, Any] | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.base = base
        self.scaling = scaling
        self._build(rope_inv_freq(head_dim, base, scaling))

    def _build(self, inv_freq: torch.Tensor) -> None:
        t = torch.arange(self.max_position, dtype=torch.int64).float()
        freqs = t[:, None] * inv_freq[None, :]
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_pos, head_dim/2]
        self.register_buffer("sin", freqs.sin(), persistent=False)

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
        cos, sin = cos_sin if cos_sin is not None else self.cos_sin(positions, q.dtype)
        return _apply(q, cos, sin), _apply(k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin

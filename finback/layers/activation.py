"""Activations on fused projections (one Triton kernel on CUDA: finback/kernels/activation.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finback.kernels import use_triton


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate, up] along the last dim -> silu(gate) * up."""
    if use_triton(x):
        from finback.kernels.activation import silu_and_mul as kernel

        return kernel(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up

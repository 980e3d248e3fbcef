"""Routed experts kept as GGUF blocks: llama.cpp's stacked expert tensors on the device as they are.

A `GGUFExperts` is one ffn_{gate,up,down}_exps tensor [E, N, K] in its GGUF type (DeepSeek-R1 GGUFs
use IQ1_S, IQ2_XXS, Q2_K ... for them): raw blocks uint8 [E, N, K / block_size * block_bytes], never a
dequantized copy; 671B's routed experts are 97% of its bytes, so this is what makes a 1.6-bit R1 fit.
Loaders slice it like a tensor (a rank's rows of gate/up, its columns of down on block boundaries).
`experts_forward` runs the routed SwiGLU over three of them: on CUDA with the expert-grouped GGUF
kernel of `finback.kernels.gguf_moe` (only the routed experts' blocks are read; no host sync), on CPU
by dequantizing each routed expert when a token needs it (correct but slow: the tests' path).
`finback.layers.moe.FusedMoE` holds them when a checkpoint gives its experts as blocks.
"""

from __future__ import annotations

import torch

from finback.kernels import use_triton
from finback.kernels.gguf import KERNEL_TYPES
from finback.kernels.gguf_moe import gguf_experts, gguf_experts_ref
from finback.layers.gguf_linear import GGUFBlocks, GGUFWeight

__all__ = ["GGUFExperts", "experts_forward"]


class GGUFExperts(GGUFBlocks):
    """A stacked GGUF expert tensor [E, N, K] as blocks: `data` uint8 [E, N, K / block_size * block_bytes]."""

    ndim, layout, noun = 3, "[E, N, K]", "expert stack"

    def expert(self, i: int) -> GGUFWeight:
        """Expert i as a 2-D GGUF weight (a view)."""
        return GGUFWeight(self.data[i], self.qtype, tuple(self.shape[1:]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole stack dense [E, N, K] (one expert at a time, so only the result is large)."""
        out = torch.empty(self.shape, dtype=dtype, device=self.device)
        for i in range(self.shape[0]):
            out[i] = self.expert(i).dequantize(dtype)
        return out


def experts_forward(x: torch.Tensor, gate: GGUFExperts, up: GGUFExperts, down: GGUFExperts,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H] -> [T, H]: sum over the k routed slots of weight * down[e] @ (silu(gate[e] @ x) * (up[e] @ x))."""
    e, i, h = gate.shape
    if tuple(up.shape) != (e, i, h) or tuple(down.shape) != (e, h, i):
        raise ValueError(f"expert shapes do not fit together: gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                         f"down {tuple(down.shape)}")
    parts = [(w.data, w.qtype) for w in (gate, up, down)]
    if use_triton(x) and all(w.qtype in KERNEL_TYPES for w in (gate, up, down)):
        return gguf_experts(x, *parts, topk_weights, topk_ids)
    return gguf_experts_ref(x, *parts, topk_weights, topk_ids)

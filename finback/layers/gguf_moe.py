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
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from finback.kernels import use_triton
from finback.kernels.gguf import KERNEL_TYPES
from finback.kernels.gguf_moe import gguf_experts, gguf_experts_ref
from finback.layers.gguf_linear import GGUFWeight

__all__ = ["GGUFExperts", "experts_forward"]


class GGUFExperts:
    """A stacked GGUF expert tensor [E, N, K] as blocks: `data` uint8 [E, N, K / block_size * block_bytes]."""

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType | int, shape: tuple[int, int, int]):
        self.qtype = GGMLQuantizationType(int(qtype))
        if self.qtype not in GGML_QUANT_SIZES:
            raise ValueError(f"{self.qtype.name} is not a block type")
        if len(shape) != 3:
            raise ValueError(f"stacked experts are [E, N, K], got shape {tuple(shape)}")
        e, n, k = (int(s) for s in shape)
        self.block_size, self.block_bytes = GGML_QUANT_SIZES[self.qtype]
        if k % self.block_size:
            raise ValueError(f"{self.qtype.name} rows of {k} values are not whole blocks of {self.block_size}")
        row = k // self.block_size * self.block_bytes
        if data.dtype != torch.uint8:
            raise ValueError(f"GGUF blocks must be uint8, got {data.dtype}")
        if data.dim() == 1:
            if data.numel() != e * n * row:
                raise ValueError(f"{self.qtype.name} [{e}, {n}, {k}] needs {e * n * row} bytes, got {data.numel()}")
            data = data.view(e, n, row)
        if tuple(data.shape) != (e, n, row) or (data.numel() and data.stride(2) != 1):
            raise ValueError(f"{self.qtype.name} [{e}, {n}, {k}] needs blocks of shape ({e}, {n}, {row}) with "
                             f"contiguous rows, got {tuple(data.shape)}")
        self.data = data
        self.shape = torch.Size((e, n, k))

    def dim(self) -> int:
        return 3

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        e, n, row = self.data.shape
        return e * n * row

    def __repr__(self) -> str:
        return f"GGUFExperts({self.qtype.name}, shape={tuple(self.shape)}, device={self.device})"

    def narrow(self, dim: int, start: int, length: int) -> GGUFExperts:
        """Experts (dim 0), rows (dim 1), or columns on block boundaries (dim 2): a view."""
        e, n, k = self.shape
        if dim in (0, 1):
            shape = (length, n, k) if dim == 0 else (e, length, k)
            return GGUFExperts(self.data.narrow(dim, start, length), self.qtype, shape)
        if dim != 2:
            raise ValueError(f"stacked GGUF experts have dims 0, 1 and 2, not {dim}")
        if start % self.block_size or length % self.block_size:
            raise ValueError(f"a {self.qtype.name} expert splits along its columns only on blocks of "
                             f"{self.block_size} (asked for {start}..{start + length})")
        qk, b = self.block_size, self.block_bytes
        return GGUFExperts(self.data.narrow(2, start // qk * b, length // qk * b), self.qtype, (e, n, length))

    def to(self, device: torch.device | str) -> GGUFExperts:
        device = torch.device(device)
        if self.data.device == device:
            return self
        return GGUFExperts(self.data.to(device), self.qtype, tuple(self.shape))

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

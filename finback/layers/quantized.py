"""4-bit GGUF weights kept 4-bit on CPU (Q4_0, Q4_1, Q4_K).

A layer loaded from such tensors multiplies with torch's int4 CPU kernel
(`torch._weight_int4pack_mm_for_cpu`, groups of 32, bf16 activations) instead of a dense bf16
copy: decode reads a quarter of the bytes. `int4_reference` is the torch reference the kernel is
tested against. Layers whose parts are not all 4-bit (Q4_K_M mixes in Q6_K), or whose shape the
kernel does not take, stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32


@dataclass
class Int4Tensor:
    """A checkpoint tensor in 4-bit groups: w = (q - 8) * scale + zero (see quants.int4_groups)."""

    q: torch.Tensor       # uint8 [N, K], 0..15
    scale: torch.Tensor   # float32 [N, K/32]
    zero: torch.Tensor    # float32 [N, K/32]

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dim(self) -> int:
        return 2

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        w = (self.q.float() - 8).view(n, k // GROUP, GROUP) * self.scale[..., None] + self.zero[..., None]
        return w.view(n, k)

    def narrow(self, dim: int, start: int, length: int) -> "Int4Tensor":
        if dim == 0:
            return Int4Tensor(self.q.narrow(0, start, length), self.scale.narrow(0, start, length),
                              self.zero.narrow(0, start, length))
        if start % GROUP or length % GROUP:
            raise ValueError("a 4-bit tensor splits along its columns only on 32-column groups")
        return Int4Tensor(self.q.narrow(1, start, length), self.scale.narrow(1, start // GROUP, length // GROUP),
                          self.zero.narrow(1, start // GROUP, length // GROUP))

    def permute_rows(self, index: torch.Tensor) -> "Int4Tensor":
        return Int4Tensor(self.q[index], self.scale[index], self.zero[index])


def kernel_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def kernel_takes(n: int, k: int) -> bool:
    return kernel_available() and n % 16 == 0 and k % GROUP == 0


def pack(t: Int4Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales_and_zeros [K/32, N, 2]) for torch's int4 CPU matmul."""
    packed = torch._convert_weight_to_int4pack_for_cpu(t.q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([t.scale.t(), t.zero.t()], dim=-1).to(dtype).contiguous()
    return packed, sz


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, n: int) -> torch.Tensor:
    shape = x.shape
    y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(sz.dtype), packed, GROUP, sz)
    return y.reshape(*shape[:-1], n).to(x.dtype)


def int4_reference(x: torch.Tensor, t: Int4Tensor, scales_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """What the kernel computes: x @ w^T with scale and zero rounded to the kernel's dtype."""
    n, k = t.q.shape
    scale = t.scale.to(scales_dtype).float()
    zero = t.zero.to(scales_dtype).float()
    w = (t.q.float() - 8).view(n, k // GROUP, GROUP) * scale[..., None] + zero[..., None]
    return x.float() @ w.view(n, k).t()

"""Linear weights kept as GGUF blocks, and the matmul that reads them.

A `GGUFWeight` is one checkpoint tensor [N, K] in its GGUF type: raw blocks (uint8 [N, bytes per row])
on the device, never a dequantized copy. Loaders slice it like a tensor: rows (output features) freely,
columns (input features, for row-parallel layers) only at block boundaries. `gguf_matmul` multiplies by
it: on CUDA with the Triton kernels of `finback.kernels.gguf` (GEMV for up to 16 rows of activations,
GEMM above); elsewhere by dequantizing then multiplying (correct but slow: the tests' path).

Decode rows of 16-bit activations (M <= 4, CUDA, the types of `Q8_TYPES`) take the int8-activation
kernel of `finback.kernels.gguf_dp4a` instead (llama.cpp's mmvq: x quantized to int8 per 32 values,
integer dot products): `quantize_x8` quantizes x once for all the parts of a layer that read it. Its
error beyond bf16's is the activation rounding (bounded in that module); float32 activations keep
the float kernels (exact to float32 rounding). `Q8_DECODE = False` turns it off. More rows of Q4_K,
Q6_K and Q8_0 weights (what Q4_K_M and Q8_0 files hold) take `finback.kernels.gguf_mma` (a 2-D
decoder per type feeding the tensor cores); the other types keep `gguf_gemv` / `gguf_gemm`.
"""

from __future__ import annotations

import math

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from finback.kernels import use_triton
from finback.kernels.gguf import GEMV_MAX_M, KERNEL_TYPES, gguf_gemm, gguf_gemv, gguf_matmul_ref
from finback.kernels.gguf_dp4a import MAX_M as Q8_MAX_M
from finback.kernels.gguf_dp4a import Q8_TYPES, gguf_gemv_q8, quantize_q8
from finback.kernels.gguf_mma import gguf_mma, mma_takes

Q8_DECODE = True

__all__ = ["KERNEL_TYPES", "GGUFBlocks", "GGUFWeight", "gguf_matmul"]


class GGUFBlocks:
    """A GGUF tensor [..., K] as raw blocks: `data` uint8 [..., K / block_size * block_bytes] with
    contiguous rows. What a 2-D weight and a stack of experts share: the checks, and slicing like a
    tensor (any dim but the last freely, the last only on block boundaries) as views."""

    ndim: int  # a subclass's dims, its layout and name for messages
    layout: str
    noun: str

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType | int, shape: tuple[int, ...]):
        self.qtype = GGMLQuantizationType(int(qtype))
        if self.qtype not in GGML_QUANT_SIZES:
            raise ValueError(f"{self.qtype.name} is not a block type")
        if len(shape) != self.ndim:
            raise ValueError(f"a GGUF {self.noun} is {self.layout}, got shape {tuple(shape)}")
        *lead, k = (int(s) for s in shape)
        self.block_size, self.block_bytes = GGML_QUANT_SIZES[self.qtype]
        if k % self.block_size:
            raise ValueError(f"{self.qtype.name} rows of {k} values are not whole blocks of {self.block_size}")
        blocks = (*lead, k // self.block_size * self.block_bytes)
        if data.dtype != torch.uint8:
            raise ValueError(f"GGUF blocks must be uint8, got {data.dtype}")
        dims = f"{self.qtype.name} [{', '.join(str(d) for d in (*lead, k))}]"
        if data.dim() == 1:
            if data.numel() != math.prod(blocks):
                raise ValueError(f"{dims} needs {math.prod(blocks)} bytes, got {data.numel()}")
            data = data.view(blocks)
        if tuple(data.shape) != blocks or (data.numel() and data.stride(-1) != 1):
            raise ValueError(f"{dims} needs blocks of shape {blocks} with contiguous rows, got {tuple(data.shape)}")
        self.data = data
        self.shape = torch.Size((*lead, k))

    def dim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.qtype.name}, shape={tuple(self.shape)}, device={self.device})"

    def narrow(self, dim: int, start: int, length: int):
        """[start, start+length) along `dim`: a view; along the last dim only on block boundaries."""
        shape, last = list(self.shape), len(self.shape) - 1
        if not 0 <= dim <= last:
            raise ValueError(f"a GGUF {self.noun} {self.layout} has dims 0 to {last}, not {dim}")
        shape[dim] = length
        if dim < last:
            return type(self)(self.data.narrow(dim, start, length), self.qtype, shape)
        if start % self.block_size or length % self.block_size:
            raise ValueError(f"a {self.qtype.name} {self.noun} splits along its columns only on blocks of "
                             f"{self.block_size} (asked for {start}..{start + length})")
        qk, b = self.block_size, self.block_bytes
        return type(self)(self.data.narrow(dim, start // qk * b, length // qk * b), self.qtype, shape)

    def to(self, device: torch.device | str):
        device = torch.device(device)
        have = self.data.device
        if have.type == device.type and device.index in (None, have.index):
            return self
        return type(self)(self.data.to(device), self.qtype, tuple(self.shape))


class GGUFWeight(GGUFBlocks):
    """A 2-D GGUF tensor [N, K] as blocks: `data` uint8 [N, K / block_size * block_bytes]."""

    ndim, layout, noun = 2, "[N, K]", "weight"

    def permute_rows(self, index: torch.Tensor) -> GGUFWeight:
        return GGUFWeight(self.data[index.to(self.data.device)], self.qtype, tuple(self.shape))

    def contiguous(self) -> GGUFWeight:
        return self if self.data.is_contiguous() else GGUFWeight(self.data.contiguous(), self.qtype, tuple(self.shape))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from finback.loader.quants import dequantize

        w = dequantize(self.data.contiguous().view(-1), self.qtype, tuple(self.shape))
        return w if dtype == torch.float32 else w.to(dtype)


def quantize_x8(x: torch.Tensor, weights) -> tuple | None:
    """quantize_q8 of x [M, K] when some of `weights` (GGUFWeight) will take the int8-activation kernel
    for it, else None."""
    if (Q8_DECODE and x.dim() == 2 and 1 <= x.shape[0] <= Q8_MAX_M and x.dtype in (torch.bfloat16, torch.float16)
            and use_triton(x) and x.shape[1] % 32 == 0 and x.stride(1) == 1 and any(w.qtype in Q8_TYPES for w in weights)):
        return quantize_q8(x)
    return None


def gguf_matmul(x: torch.Tensor, w: GGUFWeight, out: torch.Tensor | None = None, q8: tuple | None = None
                ) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype (written into `out`, a [..., N] tensor whose last
    dim is contiguous, when given). q8: `quantize_x8` of x's rows, shared by the calls that read x."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the {w.qtype.name} weight takes {k}")
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (*lead, n):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(*lead, n)}")
    o2 = out if out.dim() == 2 else out.view(m, n)
    if q8 is None:
        q8 = quantize_x8(x2, (w,))
    if q8 is not None and w.qtype in Q8_TYPES:
        gguf_gemv_q8(x2, w.data, w.qtype, k, out=o2, q8=q8)
    elif use_triton(x) and m > Q8_MAX_M and mma_takes(w.data, w.qtype):
        gguf_mma(x2, w.data, w.qtype, k, out=o2)
    elif use_triton(x) and w.qtype in KERNEL_TYPES:
        (gguf_gemv if m <= GEMV_MAX_M else gguf_gemm)(x2, w.data, w.qtype, k, out=o2)
    else:
        gguf_matmul_ref(x2, w.data, w.qtype, k, out=o2)
    return out

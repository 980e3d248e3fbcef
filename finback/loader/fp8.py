"""Block FP8 weights (DeepSeek-V3 / R1's checkpoint format) and their dequantization.

A block-FP8 checkpoint stores a linear weight `X.weight` [N, K] as float8 e4m3 and beside it
`X.weight_scale_inv` [ceil(N/bn), ceil(K/bk)] float32 (bn x bk = 128 x 128, from config.json's
quantization_config.weight_block_size): the real weight is `fp8 * scale` of the block each element
falls in (the name says "inverse" because it is the inverse of the scale used when quantizing). Every
other tensor (embeddings, norms, the router, the LM head) stays in a float dtype.

Two ways to load them. Dequantized at load, one tensor at a time (`dequantize_block_fp8`): the CPU
default, and what any layer that is not built for FP8 does with one. Kept FP8 (the CUDA default):
the checkpoint reader yields each pair as one `BlockFP8Tensor` and the layers built for it (a model
whose config has `fp8_block_size`) store the e4m3 bytes and the scales as they are and multiply
through finback/kernels/fp8_gemm.py and fused_moe.py, so the 671B takes 1 byte per weight on the GPU.
`pair_scales` tells the checkpoint reader which tensors go together and checks their shapes before
any data is read.
"""

from __future__ import annotations

import torch

SCALE_SUFFIX = "_scale_inv"  # "X.weight" -> "X.weight_scale_inv"


class FP8PairError(ValueError):
    """An FP8 weight and its scale do not go together; `tensor` names the offending tensor."""

    def __init__(self, tensor: str, problem: str):
        super().__init__(problem)
        self.tensor = tensor


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a 2-D weight of `shape` in blocks of `block`."""
    if len(shape) != 2:
        raise ValueError(f"block FP8 weights are 2-D, got shape {tuple(shape)}")
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _checked_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """`weight` as float8_e4m3fn (raw uint8 bytes are viewed so), after checking its scale grid."""
    if weight.dtype == torch.uint8:
        weight = weight.view(torch.float8_e4m3fn)
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"block FP8 weight must be float8_e4m3fn, got {weight.dtype}")
    expected = scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {tuple(weight.shape)} weight in "
                         f"{block[0]}x{block[1]} blocks needs {expected}")
    return weight


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight [N, K] float8_e4m3fn (or its raw bytes as uint8), scale_inv [ceil(N/bn), ceil(K/bk)]
    -> weight * scale of its block, computed in float32 and returned in `dtype`."""
    weight = _checked_fp8(weight, scale_inv, block)
    n, k = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return (weight.float() * scale).to(dtype)


class BlockFP8Tensor:
    """One block-FP8 checkpoint weight as it is stored: `weight` [N, K] float8_e4m3fn and `scale_inv`
    [ceil(N/bn), ceil(K/bk)] float32. Loaders slice it like a tensor, on block boundaries (or up to
    the end of a dimension); `dequantize` gives the real weight."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)):
        self.weight = _checked_fp8(weight, scale_inv, block)
        self.scale_inv = scale_inv.float()
        self.block = (int(block[0]), int(block[1]))
        self.shape = weight.shape

    def dim(self) -> int:
        return 2

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def __repr__(self) -> str:
        return f"BlockFP8Tensor(shape={tuple(self.shape)}, block={self.block}, device={self.device})"

    def narrow(self, dim: int, start: int, length: int) -> BlockFP8Tensor:
        """Rows (dim 0) or columns (dim 1) [start, start+length): a view; start must be on a block
        boundary, and so must the end unless it is the end of the dimension."""
        if dim not in (0, 1):
            raise ValueError(f"a block FP8 weight has dims 0 and 1, not {dim}")
        b, size = self.block[dim], self.shape[dim]
        end = start + length
        if start % b or (end % b and end != size) or not 0 <= start <= end <= size:
            raise ValueError(f"a block FP8 weight of shape {tuple(self.shape)} splits along dim {dim} only on "
                             f"blocks of {b} (asked for {start}..{end})")
        return BlockFP8Tensor(self.weight.narrow(dim, start, length),
                              self.scale_inv.narrow(dim, start // b, -(-end // b) - start // b), self.block)

    def to(self, device: torch.device | str) -> BlockFP8Tensor:
        return BlockFP8Tensor(self.weight.to(device), self.scale_inv.to(device), self.block)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_block_fp8(self.weight, self.scale_inv, self.block, dtype)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, as DeepSeek's converter does it: per block, scale = amax / 448 (e4m3's largest
    value), fp8 = weight / scale rounded to e4m3. Returns (fp8 [N, K], scale_inv float32)."""
    n, k = weight.shape
    gn, gk = scale_shape((n, k), block)
    w = weight.float()
    padded = torch.zeros(gn * block[0], gk * block[1])
    padded[:n, :k] = w
    blocks = padded.view(gn, block[0], gk, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale[:, None, :, None]).view(gn * block[0], gk * block[1])[:n, :k]
    return q.to(torch.float8_e4m3fn), scale


def pair_scales(shapes: dict[str, tuple[int, ...]], fp8_names: set[str], block: tuple[int, int] | None
                ) -> dict[str, str]:
    """Match every FP8 tensor with its `_scale_inv` tensor: returns weight name -> scale name.

    `shapes` has every tensor of the checkpoint, `fp8_names` those stored as FP8. Raises FP8PairError for an FP8 tensor without a scale or with one of the wrong shape, a scale
    without its FP8 tensor, or FP8 tensors in a checkpoint whose config declares no block size."""
    pairs: dict[str, str] = {}
    for name in sorted(fp8_names):
        if block is None:
            raise FP8PairError(name, f"tensor {name!r} is FP8 but config.json has no quantization_config with "
                             f"quant_method fp8 and a weight_block_size")
        if len(shapes[name]) != 2:
            raise FP8PairError(name, f"FP8 tensor {name!r} has shape {tuple(shapes[name])}: block FP8 weights are 2-D")
        scale = name + SCALE_SUFFIX
        if scale not in shapes:
            raise FP8PairError(name, f"FP8 tensor {name!r} has no {scale!r}")
        expected = scale_shape(shapes[name], block)
        if tuple(shapes[scale]) != expected:
            raise FP8PairError(scale, f"{scale!r} has shape {tuple(shapes[scale])}, but {name!r} of shape "
                             f"{tuple(shapes[name])} in {block[0]}x{block[1]} blocks needs {expected}")
        pairs[name] = scale
    for name in shapes:
        if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] not in pairs:
            raise FP8PairError(name, f"{name!r} scales no FP8 tensor")
    return pairs

"""Linear layers split across a parallel group (Megatron style).

Column-parallel layers split the output features (each rank computes a slice, no communication);
row-parallel layers split the input features (each rank computes a partial sum, then all-reduce).
Every parameter carries a `weight_loader(param, loaded, shard_id=None)` that takes the full,
unsplit checkpoint tensor and copies this rank's slice into place, so loaders never know about
ranks.

Block-FP8 weights (DeepSeek-V3's checkpoints, finback/loader/fp8.py): a layer switched to them with
`use_block_fp8()` stores `weight` as e4m3 [N, K] and `weight_scale_inv` fp32 scales of 128x128
blocks, and multiplies through `finback.kernels.fp8_gemm.fp8_block_linear`. The parts a checkpoint
loads separately (gate and up) share one scale grid when they start on block boundaries, else each
part keeps its own rows of scales. A layer not switched dequantizes a `BlockFP8Tensor` at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finback.layers.gguf_linear import GGUFWeight, gguf_matmul, quantize_x8
from finback.layers.quantized import Int4Tensor, int4_matmul, kernel_takes, pack
from finback.loader.fp8 import BlockFP8Tensor
from finback.runtime.parallel import SINGLE, ParallelGroup


class ShapeMismatch(ValueError):
    """A checkpoint tensor whose shape does not match what the config says."""


def _check_shape(param_name: str, loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ShapeMismatch(f"{param_name}: checkpoint shape {tuple(loaded.shape)}, "
                            f"config expects {tuple(expected)}")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """For parameters that are never split (norms): copy the whole tensor."""
    _check_shape("parameter", loaded, tuple(param.shape))
    param.data.copy_(loaded)


class _Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, group: ParallelGroup,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        self.group = group
        self.in_features = in_features    # this rank's
        self.out_features = out_features  # this rank's
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

        self.int4 = None       # (packed, scales_and_zeros) once finalize_int4 packed the weight
        self._int4_parts = []  # (dim, dst_start, Int4Tensor) placed into the weight
        self._dense_parts = 0
        # (first output row, GGUFWeight): the weight as GGUF blocks, each part possibly of another type
        # (Q4_K_M: Q4_K q/k, Q6_K v); once they cover every row the dense weight is dropped
        self.gguf_parts: list[tuple[int, GGUFWeight]] = []
        # block FP8 (use_block_fp8): (first row, rows, first row of its scales) per scale grid
        self.params_dtype = dtype
        self.fp8_block: tuple[int, int] | None = None
        self.fp8_groups: list[tuple[int, int, int]] | None = None

    def use_block_fp8(self, block: tuple[int, int] = (128, 128)) -> None:
        """Store the weight as block FP8 from now on (before loading; the dense weight is freed)."""
        from finback.kernels.fp8_gemm import FP8_BLOCK

        if tuple(block) != (FP8_BLOCK, FP8_BLOCK):
            raise ValueError(f"block FP8 layers take {FP8_BLOCK}x{FP8_BLOCK} blocks, got {tuple(block)}")
        bn, bk = block
        n, k = self.out_features, self.in_features
        sizes = getattr(self, "output_sizes", None)
        if sizes is None and hasattr(self, "kv_size"):
            sizes = [self.q_size, self.kv_size, self.kv_size]
        sizes = sizes or [n]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        if all(s % bn == 0 for s in starts):
            self.fp8_groups = [(0, n, 0)]
        else:
            self.fp8_groups, row = [], 0
            for s, m in zip(starts, sizes):
                self.fp8_groups.append((s, m, row))
                row += -(-m // bn)
        rows = sum(-(-m // bn) for _, m, _ in self.fp8_groups)
        device = self.weight.device
        self.fp8_block = (bn, bk)
        self.weight.data = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device)
        self.weight_scale_inv = nn.Parameter(torch.empty(rows, -(-k // bk), dtype=torch.float32, device=device),
                                             requires_grad=False)
        self.weight.fp8_scale = self.weight_scale_inv  # for load_format=dummy

    def _place_fp8(self, src: BlockFP8Tensor, dst_start: int) -> None:
        """Copy a block FP8 part (whole columns of this rank) to rows dst_start.. and its scales."""
        bn = self.fp8_block[0]
        rows = src.shape[0]
        if src.block != self.fp8_block or src.shape[1] != self.in_features:
            raise ShapeMismatch(f"block FP8 part {tuple(src.shape)} in {src.block} blocks does not fit a weight of "
                                f"{self.in_features} columns in {self.fp8_block} blocks")
        for start, n, scale_row in self.fp8_groups:
            if start <= dst_start and dst_start + rows <= start + n and (dst_start - start) % bn == 0:
                self.weight.data[dst_start:dst_start + rows].copy_(src.weight)
                first = scale_row + (dst_start - start) // bn
                self.weight_scale_inv.data[first:first + src.scale_inv.shape[0]].copy_(src.scale_inv)
                return
        raise ShapeMismatch(f"rows {dst_start}..{dst_start + rows} of a block FP8 weight do not start on a "
                            f"{bn}-row block of their part")

    def _drop_fp8(self) -> None:
        """A dense part arrived for a block FP8 weight: the whole weight becomes dense (what was
        loaded so far is dequantized)."""
        dense = torch.empty(self.out_features, self.in_features, dtype=self.params_dtype, device=self.weight.device)
        for start, n, scale_row in self.fp8_groups:
            src = BlockFP8Tensor(self.weight.data[start:start + n],
                                 self.weight_scale_inv.data[scale_row:scale_row + -(-n // self.fp8_block[0])],
                                 self.fp8_block)
            dense[start:start + n] = src.dequantize(self.params_dtype)
        self.weight.data = dense
        self.weight_scale_inv.data = torch.empty(0, dtype=torch.float32, device=dense.device)
        self.fp8_groups = None

    def _fp8_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from finback.kernels.fp8_gemm import (
            FP8_BLOCK,
            fp8_block_dequant,
            fp8_block_linear,
            supports_fp8_dot,
        )

        def one(w, s):
            if w.shape[1] % FP8_BLOCK and supports_fp8_dot(x.device):  # the FP8 GEMM takes whole K blocks
                return x @ fp8_block_dequant(w, s, dtype=x.dtype).t()
            return fp8_block_linear(x, w, s)

        w, s, bn = self.weight, self.weight_scale_inv, self.fp8_block[0]
        if len(self.fp8_groups) == 1:
            y = one(w, s)
        else:
            y = x.new_empty(*x.shape[:-1], self.out_features)
            for start, n, scale_row in self.fp8_groups:
                y[..., start:start + n] = one(w[start:start + n], s[scale_row:scale_row + -(-n // bn)])
        return y if bias is None else y + bias

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        raise NotImplementedError

    def _place(self, param, loaded, dim: int, dst_start: int, length: int, src_start: int) -> None:
        """Copy loaded[src_start:src_start+length] (along dim) to param[dst_start:...]."""
        fp8 = self.fp8_groups is not None and param is self.weight
        if isinstance(loaded, BlockFP8Tensor) and not fp8:
            loaded = loaded.dequantize(param.dtype)  # a layer not built for block FP8 (or a bias)
        try:
            src = loaded.narrow(dim, src_start, length)
        except ValueError as exc:  # block FP8 split off its blocks
            raise ShapeMismatch(str(exc)) from None
        if fp8:
            if isinstance(src, BlockFP8Tensor) and dim == 0:
                self._place_fp8(src, dst_start)
                return
            self._drop_fp8()
        if isinstance(src, GGUFWeight) and param is self.weight and dim == 0 and not self._dense_parts:
            self.gguf_parts.append((dst_start, src.to(param.device)))
            if sum(w.shape[0] for _, w in self.gguf_parts) == self.out_features:
                self.weight.data = torch.empty(0, self.in_features, dtype=param.dtype, device=param.device)
            return
        if self.gguf_parts and param is self.weight:  # a dense part too: the whole weight stays dense
            for start, w in self.gguf_parts:
                param.data.narrow(0, start, w.shape[0]).copy_(w.dequantize())
            self._dense_parts += len(self.gguf_parts)
            self.gguf_parts = []
        dst = param.data.narrow(dim, dst_start, length)
        if isinstance(src, GGUFWeight):
            dst.copy_(src.dequantize())
            self._dense_parts += param is self.weight
        elif isinstance(src, Int4Tensor):
            dst.copy_(src.dequantize())
            if param is self.weight:
                self._int4_parts.append((dim, dst_start, src))
        else:
            dst.copy_(src)
            if param is self.weight:
                self._dense_parts += 1

    def finalize_int4(self, dtype: torch.dtype = torch.bfloat16) -> bool:
        """Keep the weight 4-bit if every part of it came 4-bit and the kernel takes its shape."""
        parts, self._int4_parts = self._int4_parts, []
        n, k = self.weight.shape
        if not parts or self._dense_parts or not kernel_takes(n, k):
            return False
        q = torch.zeros(n, k, dtype=torch.uint8)
        scale = torch.zeros(n, k // 32)
        zero = torch.zeros(n, k // 32)
        rows = 0
        for dim, start, t in parts:
            if dim == 0:
                q[start:start + t.q.shape[0]] = t.q
                scale[start:start + t.q.shape[0]] = t.scale
                zero[start:start + t.q.shape[0]] = t.zero
                rows += t.q.shape[0]
            else:
                return False
        if rows != n:
            return False
        self.int4 = pack(Int4Tensor(q, scale, zero), dtype)
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)  # the dense copy is not needed
        return True

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.fp8_groups is not None:
            return self._fp8_matmul(x, bias)
        if self.gguf_parts and self.weight.numel() == 0:
            x2 = x.reshape(-1, x.shape[-1])
            y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
            q8 = quantize_x8(x2, [w for _, w in self.gguf_parts])  # once for all parts (None: not for the dp4a kernel)
            for start, w in self.gguf_parts:
                gguf_matmul(x2, w, out=y[:, start:start + w.shape[0]], q8=q8)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        if self.int4 is not None:
            y = int4_matmul(x, *self.int4, self.out_features)
            return y if bias is None else y + bias
        return F.linear(x, self.weight, bias)


class ColumnParallelLinear(_Linear):
    """y = x W^T with W's rows (output features) split over the group."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 group: ParallelGroup = SINGLE, gather_output: bool = False, params_dtype=None):
        self.full_out = out_features
        self.gather_output = gather_output
        super().__init__(in_features, group.shard(out_features, "output features"), bias, group, params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        expected = (self.full_out,) + tuple(param.shape[1:])
        _check_shape("weight" if param.dim() == 2 else "bias", loaded, expected)
        n = param.shape[0]
        self._place(param, loaded, 0, 0, n, self.group.rank * n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, self.bias)
        return self.group.all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul (gate and up projections).

    Each rank holds its slice of every part, concatenated: [part0_r, part1_r, ...].
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 group: ParallelGroup = SINGLE, params_dtype=None):
        self.output_sizes = [group.shard(s, "output features") for s in output_sizes]
        self.full_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, group, params_dtype=params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is None:
            raise ValueError("MergedColumnParallelLinear needs the index of the part being loaded")
        expected = (self.full_sizes[shard_id],) + tuple(param.shape[1:])
        _check_shape("weight" if param.dim() == 2 else "bias", loaded, expected)
        n = self.output_sizes[shard_id]
        start = sum(self.output_sizes[:shard_id])
        self._place(param, loaded, 0, start, n, self.group.rank * n)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul, heads split over the group.

    With more ranks than KV heads the KV heads are replicated (each rank keeps the one its
    query heads use).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, group: ParallelGroup = SINGLE, params_dtype=None):
        self.head_dim = head_dim
        self.num_heads = group.shard(num_heads, "attention heads")
        if num_kv_heads >= group.world_size:
            self.num_kv_heads = group.shard(num_kv_heads, "KV heads")
            self.kv_replicas = 1
        else:
            if group.world_size % num_kv_heads:
                raise ValueError(f"{num_kv_heads} KV heads cannot be replicated over {group.world_size} ranks")
            self.num_kv_heads = 1
            self.kv_replicas = group.world_size // num_kv_heads
        self.full_heads = num_heads
        self.full_kv_heads = num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * group.world_size
        super().__init__(hidden_size, out, bias, group, params_dtype=params_dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"QKVParallelLinear shard must be 'q', 'k' or 'v', got {shard_id!r}")
        full_heads = self.full_heads if shard_id == "q" else self.full_kv_heads
        expected = (full_heads * self.head_dim,) + tuple(param.shape[1:])
        _check_shape("weight" if param.dim() == 2 else "bias", loaded, expected)
        if shard_id == "q":
            start, n, src = 0, self.q_size, self.group.rank * self.q_size
        else:
            start = self.q_size + (0 if shard_id == "k" else self.kv_size)
            n = self.kv_size
            src = (self.group.rank // self.kv_replicas) * n
        self._place(param, loaded, 0, start, n, src)


class RowParallelLinear(_Linear):
    """y = x W^T with W's columns (input features) split over the group; partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 group: ParallelGroup = SINGLE, reduce_results: bool = True, params_dtype=None):
        self.full_in = in_features
        self.reduce_results = reduce_results
        super().__init__(group.shard(in_features, "input features"), out_features, bias, group, params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: not split, added once after the reduction
            _check_shape("bias", loaded, tuple(param.shape))
            param.data.copy_(loaded)
            return
        _check_shape("weight", loaded, (param.shape[0], self.full_in))
        n = param.shape[1]
        if isinstance(loaded, BlockFP8Tensor) and self.fp8_groups is not None:
            try:
                loaded = loaded.narrow(1, self.group.rank * n, n)  # whole 128-column blocks
            except ValueError as exc:
                raise ShapeMismatch(str(exc)) from None
            self._place(param, loaded, 0, 0, param.shape[0], 0)
        elif isinstance(loaded, (Int4Tensor, GGUFWeight)):
            loaded = loaded.narrow(1, self.group.rank * n, n)  # whole groups of 32 / whole blocks
            self._place(param, loaded, 0, 0, param.shape[0], 0)
        else:
            self._place(param, loaded, 1, 0, n, self.group.rank * n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x)
        if self.reduce_results:
            y = self.group.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

"""Parallel groups: who shares a layer's weights and how partial results are combined.

Every layer that can be split across devices takes a `ParallelGroup` at construction. With one
device the group has size 1, every collective is the identity, and the code path is the same.
Multi-process groups wrap a `torch.distributed` process group (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelGroup:
    rank: int = 0
    world_size: int = 1
    process_group: Any = None  # torch.distributed.ProcessGroup when world_size > 1

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"bad parallel group: rank {self.rank} of {self.world_size}")

    def shard(self, size: int, what: str = "dimension") -> int:
        """The per-rank size of a dimension of `size` split evenly over the group."""
        if size % self.world_size:
            raise ValueError(f"{what} of size {size} cannot be split evenly over {self.world_size} ranks")
        return size // self.world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        import torch.distributed as dist
        dist.all_reduce(x, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return x
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=dim)


SINGLE = ParallelGroup()

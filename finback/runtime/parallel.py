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


@dataclass(frozen=True)
class PipelineStage:
    """This rank's place in the pipeline: stage `rank` of `size` builds only its slice of the
    decoder layers; the first stage also holds the embedding, the last the final norm and LM head."""

    rank: int = 0
    size: int = 1

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"bad pipeline stage: {self.rank} of {self.size}")

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of the layers this stage runs: an even split, the first stages taking one
        more when it does not divide (the last stage also runs the LM head)."""
        if num_layers < self.size:
            raise ValueError(f"{num_layers} layers cannot be split over {self.size} pipeline stages")
        base, extra = divmod(num_layers, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)


WHOLE = PipelineStage()


class PPMissingLayer(torch.nn.Module):
    """The place of a layer that another pipeline stage holds (keeps layer indices = checkpoint names)."""

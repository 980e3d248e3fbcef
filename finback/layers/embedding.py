"""Token embedding and LM head, split over the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finback.layers.linear import _check_shape
from finback.runtime.parallel import SINGLE, ParallelGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, group: ParallelGroup = SINGLE, params_dtype=None):
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // group.world_size)  # ceil: the last rank is padded
        self.start = group.rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden_size,
                                               dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        _check_shape("embedding", loaded, (self.vocab_size, param.shape[1]))
        n = min(self.per_rank, self.vocab_size - self.start)
        param.data[:n].copy_(loaded[self.start:self.start + n])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        out.masked_fill_(mask.unsqueeze(-1), 0)
        return self.group.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h W^T over this rank's vocabulary slice, gathered to the full vocabulary."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.group.world_size > 1:
            logits = self.group.all_gather(logits)
        return logits[..., :self.vocab_size]

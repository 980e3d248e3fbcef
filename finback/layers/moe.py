"""Mixture of experts as DeepSeek-V3 / R1 route it: the router's grouped top-k choice and the
routed experts, stored stacked.

Router: scores are sigmoid(x W_router^T) in float32. The experts are *chosen* on the scores plus a
learned per-expert bias (e_score_correction_bias, DeepSeek's auxiliary-loss-free balancing), group
limited: the experts are split into n_group groups, each group is rated by the sum of its two best
biased scores, only the topk_group best groups are eligible, and the top_k experts are taken from
them. The *weights* are the unbiased scores of the chosen experts, renormalised to sum to 1
(norm_topk_prob) and multiplied by routed_scaling_factor.

Experts: w13 [E, 2*I, H] (each expert's gate rows, then its up rows) and w2 [E, H, I]; an expert
computes w2 @ (silu(w13_gate @ x) * (w13_up @ x)). With a parallel group every rank holds a slice of
I of every expert, so the output is a partial sum the caller all-reduces (once, together with the
shared experts). On CUDA the routed experts run H5's fused kernel
`finback.kernels.fused_moe.fused_moe(x, w13, w2, topk_weights, topk_ids)`; `fused_moe_ref` here has
the same signature and is the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finback.kernels import use_triton
from finback.layers.activation import silu_and_mul
from finback.layers.linear import ShapeMismatch, _check_shape
from finback.layers.quantized import Int4Tensor
from finback.runtime.parallel import SINGLE, ParallelGroup


def grouped_topk(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, n_group: int,
                 topk_group: int, renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, top_k] float32, topk_ids [T, top_k] int32)."""
    t, e = router_logits.shape
    scores = router_logits.float().sigmoid()
    choice = scores + correction_bias.float()
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(dim=-1)   # [T, G]
    best_groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    eligible = group_mask.repeat_interleave(e // n_group, dim=1)
    ids = choice.masked_fill(~eligible, float("-inf")).topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids.to(torch.int32)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k] -> [T, H]:
    sum over k of weight * expert(x). Loops over the experts that have tokens; accumulates in
    float32."""
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    weights = topk_weights.reshape(-1).float()
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        rows = pairs // k
        h = F.linear(silu_and_mul(F.linear(x[rows], w13[expert])), w2[expert])
        out.index_add_(0, rows, h.float() * weights[pairs, None])
    return out.to(x.dtype)


class TopKRouter(nn.Module):
    """The router: weight [E, H] and e_score_correction_bias [E], both kept in float32 (as DeepSeek
    and transformers keep them) whatever the model's dtype."""

    def __init__(self, num_experts: int, hidden_size: int, top_k: int, n_group: int, topk_group: int,
                 renormalize: bool, scaling: float):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.renormalize, self.scaling = renormalize, scaling
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False)
        self.weight.weight_loader = self._load_weight

    @staticmethod
    def _load_weight(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if isinstance(loaded, Int4Tensor):  # a 4-bit GGUF router: the router is kept dense
            loaded = loaded.dequantize()
        _check_shape("router weight", loaded, tuple(param.shape))
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight)
        return grouped_topk(logits, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                            self.renormalize, self.scaling)


class FusedMoE(nn.Module):
    """The routed experts, stacked; loads per-expert tensors (Hugging Face: experts.N.gate_proj /
    up_proj / down_proj, shard (N, part)) or whole stacks (GGUF ffn_{gate,up,down}_exps: [E, I, H] /
    [E, H, I], shard (None, part))."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 group: ParallelGroup = SINGLE, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.group = group
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.full_intermediate = intermediate_size
        self.intermediate = group.shard(intermediate_size, "expert intermediate size")
        dtype = params_dtype or torch.get_default_dtype()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden_size, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate, dtype=dtype),
                               requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and shard_id[1] in ("gate", "up", "down")):
            raise ValueError(f"FusedMoE shard must be (expert or None, 'gate'|'up'|'down'), got {shard_id!r}")
        expert, part = shard_id
        if (part == "down") != (param is self.w2):
            raise ValueError(f"expert part {part!r} does not go into this parameter")
        h, i, n = self.hidden_size, self.full_intermediate, self.intermediate
        one = (h, i) if part == "down" else (i, h)
        expected = one if expert is not None else (self.num_experts, *one)
        _check_shape(f"experts {part}_proj", loaded, expected)
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ShapeMismatch(f"expert {expert} is beyond the {self.num_experts} experts of the config")
        dst = param.data if expert is None else param.data[expert]
        r = self.group.rank
        if part == "down":
            dst.copy_(loaded.narrow(-1, r * n, n))
        else:
            dst.narrow(-2, 0 if part == "gate" else n, n).copy_(loaded.narrow(-2, r * n, n))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the routed experts' output, [T, H]."""
        if use_triton(x):
            from finback.kernels.fused_moe import fused_moe
            return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)
        return fused_moe_ref(x, self.w13, self.w2, topk_weights, topk_ids)

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

Block-FP8 experts (DeepSeek-V3's checkpoints kept as they are: `BlockFP8FusedMoE`) store w13 / w2 as
e4m3 with fp32 scales per 128x128 block, w13_scale_inv [E, 2I/128, H/128] and w2_scale_inv
[E, H/128, I/128], and run the same kernel's FP8 path on CUDA; on CPU each routed expert is
dequantized when a token needs it, which gives what the dequantized-at-load weights give.

GGUF experts (llama.cpp's ffn_{gate,up,down}_exps of any block type, `finback/layers/gguf_moe.py`):
when all three stacks come as `GGUFExperts` (the checkpoint's gguf_blocks mode) `FusedMoE` keeps this
rank's slice of each as blocks, frees its dense stacks, and runs the routed experts with the GGUF
expert kernel (CUDA) or by dequantizing each routed expert per call (CPU); see `_gguf_or_dense`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finback.kernels import use_triton
from finback.layers.activation import silu_and_mul
from finback.layers.gguf_moe import GGUFExperts, experts_forward
from finback.layers.linear import ShapeMismatch, _check_shape
from finback.layers.quantized import Int4Tensor
from finback.loader.fp8 import BlockFP8Tensor
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
    return _expert_loop(x, topk_weights, topk_ids, w13.shape[0], lambda e: (w13[e], w2[e]))


def _expert_loop(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                 expert_weights) -> torch.Tensor:
    """fused_moe_ref's loop, with `expert_weights(e) -> (w13[e], w2[e])` in x's dtype."""
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    weights = topk_weights.reshape(-1).float()
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        rows = pairs // k
        w13, w2 = expert_weights(expert)
        h = F.linear(silu_and_mul(F.linear(x[rows], w13)), w2)
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


_EXPERTS_ON_META = False


class experts_on_meta:
    """Within this context FusedMoE builds its dense expert stacks on the meta device: a GGUF checkpoint
    whose experts stay GGUF blocks never needs them (the 671B's would take 22.5 GB per layer in bf16).
    A checkpoint that gives its experts dense after all gets real stacks at load (`_materialize`)."""

    def __enter__(self):
        global _EXPERTS_ON_META
        self._was, _EXPERTS_ON_META = _EXPERTS_ON_META, True
        return self

    def __exit__(self, *exc):
        global _EXPERTS_ON_META
        _EXPERTS_ON_META = self._was


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
        self._device = torch.empty(0).device  # where real stacks go (the default device of the build)
        meta = _EXPERTS_ON_META and type(self) is FusedMoE
        self.w13 = self._stack("w13", (num_experts, 2 * self.intermediate, hidden_size), dtype, meta)
        self.w2 = self._stack("w2", (num_experts, hidden_size, self.intermediate), dtype, meta)
        self.gguf_experts: dict[str, GGUFExperts] = {}  # part -> this rank's stack kept as GGUF blocks
        self._dense_experts = False  # a part was loaded dense: every part is

    def _stack(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, meta: bool) -> nn.Parameter:
        p = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta" if meta else self._device),
                         requires_grad=False)
        p.weight_loader, p.expert_stack = self.weight_loader, name
        return p

    def _materialize(self) -> None:
        """Real (empty) stacks in place of meta ones: the experts turned out dense."""
        for name in ("w13", "w2"):
            p = getattr(self, name)
            if p.is_meta:
                setattr(self, name, self._stack(name, tuple(p.shape), p.dtype, False))

    def _check_part(self, param: nn.Parameter, loaded, shard_id) -> tuple[int | None, str]:
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and shard_id[1] in ("gate", "up", "down")):
            raise ValueError(f"FusedMoE shard must be (expert or None, 'gate'|'up'|'down'), got {shard_id!r}")
        expert, part = shard_id
        if (part == "down") != (getattr(param, "expert_stack", None) == "w2"):
            raise ValueError(f"expert part {part!r} does not go into this parameter")
        h, i = self.hidden_size, self.full_intermediate
        one = (h, i) if part == "down" else (i, h)
        expected = one if expert is not None else (self.num_experts, *one)
        _check_shape(f"experts {part}_proj", loaded, expected)
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ShapeMismatch(f"expert {expert} is beyond the {self.num_experts} experts of the config")
        return expert, part

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        expert, part = self._check_part(param, loaded, shard_id)
        loaded = self._gguf_or_dense(expert, part, loaded)
        if loaded is None:  # kept as GGUF blocks
            return
        param = self.w2 if part == "down" else self.w13  # (the one given may be a meta stack since replaced)
        if isinstance(loaded, BlockFP8Tensor):  # dense experts: dequantized at load
            loaded = loaded.dequantize(param.dtype)
        n = self.intermediate
        dst = param.data if expert is None else param.data[expert]
        r = self.group.rank
        if part == "down":
            dst.copy_(loaded.narrow(-1, r * n, n))
        else:
            dst.narrow(-2, 0 if part == "gate" else n, n).copy_(loaded.narrow(-2, r * n, n))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the routed experts' output, [T, H]."""
        if self.gguf_experts:
            return self._forward_gguf(x, topk_weights, topk_ids)
        if use_triton(x):
            from finback.kernels.fused_moe import fused_moe
            return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)
        return fused_moe_ref(x, self.w13, self.w2, topk_weights, topk_ids)

    # ------------------------------------------------------------------ GGUF experts (gguf_moe.py)

    def _gguf_or_dense(self, expert: int | None, part: str, loaded):
        """GGUF stacks stay blocks (this rank's slice, on the device the model is built on) while every
        part comes as blocks;
        once all three are held the dense stacks are freed. A dense part, or a block part after one,
        makes the experts dense: the parts held as blocks are dequantized into place. Returns what the
        dense path still has to copy, or None when the part was kept as blocks."""
        n = self.intermediate
        if isinstance(loaded, GGUFExperts) and expert is None and not self._dense_experts:
            r = self.group.rank
            try:
                kept = loaded.narrow(2 if part == "down" else 1, r * n, n)
            except ValueError as exc:  # a rank's slice of down that is not whole blocks
                raise ShapeMismatch(f"experts {part}_proj: {exc}") from None
            self.gguf_experts[part] = kept.to(self._device)
            if len(self.gguf_experts) == 3:
                for p in (self.w13, self.w2):
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            return None
        self._dense_experts = True
        self._materialize()
        held, self.gguf_experts = self.gguf_experts, {}
        for q, w in held.items():
            dst = self.w2.data if q == "down" else self.w13.data.narrow(1, 0 if q == "gate" else n, n)
            dst.copy_(w.dequantize(dst.dtype))
        return loaded.dequantize(self.w13.dtype) if isinstance(loaded, GGUFExperts) else loaded

    def _forward_gguf(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        g = self.gguf_experts
        return experts_forward(x, g["gate"], g["up"], g["down"], topk_weights, topk_ids)


class BlockFP8FusedMoE(FusedMoE):
    """The routed experts kept as block FP8 (see the module docstring): w13 / w2 float8_e4m3fn with
    w13_scale_inv / w2_scale_inv. Loads Hugging Face per-expert `BlockFP8Tensor`s; this rank's slice
    of I must be whole 128-blocks, as must H."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 group: ParallelGroup = SINGLE, block: tuple[int, int] = (128, 128)):
        from finback.kernels.fp8_gemm import FP8_BLOCK

        super().__init__(num_experts, hidden_size, intermediate_size, group, params_dtype=torch.float8_e4m3fn)
        if tuple(block) != (FP8_BLOCK, FP8_BLOCK) or hidden_size % FP8_BLOCK or self.intermediate % FP8_BLOCK:
            raise ValueError(f"block FP8 experts need {FP8_BLOCK}x{FP8_BLOCK} blocks and hidden size and per-rank "
                             f"intermediate size multiples of {FP8_BLOCK}; got {tuple(block)}, H={hidden_size}, "
                             f"I={self.intermediate}")
        self.block = tuple(block)
        e, hb, ib = num_experts, hidden_size // FP8_BLOCK, self.intermediate // FP8_BLOCK
        self.w13_scale_inv = nn.Parameter(torch.empty(e, 2 * ib, hb, dtype=torch.float32), requires_grad=False)
        self.w2_scale_inv = nn.Parameter(torch.empty(e, hb, ib, dtype=torch.float32), requires_grad=False)
        self.w13.fp8_scale = self.w13_scale_inv  # for load_format=dummy
        self.w2.fp8_scale = self.w2_scale_inv

    @staticmethod
    def supports(hidden_size: int, intermediate_size: int, group: ParallelGroup, block) -> bool:
        """Whether these sizes can stay block FP8 (else the experts are dequantized at load)."""
        return (block is not None and tuple(block) == (128, 128) and hidden_size % 128 == 0
                and intermediate_size % group.world_size == 0 and (intermediate_size // group.world_size) % 128 == 0)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id) -> None:
        expert, part = self._check_part(param, loaded, shard_id)
        if not isinstance(loaded, BlockFP8Tensor) or expert is None:
            raise ShapeMismatch(f"experts {part}_proj: block FP8 experts load one block FP8 tensor per expert, "
                                f"got {type(loaded).__name__}" + ("" if expert is not None else " (a stack)"))
        if loaded.block != self.block:
            raise ShapeMismatch(f"experts {part}_proj: scale blocks {loaded.block}, the experts use {self.block}")
        n, b = self.intermediate, self.block[0]
        r = self.group.rank
        if part == "down":
            src = loaded.narrow(1, r * n, n)
            self.w2.data[expert].copy_(src.weight)
            self.w2_scale_inv.data[expert].copy_(src.scale_inv)
        else:
            src = loaded.narrow(0, r * n, n)
            first = 0 if part == "gate" else n
            self.w13.data[expert, first:first + n].copy_(src.weight)
            self.w13_scale_inv.data[expert, first // b:(first + n) // b].copy_(src.scale_inv)

    def _dequantized(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        from finback.kernels.fp8_gemm import fp8_block_dequant_ref

        return (fp8_block_dequant_ref(self.w13[e], self.w13_scale_inv[e], dtype=dtype),
                fp8_block_dequant_ref(self.w2[e], self.w2_scale_inv[e], dtype=dtype))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            from finback.kernels.fused_moe import fused_moe
            return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids, self.w13_scale_inv, self.w2_scale_inv)
        return _expert_loop(x, topk_weights, topk_ids, self.num_experts, lambda e: self._dequantized(e, x.dtype))

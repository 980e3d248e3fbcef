"""DeepSeek-V3 architecture (DeepSeek-V3, DeepSeek-R1 671B): multi-head latent attention
(finback/layers/mla.py), routed + shared experts (finback/layers/moe.py) after `first_k_dense_replace`
dense layers, YaRN rotary on the 64 rotary dimensions (interleaved pairs), with YaRN's mscale^2 on
the softmax scale as DeepSeek does.

The checkpoint's multi-token-prediction layers (layer index num_hidden_layers and up,
"model.layers.61.*" in the real one) are loaded into `mtp`, a side module kept for speculative
decoding; the decoding step that would run them is not written yet, so they take no part in
forward. A checkpoint without them (transformers' own saves, llama.cpp's GGUFs) or with an
incomplete set loads all the same: `mtp` is then emptied.

Block FP8: a config with `fp8_block_size` (quantization_config fp8, and the runner keeping FP8)
builds every linear layer of attention and MLPs for block-FP8 weights (`use_block_fp8`) and the
routed experts as `BlockFP8FusedMoE` (when their sizes are whole 128-blocks; else they are
dequantized at load); kv_b_proj, embeddings, norms, router and LM head stay dense, as in the
checkpoint. The runner builds from a config without `fp8_block_size` to dequantize at load.

forward(input_ids, positions, attn_metadata) -> hidden states; compute_logits(hidden) -> logits.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from finback.layers.activation import silu_and_mul
from finback.layers.attention import AttentionMetadata
from finback.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from finback.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
    _Linear,
    default_weight_loader,
)
from finback.layers.mla import MLAAttention
from finback.layers.moe import BlockFP8FusedMoE, FusedMoE, TopKRouter
from finback.layers.norm import RMSNorm
from finback.layers.rotary import RotaryEmbedding, softmax_mscale
from finback.loader.config import ModelConfig
from finback.models.llama import LlamaDecoderLayer
from finback.runtime.parallel import (
    SINGLE,
    WHOLE,
    ParallelGroup,
    PipelineStage,
    PPMissingLayer,
)

# DeepSeek-R1's config.json as published (the fields finback reads): the benchmarks build the real
# shapes from it, the tests check what the runner derives from it.
R1_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000, "num_nextn_predict_layers": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
}


def _block_fp8(module: nn.Module, block: tuple[int, int] | None) -> nn.Module:
    """Switch every linear layer of `module` to block-FP8 weights (no-op without a block size)."""
    if block is not None:
        for m in module.modules():
            if isinstance(m, _Linear):
                m.use_block_fp8(block)
    return module


class DeepseekV3MLP(nn.Module):
    """SwiGLU MLP: the dense layers, and the shared experts (which leave the all-reduce to the MoE)."""

    def __init__(self, hidden_size: int, intermediate_size: int, group: ParallelGroup, reduce_results: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, group=group)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, group=group, reduce_results=reduce_results)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DeepseekV3MoE(nn.Module):
    def __init__(self, config: ModelConfig, group: ParallelGroup):
        super().__init__()
        self.group = group
        self.gate = TopKRouter(config.n_routed_experts, config.hidden_size, config.num_experts_per_tok,
                               config.n_group, config.topk_group, config.norm_topk_prob,
                               config.routed_scaling_factor)
        block = config.fp8_block_size
        if BlockFP8FusedMoE.supports(config.hidden_size, config.moe_intermediate_size, group, block):
            self.experts = BlockFP8FusedMoE(config.n_routed_experts, config.hidden_size,
                                            config.moe_intermediate_size, group, block)
        else:
            self.experts = FusedMoE(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, group)
        self.shared_experts = (_block_fp8(DeepseekV3MLP(config.hidden_size,
                                                        config.moe_intermediate_size * config.n_shared_experts,
                                                        group, reduce_results=False), block)
                               if config.n_shared_experts else None)

    def forward(self, x):
        topk_weights, topk_ids = self.gate(x)
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.group.all_reduce(out)


class DeepseekV3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, group: ParallelGroup, rotary: RotaryEmbedding, layer_idx: int):
        super().__init__()
        scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5 * softmax_mscale(config.rope_scaling)
        block = config.fp8_block_size  # each part switched as soon as built: one dense copy at a time
        self.self_attn = _block_fp8(MLAAttention(config.hidden_size, config.num_attention_heads, config.q_lora_rank,
                                                 config.kv_lora_rank, config.qk_nope_head_dim,
                                                 config.qk_rope_head_dim, config.v_head_dim, rotary, scale,
                                                 config.attention_bias, group), block)
        self.mlp = (DeepseekV3MoE(config, group) if layer_idx >= config.first_k_dense_replace
                    else _block_fp8(DeepseekV3MLP(config.hidden_size, config.intermediate_size, group), block))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    forward = LlamaDecoderLayer.forward  # the same pre-norm residual block: norm, attention, norm, MLP


class DeepseekV3MTPLayer(DeepseekV3DecoderLayer):
    """One multi-token-prediction module as the checkpoint stores it: a decoder layer plus its own
    embedding, the norms of the embedding (enorm) and of the previous hidden state (hnorm), the
    projection of their concatenation (eh_proj), and a shared_head (norm + LM head)."""

    def __init__(self, config: ModelConfig, group: ParallelGroup, rotary: RotaryEmbedding, layer_idx: int):
        super().__init__(config, group, rotary, layer_idx)
        h = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h, group)
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = ColumnParallelLinear(2 * h, h)  # replicated
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(h, config.rms_norm_eps)
        self.shared_head.head = ParallelLMHead(config.vocab_size, h, group)


class DeepseekV3Model(nn.Module):
    """With pipeline parallelism a stage builds only its layers; the embedding lives on the first
    stage, the final norm on the last (as in finback/models/llama.py)."""

    def __init__(self, config: ModelConfig, group: ParallelGroup, stage: PipelineStage = WHOLE):
        super().__init__()
        self.start_layer, self.end_layer = stage.layer_range(config.num_hidden_layers)
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
                             if stage.is_first else None)
        self.rotary = RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling, interleaved=config.rope_interleave)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(config, group, self.rotary, i)
                                    if self.start_layer <= i < self.end_layer else PPMissingLayer()
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if stage.is_last else None

    def forward(self, input_ids, positions, meta, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        if intermediate is None:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = intermediate
        meta.cache["rope"] = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.layers[self.start_layer:self.end_layer]:
            x, residual = layer(positions, x, residual, meta)
        if self.norm is None:
            return x, residual
        x, _ = self.norm(x, residual)
        return x


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_EXPERT_STACK = re.compile(r"^(.*\.mlp\.experts)\.(gate|up|down)_proj\.weight$")
_KV_B_HALF = re.compile(r"^(.*\.self_attn)\.(k_b|v_b)_proj\.weight$")
_GATE_UP = [(".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1)]


class DeepseekV3ForCausalLM(nn.Module):
    # a decode step reads only device tensors (MLA takes the backend's static tables, fused_moe's
    # alignment is sync-free): the runner captures it in CUDA graphs
    supports_cuda_graphs = True
    supports_pp = True
    supports_block_fp8 = True

    def __init__(self, config: ModelConfig, group: ParallelGroup = SINGLE, stage: PipelineStage = WHOLE):
        super().__init__()
        self.config = config
        self.group = group
        self.model = DeepseekV3Model(config, group, stage)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, group) if stage.is_last else None
        if config.tie_word_embeddings and stage.is_first and stage.is_last:
            self.lm_head.weight = self.model.embed_tokens.weight
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(DeepseekV3MTPLayer(config, group, self.model.rotary, n + i)  # beside the LM head
                                 for i in range(config.num_nextn_predict_layers if stage.is_last else 0))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        return self.model(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def attention_layers(self) -> list[MLAAttention]:
        return [layer.self_attn for layer in self.model.layers[self.model.start_layer:self.model.end_layer]]

    def _elsewhere(self, name: str) -> bool:
        """A checkpoint tensor that another pipeline stage loads (MTP layers go with the last stage)."""
        m = _LAYER.match(name)
        if m:
            i = int(m.group(1))
            if i >= self.config.num_hidden_layers:
                return self.lm_head is None
            return not self.model.start_layer <= i < self.model.end_layer
        if name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is None
        return name.startswith(("model.norm.", "lm_head.")) and self.lm_head is None

    def _target(self, name: str) -> tuple[str, object, list[str]]:
        """Checkpoint name -> (our parameter name, shard id, the names it counts as loaded)."""
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= self.config.num_hidden_layers:
            name = f"mtp.{int(m.group(1)) - self.config.num_hidden_layers}.{m.group(2)}"
        m = _EXPERT.match(name)
        if m:
            param = f"{m.group(1)}.{'w2' if m.group(3) == 'down' else 'w13'}"
            return param, (int(m.group(2)), m.group(3)), [name]
        m = _EXPERT_STACK.match(name)
        if m:
            param = f"{m.group(1)}.{'w2' if m.group(2) == 'down' else 'w13'}"
            counted = [f"{m.group(1)}.{e}.{m.group(2)}_proj.weight" for e in range(self.config.n_routed_experts)]
            return param, (None, m.group(2)), counted
        m = _KV_B_HALF.match(name)
        if m:
            return f"{m.group(1)}.kv_b_proj.weight", m.group(2), [name]
        for ckpt, ours, shard in _GATE_UP:
            if ckpt in name:
                target = name.replace(ckpt, ours)
                return target, shard, [f"{target}:{shard}"]
        return name, None, [name]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names, full unsplit shapes; GGUF's stacked experts
        and split kv_b under llama.cpp's converter names) into this rank's parameters. Returns the
        names loaded, in the form expected_weights() lists; raises ShapeMismatch and KeyError."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if (self.config.tie_word_embeddings and name == "model.embed_tokens.weight"
                    and self.lm_head is not None and self.model.embed_tokens is None):
                name = "lm_head.weight"  # the last stage's own copy of the tied embedding
            elif self._elsewhere(name):
                continue
            target, shard, counted = self._target(name)
            param = params.get(target)
            if param is None:
                raise KeyError(name)
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
            loaded.update(counted)
        for name in list(loaded):  # kv_b_proj rebuilt from both of llama.cpp's halves
            m = _KV_B_HALF.match(name)
            if m and m.group(2) == "k_b" and f"{m.group(1)}.v_b_proj.weight" in loaded:
                loaded.add(f"{m.group(1)}.kv_b_proj.weight")
        mtp_expected = {n for n in self._expected() if n.startswith("mtp.")}
        if mtp_expected - loaded:
            self.mtp = nn.ModuleList()  # absent or incomplete: nothing to keep for speculative decoding
        return loaded

    def _expected(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            if name.endswith("_scale_inv"):  # block FP8 scales come with their weights
                continue
            if name.endswith((".experts.w13", ".experts.w2")):
                prefix = name.rsplit(".", 1)[0]
                parts = ("gate", "up") if name.endswith("w13") else ("down",)
                names.update(f"{prefix}.{e}.{p}_proj.weight" for e in range(self.config.n_routed_experts)
                             for p in parts)
            elif ".gate_up_proj." in name:
                names.update(f"{name}:{s}" for s in (0, 1))
            else:
                names.add(name)
        return names

    def expected_weights(self) -> set[str]:
        """The loaded-names set that a complete checkpoint produces (see load_weights); the MTP
        layers are optional."""
        return {n for n in self._expected() if not n.startswith("mtp.")}

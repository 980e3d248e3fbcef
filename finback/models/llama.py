"""Llama-family decoder (Llama 2/3, Mistral-style, and Qwen2 which adds a QKV bias).

forward(input_ids, positions, attn_metadata) -> hidden states; compute_logits(hidden) -> logits.
The model never allocates the KV cache and never looks at requests.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from finback.layers.activation import silu_and_mul
from finback.layers.attention import Attention, AttentionMetadata
from finback.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from finback.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                   default_weight_loader)
from finback.layers.norm import RMSNorm
from finback.layers.rotary import RotaryEmbedding
from finback.loader.config import ModelConfig
from finback.runtime.parallel import SINGLE, WHOLE, ParallelGroup, PipelineStage, PPMissingLayer


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, group: ParallelGroup):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       bias=config.mlp_bias, group=group)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                           bias=config.mlp_bias, group=group)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, group: ParallelGroup, rotary: RotaryEmbedding):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias, group=group)
        self.o_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                        bias=False, group=group)
        self.rotary = rotary
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, config.head_dim,
                              scale=config.head_dim ** -0.5)

    def forward(self, positions, x, meta):
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        t = x.shape[0]
        q, k = self.rotary(positions, q.view(t, -1, self.attn.head_dim), k.view(t, -1, self.attn.head_dim),
                           meta.cache.get("rope"))
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, group: ParallelGroup, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = LlamaAttention(config, group, rotary)
        self.mlp = LlamaMLP(config, group)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """With pipeline parallelism a stage builds only its layers (`stage.layer_range`); the embedding
    lives on the first stage and the final norm on the last."""

    def __init__(self, config: ModelConfig, group: ParallelGroup, stage: PipelineStage = WHOLE):
        super().__init__()
        self.stage = stage
        self.start_layer, self.end_layer = stage.layer_range(config.num_hidden_layers)
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
                             if stage.is_first else None)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                      config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, group, self.rotary)
                                    if self.start_layer <= i < self.end_layer else PPMissingLayer()
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if stage.is_last else None

    def forward(self, input_ids, positions, meta, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The last stage returns normed hidden states; an earlier one (hidden, residual) for the
        next stage, which passes them as `intermediate` (then input_ids is not read)."""
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


# checkpoint name -> (our parameter name, shard id) for fused parameters
_STACKED = [
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
]


class LlamaForCausalLM(nn.Module):
    supports_pp = True

    def __init__(self, config: ModelConfig, group: ParallelGroup = SINGLE, stage: PipelineStage = WHOLE):
        super().__init__()
        self.config = config
        self.group = group
        self.stage = stage
        self.model = LlamaModel(config, group, stage)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, group) if stage.is_last else None
        if config.tie_word_embeddings and stage.is_first and stage.is_last:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        return self.model(input_ids, positions, attn_metadata, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers[self.model.start_layer:self.model.end_layer]]

    def _elsewhere(self, name: str) -> bool:
        """A checkpoint tensor that another pipeline stage loads."""
        m = self.model
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])  # a layer past the config's count is unknown everywhere: not skipped
            return i < self.config.num_hidden_layers and not m.start_layer <= i < m.end_layer
        if name.startswith("model.embed_tokens."):
            return m.embed_tokens is None
        return name.startswith(("model.norm.", "lm_head.")) and self.lm_head is None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names, full unsplit shapes) into this rank's
        parameters. Returns the names of the parameters that were loaded; raises ShapeMismatch
        (from the weight loaders) and KeyError for names the model does not have."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "rope_freqs":
                self.model.rotary.set_freq_factors(tensor)
                continue
            if "rotary_emb.inv_freq" in name:
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if (self.config.tie_word_embeddings and name == "model.embed_tokens.weight"
                    and self.lm_head is not None and self.model.embed_tokens is None):
                name = "lm_head.weight"  # the last stage's own copy of the tied embedding
            elif self._elsewhere(name):
                continue
            shard = None
            target = name
            for ckpt, ours, shard_id in _STACKED:
                if ckpt in name:
                    target = name.replace(ckpt, ours)
                    shard = shard_id
                    break
            param = params.get(target)
            if param is None:
                raise KeyError(name)
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
            loaded.add(target if shard is None else f"{target}:{shard}")
        return loaded

    def expected_weights(self) -> set[str]:
        """The loaded-names set that a complete checkpoint produces (see load_weights)."""
        names = set()
        for name, _ in self.named_parameters():
            if ".qkv_proj." in name:
                names.update(f"{name}:{s}" for s in "qkv")
            elif ".gate_up_proj." in name:
                names.update(f"{name}:{s}" for s in (0, 1))
            else:
                names.add(name)
        return names

"""The model's shape, read from a Hugging Face config.json or from GGUF metadata.

One `ModelConfig` describes every architecture we run; fields an architecture does not use keep
their defaults. Names follow Hugging Face's config.json so that both sources map onto one thing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from finback.loader.errors import ModelLoadError

# Hugging Face `architectures` / `model_type` and GGUF `general.architecture` -> our architecture name.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str | None) -> "ModelConfig":
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(path, f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(path, f"num_attention_heads {self.num_attention_heads} is not a multiple "
                                       f"of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(path, f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ModelLoadError(path, f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        return self

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], path: str | None = None) -> "ModelConfig":
        arch = None
        for name in cfg.get("architectures") or []:
            arch = HF_ARCHITECTURES.get(name)
            if arch:
                break
        if arch is None:
            arch = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama"}.get(cfg.get("model_type", ""))
        if arch is None:
            raise ModelLoadError(path, f"unsupported architecture {cfg.get('architectures') or cfg.get('model_type')!r} "
                                       f"(supported: {sorted(HF_ARCHITECTURES)})")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope_scaling = cfg.get("rope_scaling")
            rope_theta = cfg.get("rope_theta")
            params = cfg.get("rope_parameters")  # transformers >= 5 folds theta and scaling in here
            if isinstance(params, dict):
                rope_theta = params.get("rope_theta", rope_theta)
                if params.get("rope_type", "default") != "default" and rope_scaling is None:
                    rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
            config = cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                hidden_act=cfg.get("hidden_act", "silu"),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(path, f"config.json is missing or has a bad field: {exc}") from None
        return config.validate(path)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise ModelLoadError(path, "config.json not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(path, f"cannot read config.json: {exc}") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(path, "config.json is not a JSON object")
        return cls.from_hf(cfg, path)

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                  path: str | None = None) -> "ModelConfig":
        gguf_arch = metadata.get("general.architecture")
        arch = GGUF_ARCHITECTURES.get(gguf_arch)
        if arch is None:
            raise ModelLoadError(path, f"unsupported GGUF architecture {gguf_arch!r} "
                                       f"(supported: {sorted(GGUF_ARCHITECTURES)})")

        def get(key, default=None, required=False):
            value = metadata.get(f"{gguf_arch}.{key}", default)
            if required and value is None:
                raise ModelLoadError(path, f"GGUF metadata key {gguf_arch}.{key} is missing")
            return value

        heads = int(get("attention.head_count", required=True))
        kv_heads = get("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer lists exist in some GGUFs; ours are uniform
            kv_heads = kv_heads[0]
        hidden = int(get("embedding_length", required=True))
        embd = tensor_shapes.get("token_embd.weight")
        if embd is None:
            raise ModelLoadError(path, "GGUF has no token_embd.weight tensor")
        vocab = int(get("vocab_size", embd[0]))
        head_dim = int(get("attention.key_length", get("rope.dimension_count", hidden // heads)))
        rope_scaling = None
        scaling_type = get("rope.scaling.type")
        if arch == "llama" and "rope_freqs.weight" in tensor_shapes:
            # llama.cpp stores Llama-3 rope scaling as precomputed frequency factors; the
            # original parameters are not in the file. Llama 3.1's are the only ones in use.
            rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        elif scaling_type in ("linear", "yarn"):
            rope_scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor", 1.0))}
            orig = get("rope.scaling.original_context_length")
            if orig:
                rope_scaling["original_max_position_embeddings"] = int(orig)
        config = cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length", required=True)),
            num_hidden_layers=int(get("block_count", required=True)),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensor_shapes,
            attention_bias=f"blk.0.attn_q.bias" in tensor_shapes,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        )
        return config.validate(path)

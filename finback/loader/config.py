"""The model's shape, read from a Hugging Face config.json or from GGUF metadata.

One `ModelConfig` describes every architecture we run; fields an architecture does not use keep
their defaults. Names follow Hugging Face's config.json so that both sources map onto one thing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from finback.loader.errors import ModelLoadError

# Hugging Face `architectures` / `model_type` and GGUF `general.architecture` -> our architecture name.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "deepseek2": "deepseek_v3"}


# Upper bounds far beyond any real model: a value past one is a corrupt file, refused before any
# tensor is allocated (a config is read before the weights it describes).
LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 22,
}
# The rotary cos/sin tables hold max_position_embeddings x head_dim float32 values.
MAX_ROTARY_TABLE_BYTES = 4 << 30
MAX_CONFIG_BYTES = 16 << 20
ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_REQUIRED = object()


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _to_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        return math.inf


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Fields:
    """Typed reads from one config source (config.json, or GGUF metadata under `prefix`): every
    missing or ill-typed value is a ModelLoadError naming the source, the key and the value."""

    def __init__(self, data: Mapping[str, Any], path: str | None, source: str, prefix: str = ""):
        self.data, self.path, self.source, self.prefix = data, path, source, prefix

    def fail(self, problem: str) -> ModelLoadError:
        return ModelLoadError(self.path, problem)

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.data.get(self.prefix + key)
        if value is None:
            if default is _REQUIRED:
                raise self.fail(f"{self.source} lacks the required field {self.prefix + key!r}")
            return default
        return value

    def int(self, key: str, default: Any = _REQUIRED, minimum: int | None = 1) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{self.source} field {self.prefix + key!r} must be an integer, got {_show(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(f"{self.source} field {self.prefix + key!r} must be at least {minimum}, got {value}")
        return value

    def float(self, key: str, default: float, positive: bool = True) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{self.source} field {self.prefix + key!r} must be a number, got {_show(value)}")
        value = _to_float(value)
        if not math.isfinite(value) or (positive and value <= 0):
            raise self.fail(f"{self.source} field {self.prefix + key!r} must be a positive finite number, "
                            f"got {value!r}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{self.source} field {self.prefix + key!r} must be true or false, got {_show(value)}")
        return value

    def str(self, key: str, default: str | None) -> str | None:
        value = self.raw(key, default)
        if value is not None and not isinstance(value, str):
            raise self.fail(f"{self.source} field {self.prefix + key!r} must be a string, got {_show(value)}")
        return value

    def token_ids(self, key: str, allow_list: bool) -> int | list[int] | None:
        value = self.data.get(key)
        if value is None:
            return None
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
            allow_list and isinstance(value, list)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))
        if not ok:
            kind = "a token id or a list of token ids" if allow_list else "a token id"
            raise self.fail(f"{self.source} field {key!r} must be {kind}, got {_show(value)}")
        return value


def _check_rope_scaling(scaling: Any, path: str | None) -> dict[str, Any] | None:
    """rope_scaling as the rotary embedding reads it, or a ModelLoadError for one it cannot use."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ModelLoadError(path, f"rope_scaling must be an object or null, got {_show(scaling)}")
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise ModelLoadError(path, f"rope scaling {_show(kind)} is not supported "
                                   f"(supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return scaling
    need = ["factor"]
    if kind == "llama3":
        need += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    if kind == "yarn":
        need += ["original_max_position_embeddings"]
    values = {}
    for key in need:
        value = scaling.get(key)
        number = _to_float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        if not math.isfinite(number) or number <= 0:
            raise ModelLoadError(path, f"{kind} rope scaling needs a positive number {key!r}, got {_show(value)}")
        values[key] = number
    if kind == "llama3" and values["high_freq_factor"] <= values["low_freq_factor"]:
        raise ModelLoadError(path, f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                                   f"{values['high_freq_factor']} and {values['low_freq_factor']}")
    return scaling


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
    # block FP8 checkpoints (quantization_config quant_method "fp8"): [rows, cols] of one scale block
    fp8_block_size: tuple[int, int] | None = None
    # DeepSeek-V3 / R1 (architecture "deepseek_v3"): multi-head latent attention and routed experts
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 0

    def validate(self, path: str | None) -> "ModelConfig":
        """Check the config is one our models can be built from, within sane sizes (ModelLoadError)."""
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelLoadError(path, f"config field {name} must be a positive integer, got {_show(value)}")
            if value > limit:
                raise ModelLoadError(path, f"config field {name} is {value}, beyond any real model "
                                           f"(limit {limit}): corrupt?")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(path, f"num_attention_heads {self.num_attention_heads} is not a multiple "
                                       f"of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(path, f"head_dim {self.head_dim} must be even for rotary embeddings")
        rotary_bytes = self.max_position_embeddings * self.head_dim * 4
        if rotary_bytes > MAX_ROTARY_TABLE_BYTES:
            raise ModelLoadError(path, f"max_position_embeddings {self.max_position_embeddings} x head_dim "
                                       f"{self.head_dim} needs {rotary_bytes / (1 << 30):.1f} GiB of rotary "
                                       f"tables (limit {MAX_ROTARY_TABLE_BYTES >> 30} GiB): corrupt?")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            number = _to_float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
            if not math.isfinite(number) or number <= 0:
                raise ModelLoadError(path, f"config field {name} must be a positive finite number, "
                                           f"got {_show(value)}")
        if self.hidden_act != "silu":
            raise ModelLoadError(path, f"hidden_act {_show(self.hidden_act)} is not supported (only silu)")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling, path)
        if self.architecture == "deepseek_v3":
            self._validate_deepseek(path)
        return self

    def _validate_deepseek(self, path: str | None) -> None:
        def need(ok: bool, problem: str) -> None:
            if not ok:
                raise ModelLoadError(path, problem)

        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            need(not isinstance(value, bool) and isinstance(value, int) and 0 < value <= 1 << 16,
                 f"DeepSeek config field {name} must be a positive integer (at most 65536), got {_show(value)}")
        need(self.q_lora_rank is None or 0 < self.q_lora_rank <= 1 << 16,
             f"DeepSeek config field q_lora_rank must be null or a positive integer, got {_show(self.q_lora_rank)}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim {self.qk_rope_head_dim} must be even")
        need(self.head_dim == self.qk_rope_head_dim, "head_dim must be qk_rope_head_dim for DeepSeek")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace {self.first_k_dense_replace} is not in 0..{self.num_hidden_layers}")
        need(0 <= self.n_shared_experts <= 64, f"n_shared_experts {self.n_shared_experts} is not in 0..64")
        need(0 <= self.num_nextn_predict_layers <= 16,
             f"num_nextn_predict_layers {self.num_nextn_predict_layers} is not in 0..16")
        e, g = self.n_routed_experts, self.n_group
        need(e % g == 0 and e // g >= 2, f"n_routed_experts {e} must split into n_group {g} groups of at least 2")
        need(self.topk_group <= g, f"topk_group {self.topk_group} is more than n_group {g}")
        need(self.num_experts_per_tok <= self.topk_group * (e // g),
             f"num_experts_per_tok {self.num_experts_per_tok} is more than the {self.topk_group * (e // g)} "
             f"experts of topk_group {self.topk_group} groups")
        rsf = self.routed_scaling_factor
        need(not isinstance(rsf, bool) and isinstance(rsf, (int, float)) and math.isfinite(rsf) and rsf > 0,
             f"routed_scaling_factor must be a positive finite number, got {_show(rsf)}")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], path: str | None = None) -> "ModelConfig":
        f = _Fields(cfg, path, "config.json")
        names = cfg.get("architectures")
        model_type = cfg.get("model_type")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ModelLoadError(path, f"config.json field 'architectures' must be a list of names, "
                                       f"got {_show(names)}")
        if model_type is not None and not isinstance(model_type, str):
            raise ModelLoadError(path, f"config.json field 'model_type' must be a string, got {_show(model_type)}")
        if names:
            arch = next((HF_ARCHITECTURES[n] for n in names if n in HF_ARCHITECTURES), None)
        else:
            arch = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama",
                    "deepseek_v3": "deepseek_v3"}.get(model_type or "")
        if arch is None:
            raise ModelLoadError(path, f"unsupported architecture {_show(names or model_type)} "
                                       f"(supported: {sorted(HF_ARCHITECTURES)})")
        heads = f.int("num_attention_heads")
        hidden = f.int("hidden_size")
        head_dim = f.int("head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise ModelLoadError(path, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                                           f"(and there is no head_dim)")
            head_dim = hidden // heads
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = f.float("rope_theta", 10000.0)
        params = cfg.get("rope_parameters")  # transformers >= 5 folds theta and scaling in here
        if params is not None:
            if not isinstance(params, dict):
                raise ModelLoadError(path, f"config.json field 'rope_parameters' must be an object, "
                                           f"got {_show(params)}")
            rope_theta = _Fields(params, path, "config.json rope_parameters").float("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default" and rope_scaling is None:
                rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        config = cls(
            architecture=arch,
            vocab_size=f.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=f.int("intermediate_size"),
            num_hidden_layers=f.int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=f.int("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=f.int("max_position_embeddings", 4096),
            tie_word_embeddings=f.bool("tie_word_embeddings", False),
            attention_bias=f.bool("attention_bias", arch == "qwen2"),
            mlp_bias=f.bool("mlp_bias", False),
            hidden_act=f.str("hidden_act", "silu"),
            bos_token_id=f.token_ids("bos_token_id", allow_list=False),
            eos_token_id=f.token_ids("eos_token_id", allow_list=True),
            torch_dtype=f.str("torch_dtype", None) or f.str("dtype", None),
        )
        config.fp8_block_size = _fp8_block_size(cfg.get("quantization_config"), path)
        if arch == "deepseek_v3":
            _deepseek_from_hf(config, f)
        return config.validate(path)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        try:
            if os.path.isdir(path):
                raise ModelLoadError(path, "config.json is a folder, not a file")
            if os.path.getsize(path) > MAX_CONFIG_BYTES:
                raise ModelLoadError(path, f"config.json is {os.path.getsize(path)} bytes, "
                                           f"more than any real config (limit {MAX_CONFIG_BYTES})")
            with open(path, "rb") as fh:
                cfg = json.loads(fh.read(), parse_constant=_reject_constant)
        except ModelLoadError:
            raise
        except FileNotFoundError:
            raise ModelLoadError(path, "config.json not found") from None
        except OSError as exc:
            raise ModelLoadError(path, f"cannot read config.json: {exc.strerror or exc}") from None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            raise ModelLoadError(path, f"config.json is not valid JSON: {_clip(str(exc))}") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(path, f"config.json is not a JSON object (it is a {type(cfg).__name__})")
        return cls.from_hf(cfg, path)

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                  path: str | None = None) -> "ModelConfig":
        gguf_arch = metadata.get("general.architecture")
        arch = GGUF_ARCHITECTURES.get(gguf_arch) if isinstance(gguf_arch, str) else None
        if arch is None:
            raise ModelLoadError(path, f"unsupported GGUF architecture {_show(gguf_arch)} "
                                       f"(supported: {sorted(GGUF_ARCHITECTURES)})")
        f = _Fields(metadata, path, "GGUF metadata", prefix=f"{gguf_arch}.")

        heads = f.int("attention.head_count")
        kv_heads = f.raw("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer lists exist in some GGUFs; ours are uniform
            if not kv_heads or any(v != kv_heads[0] for v in kv_heads):
                raise ModelLoadError(path, f"GGUF metadata {gguf_arch}.attention.head_count_kv is a per-layer "
                                           f"list {_show(kv_heads)}: only one value for all layers is supported")
            kv_heads = _Fields({"k": kv_heads[0]}, path, "GGUF metadata").int("k")
        else:
            kv_heads = f.int("attention.head_count_kv", heads)
        hidden = f.int("embedding_length")
        embd = tensor_shapes.get("token_embd.weight")
        if embd is None:
            raise ModelLoadError(path, "GGUF has no token_embd.weight tensor")
        if len(embd) != 2:
            raise ModelLoadError(path, f"GGUF tensor token_embd.weight has shape {tuple(embd)}, not 2-D")
        head_dim = f.int("attention.key_length", None)
        if head_dim is None:
            head_dim = f.int("rope.dimension_count", None)
        if head_dim is None:
            if hidden % heads:
                raise ModelLoadError(path, f"{gguf_arch}.embedding_length {hidden} is not a multiple of "
                                           f"{gguf_arch}.attention.head_count {heads}")
            head_dim = hidden // heads
        rope_scaling = None
        scaling_type = f.str("rope.scaling.type", None)
        if arch == "llama" and "rope_freqs.weight" in tensor_shapes:
            # llama.cpp stores Llama-3 rope scaling as precomputed frequency factors; the
            # original parameters are not in the file. Llama 3.1's are the only ones in use.
            rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        elif scaling_type not in (None, "none"):
            rope_scaling = {"rope_type": scaling_type, "factor": f.float("rope.scaling.factor", 1.0)}
            orig = f.int("rope.scaling.original_context_length", None)
            if orig:
                rope_scaling["original_max_position_embeddings"] = orig
        config = cls(
            architecture=arch,
            vocab_size=f.int("vocab_size", int(embd[0])),
            hidden_size=hidden,
            intermediate_size=f.int("feed_forward_length"),
            num_hidden_layers=f.int("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=f.float("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=f.float("rope.freq_base", 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=f.int("context_length", 4096),
            tie_word_embeddings="output.weight" not in tensor_shapes,
            attention_bias="blk.0.attn_q.bias" in tensor_shapes,
            bos_token_id=_Fields(metadata, path, "GGUF metadata").token_ids("tokenizer.ggml.bos_token_id", False),
            eos_token_id=_Fields(metadata, path, "GGUF metadata").token_ids("tokenizer.ggml.eos_token_id", False),
        )
        if arch == "deepseek_v3":
            _deepseek_from_gguf(config, f, tensor_shapes)
        return config.validate(path)


def _fp8_block_size(qc: Any, path: str | None) -> tuple[int, int] | None:
    """The [rows, cols] scale block of a block-FP8 checkpoint (DeepSeek-V3's quantization_config),
    None when the checkpoint is not FP8."""
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
        return None
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ModelLoadError(path, f"FP8 format {_show(fmt)} is not supported (only e4m3)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 1 << 16 for b in block)):
        raise ModelLoadError(path, f"FP8 quantization_config needs weight_block_size [rows, cols] (per-tensor "
                                   f"FP8 is not supported), got {_show(block)}")
    return block[0], block[1]


_DEEPSEEK_INTS = (  # ModelConfig field, its config.json key, llama.cpp's deepseek2 key, default, minimum
    ("q_lora_rank", "q_lora_rank", "attention.q_lora_rank", None, 1),
    ("kv_lora_rank", "kv_lora_rank", "attention.kv_lora_rank", _REQUIRED, 1),
    ("moe_intermediate_size", "moe_intermediate_size", "expert_feed_forward_length", _REQUIRED, 1),
    ("n_routed_experts", "n_routed_experts", "expert_count", _REQUIRED, 1),
    ("num_experts_per_tok", "num_experts_per_tok", "expert_used_count", _REQUIRED, 1),
    ("n_shared_experts", "n_shared_experts", "expert_shared_count", 0, 0),
    ("n_group", "n_group", "expert_group_count", 1, 1),
    ("topk_group", "topk_group", "expert_group_used_count", 1, 1),
    ("first_k_dense_replace", "first_k_dense_replace", "leading_dense_block_count", 0, 0),
    ("num_nextn_predict_layers", "num_nextn_predict_layers", "nextn_predict_layers", 0, 0),
)


def _deepseek_common(config: ModelConfig, f: _Fields, gguf: bool) -> None:
    """The DeepSeek-V3 fields config.json and GGUF metadata both give, only under other names."""
    for name, hf_key, gguf_key, default, minimum in _DEEPSEEK_INTS:
        setattr(config, name, f.int(gguf_key if gguf else hf_key, default, minimum=minimum))
    config.routed_scaling_factor = f.float("expert_weights_scale" if gguf else "routed_scaling_factor", 1.0)


def _deepseek_from_hf(config: ModelConfig, f: _Fields) -> None:
    """DeepSeek-V3 fields of a config.json; only sigmoid scores with the bias-corrected group-limited
    choice (noaux_tc, V3 and R1) are supported."""
    scoring = f.str("scoring_func", "sigmoid")
    method = f.str("topk_method", "noaux_tc")
    if scoring != "sigmoid" or method != "noaux_tc":
        raise f.fail(f"DeepSeek routing {scoring}/{method} is not supported (only sigmoid/noaux_tc: V3 and R1)")
    _deepseek_common(config, f, gguf=False)
    config.qk_nope_head_dim = f.int("qk_nope_head_dim")
    config.qk_rope_head_dim = f.int("qk_rope_head_dim")
    config.v_head_dim = f.int("v_head_dim")
    config.norm_topk_prob = f.bool("norm_topk_prob", True)
    config.rope_interleave = f.bool("rope_interleave", True)
    config.head_dim = config.qk_rope_head_dim  # the rotary part; the other head sizes have their own fields
    config.num_key_value_heads = config.num_attention_heads


def _deepseek_from_gguf(config: ModelConfig, f: _Fields, shapes: dict[str, tuple[int, ...]]) -> None:
    """DeepSeek-V3 fields from llama.cpp's deepseek2 metadata. Newer files (MLA-split kv_b) give
    key_length = kv_lora_rank + rope and value_length = kv_lora_rank, with the per-head sizes in
    key_length_mla / value_length_mla; older ones give the per-head sizes in key_length / value_length.
    YaRN's mscale_all_dim is stored as yarn_log_multiplier = 0.1 * mscale_all_dim."""
    gating = f.int("expert_gating_func", None, minimum=0)
    if gating != 2:  # absent means softmax to llama.cpp (DeepSeek-V2 files predate the key)
        raise f.fail(f"deepseek2 expert_gating_func {gating} (softmax routing, DeepSeek-V2) is not supported: "
                     f"only sigmoid (2, DeepSeek-V3/R1)")
    rope = f.int("rope.dimension_count")
    key = f.int("attention.key_length_mla", None) or f.int("attention.key_length")
    value = f.int("attention.value_length_mla", None) or f.int("attention.value_length")
    if key <= rope:
        raise f.fail(f"deepseek2 key length {key} is not more than the rope dimension {rope}")
    _deepseek_common(config, f, gguf=True)
    config.qk_nope_head_dim = key - rope
    config.qk_rope_head_dim = rope
    config.v_head_dim = value
    config.norm_topk_prob = f.bool("expert_weights_norm", False)
    config.rope_interleave = True
    config.head_dim = rope
    config.num_key_value_heads = config.num_attention_heads
    if config.rope_scaling is not None and config.rope_scaling.get("rope_type") == "yarn":
        log_mul = f.float("rope.scaling.yarn_log_multiplier", 0.0, positive=False)
        if log_mul:
            # DeepSeek's mscale and mscale_all_dim are equal; llama.cpp keeps only the latter
            config.rope_scaling["mscale"] = config.rope_scaling["mscale_all_dim"] = log_mul / 0.1
        for key_name, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = f.float(f"rope.scaling.{key_name}", 0.0, positive=False)
            if value:
                config.rope_scaling[name] = value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")

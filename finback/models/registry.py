"""Architecture name (ModelConfig.architecture) -> model class."""

from __future__ import annotations

from finback.loader.config import ModelConfig
from finback.runtime.parallel import SINGLE, ParallelGroup


def model_class(architecture: str):
    if architecture == "llama":
        from finback.models.llama import LlamaForCausalLM
        return LlamaForCausalLM
    if architecture == "qwen2":
        from finback.models.qwen2 import Qwen2ForCausalLM
        return Qwen2ForCausalLM
    if architecture == "deepseek_v3":
        from finback.models.deepseek_v3 import DeepseekV3ForCausalLM
        return DeepseekV3ForCausalLM
    raise ValueError(f"no model for architecture {architecture!r}")


def build_model(config: ModelConfig, group: ParallelGroup = SINGLE):
    return model_class(config.architecture)(config, group)

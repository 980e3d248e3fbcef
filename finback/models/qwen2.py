"""Qwen2 (the DeepSeek-R1-Distill-Qwen models): the Llama decoder with a bias on Q, K and V.

The bias comes from the config (`attention_bias`, set for every Qwen2 checkpoint), so the
architecture is the shared Llama code; this name exists for the registry and for readers.
"""

from finback.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass

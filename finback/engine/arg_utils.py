"""Engine arguments, named as vLLM names them."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class EngineArgs:
    model: str
    tokenizer: str | None = None          # path to a tokenizer (GGUF / tokenizer.json / folder); default: the model's
    skip_tokenizer_init: bool = False
    dtype: str = "auto"                   # auto: bf16 (tests comparing with transformers use float32)
    keep_int4: bool = True                # CPU bf16: keep Q4_0/Q4_1/Q4_K GGUF weights 4-bit
    device: str = "auto"
    max_model_len: int | None = None      # default: the model's context length, capped by the KV cache
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: max(2048, max_num_seqs)
    block_size: int = 16
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # "mp" (worker processes) | "ray"; None: mp when tp x pp > 1
    gpu_memory_utilization: float = 0.9
    kv_cache_space_gb: float | None = None    # CPU: KV cache size (vLLM's VLLM_CPU_KVCACHE_SPACE), default 4
    num_kv_blocks: int | None = None          # override the computed number of KV blocks (vLLM: num_gpu_blocks_override)
    seed: int | None = 0
    load_format: str = "auto"                 # auto | dummy (random weights of the config's shapes; benchmarks)
    enforce_eager: bool = False
    async_scheduling: bool | None = None      # overlap the host's work with the GPU's (vLLM's name); None: on for one CUDA device

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        need(self.block_size >= 1 and self.block_size <= 1024, "block_size must be in 1..1024")
        need(self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1")
        need(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
             "max_num_batched_tokens must be >= 1")
        need(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]")
        need(self.tensor_parallel_size >= 1 and self.pipeline_parallel_size >= 1,
             "parallel sizes must be >= 1")
        need(self.load_format in ("auto", "dummy"), "load_format must be auto or dummy")
        need(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1")
        need(self.distributed_executor_backend in (None, "mp", "ray"),
             "distributed_executor_backend must be 'mp' or 'ray'")

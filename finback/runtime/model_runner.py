"""One forward step: turns a scheduled batch into tensors, runs the model, samples.

The runner owns the model, the KV cache and the attention backend on one device. It is the only
piece that knows devices; the engine above it knows sequences and token ids.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from finback.engine.request import PENDING
from finback.engine.sampling import Sampler, SamplerOutput
from finback.engine.scheduler import ScheduledBatch
from finback.layers.attention import AttentionMetadata, TorchAttentionBackend
from finback.loader.checkpoint import Checkpoint
from finback.loader.errors import ModelLoadError
from finback.layers.linear import ShapeMismatch
from finback.models.registry import build_model
from finback.runtime.parallel import SINGLE, WHOLE, ParallelGroup, PipelineStage


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    from finback.loader.checkpoint import DTYPES

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # bf16 everywhere: on CPU it halves the bytes each decode step reads (and 4-bit GGUF weights
        # stay 4-bit with it). Tests that compare with transformers ask for float32 explicitly.
        return torch.bfloat16
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(sorted(DTYPES))})") from None


def load_model(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, group: ParallelGroup = SINGLE,
               keep_int4: bool = True, stage: PipelineStage = WHOLE, gguf_blocks: bool | None = None,
               keep_fp8: bool | None = None):
    """Build the model (this pipeline stage's part of it) and load its weights. On CPU in bf16, 4-bit
    GGUF weights (Q4_0/Q4_1/Q4_K) stay 4-bit (torch's int4 CPU kernel) unless keep_int4 is False.
    With gguf_blocks (default: a GGUF checkpoint on CUDA with triton), quantized linear weights stay
    GGUF blocks on the device and matmuls read them (finback/layers/gguf_linear.py); True on CPU takes
    the slow dequantize-per-call path (tests). With keep_fp8 (default: on CUDA), a block-FP8 checkpoint
    (or a dummy one) of a model that supports it keeps its weights FP8 (finback/loader/fp8.py); else
    they are dequantized at load."""
    import dataclasses

    from finback.models.registry import model_class

    config = checkpoint.config
    if keep_fp8 is None:
        keep_fp8 = device.type == "cuda"
    if config.fp8_block_size is not None and not (
            keep_fp8 and getattr(model_class(config.architecture), "supports_block_fp8", False)):
        config = dataclasses.replace(config, fp8_block_size=None)  # the model is built dense
    keep_fp8 = config.fp8_block_size is not None
    from finback.kernels import HAS_TRITON
    from finback.layers.moe import experts_on_meta

    if gguf_blocks is None:
        gguf_blocks = device.type == "cuda" and HAS_TRITON
    gguf_blocks = gguf_blocks and checkpoint.format == "gguf"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # GGUF experts that stay blocks never need the dense expert stacks: they are built on meta
        with torch.device(device), (experts_on_meta() if gguf_blocks else contextlib.nullcontext()):
            if stage.size == 1:
                model = build_model(config, group)
            else:
                cls = model_class(config.architecture)
                if not getattr(cls, "supports_pp", False):
                    raise ValueError(f"{config.architecture} does not support pipeline parallelism yet")
                model = cls(config, group, stage)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    if checkpoint.format == "dummy":
        from finback.loader.dummy import init_dummy

        init_dummy(model)
        return model
    try:
        from finback.layers.quantized import kernel_available

        int4 = (keep_int4 and not gguf_blocks and device.type == "cpu" and dtype == torch.bfloat16
                and kernel_available())
        if gguf_blocks:
            tensors = checkpoint.weights(int4=int4, gguf_blocks=True)
        elif keep_fp8:
            tensors = checkpoint.weights(int4=int4, keep_fp8=True)
        else:
            tensors = checkpoint.weights(int4=int4)
        loaded = model.load_weights((name, t) for name, t in tensors)
    except ShapeMismatch as exc:
        raise ModelLoadError(checkpoint.path, f"shape does not match the config: {exc}") from None
    except KeyError as exc:
        raise ModelLoadError(checkpoint.path, f"unexpected tensor {exc.args[0]!r} for {config.architecture}") from None
    from finback.layers.linear import _Linear

    for module in model.modules():
        if isinstance(module, _Linear):
            module.finalize_int4(dtype)
    missing = model.expected_weights() - loaded
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ModelLoadError(checkpoint.path, f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return model


def select_backend(device: torch.device):
    """The attention backend for a device: Triton kernels on CUDA (when triton is installed), torch
    ops elsewhere (the CPU path, and the reference the kernels are tested against)."""
    from finback.kernels import HAS_TRITON

    if device.type == "cuda" and HAS_TRITON:
        from finback.layers.triton_attention import TritonAttentionBackend

        return TritonAttentionBackend()
    return TorchAttentionBackend()


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes on this rank: every attention layer's cache_shape for one
    one-token block."""
    elem = torch.finfo(dtype).bits // 8
    return sum(math.prod(layer.cache_shape(1, 1)) for layer in model.attention_layers()) * elem


@dataclass
class InFlight:
    """A deferred decode step: its sampled token ids on the device, their read-back under way.
    seqs[r] sampled ids[r], the token that goes to index[r] of its token_ids (where the engine put a
    PENDING placeholder); row_of maps seq_id -> r for the next step's device feed."""
    seqs: list
    index: list[int]
    row_of: dict[int, int]
    ids: torch.Tensor
    host: torch.Tensor | None = None
    event: "torch.cuda.Event | None" = None

    def tokens(self) -> list[int]:
        """The sampled ids on the host (waits for this step's GPU work only, not for later steps)."""
        if self.event is None:
            return self.ids.tolist()
        self.event.synchronize()
        return self.host.tolist()


def feed_pending(input_ids: torch.Tensor, src: torch.Tensor, prev_ids: torch.Tensor) -> None:
    """input_ids[j] = prev_ids[src[j]] where src[j] >= 0, on the device (no sync)."""
    input_ids.copy_(torch.where(src >= 0, prev_ids[src.clamp(min=0)], input_ids))


class ModelRunner:
    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
                 group: ParallelGroup = SINGLE, seed: int | None = 0, keep_int4: bool = True,
                 enforce_eager: bool = False, max_num_seqs: int = 256, stage: PipelineStage = WHOLE,
                 gguf_blocks: bool | None = None, keep_fp8: bool | None = None):
        self.device = device
        self.dtype = dtype
        self.config = checkpoint.config
        t0 = time.perf_counter_ns()
        self.model = load_model(checkpoint, device, dtype, group, keep_int4, stage, gguf_blocks, keep_fp8)
        self.load_duration_ns = time.perf_counter_ns() - t0
        self.backend = select_backend(device)
        # CUDA graphs of the decode step (finback/runtime/cuda_graphs.py): captured once the KV cache
        # exists, on CUDA with a backend whose metadata lives in static buffers
        self.use_graphs = (device.type == "cuda" and not enforce_eager and hasattr(self.backend, "alloc_static")
                           and getattr(self.model, "supports_cuda_graphs", True))
        self.max_num_seqs = max_num_seqs
        self.graphs = None
        self.sampler = Sampler(default_seed=seed)
        self.kv_caches: list[torch.Tensor] = []
        self.block_size = 0
        self.token_bytes: list[bytes] = []  # set by the engine when JSON mode is possible
        self._pinned: list[torch.Tensor] = []  # read-back buffers of deferred steps (two: one in flight)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, max_model_len: int | None = None) -> None:
        layers = self.model.attention_layers()
        self.kv_caches = []
        for layer in layers:
            # not zeroed: attention reads only slots that were written (padding reads a written slot)
            cache = torch.empty(layer.cache_shape(num_blocks, block_size), dtype=self.dtype, device=self.device)
            layer.kv_cache = cache
            self.kv_caches.append(cache)
        self.block_size = block_size
        if self.use_graphs:
            from finback.runtime.cuda_graphs import DecodeGraphs

            max_len = max_model_len
            if max_len is None:
                rotary = getattr(self.model.model, "rotary", None)
                max_len = rotary.max_position if rotary is not None else self.config.max_position_embeddings
            max_blocks = min(num_blocks, -(-max_len // block_size))  # the graphs' block-table width
            self.graphs = DecodeGraphs(self.model, self.backend, self.max_num_seqs, max_blocks, block_size,
                                       self.device)
            self.graphs.capture()

    def _constrain_json(self, logits: torch.Tensor, row: int, seq, eos_token_ids: frozenset[int]) -> None:
        """Mask row `row` to the tokens that keep the output a JSON prefix (JSON mode)."""
        from finback.engine.json_mode import CANDIDATES, allowed_tokens

        k = min(CANDIDATES, logits.shape[1])
        top = torch.topk(logits[row], k).indices.tolist()
        allowed = allowed_tokens(seq.json_state, top, self.token_bytes, eos_token_ids)
        if not allowed and not seq.json_state.complete:  # rare: look through the whole vocabulary
            allowed = allowed_tokens(seq.json_state, range(logits.shape[1]), self.token_bytes, eos_token_ids)
        keep = torch.full_like(logits[row], float("-inf"))
        idx = torch.tensor(allowed or sorted(eos_token_ids), dtype=torch.long, device=logits.device)
        keep[idx] = logits[row, idx]
        logits[row] = keep

    @torch.inference_mode()
    def hidden_states(self, token_ids: list[int], block_table: list[int]) -> torch.Tensor:
        """Final hidden states [T, H] of one prompt, computed through the paged cache blocks given
        (the caller owns them; used for embeddings)."""
        bs = self.block_size
        n = len(token_ids)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([block_table[p // bs] * bs + p % bs for p in range(n)], dtype=torch.long,
                                      device=self.device),
            query_lens=[n], context_lens=[0], block_tables=[block_table], block_size=bs, backend=self.backend)
        self.backend.prepare(meta, self.device)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.model(ids, torch.arange(n, device=self.device), meta)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_tables: list[list[int]], eos_token_ids: frozenset[int],
                prev: "InFlight | None" = None, defer: bool = False):
        """Run one step. Returns the batch indices of the sequences that produce a token this step
        (their scheduled chunk reaches the end of their known tokens) and the sampler's output for
        them, in the same order.

        Overlapped scheduling (the engine's async path): a token id that is still PENDING in a
        sequence (sampled by the step `prev`, not read back yet) is taken from `prev`'s device tensor
        of sampled ids, and with `defer` the step returns an `InFlight` at once: its sampled ids stay on
        the device (copied to pinned host memory behind the GPU work) and are read by
        `InFlight.tokens()`. Only greedy/random sampling without logprobs, penalties or JSON
        constraints may be deferred (the engine checks)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []
        last_token_index: list[int] = []
        src: list[int] = []  # per input id: the row of prev's sampled ids that gives it, or -1
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed_tokens
            toks = seq.token_ids[start:start + n]
            if prev is not None:  # only a sequence's last token can be pending
                pending = toks[-1] == PENDING
                src.extend([-1] * (n - 1) + [prev.row_of[seq.seq_id] if pending else -1])
                if pending:
                    toks[-1] = 0  # a placeholder: the device writes the sampled id over it
            ids.extend(toks)
            positions.extend(range(start, start + n))
            table = block_tables[i]
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            context_lens.append(start)
            if start + n == seq.num_tokens:
                sample_rows.append(i)
                last_token_index.append(len(ids) - 1)
        dev = self.device
        fed = None if prev is None else (src, prev.ids)
        if (self.graphs is not None and len(sample_rows) == len(ids) and all(c > 0 for c in context_lens)
                and self.graphs.bucket(len(ids)) is not None):
            # decode-only batch: replay the captured graph (forward + LM head)
            logits = self.graphs.run(ids, positions, slots, context_lens, block_tables, fed).float()
            return self._finish(logits, batch, sample_rows, eos_token_ids, defer)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_lens=list(batch.num_tokens),
            context_lens=context_lens,
            block_tables=block_tables,
            block_size=bs,
            backend=self.backend,
        )
        self.backend.prepare(meta, dev)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        if fed is not None:
            feed_pending(input_ids, torch.tensor(src, dtype=torch.long, device=dev), prev.ids)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        hidden = self.model(input_ids, pos, meta)
        if not sample_rows:
            if defer:
                raise ValueError("a deferred step must sample a token for every sequence")
            return [], SamplerOutput(token_ids=[], logprobs=[])
        logits = self.model.compute_logits(hidden[torch.tensor(last_token_index, device=dev)]).float()
        return self._finish(logits, batch, sample_rows, eos_token_ids, defer)

    def _finish(self, logits: torch.Tensor, batch: ScheduledBatch, sample_rows: list[int],
                eos_token_ids: frozenset[int], defer: bool):
        if not defer:
            return sample_rows, self._sample(logits, batch, sample_rows, eos_token_ids)
        if len(sample_rows) != len(batch.seqs):
            raise ValueError("a deferred step must sample a token for every sequence")
        seqs = batch.seqs
        chosen = self.sampler.choose(logits, [s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                                     [s.output_token_ids for s in seqs], [s.generator for s in seqs], eos_token_ids)
        host = event = None
        if chosen.is_cuda:  # the read-back queued behind the GPU work, into one of two pinned buffers
            if not self._pinned:
                self._pinned = [torch.empty(self.max_num_seqs, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self._pinned.reverse()
            host = self._pinned[0][:len(seqs)]
            host.copy_(chosen, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return InFlight(seqs=list(seqs), index=[s.num_tokens for s in seqs],
                        row_of={s.seq_id: r for r, s in enumerate(seqs)}, ids=chosen, host=host, event=event)

    def _sample(self, logits: torch.Tensor, batch: ScheduledBatch, sample_rows: list[int],
                eos_token_ids: frozenset[int]) -> SamplerOutput:
        seqs = [batch.seqs[i] for i in sample_rows]
        for r, seq in enumerate(seqs):
            if seq.json_state is not None:
                self._constrain_json(logits, r, seq, eos_token_ids)
        return self.sampler(
            logits,
            [s.params for s in seqs],
            [s.prompt_token_ids for s in seqs],
            [s.output_token_ids for s in seqs],
            [s.generator for s in seqs],
            eos_token_ids,
        )

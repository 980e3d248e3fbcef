"""CUDA graphs for the decode step.

A decode step of a small batch is bound by kernel launches, not by the GPU: a 28-layer model
launches hundreds of kernels whose Python and driver overhead exceeds their run time. So the runner
captures, once at start-up, the whole decode forward (embedding, every layer, final norm and the LM
head) as one CUDA graph per batch-size bucket, and each decode step replays the graph of the
smallest bucket that holds its batch, after copying the step's inputs into the graphs' static
buffers.

What makes this correct:
- every tensor the graph reads lives at a fixed address: token ids, positions and KV slots here, the
  attention metadata (block tables, sequence lengths) in the backend's static buffers
  (`alloc_static` / `prepare_static` of the attention backend);
- nothing in the captured forward depends on host values that change between steps (the attention
  kernels take their grid from shapes, sequence lengths are read on the device);
- rows past the real batch are padding: slot -1 (their K/V are not stored) and sequence length 0
  (attention writes zeros), and their logits are never read.
Buckets are 1, 2, 4, 8 and then every 8 up to max_num_seqs (vLLM's choice): padding costs at most
7 rows of compute, which decode at these sizes does not notice.
"""

from __future__ import annotations

import torch

from finback.layers.attention import AttentionMetadata


def graph_buckets(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(8 if max_num_seqs > 8 else max_num_seqs, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(-(-max_num_seqs // 8) * 8)
    return sorted(set(s for s in sizes if s >= 1))


class DecodeGraphs:
    def __init__(self, model, backend, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device):
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.buckets = graph_buckets(max_num_seqs)
        self.max_bs = self.buckets[-1]
        self.device = device
        n = self.max_bs
        # pinned host staging and one copy per step: ids, positions, slots, and the row of the previous
        # step's sampled ids that feeds a pending token (-1: the id is in row 0). Two staging buffers,
        # used in turn: with overlapped scheduling a step is prepared while the previous one's copy may
        # not have run yet (the engine waits for step N-1 before preparing N + 1).
        self.hosts = [torch.zeros(4, n, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self.inputs = torch.zeros(4, n, dtype=torch.long, device=device)
        self.static = backend.alloc_static(n, max_blocks_per_seq, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.metas: dict[int, AttentionMetadata] = {}
        self.pool = None

    def _meta(self, bs: int, context_lens: list[int], block_tables: list[list[int]]) -> AttentionMetadata:
        # the backend copies the real rows' slots into its static slot buffer and pads it with -1
        meta = AttentionMetadata(slot_mapping=self.inputs[2, :len(context_lens)], query_lens=[1] * len(context_lens),
                                 context_lens=context_lens, block_tables=block_tables,
                                 block_size=self.block_size, backend=self.backend)
        self.backend.prepare_static(meta, self.static, bs)
        return meta

    def _forward(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self.inputs[0, :bs], self.inputs[1, :bs], meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller graphs reuse its memory pool)."""
        for bs in reversed(self.buckets):
            meta = self._meta(bs, [], [])  # all padding rows
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the Triton kernels and settle the allocator
                    self._forward(bs, meta)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bs] = self._forward(bs, meta)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
            self.metas[bs] = meta
        torch.cuda.synchronize(self.device)

    def bucket(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def run(self, ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            block_tables: list[list[int]], fed: tuple[list[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Replay the decode graph for a batch of len(ids) decodes -> logits [n, vocab]. fed: (src,
        prev_ids): ids[j] is prev_ids[src[j]] (on the device) where src[j] >= 0."""
        n = len(ids)
        bs = self.bucket(n)
        self.hosts.reverse()
        h = self.hosts[0]
        rows = 4 if fed is not None else 3
        h[0, :n] = torch.tensor(ids)
        h[1, :n] = torch.tensor(positions)
        h[2, :n] = torch.tensor(slots)
        if fed is not None:
            h[3, :n] = torch.tensor(fed[0])
        h[:2, n:bs] = 0
        self.inputs[:rows, :bs].copy_(h[:rows, :bs], non_blocking=True)
        if fed is not None:
            from finback.runtime.model_runner import feed_pending

            feed_pending(self.inputs[0, :n], self.inputs[3, :n], fed[1])
        self._meta(bs, context_lens, block_tables)  # refills the static attention buffers in place
        self.graphs[bs].replay()
        return self.logits[bs][:n]

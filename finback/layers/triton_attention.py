"""The GPU attention backend: finback's paged KV cache read by the Triton kernels of
finback/kernels/attention.py.

`prepare` turns a step's metadata into device index tensors once per step (int32 block tables padded
to the longest, sequence lengths, query offsets); `forward` writes the new K/V into the cache and then
sends decode rows (query_len 1) to `paged_decode` and the other rows to `paged_prefill`.

For CUDA graphs the decode path has a static form: `alloc_static` makes persistent buffers once,
`prepare_static` refills them for a decode-only batch padded to a bucket size (padding rows have
seq_len 0 and slot -1: nothing stored, zeros out) and points the metadata at views of them, so a
graph captured around the model's forward reads new lengths and tables on every replay. The split
count of the decode kernel is a function of the bucket and the buffers' shapes only.
"""

from __future__ import annotations

import torch

from finback.kernels.attention import (
    decode_workspace,
    default_num_splits,
    paged_decode,
    paged_prefill,
    write_kv,
)
from finback.layers.attention import AttentionBackend, AttentionMetadata


def _padded_tables(tables: list[list[int]], width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The block tables as int32 [len(tables), width] (zero padded), into `out`'s top-left if given."""
    if out is None:
        out = torch.zeros(len(tables), max(1, width), dtype=torch.int32)
    view = out.numpy()
    for i, t in enumerate(tables):
        view[i, :len(t)] = t
        view[i, len(t):width] = 0
    return out[:len(tables), :max(1, width)]


class TritonAttentionBackend(AttentionBackend):
    """Paged attention with Triton kernels (CUDA; on CPU it runs only under Triton's interpreter)."""

    name = "triton"

    def __init__(self, num_sms: int | None = None):
        self.num_sms = num_sms

    def _sms(self, device: torch.device) -> int:
        if self.num_sms is None:
            self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                            if device.type == "cuda" else 4)
        return self.num_sms

    # ------------------------------------------------------------------ eager steps

    def prepare(self, meta: AttentionMetadata, device: torch.device) -> None:
        device = torch.device(device)
        starts, s = [], 0
        for n in meta.query_lens:
            starts.append(s)
            s += n
        decode = [i for i, n in enumerate(meta.query_lens) if n == 1]
        prefill = [i for i, n in enumerate(meta.query_lens) if n > 1]
        seq_lens = meta.seq_lens
        c = meta.cache
        c["decode"] = c["prefill"] = None
        if decode:
            everything = len(decode) == len(meta.query_lens)  # then token i is row i: no gather
            c["decode"] = {
                "tok": None if everything else torch.tensor([starts[i] for i in decode], device=device),
                "block_tables": _padded_tables([meta.block_tables[i] for i in decode],
                                               max(len(meta.block_tables[i]) for i in decode)).to(device),
                "seq_lens": torch.tensor([seq_lens[i] for i in decode], dtype=torch.int32, device=device),
                "max_seq_len": max(seq_lens[i] for i in decode),
            }
        if prefill:
            rows = prefill
            qsl = [0]
            for i in rows:
                qsl.append(qsl[-1] + meta.query_lens[i])
            contiguous = not decode and len(rows) == len(meta.query_lens)
            tok = None if contiguous else torch.cat([torch.arange(starts[i], starts[i] + meta.query_lens[i])
                                                     for i in rows]).to(device)
            c["prefill"] = {
                "tok": tok,
                "block_tables": _padded_tables([meta.block_tables[i] for i in rows],
                                               max(len(meta.block_tables[i]) for i in rows)).to(device),
                "query_start_loc": torch.tensor(qsl, dtype=torch.int32, device=device),
                "seq_lens": torch.tensor([seq_lens[i] for i in rows], dtype=torch.int32, device=device),
                "context_lens": torch.tensor([meta.context_lens[i] for i in rows], dtype=torch.int32,
                                             device=device),
                "max_query_len": max(meta.query_lens[i] for i in rows),
            }

    # ------------------------------------------------------------------ CUDA-graph decode

    def alloc_static(self, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device) -> dict:
        """Persistent decode buffers, allocated once; `prepare_static` refills them every step, from two
        pinned host staging buffers used in turn (a step may be prepared while the last one's copy is
        still queued behind the GPU: overlapped scheduling)."""
        pin = device.type == "cuda"
        return {
            "block_tables": torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device),
            "seq_lens": torch.zeros(max_num_seqs, dtype=torch.int32, device=device),
            "slot_mapping": torch.full((max_num_seqs,), -1, dtype=torch.int64, device=device),
            "staging": [(torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, pin_memory=pin),
                         torch.zeros(max_num_seqs, dtype=torch.int32, pin_memory=pin)) for _ in range(2)],
        }

    def prepare_static(self, meta: AttentionMetadata, buffers: dict, batch_size: int | None = None) -> None:
        """Fill `buffers` for a decode-only batch padded to `batch_size` rows and point `meta` at them
        (meta.slot_mapping becomes the buffer's view too). Same buffers + same batch_size = same
        pointers and the same kernel launches, so a captured graph replays with the new contents."""
        n = len(meta.query_lens)
        batch_size = n if batch_size is None else batch_size
        max_seqs, max_blocks = buffers["block_tables"].shape
        if any(q != 1 for q in meta.query_lens):
            raise ValueError("prepare_static is for decode-only batches (every query_len 1)")
        if not n <= batch_size <= max_seqs:
            raise ValueError(f"{n} sequences do not fit a bucket of {batch_size} (buffers for {max_seqs})")
        if meta.slot_mapping.shape != (n,):
            raise ValueError(f"slot_mapping has {tuple(meta.slot_mapping.shape)} entries for {n} decodes")
        widest = max((len(t) for t in meta.block_tables), default=0)
        if widest > max_blocks:
            raise ValueError(f"a block table of {widest} blocks exceeds the buffers' {max_blocks}")
        # only the used width is copied: the kernel reads no entry past a row's own length, so the
        # stale columns beyond it (and the rows of padding) are never looked at
        staging = buffers["staging"]
        staging.reverse()
        host_tables, host_lens = staging[0]
        tables = _padded_tables(meta.block_tables, widest, host_tables)
        lens = host_lens[:batch_size]
        lens.numpy()[:n] = meta.seq_lens
        lens[n:] = 0
        bt, sl, sm = (buffers[k][:batch_size] for k in ("block_tables", "seq_lens", "slot_mapping"))
        if n:
            bt[:n, :tables.shape[1]].copy_(tables, non_blocking=True)
        sl.copy_(lens, non_blocking=True)
        sm[:n].copy_(meta.slot_mapping, non_blocking=True)
        sm[n:].fill_(-1)
        meta.slot_mapping = sm
        meta.cache["decode"] = {"tok": None, "block_tables": bt, "seq_lens": sl,
                                "max_seq_len": max_blocks * meta.block_size}
        meta.cache["prefill"] = None

    # ------------------------------------------------------------------ forward

    def forward(self, layer, q, k, v, meta):
        cache = layer.kv_cache
        write_kv(k, v, cache[0], cache[1], meta.slot_mapping)
        out = torch.empty_like(q)
        c = meta.cache
        d = c["decode"]
        if d is not None:
            b = d["seq_lens"].shape[0]
            splits = default_num_splits(b, layer.num_kv_heads, d["max_seq_len"], self._sms(q.device))
            key = ("decode_ws", b, q.shape[1], q.shape[2], splits)
            if key not in c:  # one scratch for every layer of the step
                c[key] = decode_workspace(b, q.shape[1], q.shape[2], splits, q.device)
            if d["tok"] is None:
                paged_decode(q, cache[0], cache[1], d["block_tables"], d["seq_lens"], layer.scale, out,
                             num_splits=splits, workspace=c[key])
            else:
                out[d["tok"]] = paged_decode(q[d["tok"]], cache[0], cache[1], d["block_tables"], d["seq_lens"],
                                             layer.scale, num_splits=splits, workspace=c[key])
        p = c["prefill"]
        if p is not None:
            args = (cache[0], cache[1], p["block_tables"], p["query_start_loc"], p["seq_lens"], p["context_lens"],
                    layer.scale)
            if p["tok"] is None:
                paged_prefill(q, *args, out=out, max_query_len=p["max_query_len"])
            else:
                out[p["tok"]] = paged_prefill(q[p["tok"]], *args, max_query_len=p["max_query_len"])
        return out

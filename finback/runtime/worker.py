"""A worker: one rank of a tensor x pipeline parallel model, driven by the engine over a control channel.

The engine (scheduler, block manager, tokenizer, request state) stays in the server process; each
worker holds its slice of the model and of the KV cache. Every step the engine sends the same
message to every worker: the scheduled chunk of each sequence as plain lists (token ids, first
position, block table, how long the sequence is now) plus, the first time a sequence is seen, what
sampling needs (its prompt length, SamplingParams as a dict, the seed of its generator) and the tokens
before its first chunk (those a prefix-cache hit spared). A worker
keeps a mirror of each sequence (its tokens, its generator) until the engine says it finished.

JSON mode: each worker keeps its own recogniser per sequence, built from the request's parameters and
fed the same output tokens the engine's is (the vocabulary's bytes come once, in the first step
after the engine built them), so the logits are masked where they are, before sampling.

Sampling happens on every rank of the last pipeline stage: the vocabulary-parallel LM head gathers
the full logits to each of them, and the same logits, generators and parameters give the same tokens.
Only tensor rank 0 of the last stage reports them (token ids and logprobs, JSON) back to the engine;
the other workers answer an empty acknowledgement, so the engine hears from every worker each step
and notices at once when one is gone. The tokens reach the workers again as the next step's input.

Pipeline parallelism: stage s runs its layers and sends (hidden, residual) to the same tensor rank
of stage s+1 (torch.distributed send/recv). The step's tokens are cut into `pp` micro-batches of
about equal size (a long prefill is cut inside a sequence too: a later piece is a chunk whose
context is the earlier piece, written to the cache first since pieces run in order). Sends are
asynchronous, so stage 0 computes piece 2 while stage 1 computes piece 1: GPipe's fill and drain
within one step, idle share (pp-1)/(2pp-1) of a step instead of (pp-1)/pp without cutting. The last
stage computes the logits of each piece as it arrives and samples once, after the last piece, so
sampling sees the whole batch as it does in one process. The pipelined path runs eagerly (the CUDA
graphs of ModelRunner cover the whole model); with pp == 1 a worker runs ModelRunner.execute itself.

Run as `python -m finback.runtime.worker` (the multi-process executor): the launch configuration,
including the shared secret, is one JSON line on stdin. Ray actors call `run_worker` directly.
"""

from __future__ import annotations

import base64
import logging
import os
import sys
import traceback
from dataclasses import dataclass, field

import torch

from finback.engine.sampling import SamplerOutput, SamplingParams
from finback.engine.scheduler import ScheduledBatch
from finback.layers.attention import AttentionMetadata
from finback.runtime.distributed import (
    AuthError,
    Channel,
    ChannelError,
    connect,
    encode_tensor,
    init_distributed,
)

log = logging.getLogger("finback.worker")


class SeqMirror:
    """A worker's copy of a sequence: what ModelRunner.execute and the sampler read from one."""

    def __init__(self, prompt_len: int, params: SamplingParams, generator: torch.Generator | None):
        self.prompt_len = prompt_len
        self.params = params
        self.generator = generator
        self.token_ids: list[int] = []
        self.num_tokens = 0
        self.num_computed_tokens = 0
        self.json_state = None  # JSON mode: this worker's own recogniser, fed the same tokens as the engine's
        self.json_fed = 0       # output tokens fed to it so far

    def feed_json(self, token_bytes: list[bytes], eos: frozenset[int]) -> None:
        """Feed the output tokens the recogniser has not seen (a recomputed sequence resends some)."""
        out = self.token_ids[self.prompt_len:]
        for t in out[self.json_fed:]:
            if t not in eos:
                self.json_state.feed(token_bytes[t])
        self.json_fed = max(self.json_fed, len(out))

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.prompt_len]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]


@dataclass
class Piece:
    """One micro-batch: chunks (batch index, first position, token count) in batch order."""

    chunks: list[tuple[int, int, int]] = field(default_factory=list)


def split_pieces(starts: list[int], counts: list[int], num_pieces: int) -> list[Piece]:
    """Cut the step's token stream (sequence after sequence) into `num_pieces` runs of about equal
    length; a sequence's chunk may be cut between pieces."""
    total = sum(counts)
    num_pieces = max(1, min(num_pieces, total))
    bounds = [total * k // num_pieces for k in range(num_pieces + 1)]
    pieces = [Piece() for _ in range(num_pieces)]
    offset, k = 0, 0
    for i, (start, n) in enumerate(zip(starts, counts)):
        done = 0
        while done < n:
            while offset + done >= bounds[k + 1]:
                k += 1
            take = min(n - done, bounds[k + 1] - (offset + done))
            pieces[k].chunks.append((i, start + done, take))
            done += take
        offset += n
    return pieces


class Worker:
    def __init__(self, cfg: dict):
        from finback.loader.checkpoint import DTYPES, open_checkpoint
        from finback.runtime.model_runner import ModelRunner

        self.rank, self.tp, self.pp = cfg["rank"], cfg["tp"], cfg["pp"]
        if cfg["device_type"] == "cuda":
            self.device = torch.device("cuda", cfg["local_rank"])
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            if cfg.get("threads"):
                torch.set_num_threads(cfg["threads"])
        self.group, self.stage = init_distributed(self.rank, self.tp, self.pp, cfg["init_method"], cfg["backend"])
        if self.tp > 1:  # NCCL makes its communicator on first use: now, not inside a CUDA graph capture
            self.group.all_reduce(torch.zeros(1, device=self.device))
        dtype = DTYPES[cfg["dtype"]]
        if cfg.get("load_format") == "dummy":
            from finback.loader.dummy import DummyCheckpoint

            checkpoint = DummyCheckpoint(cfg["model"])
        else:
            checkpoint = open_checkpoint(cfg["model"])
        try:
            self.runner = ModelRunner(checkpoint, self.device, dtype, self.group, seed=cfg["seed"],
                                      keep_int4=cfg["keep_int4"], enforce_eager=cfg["enforce_eager"] or self.pp > 1,
                                      max_num_seqs=cfg["max_num_seqs"], stage=self.stage)
        finally:
            checkpoint.close()
        self.hidden_size = self.runner.config.hidden_size
        self.seqs: dict[int, SeqMirror] = {}
        self.reports = self.stage.is_last and self.group.rank == 0

    # -- handlers (one per control message op) --------------------------------------------
    def info(self, msg: dict) -> dict:
        from finback.runtime.executor import kv_blocks_that_fit
        from finback.runtime.model_runner import kv_bytes_per_token

        per_token = kv_bytes_per_token(self.runner.model, self.runner.dtype)
        blocks = kv_blocks_that_fit(per_token * msg["block_size"], self.device, msg["gpu_memory_utilization"],
                                    msg["kv_cache_space_gb"])
        return {"kv_bytes_per_token": per_token, "blocks": blocks, "load_duration_ns": self.runner.load_duration_ns}

    def set_max_position(self, msg: dict) -> dict:
        self.runner.model.model.rotary.max_position = msg["max_position"]
        return {}

    def allocate(self, msg: dict) -> dict:
        self.runner.allocate_kv_cache(msg["num_blocks"], msg["block_size"], msg.get("max_model_len"))
        return {}

    def step(self, msg: dict) -> dict:
        for sid in msg["free"]:
            self.seqs.pop(sid, None)
        if "token_bytes" in msg:  # sent once, before the first JSON-mode sequence
            self.runner.token_bytes = [base64.b64decode(t) for t in msg["token_bytes"]]
        eos = frozenset(msg["eos"])
        mirrors, counts, tables = [], [], []
        for s in msg["seqs"]:
            m = self.seqs.get(s["id"])
            if m is None:
                new = s["new"]
                gen = None
                if new["seed"] is not None:
                    gen = torch.Generator(self.device).manual_seed(new["seed"])
                m = self.seqs[s["id"]] = SeqMirror(new["prompt_len"], SamplingParams(**new["params"]), gen)
                m.token_ids = new["prefix"]  # tokens before this chunk (a prefix-cache hit computed them)
                if m.params.json_mode or m.params.json_schema is not None:
                    from finback.engine.json_mode import JSONPrefix, SchemaPrefix, check_schema

                    schema = m.params.json_schema
                    m.json_state = SchemaPrefix(check_schema(schema)) if schema is not None else JSONPrefix()
            start = s["start"]
            m.token_ids[start:] = s["ids"]
            m.num_computed_tokens = start
            m.num_tokens = s["len"]
            if m.json_state is not None:
                m.feed_json(self.runner.token_bytes, eos)
            mirrors.append(m)
            counts.append(len(s["ids"]))
            tables.append(s["table"])
        batch = ScheduledBatch(seqs=mirrors, num_tokens=counts)
        if self.pp == 1:
            rows, out = self.runner.execute(batch, tables, eos)
        else:
            rows, out = self._execute_pipelined(batch, tables, eos)
        if not self.reports:
            return {}
        return {"rows": rows, "tokens": out.token_ids,
                "logprobs": [None if lp is None else [lp[0], [list(p) for p in lp[1]]] for lp in out.logprobs]}

    def hidden(self, msg: dict) -> dict:
        ids, table = msg["ids"], msg["table"]
        if self.pp == 1:
            hidden = self.runner.hidden_states(ids, table)
        else:
            m = SeqMirror(len(ids), SamplingParams(), None)
            m.token_ids, m.num_tokens = list(ids), len(ids)
            outs = self._pipeline([Piece([(0, 0, len(ids))])], [m], [table])
            hidden = outs[0] if outs else None
        return {"hidden": encode_tensor(hidden)} if self.reports else {}

    # -- pipeline parallelism -------------------------------------------------------------
    @torch.inference_mode()
    def _pipeline(self, pieces: list[Piece], seqs: list, tables: list[list[int]]) -> list[torch.Tensor]:
        """Run each piece through this stage: receive its input from the previous stage (or embed),
        compute, send to the next stage without waiting. The last stage returns each piece's final
        hidden states."""
        import torch.distributed as dist

        runner, dev, bs = self.runner, self.device, self.runner.block_size
        prev = self.rank - self.tp if not self.stage.is_first else None
        nxt = self.rank + self.tp if not self.stage.is_last else None
        sends, outs = [], []
        for piece in pieces:
            ids, positions, slots, qlens, clens, ptables = [], [], [], [], [], []
            for i, start, n in piece.chunks:
                seq, table = seqs[i], tables[i]
                ids.extend(seq.token_ids[start:start + n])
                positions.extend(range(start, start + n))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
                qlens.append(n)
                clens.append(start)
                ptables.append(table)
            meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev), query_lens=qlens,
                                     context_lens=clens, block_tables=ptables, block_size=bs, backend=runner.backend)
            runner.backend.prepare(meta, dev)
            input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
            pos = torch.tensor(positions, dtype=torch.long, device=dev)
            intermediate = None
            if prev is not None:
                x = torch.empty(len(ids), self.hidden_size, dtype=runner.dtype, device=dev)
                residual = torch.empty_like(x)
                for w in (dist.irecv(x, prev), dist.irecv(residual, prev)):
                    w.wait()
                intermediate = (x, residual)
            out = runner.model(input_ids, pos, meta, intermediate)
            if nxt is not None:
                x, residual = (t.contiguous() for t in out)
                sends += [(dist.isend(x, nxt), x), (dist.isend(residual, nxt), residual)]
            else:
                outs.append(out)
        for work, _ in sends:
            work.wait()
        return outs

    def _execute_pipelined(self, batch: ScheduledBatch, tables: list[list[int]], eos: frozenset[int]
                           ) -> tuple[list[int], SamplerOutput]:
        seqs = batch.seqs
        pieces = split_pieces([s.num_computed_tokens for s in seqs], batch.num_tokens, self.pp)
        outs = self._pipeline(pieces, seqs, tables)
        if not self.stage.is_last:
            return [], SamplerOutput(token_ids=[], logprobs=[])
        rows, logits = [], []
        for piece, hidden in zip(pieces, outs):
            offset, last = 0, []
            for i, start, n in piece.chunks:
                offset += n
                if start + n == seqs[i].num_tokens:
                    rows.append(i)
                    last.append(offset - 1)
            if last:
                logits.append(self.runner.model.compute_logits(hidden[torch.tensor(last, device=self.device)]))
        if not rows:
            return [], SamplerOutput(token_ids=[], logprobs=[])
        return rows, self.runner._sample(torch.cat(logits).float(), batch, rows, eos)


OPS = ("info", "set_max_position", "allocate", "step", "hidden")


def run_worker(cfg: dict, secret: bytes) -> None:
    """Connect to the engine, say who we are, build the model, then serve control messages until
    told to stop or the engine goes away."""
    channel: Channel = connect(cfg["driver_host"], cfg["driver_port"], secret)
    channel.send({"hello": cfg["rank"]})
    try:
        worker = Worker(cfg)
    except Exception as exc:
        channel.send({"error": f"rank {cfg['rank']} failed to start: {type(exc).__name__}: {exc}"})
        raise
    channel.send({"ready": cfg["rank"]})
    while True:
        try:
            msg = channel.recv()
        except AuthError:
            raise
        except ChannelError:
            log.info("worker %d: the engine went away, stopping", cfg["rank"])
            return
        op = msg.get("op")
        if op == "shutdown":
            break
        if op not in OPS:
            channel.send({"error": f"unknown op {op!r}"})
            continue
        try:
            reply = getattr(worker, op)(msg)
        except Exception as exc:  # the step is lost on every rank: report and stop
            traceback.print_exc()
            channel.send({"error": f"rank {cfg['rank']}: {type(exc).__name__}: {exc}"})
            raise
        channel.send(reply)
    channel.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    import json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = json.loads(sys.stdin.readline())
    secret = bytes.fromhex(cfg.pop("secret"))
    sys.stdin.close()
    try:
        run_worker(cfg, secret)
    except Exception:
        log.exception("worker %d stopped", cfg["rank"])
        os._exit(1)


if __name__ == "__main__":
    main()

"""The synchronous engine: add requests, call step(), get outputs.

One step = schedule (which sequences run, how many tokens each) -> model runner (one forward,
sampling) -> append tokens, detokenize incrementally, check stop conditions -> free what
finished. `AsyncEngine` drives this loop in a background thread for the server.
"""

from __future__ import annotations

import logging
import time

import torch

from finback.engine.arg_utils import EngineArgs
from finback.engine.block_manager import BlockManager, NoFreeBlocks
from finback.engine.request import PENDING, CompletionOutput, Request, RequestOutput, Sequence
from finback.engine.sampling import SamplingParams
from finback.engine.scheduler import Scheduler, SchedulerConfig
from finback.loader.checkpoint import open_checkpoint
from finback.runtime.executor import make_executor
from finback.runtime.model_runner import resolve_device, resolve_dtype

log = logging.getLogger("finback.engine")


class PromptTooLong(ValueError):
    pass


class LLMEngine:
    def __init__(self, args: EngineArgs):
        args.validate()
        self.args = args
        t0 = time.perf_counter_ns()
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        if args.load_format == "dummy":
            from finback.loader.dummy import DummyCheckpoint

            checkpoint = DummyCheckpoint(args.model)
        else:
            checkpoint = open_checkpoint(args.model)
        try:
            self.model_config = checkpoint.config
            self.tokenizer = None
            if not args.skip_tokenizer_init:
                from finback.tokenizer import Tokenizer
                if args.tokenizer:
                    self.tokenizer = Tokenizer.load(args.tokenizer)
                elif checkpoint.gguf_metadata is not None:
                    self.tokenizer = Tokenizer.from_gguf(checkpoint.gguf_metadata)
                else:
                    self.tokenizer = Tokenizer.from_pretrained(checkpoint.path)
            self.gguf_metadata = checkpoint.gguf_metadata
            self.model_path = checkpoint.path
            # one process (a ModelRunner) or tp x pp workers: finback/runtime/executor.py
            self.executor = make_executor(args, checkpoint, self.device, self.dtype)
            self.runner = getattr(self.executor, "runner", None)  # the in-process runner, if any
        finally:
            checkpoint.close()
        try:
            self._setup_cache()
        except BaseException:
            self.executor.shutdown()
            raise
        self.load_duration_ns = time.perf_counter_ns() - t0
        self.requests: dict[str, Request] = {}
        # overlapped ("async") scheduling: a decode step is launched before the previous one's tokens
        # are read back, so the host's work (outputs, detokenizing, scheduling) runs while the GPU works
        overlap = args.async_scheduling
        if overlap is None:
            overlap = self.device.type == "cuda"
        self.async_scheduling = bool(overlap) and self.runner is not None
        self._inflight = None  # the deferred step whose tokens are not read back yet
        self.eos_token_ids = self._eos_ids()
        # reasoning block markers, when the vocabulary has them as single tokens (the R1 family)
        self.think_ids: tuple[int, int] | None = None
        if self.tokenizer is not None:
            open_id, close_id = self.tokenizer.token_to_id("<think>"), self.tokenizer.token_to_id("</think>")
            if open_id is not None and close_id is not None:
                self.think_ids = (open_id, close_id)

    # -- setup -----------------------------------------------------------------------------
    def _eos_ids(self) -> frozenset[int]:
        ids = set()
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.eos_token_ids)
        eos = self.model_config.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(e for e in eos if isinstance(e, int))
        return frozenset(ids)

    def _setup_cache(self) -> None:
        args, cfg = self.args, self.model_config
        if args.num_kv_blocks is not None:
            num_blocks = args.num_kv_blocks
        else:  # the fewest any worker can hold (per process: GPU memory left, or the CPU KV space)
            num_blocks = self.executor.kv_blocks_that_fit(args.block_size, args.gpu_memory_utilization,
                                                          args.kv_cache_space_gb)
        if num_blocks < 1:
            raise ValueError("no memory left for the KV cache: lower max_model_len or raise the "
                             "KV cache space / gpu_memory_utilization")
        max_len = args.max_model_len or cfg.max_position_embeddings
        if args.max_model_len and args.max_model_len > cfg.max_position_embeddings:
            log.warning("max_model_len %d is beyond the model's context length %d",
                        args.max_model_len, cfg.max_position_embeddings)
            self.executor.set_max_position(max_len)
        capacity = num_blocks * args.block_size
        if max_len > capacity:
            if args.max_model_len:
                raise ValueError(f"max_model_len {max_len} needs {-(-max_len // args.block_size)} KV blocks "
                                 f"but the cache holds {num_blocks} ({capacity} tokens)")
            max_len = capacity
        self.max_model_len = max_len
        self.num_kv_blocks = num_blocks
        batched = args.max_num_batched_tokens or max(2048, args.max_num_seqs)
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(args.max_num_seqs, batched, max_len), self.block_manager)
        self.executor.allocate_kv_cache(num_blocks, args.block_size, max_len)

    # -- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    prompt: str | None = None, arrival_ns: int | None = None) -> Request:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLong(f"the prompt has {len(prompt_token_ids)} tokens but the context holds "
                                f"{self.max_model_len} (the prompt plus at least one generated token "
                                f"must fit): shorten it or raise max_model_len")
        req = Request(request_id, prompt_token_ids, params, prompt, arrival_ns)
        for i in range(params.n):
            p = params
            gen = None
            if params.seed is not None:
                gen = torch.Generator(self.executor.generator_device).manual_seed(params.seed + i)
            seq = Sequence(req, i, p, gen)
            if p.json_mode or p.json_schema is not None:
                if self.tokenizer is None or not self.tokenizer.byte_level:
                    raise ValueError("JSON mode needs the model's byte-level tokenizer")
                from finback.engine.json_mode import JSONPrefix, SchemaPrefix, check_schema

                if not self.executor.token_bytes:
                    self.executor.token_bytes = self.tokenizer.token_bytes_table(False)
                if p.json_schema is not None:
                    seq.json_state = SchemaPrefix(check_schema(p.json_schema))
                else:
                    seq.json_state = JSONPrefix()
            if self.think_ids is not None:  # generation starts inside a block the template opened
                o, c = self.think_ids
                last_open = max((k for k, t in enumerate(prompt_token_ids) if t == o), default=-1)
                seq.reasoning_open = last_open > max((k for k, t in enumerate(prompt_token_ids) if t == c),
                                                     default=-1)
            if self.tokenizer is not None:
                from finback.tokenizer.detokenizer import IncrementalDetokenizer
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=p.skip_special_tokens)
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            while seq.token_ids and seq.token_ids[-1] == PENDING:  # sampled in a step still in flight
                seq.token_ids.pop()
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        req.metrics.finished_ns = time.perf_counter_ns()
        return self._output(req)

    def embed(self, prompt_token_ids: list[int], normalize: bool = True) -> list[float]:
        """Mean-pooled final hidden states of a prompt (L2-normalised unless told otherwise), as
        Ollama's /api/embed gives for a generative model. Borrows free KV blocks for the pass."""
        if not prompt_token_ids:
            raise ValueError("the input is empty")
        if len(prompt_token_ids) > self.max_model_len:
            raise PromptTooLong(f"the input has {len(prompt_token_ids)} tokens but the context holds "
                                f"{self.max_model_len}")
        vocab = self.model_config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"token ids must be integers in [0, {vocab})")
        bm = self.block_manager
        try:
            table = bm.borrow(-(-len(prompt_token_ids) // bm.block_size))
        except NoFreeBlocks:
            raise RuntimeError("no free KV blocks for the embedding now: try again") from None
        try:
            hidden = self.executor.hidden_states(prompt_token_ids, table).float()
        finally:
            bm.give_back(table)
        vec = hidden.mean(dim=0)
        if normalize:
            vec = vec / vec.norm().clamp_min(1e-12)
        return vec.tolist()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def shutdown(self) -> None:
        """Stop the executor's workers, if any (a single-process engine has nothing to stop)."""
        self.executor.shutdown()

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step. With overlapped scheduling a decode step is launched and the outputs returned are
        those of the step before it (read back while this one runs); the last step's outputs come with
        the next call (has_unfinished_requests stays true until then)."""
        overlap = self._overlap_ok()
        outputs: list[RequestOutput] = []
        if self._inflight is not None and not overlap:
            outputs = self._resolve()
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        now = time.perf_counter_ns()
        for seq in batch.seqs:
            m = seq.request.metrics
            if m.first_scheduled_ns is None:
                m.first_scheduled_ns = now
        tables = [self.block_manager.block_table(s.seq_id) for s in batch.seqs]
        if overlap and not batch.preempted and all(n == 1 for n in batch.num_tokens):
            inflight = self.runner.execute(batch, tables, self.eos_token_ids, prev=self._inflight, defer=True)
            for seq in batch.seqs:
                seq.num_computed_tokens += 1
                seq.token_ids.append(PENDING)
            outputs = self._resolve()  # the previous step's tokens, while this one runs
            for seq in batch.seqs:
                if not seq.finished:  # its tokens up to num_computed are all known now
                    self.block_manager.commit(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            self._inflight = inflight
            if all(seq.finished for seq in inflight.seqs):
                self._resolve()  # every sequence of it finished meanwhile: nothing of it is needed
            return outputs
        if self._inflight is not None:
            # overlap was allowed yet the batch is not all one-token decodes (_overlap_ok's checks make
            # this unexpected; kept as the safe path): this step needs the in-flight tokens first
            outputs = self._resolve()
        rows, out = self.executor.execute(batch, tables, self.eos_token_ids)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        now = time.perf_counter_ns()
        touched: dict[str, Request] = {}
        for k, i in enumerate(rows):
            seq = batch.seqs[i]
            token = out.token_ids[k]
            lp = out.logprobs[k] if out.logprobs else None
            self._append(seq, token, lp)
            req = seq.request
            if req.metrics.first_token_ns is None:
                req.metrics.first_token_ns = now
            touched[req.request_id] = req
        return outputs + self._outputs(touched.values(), now)

    def _outputs(self, touched, now: int) -> list[RequestOutput]:
        outputs = []
        for req in touched:
            if req.finished:
                req.metrics.finished_ns = now
                self.requests.pop(req.request_id, None)
            outputs.append(self._output(req))
        return outputs

    def _overlap_ok(self) -> bool:
        """Whether the next step may be launched before the in-flight one's tokens are read: only a
        step of decodes (nothing waiting to be admitted, no prefill under way) that cannot need a
        preemption (a free block for every sequence), whose sequences' sampling needs no token
        values on the host (no penalties, logprobs, JSON constraint or reasoning budget)."""
        if not self.async_scheduling:
            return False
        s = self.scheduler
        if s.waiting or not s.running or self.block_manager.num_free < len(s.running):
            return False
        if len(s.running) > s.config.max_num_batched_tokens:
            return False
        for seq in s.running:
            p = seq.params
            if (seq.num_tokens - seq.num_computed_tokens != 1 or p.has_penalties or p.logprobs is not None
                    or seq.json_state is not None or (self.think_ids is not None and p.max_thinking_tokens is not None)):
                return False
        return True

    def _resolve(self) -> list[RequestOutput]:
        """Read back the in-flight step's tokens and append them where their placeholders are (a
        sequence may hold one more placeholder after it, from the step launched since)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        tokens = inflight.tokens()
        now = time.perf_counter_ns()
        touched: dict[str, Request] = {}
        for seq, at, token in zip(inflight.seqs, inflight.index, tokens):
            if seq.finished:  # finished (or aborted) while its step was in flight: the token is dropped
                continue
            tail = seq.token_ids[at + 1:]
            del seq.token_ids[at:]
            self._append(seq, token, None)
            if not seq.finished:
                seq.token_ids.extend(tail)
            touched[seq.request.request_id] = seq.request
        return self._outputs(touched.values(), now)

    def _reasoning(self, seq: Sequence, token: int) -> int:
        """Track the reasoning block; past the request's reasoning budget (max_thinking_tokens) the
        block is closed: the close tag replaces the sampled token."""
        if self.think_ids is None:
            return token
        open_id, close_id = self.think_ids
        budget = seq.params.max_thinking_tokens
        if seq.reasoning_open and budget is not None and seq.reasoning_tokens >= budget:
            token = close_id
        if token == open_id and seq.num_output_tokens == 0:
            seq.reasoning_open = True
        elif token == close_id:
            seq.reasoning_open = False
        elif seq.reasoning_open:
            seq.reasoning_tokens += 1
        return token

    def _append(self, seq: Sequence, token: int, lp) -> None:
        token = self._reasoning(seq, token)
        seq.token_ids.append(token)
        if seq.json_state is not None and token not in self.eos_token_ids:
            seq.json_state.feed(self.executor.token_bytes[token])
        p = seq.params
        if lp is not None and seq.logprobs is not None:
            chosen, top = lp
            entry = dict(top)
            entry[token] = chosen
            seq.logprobs.append(entry)
            seq.cumulative_logprob += chosen
        reason, stop = None, None
        if not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, stop = "stop", token
        # the text of a stopping token (EOS or a stop id) is not part of the answer, as in vLLM
        if seq.detokenizer is not None and (reason is None or p.include_stop_str_in_output):
            seq.text += seq.detokenizer.add([token])
        if reason is None and p.stop and seq.detokenizer is not None and seq.num_output_tokens > p.min_tokens:
            hit = self._find_stop(seq)
            if hit is not None:
                reason, stop = "stop", hit
        if reason is None:
            if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
                reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason is not None:
            if seq.detokenizer is not None and not isinstance(stop, str):
                seq.text += seq.detokenizer.flush()
            seq.finish_reason = reason
            seq.stop_reason = stop
            self.scheduler.finish(seq)

    def _find_stop(self, seq: Sequence) -> str | None:
        """Look for a stop string in the newly decoded text (and the tail that may complete one).
        On a hit the text is cut before it (or after it with include_stop_str_in_output)."""
        p = seq.params
        longest = max(len(s) for s in p.stop)
        start = max(0, seq.emitted_text_len - longest)
        best = None
        for s in p.stop:
            idx = seq.text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        seq.text = seq.text[:idx + len(s)] if p.include_stop_str_in_output else seq.text[:idx]
        return s

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.text
            if seq.finished:
                visible = len(text)
            else:  # hold back what could be the start of a stop string
                hold = max((len(s) for s in seq.params.stop), default=1) - 1
                visible = max(seq.emitted_text_len, len(text) - hold)
            new_text = text[seq.emitted_text_len:visible]
            seq.emitted_text_len = visible
            out_ids = seq.output_token_ids
            while out_ids and out_ids[-1] == PENDING:  # sampled by a step in flight: not read back yet
                out_ids.pop()
            new_ids = out_ids[seq.emitted_tokens:]
            seq.emitted_tokens = len(out_ids)
            outs.append(CompletionOutput(
                index=seq.index, text=text[:visible], token_ids=out_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=seq.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                new_text=new_text, new_token_ids=new_ids, reasoning_tokens=seq.reasoning_tokens))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, req.metrics)

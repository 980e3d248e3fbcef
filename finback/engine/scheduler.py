"""Continuous batching with chunked prefill and preemption by recompute.

Each step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest
first: a decode costs one token, an unfinished prefill continues with the next chunk. Then
waiting sequences join the running batch, as many as the budget, `max_num_seqs` and free KV
blocks allow, a long prompt taking only the budget left (the rest next step). When a running
sequence needs a block and none is free, the newest running sequence is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed from its tokens later
(prompt + what it generated so far), so no request is lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from finback.engine.block_manager import BlockManager, NoFreeBlocks
from finback.engine.request import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # new tokens per sequence this step
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self):
        return bool(self.seqs)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.bm.free_seq(seq.seq_id)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.request.metrics.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            while not self.bm.grow(seq.seq_id, seq.num_computed_tokens + n):
                victim = self.running[-1]  # newest
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # seq preempted itself; self.running shrank, i now points past it
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            scheduled.add(seq.seq_id)
            budget -= n
            i += 1

        if batch.preempted:
            return batch  # memory is tight: don't admit new work this step

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            try:
                cached, n = self.bm.allocate(seq.seq_id, seq.token_ids, budget)
            except NoFreeBlocks:
                break
            self.waiting.popleft()
            seq.num_computed_tokens = cached
            seq.request.metrics.num_cached_tokens = max(seq.request.metrics.num_cached_tokens, cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

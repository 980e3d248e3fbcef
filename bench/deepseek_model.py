"""DeepSeek-V3 model path on one GPU: the layers' kernel hooks against their torch paths, then decode
step timings.

    python bench/deepseek_model.py                 # CUDA, bf16, a 3-layer model of real head sizes
    python bench/deepseek_model.py --experts 256 --hidden 7168 --heads 128 --layers 4   # real widths (~70 GB)

A random-weight DeepSeek-V3 config (real MLA sizes: kv_lora 512, qk_nope 128, qk_rope 64, v 128; YaRN;
first layer dense, the others MoE) is built with finback's own model class on the device. It then
1. checks each MoE layer's routed experts (finback.kernels.fused_moe on CUDA) against fused_moe_ref
   on the same inputs;
2. prefills B sequences of C tokens through the paged latent cache and runs one decode step twice:
   with the kernels (finback.kernels.mla_decode, fused_moe) and with the torch paths (the layers'
   `use_triton` switched off), and compares the logits;
3. times the decode step (model forward, no sampling) for both paths at each B.
Needs only torch, triton, numpy. A kernel H5 has not landed yet is reported as missing and only
the torch path is timed.
"""

from __future__ import annotations

import argparse
import time

import torch

from finback.layers import mla, moe
from finback.layers.attention import AttentionMetadata
from finback.loader.config import ModelConfig
from finback.models.deepseek_v3 import DeepseekV3ForCausalLM


def build(args, device, dtype) -> DeepseekV3ForCausalLM:
    config = ModelConfig(
        architecture="deepseek_v3", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads, head_dim=64,
        rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        max_position_embeddings=16384, q_lora_rank=args.q_lora, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=args.moe_inter, n_routed_experts=args.experts,
        num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4, norm_topk_prob=True,
        routed_scaling_factor=2.5, first_k_dense_replace=1).validate(None)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DeepseekV3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.05 * torch.randn(p.shape, generator=gen, device=device) if "norm" in name
                        else 0.5 * torch.randn(p.shape, generator=gen, device=device))
            else:
                p.normal_(0, p.shape[-1] ** -0.5, generator=gen)
    return model


def attach_cache(model, num_blocks, block_size, device, dtype):
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(layer.cache_shape(num_blocks, block_size), dtype=dtype, device=device)


def meta_for(query_lens, context_lens, tables, block_size, device):
    slots = []
    for q, c, t in zip(query_lens, context_lens, tables):
        slots += [t[p // block_size] * block_size + p % block_size for p in range(c, c + q)]
    return AttentionMetadata(slot_mapping=torch.tensor(slots, device=device), query_lens=query_lens,
                             context_lens=context_lens, block_tables=tables, block_size=block_size)


def set_kernels(on: bool):
    flag = (lambda t: t.is_cuda) if on else (lambda t: False)
    mla.use_triton = flag
    moe.use_triton = flag


def kernel_available(module: str) -> str | None:
    try:
        __import__(module)
        return None
    except ImportError as exc:
        return str(exc)


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--moe-inter", type=int, default=512)
    ap.add_argument("--q-lora", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    missing = {m: kernel_available(m) for m in ("finback.kernels.fused_moe", "finback.kernels.mla_decode")}
    for m, why in missing.items():
        print(f"{m}: {'available' if why is None else 'MISSING (' + why + ')'}")
    kernels = device.type == "cuda" and all(v is None for v in missing.values())

    model = build(args, device, dtype)
    print(f"model: hidden {args.hidden}, {args.heads} heads, {args.layers} layers, {args.experts} experts "
          f"(top-8 of 8 groups, 4 used), {dtype}, {device}")

    # 1. routed experts: kernel vs reference, per MoE layer
    if kernels:
        gen = torch.Generator(device=device).manual_seed(1)
        for i, layer in enumerate(model.model.layers):
            if not hasattr(layer.mlp, "experts"):
                continue
            for t in (1, 64):
                x = torch.randn(t, args.hidden, generator=gen, device=device, dtype=dtype)
                w, ids = layer.mlp.gate(x)
                got = layer.mlp.experts(x, w, ids)
                ref = moe.fused_moe_ref(x, layer.mlp.experts.w13, layer.mlp.experts.w2, w, ids)
                err = (got.float() - ref.float()).abs().max().item()
                print(f"fused_moe layer {i} T={t}: max |kernel - ref| {err:.3g} (ref max {ref.abs().max().item():.3g})")

    # 2 + 3. decode step: kernels vs torch paths
    bs = 16
    print(f"\ndecode step, context {args.context}: B | torch path ms | kernel path ms | max |logit diff| | argmax agree")
    for b in [int(v) for v in args.batches.split(",")]:
        per_seq = -(-(args.context + 1) // bs)
        attach_cache(model, b * per_seq, bs, device, dtype)
        tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(b)]
        gen = torch.Generator(device=device).manual_seed(2)
        ids = torch.randint(0, args.vocab, (b, args.context + 1), generator=gen, device=device)
        set_kernels(kernels)
        for s in range(b):  # prefill one sequence at a time (kernel-free path: MLA prefill is torch)
            meta = meta_for([args.context], [0], [tables[s]], bs, device)
            model(ids[s, :-1], torch.arange(args.context, device=device), meta)
        meta = meta_for([1] * b, [args.context] * b, tables, bs, device)
        pos = torch.full((b,), args.context, device=device)
        results = {}
        for on in ([False, True] if kernels else [False]):
            set_kernels(on)
            logits = None
            for _ in range(3):  # warm-up (and triton compile)
                meta.cache.clear()
                logits = model.compute_logits(model(ids[:, -1], pos, meta)).float()
            if device.type == "cuda":
                torch.cuda.synchronize()
            n, t0 = 10, time.perf_counter()
            for _ in range(n):
                meta.cache.clear()
                model(ids[:, -1], pos, meta)
            if device.type == "cuda":
                torch.cuda.synchronize()
            results[on] = ((time.perf_counter() - t0) / n * 1e3, logits)
        ref_ms, ref_logits = results[False]
        if True in results:
            ms, logits = results[True]
            err = (logits - ref_logits).abs().max().item()
            agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
            print(f"{b:4d} | {ref_ms:13.2f} | {ms:14.2f} | {err:16.3g} | {agree:.2%}")
        else:
            print(f"{b:4d} | {ref_ms:13.2f} | {'-':>14} | {'-':>16} | -")
    set_kernels(True)


if __name__ == "__main__":
    main()

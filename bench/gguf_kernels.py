"""GGUF block matmul kernels on a GPU: correctness against the torch reference, then speed.

For every type (default: Q4_K, Q6_K, Q8_0, Q5_K, Q4_0, Q4_1, Q2_K, Q3_K, IQ2_XXS, IQ1_S, IQ1_M,
IQ2_XS, IQ3_XXS; --types names others the kernels take: Q5_0, Q5_1, IQ2_S, IQ3_S, IQ4_NL, IQ4_XS),
every linear shape of R1-Distill-Qwen-1.5B and -7B and the 671B expert shapes, and M in
{1, 4, 16, 64, 512} rows of bf16 activations (random valid blocks from finback/loader/random_blocks.py): the kernel `gguf_matmul` picks (GEMV for M <= 16, GEMM above) is checked against
dequantize + a float32 matmul (max |y - ref| / max |ref|; bf16 output, so ~4e-3 is rounding), then
timed with triton.testing.do_bench (L2 flushed between runs, so weights come from HBM as in decode).
Bandwidth is bytes of weight blocks / time, also as a fraction of a device-to-device copy measured in
the same run (tensor.copy_ of 1 GiB; (read + write) / time). `dense` is torch's bf16 matmul with the
dequantized weight (cuBLAS) on the same shape, for reference.

    python bench/gguf_kernels.py                      # everything (~5-8 minutes on an H100, compiles included)
    python bench/gguf_kernels.py --types Q4_K,Q6_K --m 1,16 --shapes 7b
    python bench/gguf_kernels.py --both --m 1,2,4,8,16 # GEMV and GEMM side by side for small M
    python bench/gguf_kernels.py --sweep --types Q4_K --shapes 7b   # try tile configs per row, print the best
                                                      # (compiles many variants: filter the rows)

Needs torch, triton, numpy and gguf only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton
import triton.testing
from gguf import GGMLQuantizationType as T

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from finback.kernels.gguf import GEMV_MAX_M, gguf_gemm, gguf_gemv  # noqa: E402
from finback.loader.quants import dequantize  # noqa: E402
from finback.loader.random_blocks import random_blocks  # noqa: E402

TYPES = ["Q4_K", "Q6_K", "Q8_0", "Q5_K", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "IQ2_XXS", "IQ1_S", "IQ1_M", "IQ2_XS",
         "IQ3_XXS"]  # the priority list; the kernels also take Q5_0, Q5_1, IQ2_S, IQ3_S, IQ4_NL, IQ4_XS
# name -> (N, K) of W [N, K]
SHAPES = {
    "1.5b": {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)},
    "7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)},
    "671b": {"exp_gate": (2048, 7168), "exp_down": (7168, 2048)},
}
GEMV_SWEEP = [{"block_n": bn, "block_k": bk, "num_warps": w} for bn in (4, 8, 16) for bk in (128, 256, 512)
              for w in (2, 4)]
GEMM_SWEEP = [{"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": w, "num_stages": s}
              for bm in (64, 128) for bn in (64, 128) for bk in (32, 64) for w in (4, 8) for s in (2, 3)]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return 2 * (1 << 30) / (ms * 1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--shapes", default=",".join(SHAPES), help="model names: " + ", ".join(SHAPES))
    ap.add_argument("--m", default="1,4,16,64,512")
    ap.add_argument("--sweep", action="store_true", help="try tile configs per row and show the best")
    ap.add_argument("--both", action="store_true", help="for M <= 16 time the GEMM kernel too (where to switch)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    types = [T[t.strip()] for t in args.types.split(",")]
    ms = [int(m) for m in args.m.split(",")]
    shapes = [(f"{model}/{name}", nk) for model in args.shapes.split(",") for name, nk in SHAPES[model].items()]

    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    print(f"# device copy bandwidth (1 GiB, read + write): {bw / 1e9:.0f} GB/s")
    head = (f"{'type':5} {'shape':16} {'N x K':>12} {'M':>4} {'kernel':6} {'rel.err':>8} {'us':>8} "
            f"{'GB/s':>7} {'%copy':>6} {'dense us':>8} {'vs dense':>8}")
    if args.sweep:
        head += "  best config"
    print(head)
    print("-" * len(head))
    gen = torch.Generator().manual_seed(0)
    dense_us: dict[tuple, float] = {}
    worst = 0.0
    for qt in types:
        for label, (n, k) in shapes:
            data = random_blocks(qt, (n, k), gen).cuda()
            w = dequantize(data.view(-1), qt, (n, k))
            wb = w.bfloat16()
            nbytes = data.numel()
            for m in ms:
                x = torch.randn(m, k, generator=gen).cuda().bfloat16()
                kernels = [("gemv", gguf_gemv)] if m <= GEMV_MAX_M else []
                if m > GEMV_MAX_M or args.both:
                    kernels.append(("gemm", gguf_gemm))
                for kernel, fn in kernels:
                    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                    fn(x, data, qt, k, out=out)
                    ref = x.float() @ w.T
                    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    worst = max(worst, float("inf") if math.isnan(err) else err)
                    best_cfg, us = None, triton.testing.do_bench(lambda: fn(x, data, qt, k, out=out)) * 1e3
                    if args.sweep:
                        for cfg in (GEMV_SWEEP if kernel == "gemv" else GEMM_SWEEP):
                            try:
                                t = triton.testing.do_bench(lambda: fn(x, data, qt, k, out=out, **cfg),
                                                            warmup=10, rep=40) * 1e3
                            except Exception:  # a config that does not fit (shared memory, registers)
                                continue
                            if t < us:
                                best_cfg, us = cfg, t
                    if (n, k, m) not in dense_us:
                        dense_us[n, k, m] = triton.testing.do_bench(lambda: x @ wb.T) * 1e3
                    gbs = nbytes / (us * 1e-6)
                    line = (f"{qt.name:5} {label:16} {f'{n}x{k}':>12} {m:>4} {kernel:6} {err:8.1e} {us:8.1f} "
                            f"{gbs / 1e9:7.0f} {100 * gbs / bw:5.0f}% {dense_us[n, k, m]:8.1f} "
                            f"{dense_us[n, k, m] / us:7.2f}x")
                    if args.sweep:
                        line += f"  {best_cfg or 'default'}"
                    print(line, flush=True)
    print(f"# worst relative error {worst:.1e} ({'OK' if worst < 1e-2 else 'FAILED'}: bf16 output rounding is ~4e-3)")


if __name__ == "__main__":
    main()

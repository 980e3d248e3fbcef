"""The tensor-core GGUF matmul (finback/kernels/gguf_mma.py) against the older `_mm_kernel` and cuBLAS.

Rows: GGUF type (Q4_K, Q6_K, Q8_0: what Q4_K_M and Q8_0 files hold) x linear shape (R1-Distill-Qwen 7B
and 1.5B) x M rows of bf16 activations (5-16: decode of a few sequences; 64: 64 concurrent; 512:
prefill), random valid blocks. Per row: `rel.err` of gguf_mma against dequantize + a float32 matmul
(max |y - ref| / max |ref|; bf16 output and bf16 weights in the MMA: ~4e-3 is rounding), then times,
measured as bench/gguf_kernels.py does (a CUDA graph of calls over enough weight copies that each
call reads its blocks from HBM):
  mma us    gguf_mma with its default tiles; GB/s and %copy: block bytes / time against a device copy
  old us    the kernel gguf_matmul took before (gguf_gemv's MMA path for M <= 16, gguf_gemm above)
  dense us  torch.matmul with the dequantized bf16 weight (cuBLAS); TFLOP/s of gguf_mma beside it
Then (--sweep) tile configs of gguf_mma per M class on the 7B shapes, ranked by geometric-mean time
against the default.

    python bench/gguf_mma.py                 # the table (~1 min on an H100)
    python bench/gguf_mma.py --sweep         # then the sweep (~3 min)

Needs torch, triton, numpy and gguf only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from gguf_kernels import banner, copies, graph_us, summary, sweep_row  # noqa: E402

from finback.kernels.gguf import GEMV_MAX_M, gguf_gemm, gguf_gemv  # noqa: E402
from finback.kernels.gguf_mma import gguf_mma  # noqa: E402
from finback.loader.quants import dequantize  # noqa: E402
from finback.loader.random_blocks import random_blocks  # noqa: E402

SHAPES = {
    "7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)},
    "1.5b": {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)},
}
PF = ({}, {"prefetch": True})  # each config without and with the register prefetch of Q4_K's next step
SWEEPS = {
    8: [dict(c, **p) for c in ({"block_n": 64, "num_warps": 4, "num_stages": 2, "swap": True},
                               {"block_n": 64, "num_warps": 4, "num_stages": 3, "swap": True},
                               {"block_n": 128, "num_warps": 8, "num_stages": 3, "swap": True},
                               {"block_n": 64, "num_warps": 4, "swap": False}) for p in PF],
    64: [dict(c, **p) for c in ({"block_m": 64, "block_n": 128, "num_warps": 8, "num_stages": 3, "swap": True},
                                {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3, "swap": True},
                                {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3, "swap": False},
                                {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "swap": True})
         for p in PF],
    512: [dict(c, **p) for c in ({"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2},
                                 {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3},
                                 {"block_m": 256, "block_n": 128, "num_warps": 8, "num_stages": 3},
                                 {"block_m": 128, "block_n": 128, "num_warps": 4, "num_stages": 3},
                                 {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3},
                                 {"block_m": 128, "block_n": 256, "num_warps": 8, "num_stages": 2}) for p in PF],
}


def old_kernel(x, data, qt, k, out):
    if x.shape[0] <= GEMV_MAX_M:
        return gguf_gemv(x, data, qt, k, out=out)
    return gguf_gemm(x, data, qt, k, out=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q4_K,Q6_K,Q8_0")
    ap.add_argument("--shapes", default="7b,1.5b")
    ap.add_argument("--m", default="8,16,64,512")
    ap.add_argument("--no-old", action="store_true", help="skip the older kernel's column")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    types = [T[t] for t in args.types.split(",")]
    ms = [int(m) for m in args.m.split(",")]
    shapes = [(f"{s}/{name}", nk) for s in args.shapes.split(",") for name, nk in SHAPES[s].items()]
    bw = banner()
    head = (f"{'type':5} {'shape':13} {'N x K':>11} {'M':>4} {'rel.err':>8} {'mma us':>8} {'GB/s':>6} {'%copy':>6} "
            f"{'old us':>8} {'speedup':>7} {'dense us':>8} {'vs dense':>8} {'TFLOP/s':>7}")
    print(head)
    print("-" * len(head))
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for qt in types:
        for label, (n, k) in shapes:
            data = random_blocks(qt, (n, k), gen).cuda()
            w = dequantize(data.view(-1), qt, (n, k))
            datas = copies(data)
            wbs = None
            for m in ms:
                x = torch.randn(m, k, generator=gen).cuda().bfloat16()
                out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                gguf_mma(x, data, qt, k, out=out)
                ref = x.float() @ w.T
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                worst = max(worst, math.inf if math.isnan(err) else err)
                us = graph_us([lambda d=d: gguf_mma(x, d, qt, k, out=out) for d in datas])
                old = math.nan if args.no_old else graph_us([lambda d=d: old_kernel(x, d, qt, k, out) for d in datas])
                if wbs is None:
                    wbs = copies(w.bfloat16())
                dense = graph_us([lambda wb=wb: torch.matmul(x, wb.T) for wb in wbs])
                gbs = data.numel() / (us * 1e-6)
                print(f"{qt.name:5} {label:13} {f'{n}x{k}':>11} {m:>4} {err:8.1e} {us:8.1f} {gbs / 1e9:6.0f} "
                      f"{100 * gbs / bw:5.0f}% {old:8.1f} {old / us:6.2f}x {dense:8.1f} {dense / us:7.2f}x "
                      f"{2 * m * n * k / (us * 1e-6) / 1e12:7.1f}", flush=True)
            del datas, w, wbs
            torch.cuda.empty_cache()
    print(f"# worst relative error {worst:.1e} ({'OK' if worst < 1e-2 else 'FAILED'}: bf16 rounding is ~4e-3)")

    if args.sweep:
        print("\n# sweep on the 7B shapes: each row's best config vs the default")
        for qt in [t for t in types if t in (T.Q4_K, T.Q6_K)]:
            tables: dict[int, list] = {m: [] for m in SWEEPS}
            for label, (n, k) in shapes:
                if not label.startswith("7b"):
                    continue
                data = random_blocks(qt, (n, k), gen).cuda()
                datas = copies(data)
                for m, configs in SWEEPS.items():
                    x = torch.randn(m, k, generator=gen).cuda().bfloat16()
                    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                    default = graph_us([lambda d=d: gguf_mma(x, d, qt, k, out=out) for d in datas], calls=30)
                    print(f"# {qt.name} {label} {n}x{k} M={m}: default {default:.1f} us", flush=True)
                    tables[m].append((sweep_row(gguf_mma, x, datas, qt, k, out, configs, default), default))
                del datas
                torch.cuda.empty_cache()
            for m, configs in SWEEPS.items():
                summary(f"{qt.name} M={m}", configs, tables[m])


if __name__ == "__main__":
    main()

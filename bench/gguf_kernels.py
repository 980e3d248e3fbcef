"""GGUF block matmul kernels on a GPU: correctness against the torch reference, then speed.

Rows: GGUF type x linear shape (R1-Distill-Qwen-7B's and the 671B routed expert's; --all adds 1.5B and
every type) x M rows of bf16 activations (random valid blocks from finback/loader/random_blocks.py).
The kernel `gguf_matmul` picks (GEMV for M <= 16, GEMM above) is checked against dequantize + a
float32 matmul (max |y - ref| / max |ref|; bf16 output, so ~4e-3 is rounding), then timed.

Timing: a CUDA graph of many calls, replayed; the calls rotate over enough copies of the weight
blocks (> 256 MB together) that every call reads its weights from HBM, not from the 50 MB L2, as in
a decode step. So `us` is the kernel time plus the gap between graph nodes, what an engine with CUDA
graphs pays. Bandwidth is weight bytes / time, also as a fraction of a device-to-device copy timed
the same way (1 GiB tensor.copy_, (read + write) / time). `dense` is torch's bf16 matmul with the
dequantized weight (cuBLAS), timed the same way.

    python bench/gguf_kernels.py            # Q4_K Q6_K Q8_0 Q2_K IQ1_S, 7b + 671b shapes, M 1,16,512 (~1 min)
    python bench/gguf_kernels.py --sweep    # the same, then tile configs of Q4_K's GEMV (M 1, 16) and
                                            # GEMM (M 512) per shape and the best configs overall (~4 min)
    python bench/gguf_kernels.py --all      # every type the kernels take, 1.5b too, M 1,4,16,64,512
    python bench/gguf_kernels.py --types Q4_K --shapes 7b --m 1,2,4,8,16,32,64 --both   # GEMV vs GEMM

Needs torch, triton, numpy and gguf only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton
from gguf import GGMLQuantizationType as T

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from finback.kernels.gguf import GEMV_MAX_M, KERNEL_TYPES, gguf_gemm, gguf_gemv  # noqa: E402
from finback.loader.quants import dequantize  # noqa: E402
from finback.loader.random_blocks import random_blocks  # noqa: E402

TYPES = ["Q4_K", "Q6_K", "Q8_0", "Q2_K", "IQ1_S"]
# name -> (N, K) of W [N, K]
SHAPES = {
    "1.5b": {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)},
    "7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)},
    "671b": {"exp_gate": (2048, 7168), "exp_down": (7168, 2048)},
}
# tile configs --sweep tries (Q4_K). M = 1: gguf_gemv's CUDA-core kernel (32 weights per thread per
# step keeps its sums in registers: block_n * block_k = 32 * 32 * num_warps), and its MMA path for
# comparison; M = 16: the MMA path; M = 512: gguf_gemm.
GEMV1_SWEEP = ([{"block_n": bn, "block_k": bk, "num_warps": w}
                for bn, bk, w in ((16, 256, 4), (32, 128, 4), (8, 512, 4), (8, 256, 2), (16, 128, 2), (32, 256, 8),
                                  (16, 512, 8), (64, 128, 8), (4, 512, 2))]
               + [{"num_stages": st} for st in (1, 3, 4)]
               + [{"mma": True}, {"mma": True, "block_n": 64, "block_k": 64, "num_warps": 4}])
GEMV16_SWEEP = ([{"block_n": bn, "block_k": bk, "num_warps": w, "swap": sw}
                 for bn, bk, w, sw in ((128, 64, 8, True), (64, 64, 4, True), (128, 64, 4, True), (64, 128, 8, True),
                                       (128, 128, 8, True), (32, 128, 4, True), (128, 64, 8, False),
                                       (64, 64, 4, False), (64, 128, 8, False))]
                + [{"num_stages": st} for st in (1, 3, 4)])
GEMM_SWEEP = [{"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": w, "num_stages": st}
              for bm, bn, bk, w, st in ((128, 128, 64, 8, 3), (128, 128, 64, 8, 2), (128, 128, 64, 8, 4),
                                        (64, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 3),
                                        (64, 64, 64, 4, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3),
                                        (64, 128, 64, 4, 3), (128, 128, 64, 4, 3))]
ROTATE_BYTES = 256 << 20  # weight copies per graph: more than 5x the H100's L2


def graph_us(fns, calls: int = 60) -> float:
    """Mean time per call of a CUDA graph that runs fns round-robin, `calls` calls or more."""
    for f in fns:  # compile, allocate workspaces and counters outside the capture
        f()
    torch.cuda.synchronize()
    reps = max(1, calls // len(fns))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(3):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / (reps * len(fns)))
    del g
    return best


def copies(t: torch.Tensor) -> list[torch.Tensor]:
    n = max(1, min(32, math.ceil(ROTATE_BYTES / (t.numel() * t.element_size()))))
    return [t] + [t.clone() for _ in range(n - 1)]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * (1 << 30) / (graph_us([lambda: dst.copy_(src)], calls=10) * 1e-6)


def banner() -> float:
    """Print the GPU and software line and the device copy bandwidth; return the bandwidth (bytes/s)."""
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    print(f"# device copy bandwidth (1 GiB, read + write, CUDA graph): {bw / 1e9:.0f} GB/s")
    return bw


def sweep_row(fn, x, datas, qt, k, out, configs, default_us):
    """Times of every config that compiles, as {index: us}."""
    res = {}
    for i, cfg in enumerate(configs):
        try:
            res[i] = graph_us([lambda d=d, c=cfg: fn(x, d, qt, k, out=out, **c) for d in datas], calls=30)
        except Exception as e:  # a config that does not fit (shared memory, registers)
            print(f"#   config {cfg} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    best = min(res, key=res.get) if res else None
    if best is not None:
        print(f"#   best {configs[best]}: {res[best]:.1f} us (default {default_us:.1f} us)", flush=True)
    return res


def summary(name, configs, tables):
    """Geometric mean over rows of time / default time, per config: the one to make the default."""
    rows = [(t, d) for t, d in tables if t]
    if not rows:
        return
    scores = []
    for i, cfg in enumerate(configs):
        if all(i in t for t, _ in rows):
            scores.append((math.exp(sum(math.log(t[i] / d) for t, d in rows) / len(rows)), cfg))
    scores.sort(key=lambda s: s[0])
    print(f"# {name} configs by geometric-mean time vs the default over {len(rows)} rows (best first):")
    for s, cfg in scores[:6]:
        print(f"#   {s:5.2f}x  {cfg}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default=None, help="comma-separated GGUF types (default: " + ",".join(TYPES) + ")")
    ap.add_argument("--shapes", default=None, help="model names: " + ", ".join(SHAPES) + " (default 7b,671b)")
    ap.add_argument("--m", default=None, help="rows of x (default 1,16,512)")
    ap.add_argument("--all", action="store_true", help="every type, every shape, M 1,4,16,64,512")
    ap.add_argument("--sweep", action="store_true", help="then sweep Q4_K tile configs (GEMV and GEMM)")
    ap.add_argument("--both", action="store_true", help="for M <= 16 time the GEMM kernel too")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    all_types = sorted(KERNEL_TYPES, key=lambda t: (t.name not in TYPES, TYPES.index(t.name) if t.name in TYPES else 0))
    types = [T[t.strip()] for t in args.types.split(",")] if args.types else all_types if args.all else \
        [T[t] for t in TYPES]
    models = args.shapes.split(",") if args.shapes else list(SHAPES) if args.all else ["7b", "671b"]
    ms = [int(m) for m in args.m.split(",")] if args.m else [1, 4, 16, 64, 512] if args.all else [1, 16, 512]
    shapes = [(f"{model}/{name}", nk) for model in models for name, nk in SHAPES[model].items()]

    bw = banner()
    head = (f"{'type':7} {'shape':14} {'N x K':>11} {'M':>4} {'kernel':6} {'rel.err':>8} {'us':>8} "
            f"{'GB/s':>6} {'%copy':>6} {'dense us':>8} {'vs dense':>8}")
    print(head)
    print("-" * len(head))
    gen = torch.Generator().manual_seed(0)
    dense_us: dict[tuple, float] = {}
    worst = 0.0
    for qt in types:
        for label, (n, k) in shapes:
            data = random_blocks(qt, (n, k), gen).cuda()
            w = dequantize(data.view(-1), qt, (n, k))
            datas = copies(data)
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
                    worst = max(worst, math.inf if math.isnan(err) else err)
                    us = graph_us([lambda d=d: fn(x, d, qt, k, out=out) for d in datas])
                    if (n, k, m) not in dense_us:
                        wbs = copies(w.bfloat16())
                        dense_us[n, k, m] = graph_us([lambda wb=wb: torch.matmul(x, wb.T) for wb in wbs])
                        del wbs
                    gbs = nbytes / (us * 1e-6)
                    print(f"{qt.name:7} {label:14} {f'{n}x{k}':>11} {m:>4} {kernel:6} {err:8.1e} {us:8.1f} "
                          f"{gbs / 1e9:6.0f} {100 * gbs / bw:5.0f}% {dense_us[n, k, m]:8.1f} "
                          f"{dense_us[n, k, m] / us:7.2f}x", flush=True)
            del datas, w
            torch.cuda.empty_cache()
    print(f"# worst relative error {worst:.1e} ({'OK' if worst < 1e-2 else 'FAILED'}: bf16 output rounding is ~4e-3)")

    if args.sweep:
        print("\n# sweep: Q4_K, each row's best config vs the default; compiles every config once")
        tables: dict[int, list] = {1: [], 16: [], 512: []}
        sweeps = {1: (gguf_gemv, GEMV1_SWEEP), 16: (gguf_gemv, GEMV16_SWEEP), 512: (gguf_gemm, GEMM_SWEEP)}
        for label, (n, k) in shapes:
            data = random_blocks(T.Q4_K, (n, k), gen).cuda()
            datas = copies(data)
            for m in (1, 16, 512):
                x = torch.randn(m, k, generator=gen).cuda().bfloat16()
                out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                fn, configs = sweeps[m]
                default = graph_us([lambda d=d: fn(x, d, T.Q4_K, k, out=out) for d in datas], calls=30)
                print(f"# Q4_K {label} {n}x{k} M={m}", flush=True)
                tables[m].append((sweep_row(fn, x, datas, T.Q4_K, k, out, configs, default), default))
            del datas
            torch.cuda.empty_cache()
        summary("GEMV M=1 (gguf_gemv)", GEMV1_SWEEP, tables[1])
        summary("GEMV M=16 (gguf_gemv)", GEMV16_SWEEP, tables[16])
        summary("GEMM M=512 (gguf_gemm)", GEMM_SWEEP, tables[512])


if __name__ == "__main__":
    main()

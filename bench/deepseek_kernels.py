"""DeepSeek-V3 GPU kernels at the real widths: correctness against the torch references, then timings.

Kernels: fused MoE (bf16 and block-FP8 experts; hidden 7168, 256 experts, top-8, intermediate
2048), absorbed MLA decode (128 heads, latent 512 + rope 64, paged cache of 16-token blocks), and the
block-FP8 GEMM for the attention and dense shapes. Each timing is the median of `--reps` runs, each
timed alone with CUDA events after the L2 cache is flushed (a 256 MiB write), and is reported as
bytes the kernel must read / time, next to a device-to-device copy's bandwidth measured in the same
run (the copy figure counts its read and its write).

Run on a GPU machine (torch 2.11 + triton 3.6, nothing else):  python bench/deepseek_kernels.py
Options: --experts N (fewer experts if the real 256 do not fit), --quick (fewer rows), --reps N.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from finback.kernels.fp8_gemm import (  # noqa: E402
    fp8_block_dequant,
    fp8_block_gemm,
    fp8_block_gemm_ref,
)
from finback.kernels.fused_moe import fused_moe, fused_moe_ref  # noqa: E402
from finback.kernels.mla_decode import mla_decode, mla_decode_ref  # noqa: E402

HIDDEN, INTER, TOPK = 7168, 2048, 8
HEADS, LATENT, ROPE, BLOCK = 128, 512, 64, 16
SCALE = 192 ** -0.5
GB = 1e9

_flush = None


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs, each after an L2 flush."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        _flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def graphed(fn):
    """fn captured in a CUDA graph (after two warm-up calls on a side stream): returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(rows: list, name: str, shape: str, fn, reps: int, nbytes: float, flops: float) -> None:
    """One table row: eager time, and the time of the same call replayed from a CUDA graph."""
    eager = timed(fn, reps)
    try:
        graph = timed(graphed(fn), reps)
    except Exception as exc:  # noqa: BLE001 - a capture failure is a result to report
        print(f"  {name} {shape}: CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:160]}")
        graph = None
    rows.append((name, shape, eager, graph, nbytes, flops))


def copy_bandwidth(reps: int) -> float:
    src = torch.empty(2 * 2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), reps)
    return 2 * 2 * 2 ** 30 / t / GB


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def check(err: float, tol: float) -> str:
    """err printed with a verdict against the tolerance the CPU tests use for the same comparison."""
    return f"{err:.2e} {'ok' if err <= tol else 'FAIL'}"


def routing(t: int, e: int, gen: torch.Generator):
    scores = torch.rand(t, e, device="cuda", generator=gen)
    w, ids = scores.topk(TOPK, -1)
    return (w / w.sum(-1, keepdim=True)).float(), ids.to(torch.int32)


def fp8_weight(*shape, gen):
    """Random block-FP8 weight [..., N, K] and scales, made one [N, K] matrix at a time (fp32 temporaries)."""
    w = torch.empty(shape, dtype=torch.float8_e4m3fn, device="cuda")
    for mat in w.view(-1, *shape[-2:]):
        mat.copy_((torch.randn(shape[-2:], device="cuda", generator=gen) * 64).clamp(-448, 448))
    s = (torch.rand(*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128), device="cuda", generator=gen) + 0.5)
    return w, s / (64 * shape[-1] ** 0.5)


# ----------------------------------------------------------------------------- MoE

def bench_moe(num_experts: int, tokens: list[int], reps: int, rows: list):
    gen = torch.Generator(device="cuda").manual_seed(0)
    e = num_experts
    w13, s13 = fp8_weight(e, 2 * INTER, HIDDEN, gen=gen)
    w2, s2 = fp8_weight(e, HIDDEN, INTER, gen=gen)
    # bf16 experts: the dequantized FP8 ones, so both paths compute the same function
    w13b = torch.empty(w13.shape, dtype=torch.bfloat16, device="cuda")
    w2b = torch.empty(w2.shape, dtype=torch.bfloat16, device="cuda")
    for i in range(e):
        fp8_block_dequant(w13[i], s13[i], out=w13b[i])
        fp8_block_dequant(w2[i], s2[i], out=w2b[i])
    per_expert = {"bf16": 3 * INTER * HIDDEN * 2, "fp8": 3 * INTER * HIDDEN + (3 * INTER * HIDDEN // 128 ** 2) * 4}
    print(f"MoE correctness (H={HIDDEN}, I={INTER}, {e} experts, top-{TOPK}):")
    for t in (1, 37, 256):
        x = torch.randn(t, HIDDEN, device="cuda", generator=gen).bfloat16()
        tw, ids = routing(t, e, gen)
        ref = fused_moe_ref(x, w13, w2, tw, ids, s13, s2)
        got8 = fused_moe(x, w13, w2, tw, ids, s13, s2)
        gotb = fused_moe(x, w13b, w2b, tw, ids)
        refb = fused_moe_ref(x, w13b, w2b, tw, ids)
        print(f"  T={t:<4} fp8 kernel vs fp8 ref rel err {check(rel_err(got8, ref), 3e-2)}   "
              f"bf16 kernel vs bf16 ref {check(rel_err(gotb, refb), 2e-2)}   "
              f"fp8 vs bf16 (W8A8 cost) {rel_err(got8, refb):.2e}")
    for t in tokens:
        x = torch.randn(t, HIDDEN, device="cuda", generator=gen).bfloat16()
        tw, ids = routing(t, e, gen)
        used = ids.unique().numel()
        for kind, args in (("bf16", (x, w13b, w2b, tw, ids)), ("fp8", (x, w13, w2, tw, ids, s13, s2))):
            for bn, nw in ((64, 4), (128, 8)):
                measure(rows, f"fused MoE {kind} bn={bn} w={nw}", f"T={t} ({used} experts)",
                        lambda: fused_moe(*args, block_n=bn, num_warps=nw), reps,
                        used * per_expert[kind] + x.numel() * 2, 2 * t * TOPK * 3 * INTER * HIDDEN)
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- MLA decode

def mla_inputs(batch: int, ctx: int, gen: torch.Generator, seq_lens: list[int] | None = None):
    max_blocks = -(-ctx // BLOCK)
    kv = torch.randn(batch * max_blocks + 1, BLOCK, LATENT + ROPE, device="cuda", generator=gen).bfloat16()
    bt = torch.randperm(batch * max_blocks, device="cuda", generator=gen).view(batch, max_blocks).to(torch.int32)
    sl = torch.tensor(seq_lens or [ctx] * batch, dtype=torch.int32, device="cuda")
    q = (torch.randn(batch, HEADS, LATENT, device="cuda", generator=gen) * 0.05).bfloat16()
    qp = (torch.randn(batch, HEADS, ROPE, device="cuda", generator=gen) * 0.05).bfloat16()
    return q, qp, kv, bt, sl


def bench_mla(batches: list[int], contexts: list[int], reps: int, rows: list):
    gen = torch.Generator(device="cuda").manual_seed(1)
    print(f"MLA decode correctness (H={HEADS}, latent {LATENT}+{ROPE}, block {BLOCK}):")
    q, qp, kv, bt, sl = mla_inputs(5, 3000, gen, seq_lens=[3000, 1, 0, 777, 2048])
    ref = mla_decode_ref(q, qp, kv, bt, sl, SCALE)
    for bh, nw in ((16, 4), (32, 8), (64, 8)):
        try:
            got = mla_decode(q, qp, kv, bt, sl, SCALE, block_h=bh, num_warps=nw)
            print(f"  block_h={bh:<3} warps={nw}: rel err {check(rel_err(got, ref), 2e-2)}; padding row zero: "
                  f"{bool((got[2] == 0).all())}")
        except Exception as exc:  # a tile that does not fit this GPU is reported, not fatal
            print(f"  block_h={bh:<3} warps={nw}: failed: {type(exc).__name__}: {str(exc)[:120]}")
    for b in batches:
        for ctx in contexts:
            q, qp, kv, bt, sl = mla_inputs(b, ctx, gen)
            nbytes = b * ctx * (LATENT + ROPE) * 2 + 2 * q.numel() * 2 + qp.numel() * 2
            for bh, nw in ((16, 4), (32, 8), (64, 8)):
                try:
                    measure(rows, f"MLA decode bh={bh} w={nw}", f"B={b} ctx={ctx}",
                            lambda: mla_decode(q, qp, kv, bt, sl, SCALE, block_h=bh, num_warps=nw), reps,
                            nbytes, 2 * b * HEADS * ctx * (2 * LATENT + ROPE))
                except Exception as exc:  # noqa: BLE001 - reported in the correctness lines above too
                    print(f"  B={b} ctx={ctx} block_h={bh}: not timed ({type(exc).__name__})")
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- FP8 GEMM

GEMM_SHAPES = {  # name: (N, K)
    "q_a_proj": (1536, 7168),
    "q_b_proj": (24576, 1536),
    "kv_a_proj": (576, 7168),
    "kv_b_proj": (32768, 512),
    "o_proj": (7168, 16384),
    "dense gate_up": (36864, 7168),
    "dense down": (7168, 18432),
}


def bench_gemm(ms: list[int], reps: int, rows: list):
    gen = torch.Generator(device="cuda").manual_seed(2)
    print("FP8 GEMM correctness:")
    for name, (n, k) in GEMM_SHAPES.items():
        w, s = fp8_weight(n, k, gen=gen)
        wb = fp8_block_dequant(w, s)
        x = torch.randn(37, k, device="cuda", generator=gen).bfloat16()
        got = fp8_block_gemm(x, w, s)
        print(f"  {name:<14} N={n:<6} K={k:<6} vs ref {check(rel_err(got, fp8_block_gemm_ref(x, w, s)), 1e-2)}"
              f"   vs bf16 matmul (A8 cost) {rel_err(got, x @ wb.t()):.2e}")
        for m in ms:
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            nbytes = n * k + (n // 128) * (k // 128) * 4 + m * k * 2 + m * n * 2
            measure(rows, f"FP8 GEMM {name}", f"M={m}", lambda: fp8_block_gemm(x, w, s), reps, nbytes, 2 * m * n * k)
            measure(rows, f"  bf16 torch.matmul {name}", f"M={m}", lambda: x @ wb.t(), reps,
                    n * k * 2 + m * k * 2 + m * n * 2, 2 * m * n * k)
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["moe", "mla", "gemm"], action="append")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/deepseek_kernels.py needs a CUDA GPU")
    import triton
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, {props.multi_processor_count} SMs; "
          f"torch {torch.__version__}, triton {triton.__version__}")
    t0 = time.perf_counter()
    copy_bw = copy_bandwidth(args.reps)
    print(f"device copy bandwidth (read + write): {copy_bw:.0f} GB/s")
    rows: list = []
    only = set(args.only or ["moe", "mla", "gemm"])
    if "moe" in only:
        experts = args.experts
        while True:
            try:
                bench_moe(experts, [1, 64] if args.quick else [1, 16, 64, 256], args.reps, rows)
                break
            except torch.OutOfMemoryError:
                pass
            torch.cuda.empty_cache()              # out of the except block: the failed frame is gone
            experts //= 2
            print(f"MoE: out of memory, retrying with {experts} experts")
        if experts != 256:
            print(f"NOTE: MoE rows use {experts} experts, not DeepSeek-V3's 256")
    if "mla" in only:
        bench_mla([1, 64] if args.quick else [1, 16, 64], [1024, 8192], args.reps, rows)
    if "gemm" in only:
        bench_gemm([1, 512] if args.quick else [1, 64, 512], args.reps, rows)
    print()
    print(f"{'kernel':<34} {'shape':<22} {'graph us':>9} {'eager us':>9} {'MB read':>9} {'GB/s':>7} {'% copy':>7} "
          f"{'TFLOP/s':>8}")
    for name, shape, eager, graph, nbytes, flops in rows:
        sec = graph if graph is not None else eager
        gbs = nbytes / sec / GB
        gtxt = f"{graph * 1e6:>9.1f}" if graph is not None else f"{'failed':>9}"
        print(f"{name:<34} {shape:<22} {gtxt} {eager * 1e6:>9.1f} {nbytes / 1e6:>9.1f} {gbs:>7.0f} "
              f"{100 * gbs / copy_bw:>6.0f}% {flops / sec / 1e12:>8.1f}")
    print("\ngraph us: replayed from a CUDA graph (what the runner does); GB/s, % copy and TFLOP/s use it (eager if")
    print("capture failed). % copy = bytes the kernel must read / time, over the copy bandwidth above.")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

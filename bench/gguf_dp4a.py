"""The int8-activation dp4a GEMV (finback/kernels/gguf_dp4a.py) against the float GEMV (gguf_gemv) on a GPU.

Rows: GGUF type x linear shape (R1-Distill-Qwen 1.5B and 7B, the 671B attention / expert shapes) x M
rows of bf16 activations, random valid blocks (finback/loader/random_blocks.py). Per (type, shape)
first a correctness line: `rel.err` is max |y - ref| / max |ref| against gguf_gemv_q8_ref (the same
int8 activations, float32 matmul; bf16 output rounding is ~4e-3) and `vs float` the same against
gguf_matmul_ref (adds the activation rounding). Then speed per M, timed as bench/gguf_kernels.py
does: a CUDA graph of calls rotating over enough weight copies (> 256 MB) that every call reads its
blocks from HBM.
  q8 us     gguf_gemv_q8 as a layer would call it: quantize_q8 + the dp4a GEMV (two kernels)
  pre us    the dp4a GEMV alone, x already quantized (q8=..., shared by layers that read one x)
  GB/s      block bytes / pre us, and %copy: that as a share of a device copy timed the same way
  gemv us   finback.kernels.gguf.gguf_gemv on the same blocks and x; `speedup` = gemv us / q8 us
Then a sweep for Q4_K, M = 1 and 2, on every shape: (block_n, block_k, num_warps) and the default
split K against none and twice as many, ranked by geometric mean time against the default.

    python bench/gguf_dp4a.py                      # all of it (~3 min on an H100)
    python bench/gguf_dp4a.py --types Q4_K --shapes 7b --no-sweep

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
sys.path.insert(0, os.path.dirname(__file__))

from gguf_kernels import banner, copies, graph_us, summary  # noqa: E402

from finback.kernels.gguf import gguf_gemv, gguf_matmul_ref  # noqa: E402
from finback.kernels.gguf_dp4a import SPLIT_WARPS_PER_SM, gguf_gemv_q8, gguf_gemv_q8_ref, quantize_q8  # noqa: E402
from finback.loader.random_blocks import random_blocks  # noqa: E402

TYPES = ["Q4_K", "Q6_K", "Q8_0", "Q2_K", "IQ1_S"]
SHAPES = {  # name -> (N, K) of W [N, K]
    "1.5b": {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)},
    "7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)},
    "671b": {"q_b": (24576, 1536), "o": (7168, 16384), "exp_gate": (2048, 7168), "exp_down": (7168, 2048)},
}
# Q4_K tile configs --sweep tries: block_n * block_k / 64 >= 32 * num_warps keeps whole groups in a thread;
# the default split K (SPLIT_WARPS_PER_SM) against none and against twice as many splits
SWEEP = ([{"block_n": bn, "block_k": bk, "num_warps": w}
          for bn, bk, w in ((8, 512, 2), (8, 256, 1), (4, 512, 1), (16, 512, 2), (8, 1024, 4), (16, 512, 4),
                            (32, 256, 4), (16, 1024, 8))]
         + [{"split_k": 1}, {"split_x2": True}])


def label(cfg: dict) -> str:
    if "block_n" in cfg:
        return f"{cfg['block_n']}x{cfg['block_k']}/{cfg['num_warps']}w"
    return "split1" if cfg.get("split_k") == 1 else "split*2"


def default_split(n: int, k: int) -> int:
    """gguf_gemv_q8's default split_k at its default tile (8 x 512, 2 warps)."""
    tiles = triton.cdiv(n, 8)
    return min(triton.cdiv(SPLIT_WARPS_PER_SM * torch.cuda.get_device_properties(0).multi_processor_count,
                           tiles * 2), triton.cdiv(k, 512))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    return math.inf if math.isnan(err) else err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--m", default="1,2")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    types = [T[t.strip()] for t in args.types.split(",")]
    shapes = [(f"{model}/{name}", nk) for model in args.shapes.split(",") for name, nk in SHAPES[model].items()]
    ms = [int(m) for m in args.m.split(",")]

    bw = banner()
    gen = torch.Generator().manual_seed(0)

    head = (f"{'type':6} {'shape':16} {'N x K':>11} {'M':>2} {'q8 us':>8} {'pre us':>8} {'GB/s':>6} {'%copy':>6} "
            f"{'gemv us':>8} {'speedup':>7}")
    print(head)
    print("-" * len(head))
    worst = 0.0
    totals: dict[tuple, list[float]] = {}
    for qt in types:
        for label, (n, k) in shapes:
            data = random_blocks(qt, (n, k), gen).cuda()
            x = torch.randn(2, k, generator=gen).cuda().bfloat16()
            y = gguf_gemv_q8(x, data, qt, k, out=torch.full((2, n), float("nan"), dtype=torch.bfloat16, device="cuda"))
            err = rel_err(y, gguf_gemv_q8_ref(x.float(), data, qt, k))
            worst = max(worst, err)
            print(f"{qt.name:6} {label:16} {f'{n}x{k}':>11}  M=2 rel.err {err:8.1e}  vs float "
                  f"{rel_err(y, gguf_matmul_ref(x.float(), data, qt, k)):8.1e}", flush=True)
            datas = copies(data)
            for m in ms:
                x = torch.randn(m, k, generator=gen).cuda().bfloat16()
                out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                q8 = quantize_q8(x)
                us = graph_us([lambda d=d: gguf_gemv_q8(x, d, qt, k, out=out) for d in datas])
                pre = graph_us([lambda d=d: gguf_gemv_q8(x, d, qt, k, out=out, q8=q8) for d in datas])
                old = graph_us([lambda d=d: gguf_gemv(x, d, qt, k, out=out) for d in datas])
                gbs = data.numel() / (pre * 1e-6)
                t = totals.setdefault((qt.name, label.split("/")[0], m), [0.0, 0.0])
                t[0] += us
                t[1] += old
                print(f"{qt.name:6} {label:16} {f'{n}x{k}':>11} {m:>2} {us:8.1f} {pre:8.1f} {gbs / 1e9:6.0f} "
                      f"{100 * gbs / bw:5.0f}% {old:8.1f} {old / us:6.2f}x", flush=True)
            del datas, data
            torch.cuda.empty_cache()
    print(f"# worst rel.err {worst:.1e} ({'OK' if worst < 1e-2 else 'FAILED'}: bf16 output rounding is ~4e-3)")
    print("\n# per model, the four shapes summed (one call each): dp4a us vs gemv us")
    for (name, model, m), (q8us, oldus) in totals.items():
        print(f"#   {name:6} {model:5} M={m}: {q8us:8.1f} vs {oldus:8.1f} us ({oldus / q8us:.2f}x)")

    if not args.no_sweep:
        print("\n# sweep: Q4_K tiles (pre-quantized x), us per shape; then configs by geometric mean vs the default")
        for m in ms:
            table = []
            for label, (n, k) in shapes:
                data = random_blocks(T.Q4_K, (n, k), gen).cuda()
                datas = copies(data)
                x = torch.randn(m, k, generator=gen).cuda().bfloat16()
                out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                q8 = quantize_q8(x)
                default = graph_us([lambda d=d: gguf_gemv_q8(x, d, T.Q4_K, k, out=out, q8=q8) for d in datas], calls=30)
                res = {}
                for i, cfg in enumerate(SWEEP):
                    if cfg.get("split_x2"):
                        cfg = {"split_k": 2 * default_split(n, k)}
                    try:
                        res[i] = graph_us([lambda d=d, c=cfg: gguf_gemv_q8(x, d, T.Q4_K, k, out=out, q8=q8, **c)
                                           for d in datas], calls=30)
                    except Exception as e:  # a config that does not compile or fit
                        print(f"#   config {cfg} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                cells = " ".join(f"{res[i]:6.1f}" if i in res else "     -" for i in range(len(SWEEP)))
                print(f"# M={m} {label:16} default {default:6.1f} | {cells}", flush=True)
                table.append((res, default))
                del datas, data
                torch.cuda.empty_cache()
            print("# columns: " + " ".join(label(c) for c in SWEEP))
            summary(f"Q4_K M={m} (gguf_gemv_q8)", SWEEP, table)


if __name__ == "__main__":
    main()

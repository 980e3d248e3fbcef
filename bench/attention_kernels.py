"""GPU check and timing of the Triton attention, norm and activation kernels (finback/kernels/).

1. Correctness against the torch references on the R1-Distill-Qwen 1.5B and 7B attention shapes
   (H=12/Hk=2 and H=28/Hk=4, D=128, bf16, block size 16): decode (several splits, a padding row,
   and a CUDA graph replayed with new lengths), prefill over a cached prefix, the KV write with padding
   slots, RMSNorm (plain and fused with the residual) and SiLU-and-multiply.
2. Timings (CUDA-graph replays of the call, so launch overhead is not in them): decode at
   B in {1, 8, 32, 64} x context {128, 1024, 4096}, with the KV bytes read / time next to a
   device-to-device copy bandwidth measured in the same run (read + write bytes / time), and the torch
   path (gather + matmul, as TorchAttentionBackend) for comparison; prefill of 512 tokens (fresh,
   batch of 8, and after a 3584-token cached prefix) against torch SDPA; the KV write against
   index_copy; the norm and activation against torch.

Small cases fit in the 50 MB L2, so their "GB/s" can exceed HBM bandwidth; the large ones cannot.

Run on the device machine:  python bench/attention_kernels.py  [--sweep]  (--sweep: also time a few
tile configurations of the prefill kernel and decode tile sizes)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from finback.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from finback.kernels.attention import (  # noqa: E402
    decode_workspace,
    default_num_splits,
    paged_decode,
    paged_decode_ref,
    paged_prefill,
    paged_prefill_ref,
    write_kv,
    write_kv_ref,
)
from finback.kernels.norm import (  # noqa: E402
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from finback.kernels.rotary import rotary, rotary_ref  # noqa: E402
from finback.layers.attention import Attention, TorchAttentionBackend  # noqa: E402
from finback.layers.rotary import RotaryEmbedding  # noqa: E402

SHAPES = {"1.5B": (12, 2, 1536, 8960), "7B": (28, 4, 3584, 18944)}   # H, Hk, hidden, intermediate
D, BS = 128, 16
DT = torch.bfloat16
DEV = "cuda"


def timeit(fn, reps: int = 30) -> float:
    """Milliseconds per call: fn captured 10 times in a CUDA graph, the graph replayed `reps` times
    (eager calls if the capture fails, which the output then says)."""
    fn()
    torch.cuda.synchronize()
    per = 10
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per):
                fn()
        run = graph.replay
    except Exception as e:  # noqa: BLE001 - reported, then timed eagerly
        print(f"  (no graph: {type(e).__name__}: {e}; timed eagerly)")
        run, per = fn, 1
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps * per)


def copy_bandwidth() -> float:
    x = torch.empty(1 << 29, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = timeit(lambda: y.copy_(x), reps=5)
    return 2 * x.numel() / ms / 1e6  # GB/s, read + write


def paged(b: int, ctx: int, hk: int, gen: torch.Generator, extra_blocks: int = 0):
    """A cache holding b sequences of ctx tokens in shuffled blocks, and their int32 block tables."""
    per = -(-ctx // BS)
    nb = b * per + extra_blocks + 1
    k = torch.randn(nb, BS, hk, D, generator=gen, device=DEV, dtype=DT)
    v = torch.randn(nb, BS, hk, D, generator=gen, device=DEV, dtype=DT)
    perm = torch.randperm(nb, generator=gen, device=DEV)[:b * per]
    return k, v, perm.view(b, per).to(torch.int32).contiguous()


def err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def check(name: str, e: float, tol: float, rows: list) -> None:
    rows.append((name, e, tol, "ok" if e <= tol else "FAIL"))


def correctness() -> list:
    rows: list = []
    gen = torch.Generator(device=DEV).manual_seed(0)
    for shape, (h, hk, hidden, inter) in SHAPES.items():
        scale = D ** -0.5
        # decode: lengths across splits, one padding row
        lens = [4096, 1, 0, 777, 16, 2049, 129, 3000]
        k, v, bt = paged(len(lens), 4096, hk, gen)
        seq = torch.tensor(lens, dtype=torch.int32, device=DEV)
        q = torch.randn(len(lens), h, D, generator=gen, device=DEV, dtype=DT)
        want = paged_decode_ref(q, k, v, bt, seq, scale)
        for splits in (1, 4, default_num_splits(len(lens), hk, 4096)):
            out = torch.full_like(q, float("nan"))
            paged_decode(q, k, v, bt, seq, scale, out, num_splits=splits)
            check(f"{shape} decode, {splits} splits", err(out, want), 2e-2, rows)
        # decode captured in a CUDA graph, replayed with new lengths
        splits = default_num_splits(len(lens), hk, 4096)
        ws = decode_workspace(len(lens), h, D, splits, DEV)
        out = torch.empty_like(q)
        paged_decode(q, k, v, bt, seq, scale, out, num_splits=splits, workspace=ws)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            paged_decode(q, k, v, bt, seq, scale, out, num_splits=splits, workspace=ws)
        seq.copy_(torch.tensor([5, 0, 4096, 1000, 33, 64, 65, 2], dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        check(f"{shape} decode, graph replay, new lens", err(out, paged_decode_ref(q, k, v, bt, seq, scale)), 2e-2,
              rows)
        # prefill: a fresh prompt, a chunk after a prefix, a long chunk after a long prefix
        ctx, new = [0, 300, 1000], [512, 100, 777]
        k, v, bt = paged(3, 1777, hk, gen)
        qsl = torch.tensor([0, 512, 612, 1389], dtype=torch.int32, device=DEV)
        args = (k, v, bt, qsl, torch.tensor([c + n for c, n in zip(ctx, new)], dtype=torch.int32, device=DEV),
                torch.tensor(ctx, dtype=torch.int32, device=DEV), scale)
        q = torch.randn(1389, h, D, generator=gen, device=DEV, dtype=DT)
        out = torch.full_like(q, float("nan"))
        paged_prefill(q, *args, out=out)
        check(f"{shape} prefill (cached prefixes)", err(out, paged_prefill_ref(q, *args)), 2e-2, rows)
        # KV write with padding slots
        kn = torch.randn(64, hk, D, generator=gen, device=DEV, dtype=DT)
        slots = torch.randperm(k.shape[0] * BS, generator=gen, device=DEV)[:64]
        slots[::7] = -1
        k2, v2 = k.clone(), v.clone()
        write_kv(kn, kn, k, v, slots)
        write_kv_ref(kn, kn, k2, v2, slots)
        check(f"{shape} write_kv (bit-exact)", float(not (torch.equal(k, k2) and torch.equal(v, v2))), 0, rows)
        # norm and activation (bit-exact on the GPU: same roundings as torch)
        x = torch.randn(300, hidden, generator=gen, device=DEV, dtype=DT)
        r = torch.randn(300, hidden, generator=gen, device=DEV, dtype=DT)
        w = torch.randn(hidden, generator=gen, device=DEV, dtype=DT)
        check(f"{shape} rms_norm", err(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)), 0.02, rows)
        want_x, want_r = fused_add_rms_norm_ref(x, r, w, 1e-6)
        got_x, got_r = fused_add_rms_norm(x.clone(), r.clone(), w, 1e-6)
        check(f"{shape} fused_add_rms_norm", max(err(got_x, want_x), err(got_r, want_r)), 0.02, rows)
        g = torch.randn(300, 2 * inter, generator=gen, device=DEV, dtype=DT) * 3
        check(f"{shape} silu_and_mul", err(silu_and_mul(g), silu_and_mul_ref(g)), 0.02, rows)
        rope = RotaryEmbedding(D, 8192, 10000.0).to(DEV)
        pos = torch.randint(0, 8192, (300,), generator=gen, device=DEV)
        qkv = torch.randn(300, (h + 2 * hk) * D, generator=gen, device=DEV, dtype=DT)
        qv, kv = qkv[:, :h * D].view(300, h, D), qkv[:, h * D:(h + hk) * D].view(300, hk, D)
        got, want = rotary(pos, qv, kv, rope.cos, rope.sin), rotary_ref(pos, qv, kv, rope.cos, rope.sin)
        check(f"{shape} rotary (q/k views of qkv)", max(err(got[0], want[0]), err(got[1], want[1])), 0.05, rows)
    return rows


def decode_table(bw: float) -> list:
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(1)
    backend = TorchAttentionBackend()
    for shape, (h, hk, _, _) in SHAPES.items():
        layer = Attention(h, hk, D, D ** -0.5)
        for ctx in (128, 1024, 4096):
            for b in (1, 8, 32, 64):
                k, v, bt = paged(b, ctx, hk, gen)
                seq = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
                q = torch.randn(b, h, D, generator=gen, device=DEV, dtype=DT)
                splits = default_num_splits(b, hk, ctx)
                ws = decode_workspace(b, h, D, splits, DEV)
                out = torch.empty_like(q)
                ms = timeit(lambda: paged_decode(q, k, v, bt, seq, layer.scale, out, num_splits=splits, workspace=ws))
                # the torch path: gather the slots, batched matmuls (TorchAttentionBackend._decode)
                slots = (bt.long()[:, :, None] * BS + torch.arange(BS, device=DEV)).view(b, -1)[:, :ctx]
                mask = torch.ones(b, 1, 1, ctx, dtype=torch.bool, device=DEV)
                fk, fv = k.view(-1, hk, D), v.view(-1, hk, D)
                ms_torch = timeit(lambda: backend._decode(layer, q, fk, fv, slots, mask))
                kv_bytes = b * ctx * hk * D * 2 * k.element_size()
                rows.append((shape, b, ctx, splits, ms * 1e3, kv_bytes / ms / 1e6, kv_bytes / ms / 1e6 / bw,
                             ms_torch * 1e3))
    return rows


def prefill_table() -> list:
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(2)
    for shape, (h, hk, _, _) in SHAPES.items():
        scale = D ** -0.5
        for b, ctx, n in ((1, 0, 512), (8, 0, 512), (1, 3584, 512)):
            k, v, bt = paged(b, ctx + n, hk, gen)
            qsl = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=DEV)
            seq = torch.full((b,), ctx + n, dtype=torch.int32, device=DEV)
            ctxs = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
            q = torch.randn(b * n, h, D, generator=gen, device=DEV, dtype=DT)
            out = torch.empty_like(q)
            ms = timeit(lambda: paged_prefill(q, k, v, bt, qsl, seq, ctxs, scale, out=out, max_query_len=n))
            # torch SDPA on contiguous K/V (what flash attention does with no paging), batched
            qs = q.view(b, n, h, D).transpose(1, 2)
            ks = torch.randn(b, hk, ctx + n, D, generator=gen, device=DEV, dtype=DT)
            vs = torch.randn_like(ks)
            if ctx == 0:
                sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)  # noqa: E731
            else:
                mask = (torch.arange(ctx + n, device=DEV)[None, :] <= torch.arange(ctx, ctx + n, device=DEV)[:, None])
                sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)  # noqa: E731
            ms_sdpa = timeit(sdpa)
            # causal FLOPs: QK^T and PV over the visible keys
            flops = 4 * b * h * D * sum(ctx + i + 1 for i in range(n))
            rows.append((shape, b, ctx, n, ms * 1e3, flops / ms / 1e9, ms_sdpa * 1e3))
    return rows


def small_kernels_table() -> list:
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(3)
    _, hk, hidden, inter = SHAPES["1.5B"]
    for t in (1, 64, 512, 4096):
        k, v, _ = paged(1, 8192, hk, gen)
        kn = torch.randn(t, hk, D, generator=gen, device=DEV, dtype=DT)
        slots = torch.randperm(8192, generator=gen, device=DEV)[:t]
        fk, fv = k.view(-1, hk, D), v.view(-1, hk, D)
        rows.append(("write_kv", t, timeit(lambda: write_kv(kn, kn, k, v, slots)) * 1e3,
                     timeit(lambda: (fk.index_copy_(0, slots, kn), fv.index_copy_(0, slots, kn))) * 1e3))
        x = torch.randn(t, hidden, generator=gen, device=DEV, dtype=DT)
        r = torch.randn_like(x)
        w = torch.randn(hidden, generator=gen, device=DEV, dtype=DT)
        rows.append(("fused_add_rms_norm", t, timeit(lambda: fused_add_rms_norm(x, r, w, 1e-6)) * 1e3,
                     timeit(lambda: fused_add_rms_norm_ref(x, r, w, 1e-6)) * 1e3))
        g = torch.randn(t, 2 * inter, generator=gen, device=DEV, dtype=DT)
        rows.append(("silu_and_mul", t, timeit(lambda: silu_and_mul(g)) * 1e3,
                     timeit(lambda: silu_and_mul_ref(g)) * 1e3))
        rope = RotaryEmbedding(D, 8192, 10000.0).to(DEV)
        pos = torch.randint(0, 8192, (t,), generator=gen, device=DEV)
        qr = torch.randn(t, SHAPES["1.5B"][0], D, generator=gen, device=DEV, dtype=DT)
        kr = torch.randn(t, hk, D, generator=gen, device=DEV, dtype=DT)
        rows.append(("rotary (q and k)", t, timeit(lambda: rotary(pos, qr, kr, rope.cos, rope.sin)) * 1e3,
                     timeit(lambda: rotary_ref(pos, qr, kr, rope.cos, rope.sin)) * 1e3))
    return rows


def sweep() -> None:
    gen = torch.Generator(device=DEV).manual_seed(4)
    h, hk = SHAPES["7B"][:2]
    print("\nprefill sweep, 7B shape, 8 x 512 fresh tokens (us):")
    k, v, bt = paged(8, 512, hk, gen)
    qsl = torch.arange(0, 9 * 512, 512, dtype=torch.int32, device=DEV)
    seq = torch.full((8,), 512, dtype=torch.int32, device=DEV)
    ctxs = torch.zeros(8, dtype=torch.int32, device=DEV)
    q = torch.randn(8 * 512, h, D, generator=gen, device=DEV, dtype=DT)
    out = torch.empty_like(q)
    for bm, bn, warps, stages in ((64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3),
                                  (64, 32, 4, 3), (128, 64, 8, 3), (64, 128, 8, 2)):
        try:
            ms = timeit(lambda: paged_prefill(q, k, v, bt, qsl, seq, ctxs, D ** -0.5, out=out, max_query_len=512,
                                              block_m=bm, block_n=bn, num_warps=warps, num_stages=stages))
            print(f"  block_m {bm:>3} block_n {bn:>3} warps {warps} stages {stages}: {ms * 1e3:8.1f}")
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for this tile
            print(f"  block_m {bm:>3} block_n {bn:>3} warps {warps} stages {stages}: {type(e).__name__}")
    print("decode sweep, 7B shape, B=32, context 4096 (us):")
    k, v, bt = paged(32, 4096, hk, gen)
    seq = torch.full((32,), 4096, dtype=torch.int32, device=DEV)
    q = torch.randn(32, h, D, generator=gen, device=DEV, dtype=DT)
    out = torch.empty_like(q)
    for bn in (16, 32, 64, 128):
        for warps in (2, 4, 8):
            for splits in (1, 2, 4, 8):
                ms = timeit(lambda: paged_decode(q, k, v, bt, seq, D ** -0.5, out, num_splits=splits, block_n=bn,
                                                 num_warps=warps))
                print(f"  block_n {bn:>3} warps {warps} splits {splits}: {ms * 1e3:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention_kernels.py needs a CUDA device")
    import triton

    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"\n{'correctness (bf16)':<40} {'max abs err':>12} {'tol':>6}")
    rows = correctness()
    for name, e, tol, verdict in rows:
        print(f"{name:<40} {e:>12.2e} {tol:>6g}  {verdict}")
    bw = copy_bandwidth()
    print(f"\ncopy bandwidth (device to device, read + write): {bw:.0f} GB/s")
    print("\ndecode, one layer (us; KV GB/s = K+V bytes read / time; torch = gather + matmul path)")
    print(f"{'shape':>5} {'B':>3} {'ctx':>5} {'splits':>6} {'triton us':>10} {'KV GB/s':>8} {'of copy':>8} "
          f"{'torch us':>9} {'speedup':>8}")
    for shape, b, ctx, s, us, gbs, frac, us_t in decode_table(bw):
        print(f"{shape:>5} {b:>3} {ctx:>5} {s:>6} {us:>10.1f} {gbs:>8.0f} {frac:>8.0%} {us_t:>9.1f} {us_t / us:>7.1f}x")
    print("\nprefill, one layer (us; TFLOP/s of the causal part; sdpa = torch on contiguous K/V)")
    print(f"{'shape':>5} {'B':>3} {'prefix':>6} {'new':>4} {'triton us':>10} {'TFLOP/s':>8} {'sdpa us':>8} {'vs sdpa':>8}")
    for shape, b, ctx, n, us, tf, us_s in prefill_table():
        print(f"{shape:>5} {b:>3} {ctx:>6} {n:>4} {us:>10.1f} {tf:>8.1f} {us_s:>8.1f} {us_s / us:>7.2f}x")
    print("\nsmall kernels, 1.5B shape (us; torch = the reference ops)")
    print(f"{'kernel':<20} {'T':>5} {'triton us':>10} {'torch us':>9}")
    for name, t, us, us_t in small_kernels_table():
        print(f"{name:<20} {t:>5} {us:>10.1f} {us_t:>9.1f}")
    if a.sweep:
        sweep()
    if any(r[3] == "FAIL" for r in rows):
        sys.exit("correctness FAILED")


if __name__ == "__main__":
    main()

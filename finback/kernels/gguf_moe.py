"""Routed-expert matmuls that read GGUF blocks where they lie: llama.cpp's stacked expert tensors
(ffn_{gate,up,down}_exps, [E, N, K] of any GGUF type: IQ1_S, IQ2_XXS, Q2_K ...) are multiplied by the
rows routed to each expert, and no expert is ever dequantized in memory.

`gguf_moe_matmul(a, data, qtype, k, align, a_row_div, out, row_weights)`: for every routed row r (a
(token, slot) pair) out[r] = a[r // a_row_div] @ W[e(r)]^T (times row_weights[r]), with W the expert
e(r) of `data` (uint8 [E, N, K/QK*block_bytes], rows of an expert may be a strided view: a
rank's slice). `align` is `finback.kernels.fused_moe.moe_align(topk_ids, E, block_m)`: rows sorted by
expert and padded so that every block of block_m rows has one expert, computed on the device (no host
sync, so a decode step with it can be captured in a CUDA graph). One program takes one such block
and one tile of N: it decodes the expert's [BN, BK] weight tile in registers with the GGUF kernels'
`_tile` (finback/kernels/gguf.py: every type they take), and feeds it to tl.dot with the gathered
rows of `a`, fp32 accumulation. It is the prefill kernel: at decode 15 of a block's 16 rows are
padding and each busy program walks all of K alone (1-5% of the copy bandwidth on an H100).

`gguf_moe_gemv(a, data, qtype, k, topk_ids, a_row_div, out, row_weights)` is the decode kernel (up
to GEMV_MAX_ROWS routed rows): no alignment, a program per (row, BN columns) that reads its row's
expert id on the device and runs the dense GGUF GEMV's CUDA-core loop (word loads: gguf.py's
`_w_parts` for IQ1_S, Q2_K, Q4_K, Q6_K, Q8_0 and `_iq2xxs_parts` here for IQ2_XXS, the 671B's down
projections; `_tile` for the rest) on that expert's rows, fp32 FMA accumulators summed after the K
loop. Gate and up (same type and shape) go in one launch. Expert ids are not range-checked on the
device (the router's are valid; the reference checks).

`gguf_experts_ref(x, gate, up, down, topk_weights, topk_ids)` is the whole routed SwiGLU on the torch
path (dequantize each routed expert's blocks when a token needs it, float32 matmul), the CPU path and
the reference; `gguf_experts(...)` is the same on the kernels. `gguf_moe_matmul_ref` is the one-matmul
reference the kernel test compares with.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from finback.kernels import HAS_TRITON, interpreting
from finback.kernels.fused_moe import MoEAlignment, moe_align
from finback.kernels.gguf import _GROUPS, _PARTS, KERNEL_TYPES, _check, _table, gguf_matmul_ref

__all__ = ["GEMV_MAX_ROWS", "gguf_experts", "gguf_experts_ref", "gguf_moe_gemv", "gguf_moe_matmul",
           "gguf_moe_matmul_ref"]

# types the GEMV reads as words: gguf.py's `_PARTS` and IQ2_XXS (`_iq2xxs_parts`, here)
_GEMV_PARTS = {**_PARTS, T.IQ2_XXS: (False, 32, 4, 2, 4)}
# routed rows (tokens x top_k) up to which gguf_experts takes the GEMV: on the H100 sweep (one R1 MoE layer,
# bench/deepseek_gguf.py --kernels) it beat the expert-grouped MMA kernel at every size tried, 1 to 64 tokens
# (512 rows: 14.3 ms against 19.9)
GEMV_MAX_ROWS = 512
SORT_MIN_TOKENS = 4  # from this many tokens the GEMV visits rows in expert order (an expert's rows together)


def _check_stack(a: torch.Tensor, data: torch.Tensor, qtype, k: int, types=KERNEL_TYPES):
    if data.dim() != 3 or data.dtype != torch.uint8 or data.stride(-1) != 1:
        raise ValueError(f"expert blocks must be uint8 [E, N, bytes per row] with contiguous rows, got "
                         f"{data.dtype} {tuple(data.shape)}")
    if a.dim() != 2:
        raise ValueError(f"activations must be [rows, K], got shape {tuple(a.shape)}")
    return _check(a, data[0], qtype, k, None, types=types)


def gguf_moe_matmul_ref(a: torch.Tensor, data: torch.Tensor, qtype, k: int, topk_ids: torch.Tensor,
                        a_row_div: int, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[T*top_k, N] in a's dtype: row r = a[r // a_row_div] @ dequantize(W[topk_ids.flat[r]])^T in float32
    (times row_weights[r]); only the experts that rows route to are dequantized."""
    from finback.loader.quants import SUPPORTED_TYPES

    qt, n = _check_stack(a, data, qtype, k, SUPPORTED_TYPES)
    ids = topk_ids.reshape(-1).long()
    out = torch.zeros(ids.numel(), n, dtype=torch.float32, device=a.device)
    for e in torch.unique(ids).tolist():
        if not 0 <= e < data.shape[0]:
            raise ValueError(f"expert id {e} outside [0, {data.shape[0]})")
        rows = (ids == e).nonzero().flatten()
        out[rows] = gguf_matmul_ref(a[rows // a_row_div].float(), data[e], qt, k)
    if row_weights is not None:
        out *= row_weights.reshape(-1, 1).float()
    return out.to(a.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from finback.kernels.gguf import _IQ2_XXS, _fma_parts, _tile, _w_parts

    @triton.jit
    def _gguf_moe_kernel(a_ptr, w_ptr, h_ptr, t_ptr, c_ptr, rw_ptr, sorted_ids_ptr, expert_ids_ptr, post_pad_ptr,
                         N, K, num_valid, a_row_div, stride_am, stride_we, stride_wn, stride_cm,
                         QT: tl.constexpr, GS: tl.constexpr, HAS_MIN: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                         WIDEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         PREC: tl.constexpr):
        pid = tl.program_id(0)
        grid_n = tl.cdiv(N, BN)
        pm = pid // grid_n
        pn = pid % grid_n
        if pm * BM >= tl.load(post_pad_ptr):
            return
        expert = tl.load(expert_ids_ptr + pm).to(tl.int64)
        rows = tl.load(sorted_ids_ptr + pm * BM + tl.arange(0, BM))
        row_ok = rows < num_valid
        a_rows = a_ptr + (rows // a_row_div).to(tl.int64)[:, None] * stride_am
        rn = pn * BN + tl.arange(0, BN)
        nmask = rn < N
        row_off = expert * stride_we + rn.to(tl.int64) * stride_wn
        NG: tl.constexpr = BK // GS
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            g = k0 // GS + tl.arange(0, NG)
            q, sc, mn = _tile(w_ptr, h_ptr, t_ptr, row_off, nmask, g, g < K // GS, QT, GS)
            if HAS_MIN:
                w = q * sc[:, :, None] - mn[:, :, None]
            else:
                w = q * sc[:, :, None]
            kk = k0 + tl.arange(0, BK)
            x = tl.load(a_rows + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
            if WIDEN:  # the interpreter's tl.dot mishandles 16-bit tiles
                x = x.to(tl.float32)
            acc = tl.dot(x, tl.trans(tl.reshape(w.to(x.dtype), (BN, BK))), acc, input_precision=PREC)
        if MUL_WEIGHT:
            acc = acc * tl.load(rw_ptr + rows, mask=row_ok, other=0.0)[:, None]
        cs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + rn[None, :]
        tl.store(cs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & nmask[None, :])

    @triton.jit
    def _iq2xxs_parts(h_ptr, t_ptr, row_off, k0, k_hi, BK: tl.constexpr):
        """IQ2_XXS in `_w_parts`'s form (units of one 32-value group, (G, A, B) = (4, 2, 4)), read as int16
        words (a 66-byte block starts at 2 mod 4 every other block): d | per group j, at 2 + 8j, 4 grid
        indices (a byte per 8-value row r) and a uint32 aux (row r's 7 sign bits at 7r, their parity
        the 8th; scale s at 28): w = d * (0.5 + s) / 4 * grid[idx_r][k] * (-1 if sign bit k).
        t_ptr: the packed grid as int32 (a row is 8 unsigned bytes in two words)."""
        U: tl.constexpr = BK // 32
        gu = tl.minimum(k0 // 32 + tl.arange(0, U), k_hi // 32 - 1)  # the groups, clamped to K
        j = gu % 8
        hw = (row_off[:, None] + ((gu // 8) * 66)[None, :]) // 2  # [BN, U] the block's fp16 d
        at = hw + 1 + 4 * j[None, :]
        idx = (tl.load(h_ptr + at).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) \
            | (tl.load(h_ptr + at + 1).to(tl.int16, bitcast=True).to(tl.int32) << 16)
        aux = (tl.load(h_ptr + at + 2).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) \
            | (tl.load(h_ptr + at + 3).to(tl.int16, bitcast=True).to(tl.int32) << 16)
        sc = (tl.load(h_ptr + hw).to(tl.float32) * (0.125 + 0.25 * ((aux >> 28) & 15).to(tl.float32)))[:, :, None]
        r = tl.arange(0, 4)
        row = (idx[:, :, None] >> (8 * r)[None, None, :]) & 255  # [BN, U, 4]
        s7 = (aux[:, :, None] >> (7 * r)[None, None, :]) & 127
        p = s7 ^ (s7 >> 4)
        p ^= p >> 2
        p ^= p >> 1
        s8 = s7 | ((p & 1) << 7)
        t2 = tl.arange(0, 2)
        gw = tl.load(t_ptr + 2 * row[:, :, :, None] + t2[None, None, None, :])  # [BN, U, 4, 2]
        b4 = tl.arange(0, 4)
        u = (gw[:, :, :, :, None] >> (8 * b4)[None, None, None, None, :]) & 255  # [BN, U, 4, 2, 4]
        # sign bit k = 4a + b of the row moved to the float's sign bit
        neg = (s8[:, :, :, None, None] << (31 - 4 * t2[:, None] - b4[None, :])[None, None, None, :, :]) \
            & -2147483648
        q = ((u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0).to(tl.int32, bitcast=True) ^ neg
        q = q.to(tl.float32, bitcast=True)
        kidx = ((32 * tl.arange(0, U))[:, None, None, None] + (8 * r)[None, :, None, None]
                + (4 * t2)[None, None, :, None] + b4[None, None, None, :])
        return q, sc, sc, kidx

    @triton.jit
    def _gguf_moe_gemv_kernel(a_ptr, w_ptr, h_ptr, w32_ptr, w2_ptr, h2_ptr, w322_ptr, t_ptr, c_ptr, rw_ptr,
                              ids_ptr, order_ptr, N, K, a_row_div, stride_am, stride_we, stride_wn, stride_cm,
                              QT: tl.constexpr, GS: tl.constexpr, HAS_MIN: tl.constexpr, FAST: tl.constexpr,
                              UNIT: tl.constexpr, G: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                              TWO: tl.constexpr, ORDER: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                              BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
        """Program (n tile [+ N * stack], p): routed row r = order[p] (or p), its expert read here on the
        device; BN output columns of row r over the whole K, as gguf.py's `_gemv_kernel` with M = 1."""
        n_tiles = tl.cdiv(N, BN)
        pid = tl.program_id(0)
        part = pid // n_tiles  # 1: the second stack (up), written N columns further
        r = tl.program_id(1)
        if ORDER:
            r = tl.load(order_ptr + r)
        if TWO:
            second = part == 1
            w_ptr = tl.where(second, w2_ptr, w_ptr)
            h_ptr = tl.where(second, h2_ptr, h_ptr)
            w32_ptr = tl.where(second, w322_ptr, w32_ptr)
        expert = tl.load(ids_ptr + r).to(tl.int64)
        rn = (pid % n_tiles) * BN + tl.arange(0, BN)
        row_off = expert * stride_we + tl.minimum(rn, N - 1).to(tl.int64) * stride_wn  # rows past N: not stored
        x_ptr = a_ptr + (r // a_row_div).to(tl.int64) * stride_am
        if FAST:
            acc = tl.zeros((G, B, BN, BK // UNIT, A), dtype=tl.float32)  # q's axes permuted as below
            for k0 in range(0, K, BK):
                if QT == _IQ2_XXS:
                    q, sc, mn, kidx = _iq2xxs_parts(h_ptr, t_ptr, row_off, k0, K, BK)
                else:
                    q, sc, mn, kidx = _w_parts(w_ptr, h_ptr, w32_ptr, t_ptr, row_off, k0, K, QT, BK, UNIT, G, A, B)
                acc = _fma_parts(acc, q, sc, mn, kidx, x_ptr, k0, K, QT, EVEN_K)
            out = tl.sum(tl.sum(tl.sum(tl.sum(acc, axis=4), axis=3), axis=1), axis=0)
        else:
            acc = tl.zeros((BN, BK // GS, GS), dtype=tl.float32)
            for k0 in range(0, K, BK):
                g = k0 // GS + tl.arange(0, BK // GS)
                gmask = g < K // GS
                q, sc, mn = _tile(w_ptr, h_ptr, t_ptr, row_off, rn >= 0, g, gmask, QT, GS)
                if HAS_MIN:
                    w = q * sc[:, :, None] - mn[:, :, None]
                else:
                    w = q * sc[:, :, None]
                kx = (g * GS)[:, None] + tl.arange(0, GS)[None, :]
                if EVEN_K:
                    xv = tl.load(x_ptr + kx).to(tl.float32)
                else:
                    xv = tl.load(x_ptr + kx, mask=gmask[:, None], other=0.0).to(tl.float32)
                acc += w * xv[None, :, :]
            out = tl.sum(tl.sum(acc, axis=2), axis=1)
        if MUL_WEIGHT:
            out = out * tl.load(rw_ptr + r)
        tl.store(c_ptr + r.to(tl.int64) * stride_cm + part * N + rn, out.to(c_ptr.dtype.element_ty), mask=rn < N)


def gguf_moe_matmul(a: torch.Tensor, data: torch.Tensor, qtype, k: int, align: MoEAlignment, a_row_div: int,
                    out: torch.Tensor, row_weights: torch.Tensor | None = None, *, block_n: int = 64,
                    block_k: int = 32, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """The kernel (see the module docstring). out: [T*top_k, N] with contiguous rows (a column slice of
    a wider buffer is fine); row_weights: [T*top_k] float32 or None. The block size is align's (the
    sorted rows per block: len(sorted_ids) // len(expert_ids))."""
    if not HAS_TRITON:
        raise RuntimeError("the GGUF expert kernel needs triton (use gguf_moe_matmul_ref on CPU)")
    if a.dim() == 2 and a.stride(1) != 1:
        a = a.contiguous()
    qt, n = _check_stack(a, data, qtype, k)
    rows = out.shape[0]
    if out.dim() != 2 or out.shape[1] != n or out.stride(1) != 1:
        raise ValueError(f"out must be [rows, {n}] with contiguous rows, got {tuple(out.shape)}")
    if block_k % 32 or block_k & (block_k - 1) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError("block_k must be a power of two >= 32 and block_n a power of two >= 16")
    block_m = align.sorted_ids.numel() // max(1, align.expert_ids.numel())
    if rows == 0 or n == 0:
        return out
    gs, has_min = _GROUPS[qt]
    rw = row_weights.reshape(-1).float().contiguous() if row_weights is not None else out
    grid = (align.expert_ids.numel() * triton.cdiv(n, block_n),)
    _gguf_moe_kernel[grid](
        a, data, data.view(torch.float16), _table(qt, data), out, rw,
        align.sorted_ids, align.expert_ids, align.num_tokens_post_padded,
        n, k, rows, a_row_div, a.stride(0), data.stride(0), data.stride(1), out.stride(0),
        QT=int(qt), GS=gs, HAS_MIN=has_min, MUL_WEIGHT=row_weights is not None,
        WIDEN=interpreting() and a.dtype != torch.float32, BM=block_m, BN=block_n, BK=block_k,
        PREC="ieee" if a.dtype == torch.float32 or interpreting() else "tf32",  # float32: exact, not TF32
        num_warps=num_warps, num_stages=num_stages)
    return out


def gguf_moe_gemv(a: torch.Tensor, data, qtype, k: int, topk_ids: torch.Tensor, a_row_div: int, out: torch.Tensor,
                  row_weights: torch.Tensor | None = None, *, row_order: torch.Tensor | None = None,
                  block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                  num_stages: int = 2, word_loads: bool = True) -> torch.Tensor:
    """The routed-expert GEMV (decode): out[r] = a[r // a_row_div] @ W[topk_ids.flat[r]]^T (times
    row_weights[r]) for every routed row r, W an expert of `data` (uint8 [E, N, bytes]; rows and experts
    may be strided views), with no alignment step and no host sync.

    One program per (BN columns, row): it loads its row's expert id on the device, then runs gguf.py's
    CUDA-core GEMV over the whole K (word loads: `_w_parts` for IQ1_S, Q2_K, Q4_K, Q6_K, Q8_0 where rows
    and expert strides allow, `_iq2xxs_parts` for IQ2_XXS; `_tile` otherwise, or with word_loads=False):
    one fp32 FMA accumulator per weight, summed once after the K loop. Ids must lie in [0, E): the
    kernel cannot check them without a host sync (the router's ids always do; `gguf_moe_matmul_ref`
    checks).

    data may be a pair of stacks of one type, shape and strides (gate and up): one launch computes both,
    the second into out[:, N:2N]. out: [rows, N * stacks] with contiguous rows (a column slice of a
    wider buffer is fine); row_weights: [rows] or None. row_order: an int permutation of the rows,
    the order programs take them in (sorted by expert, an expert's rows run together and its blocks
    come from L2 after the first). Defaults: block_n 4 below N = 4096 columns, 8 from it (the dense
    GEMV's H100 sweep), block_k 512 (word loads) or 256 (`_tile`), and 32 weights a thread per K step
    (4 x 512 on 2 warps, 8 x 512 on 4): at 1.6-2 bits a weight these loops are bound by instructions
    (~13 a weight on sm_90 for IQ1_S and IQ2_XXS), and these shapes keep to 128 registers (16 warps an
    SM) where 8 x 512 on 2 warps takes 170-230."""
    if not HAS_TRITON:
        raise RuntimeError("the GGUF expert kernels need triton (use gguf_moe_matmul_ref on CPU)")
    stacks = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    if not 1 <= len(stacks) <= 2:
        raise ValueError(f"data must be one expert stack or a pair of them, got {len(stacks)}")
    if a.dim() == 2 and a.stride(1) != 1:
        a = a.contiguous()
    qt, n = _check_stack(a, stacks[0], qtype, k)
    for st in stacks[1:]:
        _check_stack(a, st, qt, k)
        if st.shape != stacks[0].shape or st.stride() != stacks[0].stride():
            raise ValueError(f"paired expert stacks must have one shape and strides, got {tuple(stacks[0].shape)} "
                             f"{stacks[0].stride()} and {tuple(st.shape)} {st.stride()}")
    for st in stacks:
        if st.data_ptr() % 2 or st.stride(0) % 2 or st.stride(1) % 2:
            raise ValueError("expert blocks must start at even byte offsets (whole blocks of a stack)")
    ids = topk_ids.reshape(-1)
    if ids.dtype not in (torch.int32, torch.int64) or ids.device != a.device:
        raise ValueError(f"topk_ids must be int32 or int64 on {a.device}, got {ids.dtype} on {ids.device}")
    rows = ids.numel()
    if a_row_div < 1 or a.shape[0] * a_row_div != rows:
        raise ValueError(f"{rows} routed rows need {rows} / a_row_div = {rows} / {a_row_div} rows of a, "
                         f"got {a.shape[0]}")
    width = n * len(stacks)
    if out.dim() != 2 or tuple(out.shape) != (rows, width) or out.stride(1) != 1 or not out.is_floating_point() \
            or out.device != a.device:
        raise ValueError(f"out must be a float [{rows}, {width}] tensor on {a.device} with contiguous rows, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}")
    if row_weights is not None and (row_weights.numel() != rows or row_weights.device != a.device):
        raise ValueError(f"row_weights must hold {rows} values on {a.device}, got {tuple(row_weights.shape)} on "
                         f"{row_weights.device}")
    if row_order is not None and (row_order.numel() != rows or row_order.device != a.device
                                  or row_order.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"row_order must be {rows} int32/int64 row numbers on {a.device}, got {row_order.dtype} "
                         f"{tuple(row_order.shape)} on {row_order.device}")
    if rows > 65535:
        raise ValueError(f"gguf_moe_gemv takes at most 65535 routed rows, got {rows} (use gguf_moe_matmul)")
    gs, has_min = _GROUPS[qt]
    words, unit, g, a_, b = _GEMV_PARTS.get(qt, (False, 32, 1, 1, 1))
    aligned = all(st.data_ptr() % 4 == 0 and st.stride(0) % 4 == 0 and st.stride(1) % 4 == 0
                  and st.shape[2] % 4 == 0 for st in stacks)
    fast = word_loads and qt in _GEMV_PARTS and (not words or aligned)
    # default from the H100 sweep (bench/deepseek_gguf.py --kernels; IQ1_S gate/up + IQ2_XXS down at 1-64
    # tokens): 16 x 256 on 4 warps was best or within 6% of it at every token count
    block_n, block_k = block_n or 16, block_k or 256
    num_warps = num_warps or 4
    if block_k < 32 or block_k & (block_k - 1) or block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_k must be a power of two >= 32 and block_n a power of two, got {block_n}, {block_k}")
    fast = fast and block_k % unit == 0
    if rows == 0 or n == 0:
        return out
    if fast and qt in (T.IQ1_S, T.IQ2_XXS):
        from finback.loader import iq_grids

        table = iq_grids.packed_grid(qt, a.device).view(torch.int32)
    else:
        table = _table(qt, stacks[0])
    views = [(st, st.view(torch.float16), st.view(torch.int32) if fast and words else st) for st in stacks]
    rw = row_weights.reshape(-1).float().contiguous() if row_weights is not None else out
    grid = (triton.cdiv(n, block_n) * len(stacks), rows)
    _gguf_moe_gemv_kernel[grid](
        a, *views[0], *views[-1], table, out, rw, ids.contiguous(),
        row_order.reshape(-1).contiguous() if row_order is not None else ids,
        n, k, a_row_div, a.stride(0), stacks[0].stride(0), stacks[0].stride(1), out.stride(0),
        QT=int(qt), GS=gs, HAS_MIN=has_min, FAST=fast, UNIT=unit, G=g, A=a_, B=b, TWO=len(stacks) == 2,
        ORDER=row_order is not None, MUL_WEIGHT=row_weights is not None, BN=block_n, BK=block_k,
        EVEN_K=k % block_k == 0, num_warps=num_warps, num_stages=num_stages)
    return out


def gguf_experts_ref(x: torch.Tensor, gate, up, down, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                     ) -> torch.Tensor:
    """x [T, H]; gate, up [E, I, H] and down [E, H, I] as (blocks uint8 [E, rows, bytes], qtype) pairs;
    -> [T, H] = sum over slots of weight * down[e] @ (silu(gate[e] @ x) * (up[e] @ x)), in x's dtype."""
    t, kk = topk_ids.shape
    g = gguf_moe_matmul_ref(x, gate[0], gate[1], x.shape[1], topk_ids, kk).float()
    u = gguf_moe_matmul_ref(x, up[0], up[1], x.shape[1], topk_ids, kk).float()
    h = (torch.nn.functional.silu(g) * u).to(x.dtype)
    y = gguf_moe_matmul_ref(h, down[0], down[1], h.shape[1], topk_ids, 1, topk_weights).float()
    return y.view(t, kk, -1).sum(1).to(x.dtype)


def gguf_experts(x: torch.Tensor, gate, up, down, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 block_m: int | None = None, gemv: bool | None = None, **kernel_args) -> torch.Tensor:
    """gguf_experts_ref on the kernels: gate and up into one [T*k, 2I] buffer, SiLU-and-mul, down with
    the routing weights, a sum over the k slots. No host sync. Up to GEMV_MAX_ROWS routed rows (or
    gemv=True): `gguf_moe_gemv` (gate and up in one launch when their stacks match; from
    SORT_MIN_TOKENS tokens the rows are visited in expert order); more (or gemv=False): one
    `moe_align` (blocks of block_m rows) and the expert-grouped `gguf_moe_matmul`. kernel_args go to
    the kernel taken (block_n, block_k, num_warps, num_stages)."""
    from finback.layers.activation import silu_and_mul

    t, kk = topk_ids.shape
    h_dim = x.shape[1]
    i_dim = gate[0].shape[1]
    inter = torch.empty(t * kk, 2 * i_dim, dtype=x.dtype, device=x.device)
    partial = torch.empty(t * kk, h_dim, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).float()
    if gemv if gemv is not None else t * kk <= GEMV_MAX_ROWS:
        ids = topk_ids.reshape(-1)
        order = torch.sort(ids, stable=True).indices if t >= SORT_MIN_TOKENS else None
        if gate[1] == up[1] and gate[0].shape == up[0].shape and gate[0].stride() == up[0].stride():
            gguf_moe_gemv(x, (gate[0], up[0]), gate[1], h_dim, ids, kk, inter, row_order=order, **kernel_args)
        else:
            gguf_moe_gemv(x, gate[0], gate[1], h_dim, ids, kk, inter[:, :i_dim], row_order=order, **kernel_args)
            gguf_moe_gemv(x, up[0], up[1], h_dim, ids, kk, inter[:, i_dim:], row_order=order, **kernel_args)
        h = silu_and_mul(inter)
        gguf_moe_gemv(h, down[0], down[1], i_dim, ids, 1, partial, weights, row_order=order, **kernel_args)
    else:
        if block_m is None:
            block_m = 16 if t * kk <= 16 * gate[0].shape[0] else 32
        align = moe_align(topk_ids, gate[0].shape[0], block_m)
        gguf_moe_matmul(x, gate[0], gate[1], h_dim, align, kk, inter[:, :i_dim], **kernel_args)
        gguf_moe_matmul(x, up[0], up[1], h_dim, align, kk, inter[:, i_dim:], **kernel_args)
        h = silu_and_mul(inter)
        gguf_moe_matmul(h, down[0], down[1], i_dim, align, 1, partial, weights, **kernel_args)
    return partial.view(t, kk, h_dim).sum(1, dtype=torch.float32).to(x.dtype)

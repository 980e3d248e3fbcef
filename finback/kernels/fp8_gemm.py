"""Block-FP8 linear layers as DeepSeek-V3 ships them: weights e4m3 with one fp32 scale per 128x128 block.

A checkpoint's FP8 weight is `weight [N, K] float8_e4m3fn` plus `weight_scale_inv [ceil(N/128),
ceil(K/128)] fp32`; the real weight is `fp8 * scale` of its 128x128 block. Two ways to multiply by it:

- `fp8_block_gemm(x, w, s)` (Hopper/Ada, FP8 tensor cores): the activations are quantized per token
  per 128-channel group to e4m3 (`act_quant_fp8`), then one Triton kernel runs `tl.dot` on the fp8
  operands, 128 channels of K at a time, and applies both scales to each 128-deep partial product
  before adding it to the fp32 accumulator (so the fp8 tensor-core accumulation never spans more than
  one block, which is what keeps it accurate). Out: bf16.
- `fp8_block_dequant(w, s)` -> bf16 weight, for GPUs without FP8 and for CPU; then a plain matmul.

Activation scales are powers of two: the smallest 2^k with amax / 2^k <= 448 (e4m3's largest
value). Dividing by a power of two is exact, so the kernel and its torch reference agree bit for bit,
and a float format loses no relative precision from the scale not being amax/448 exactly. The kernel
rounds to the e4m3 grid itself (round to nearest even, in fp32) before converting, so the conversion
is exact whatever rounding the target's fp8 conversion does.

The torch references (`*_ref`) are the CPU path and what the tests compare the kernels with.
"""

from __future__ import annotations

import torch

from finback.kernels import HAS_TRITON

__all__ = [
    "FP8_BLOCK",
    "FP8_MAX",
    "act_quant_fp8",
    "act_quant_fp8_ref",
    "fp8_block_dequant",
    "fp8_block_dequant_ref",
    "fp8_block_gemm",
    "fp8_block_gemm_ref",
    "fp8_block_linear",
    "supports_fp8_dot",
]

FP8_BLOCK = 128
FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def supports_fp8_dot(device: torch.device | str) -> bool:
    """Whether Triton can run `tl.dot` on e4m3 operands there (CUDA compute capability >= 8.9)."""
    device = torch.device(device)
    return HAS_TRITON and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# ----------------------------------------------------------------------------- torch references

def _pow2_scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """k such that 2^k is the smallest power of two with amax / 2^k <= 448 (0 where amax is 0)."""
    mant, exp = torch.frexp(amax)                       # amax = mant * 2^exp, mant in [0.5, 1)
    k = exp - 9 + (mant > 0.875).to(exp.dtype)          # 448 = 0.875 * 2^9
    k = k.clamp(min=-126)
    return torch.where(amax == 0, torch.zeros_like(k), k)


def act_quant_fp8_ref(x: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, K/group]) with power-of-two scales per group."""
    _check_act(x, group)
    m, k = x.shape
    xg = x.float().view(m, k // group, group)
    amax = xg.abs().amax(-1)
    scale = torch.ldexp(torch.ones_like(amax), _pow2_scale_exponent(amax))
    q = (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, k), scale


def fp8_block_dequant_ref(w: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK,
                          dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w [..., N, K] e4m3 and scale [..., ceil(N/block), ceil(K/block)] -> w * scale in `dtype`."""
    _check_weight(w, scale, block)
    n, k = w.shape[-2:]
    s = scale.float().repeat_interleave(block, -2)[..., :n, :].repeat_interleave(block, -1)[..., :k]
    return (w.float() * s).to(dtype)


def fp8_block_gemm_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What `fp8_block_gemm` computes: quantize x as the kernel does, dequantize both, matmul in fp32, bf16 out."""
    xq, xs = act_quant_fp8_ref(x.reshape(-1, x.shape[-1]))
    xd = (xq.float().view(xq.shape[0], -1, FP8_BLOCK) * xs[..., None]).view(xq.shape)
    out = xd @ fp8_block_dequant_ref(w, scale, dtype=torch.float32).t()
    return out.to(torch.bfloat16).view(*x.shape[:-1], w.shape[0])


def _check_act(x: torch.Tensor, group: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"activations must be [M, K], got shape {tuple(x.shape)}")
    if x.shape[1] % group:
        raise ValueError(f"K={x.shape[1]} must be a multiple of the quantization group {group}")
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"activations must be float32/float16/bfloat16, got {x.dtype}")


def _check_weight(w: torch.Tensor, scale: torch.Tensor, block: int) -> None:
    if w.dtype != FP8_DTYPE:
        raise ValueError(f"block-FP8 weight must be float8_e4m3fn, got {w.dtype}")
    n, k = w.shape[-2:]
    want = (*w.shape[:-2], -(-n // block), -(-k // block))
    if tuple(scale.shape) != want:
        raise ValueError(f"weight {tuple(w.shape)} needs scales of shape {want}, got {tuple(scale.shape)}")


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _round_to_e4m3(y):
        """Round fp32 y (already within +-448) to the nearest e4m3 value (ties to even), in fp32."""
        biased = (y.to(tl.int32, bitcast=True) >> 23) & 0xFF
        step_exp = tl.maximum(biased, 127 - 6) - 3           # e4m3: 3 mantissa bits, subnormal below 2^-6
        step = (step_exp << 23).to(tl.float32, bitcast=True)
        inv_step = ((254 - step_exp) << 23).to(tl.float32, bitcast=True)
        q = y * inv_step                                     # exact: |q| < 16
        q = tl.abs((q + 12582912.0) - 12582912.0) * step     # 1.5 * 2^23: round to an integer, ties to even
        # keep y's sign, zeros included (-0.0 as a conversion gives it): OR the sign bit into |q|
        # (a select of -q and q lets the compiler drop the sign of a zero, as seen on sm_90)
        sign = y.to(tl.int32, bitcast=True) & -2147483648
        return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _quant_group(x):
        """One group of values (fp32) -> (values on the e4m3 grid as fp32, scale) with a power-of-two scale."""
        amax = tl.max(tl.abs(x), axis=0)
        bits = amax.to(tl.int32, bitcast=True)
        k = ((bits >> 23) & 0xFF) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        k = tl.maximum(k, -126)
        k = tl.where(amax == 0, 0, k)
        scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
        y = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
        return _round_to_e4m3(y), scale

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, stride_xm, stride_qm, GROUP: tl.constexpr):
        m = tl.program_id(0)
        g = tl.program_id(1)
        offs = g * GROUP + tl.arange(0, GROUP)
        x = tl.load(x_ptr + m * stride_xm + offs).to(tl.float32)
        y, scale = _quant_group(x)
        tl.store(q_ptr + m * stride_qm + offs, y.to(q_ptr.dtype.element_ty))
        tl.store(s_ptr + m * tl.num_programs(1) + g, scale)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wb, stride_sb, stride_ob,
                        BLOCK: tl.constexpr):
        pb = tl.program_id(0).to(tl.int64)                 # a stack of experts passes 2^31 elements
        pn = tl.program_id(1)
        pk = tl.program_id(2)
        offs_n = pn * BLOCK + tl.arange(0, BLOCK)
        offs_k = pk * BLOCK + tl.arange(0, BLOCK)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = tl.load(w_ptr + pb * stride_wb + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        s = tl.load(s_ptr + pb * stride_sb + pn * tl.num_programs(2) + pk)
        tl.store(out_ptr + pb * stride_ob + offs_n[:, None] * K + offs_k[None, :],
                 (w.to(tl.float32) * s).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * grid_n)                    # grouped order: neighbours share B tiles in L2
        first_m = group * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pm = first_m + (pid % (GROUP_M * grid_n)) % size_m
        pn = (pid % (GROUP_M * grid_n)) // size_m
        offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        k_blocks = K // BLOCK_K
        a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
        b_ptrs = b_ptr + offs_n[None, :] * K + offs_k[:, None]
        as_ptrs = as_ptr + offs_m * k_blocks
        bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * k_blocks
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(k_blocks):
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
            sa = tl.load(as_ptrs + kb, mask=mask_m, other=0.0)
            sb = tl.load(bs_ptrs + kb, mask=mask_n, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


def _need_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use the *_ref torch functions")


def act_quant_fp8(x: torch.Tensor, group: int = FP8_BLOCK, out: torch.Tensor | None = None,
                  scale_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `act_quant_fp8_ref` (bit-identical). x [M, K] with unit stride on K."""
    _need_triton()
    _check_act(x, group)
    if x.stride(1) != 1:
        raise ValueError("activations need a contiguous last dimension")
    m, k = x.shape
    q = out if out is not None else torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = scale_out if scale_out is not None else torch.empty(m, k // group, dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(m, k // group)](x, q, s, x.stride(0), q.stride(0), GROUP=group)
    return q, s


def fp8_block_dequant(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `fp8_block_dequant_ref`: w [..., N, K] e4m3 -> `dtype` (leading dims are batches)."""
    _need_triton()
    _check_weight(w, scale, FP8_BLOCK)
    n, k = w.shape[-2:]
    w3 = w.reshape(-1, n, k).contiguous()
    s3 = scale.reshape(-1, *scale.shape[-2:]).contiguous().float()
    o = out if out is not None else torch.empty(w.shape, dtype=dtype, device=w.device)
    o3 = o.view(-1, n, k)
    if w3.numel():
        grid = (w3.shape[0], s3.shape[1], s3.shape[2])
        _dequant_kernel[grid](w3, s3, o3, n, k, w3.stride(0), s3.stride(0), o3.stride(0), BLOCK=FP8_BLOCK)
    return o


def fp8_block_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None,
                   block_m: int | None = None, block_n: int = 128, num_warps: int = 4,
                   num_stages: int = 3) -> torch.Tensor:
    """y = x @ dequant(w, scale).T with FP8 tensor cores: x [..., K] (bf16/fp16/fp32) -> bf16 [..., N]."""
    _need_triton()
    _check_weight(w, scale, FP8_BLOCK)
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} channels, the weight expects K={k}")
    if block_n not in (16, 32, 64, 128):
        raise ValueError("block_n must divide 128 (16, 32, 64 or 128): one weight scale per column")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    xq, xs = act_quant_fp8(x2)
    c = out if out is not None else torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if block_m is None:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if m:
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
        _fp8_gemm_kernel[grid](xq, xs, w.contiguous(), scale.float().contiguous(), c, m, n, k,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=FP8_BLOCK, GROUP_M=8,
                               num_warps=num_warps, num_stages=num_stages)
    return c.view(*x.shape[:-1], n)


def fp8_block_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer entry point: FP8 tensor cores where there are some, else dequantize and matmul in x's dtype."""
    if supports_fp8_dot(x.device):
        y = fp8_block_gemm(x, w, scale).to(x.dtype)
    else:
        wd = (fp8_block_dequant if HAS_TRITON and x.is_cuda else fp8_block_dequant_ref)(w, scale, dtype=x.dtype)
        y = x @ wd.t()
    return y if bias is None else y + bias

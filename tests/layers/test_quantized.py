"""4-bit GGUF weights on CPU: the groups equal the dequantized tensor, the int4 kernel equals its
torch reference, and a layer loaded 4-bit computes what the dense layer computes."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from finback.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from finback.layers.quantized import Int4Tensor, int4_matmul, int4_reference, kernel_available, pack
from finback.loader.quants import dequantize, int4_groups

pytestmark = pytest.mark.skipif(not kernel_available(), reason="torch has no int4 CPU kernel")


def random_blocks(qtype, n, k, seed):
    """Random valid blocks: random bytes with small finite fp16 scales."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    scales = (rng.standard_normal((raw.shape[0], 2)) * 0.01).astype(np.float16).view(np.uint8)
    raw[:, :4] = scales.reshape(-1, 4)
    return torch.from_numpy(raw.reshape(-1).copy())


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_groups_equal_dequantize(qtype):
    n, k = 48, 512
    data = random_blocks(qtype, n, k, seed=int(qtype))
    t = Int4Tensor(*int4_groups(data, qtype, (n, k)))
    assert t.q.max() <= 15 and t.q.dtype == torch.uint8
    ref = dequantize(data, qtype, (n, k))
    torch.testing.assert_close(t.dequantize(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [1, 3, 16])
def test_kernel_matches_reference(m):
    torch.manual_seed(m)
    n, k = 64, 256
    t = Int4Tensor(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, k // 32) * 0.02,
                   torch.randn(n, k // 32) * 0.01)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    out = torch.full((m, n), float("nan"))
    out.copy_(int4_matmul(x, *pack(t), n).float())
    ref = int4_reference(x, t)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_layers_loaded_4bit_match_dense():
    torch.manual_seed(0)
    hidden, inter = 256, 512
    parts = [Int4Tensor(*int4_groups(random_blocks(T.Q4_K, inter, hidden, s), T.Q4_K, (inter, hidden)))
             for s in (1, 2)]
    down = Int4Tensor(*int4_groups(random_blocks(T.Q4_1, hidden, inter, 3), T.Q4_1, (hidden, inter)))
    layers = []
    for four_bit in (False, True):
        gu = MergedColumnParallelLinear(hidden, [inter, inter], params_dtype=torch.bfloat16)
        dn = RowParallelLinear(inter, hidden, params_dtype=torch.bfloat16)
        for i, p in enumerate(parts):
            gu.weight_loader(gu.weight, p if four_bit else p.dequantize(), i)
        dn.weight_loader(dn.weight, down if four_bit else down.dequantize())
        if four_bit:
            assert gu.finalize_int4() and dn.finalize_int4()
            assert gu.weight.numel() == 0  # the dense copy is gone
        layers.append((gu, dn))
    x = torch.randn(5, hidden, dtype=torch.bfloat16)
    (gu0, dn0), (gu1, dn1) = layers
    h = torch.randn(5, inter, dtype=torch.bfloat16)
    for a, b in ((gu1(x), gu0(x)), (dn1(h), dn0(h))):
        # bf16 rounding differs (dense rounds w, the kernel rounds scale and zero): compare to scale
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err < 1e-2, err


def test_mixed_parts_stay_dense():
    gu = MergedColumnParallelLinear(256, [64, 64], params_dtype=torch.bfloat16)
    t = Int4Tensor(*int4_groups(random_blocks(T.Q4_0, 64, 256, 4), T.Q4_0, (64, 256)))
    gu.weight_loader(gu.weight, t, 0)
    gu.weight_loader(gu.weight, torch.randn(64, 256), 1)  # a part in another type (Q6_K in Q4_K_M)
    assert not gu.finalize_int4() and gu.int4 is None and gu.weight.shape == (128, 256)


def test_embedded_model_runs_4bit(smollm2_path):
    """The default CPU mode (bf16) keeps SmolLM2's Q4_1 weights 4-bit and still answers right."""
    from finback import LLM, SamplingParams
    from finback.layers.linear import _Linear

    llm = LLM(smollm2_path, kv_cache_space_gb=0.1)
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, _Linear)]
    assert linears and all(m.int4 is not None for m in linears)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text
    assert "Paris" in out

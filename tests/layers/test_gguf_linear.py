"""GGUF weights kept as blocks: GGUFWeight slicing, gguf_matmul's CPU path, linear layers whose parts
are blocks of different types, and a tiny Llama GGUF of mixed types that gives the same greedy tokens
with its linear weights kept as blocks (forced on CPU) as when dequantized at load."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fbtest import runner_greedy
from gguf import GGMLQuantizationType as T

from finback.layers.gguf_linear import GGUFWeight, gguf_matmul
from finback.layers.linear import QKVParallelLinear, RowParallelLinear
from finback.loader.quantize import quantize
from finback.loader.random_blocks import random_blocks
from finback.runtime.parallel import ParallelGroup


def _weight(qtype, n, k, seed=0) -> GGUFWeight:
    rng = np.random.default_rng(seed)
    q = quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    return GGUFWeight(torch.from_numpy(q.reshape(-1)), qtype, (n, k))


def test_slicing_matches_the_dequantized_tensor():
    w = _weight(T.Q6_K, 24, 768)
    dense = w.dequantize()
    assert torch.equal(w.narrow(0, 5, 7).dequantize(), dense[5:12])
    cols = w.narrow(1, 256, 512)
    assert cols.data.stride(0) == w.data.shape[1]  # a view, not a copy
    assert torch.equal(cols.dequantize(), dense[:, 256:768])
    index = torch.randperm(24)
    assert torch.equal(w.permute_rows(index).dequantize(), dense[index])
    with pytest.raises(ValueError, match="only on blocks of 256"):
        w.narrow(1, 128, 256)
    with pytest.raises(ValueError, match="needs 15120 bytes, got 15119"):
        GGUFWeight(w.data.reshape(-1)[:-1], T.Q6_K, (24, 768))
    with pytest.raises(ValueError, match="not whole blocks"):
        GGUFWeight(w.data, T.Q6_K, (24, 700))


def test_gguf_matmul_cpu_path():
    w = _weight(T.Q4_K, 32, 512, seed=1)
    x = torch.randn(2, 3, 512)
    ref = x @ w.dequantize().T
    torch.testing.assert_close(gguf_matmul(x, w), ref, rtol=1e-5, atol=1e-5)
    out = torch.full((2, 3, 32), float("nan"))
    assert gguf_matmul(x, w, out=out) is out
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="takes 512"):
        gguf_matmul(torch.randn(2, 256), w)


def test_qkv_parts_of_different_types():
    """Q4_K_M's layout: q and k Q4_K, v Q6_K; each part stays in its own type."""
    layer = QKVParallelLinear(256, 32, 4, 2, bias=True, params_dtype=torch.float32)
    parts = {"q": _weight(T.Q4_K, 128, 256, 1), "k": _weight(T.Q4_K, 64, 256, 2), "v": _weight(T.Q6_K, 64, 256, 3)}
    bias = torch.randn(256)
    for shard, w in parts.items():
        layer.weight_loader(layer.weight, w, shard)
    layer.weight_loader(layer.bias, bias[:128], "q")
    layer.weight_loader(layer.bias, bias[128:192], "k")
    layer.weight_loader(layer.bias, bias[192:], "v")
    assert [(s, w.qtype) for s, w in layer.gguf_parts] == [(0, T.Q4_K), (128, T.Q4_K), (192, T.Q6_K)]
    assert layer.weight.numel() == 0  # no dense copy
    dense = torch.cat([parts[s].dequantize() for s in "qkv"])
    x = torch.randn(5, 256)
    torch.testing.assert_close(layer(x), F.linear(x, dense, bias), rtol=1e-5, atol=1e-4)


def test_a_dense_part_keeps_the_layer_dense():
    layer = QKVParallelLinear(256, 32, 4, 2, params_dtype=torch.float32)
    q, v = _weight(T.Q8_0, 128, 256, 4), _weight(T.Q5_K, 64, 256, 5)
    k = torch.randn(64, 256)
    layer.weight_loader(layer.weight, q, "q")
    layer.weight_loader(layer.weight, k, "k")
    layer.weight_loader(layer.weight, v, "v")
    assert not layer.gguf_parts
    torch.testing.assert_close(layer.weight.data, torch.cat([q.dequantize(), k, v.dequantize()]))


def test_row_parallel_takes_its_column_blocks():
    """Rank 1 of 2 loads the second half of the input features: whole Q4_K blocks of the rows."""
    layer = RowParallelLinear(512, 32, group=ParallelGroup(rank=1, world_size=2), params_dtype=torch.float32)
    w = _weight(T.Q4_K, 32, 512, 6)
    layer.weight_loader(layer.weight, w)
    assert len(layer.gguf_parts) == 1 and layer.gguf_parts[0][1].shape == (32, 256)
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer._matmul(x), x @ w.dequantize()[:, 256:].T, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ a mixed-type tiny Llama GGUF

_TYPES = [  # per layer: llama.cpp tensor -> type (K, legacy and IQ types mixed)
    {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q8_0", "ffn_gate": "Q5_K",
     "ffn_up": "Q4_0", "ffn_down": "Q6_K"},
    {"attn_q": "Q3_K", "attn_k": "Q2_K", "attn_v": "IQ4_XS", "attn_output": "Q5_0", "ffn_gate": "Q4_1",
     "ffn_up": "IQ2_XXS", "ffn_down": "Q4_K"},
]
_RANDOM = ("IQ4_XS", "IQ2_XXS")  # no quantizer here for IQ types: random blocks of the weight's spread


def _write_mixed_llama(model, path: str) -> str:
    """tests/fbtest.write_gguf with each 2-D tensor's type taken from _TYPES (IQ tensors are random
    blocks: the test compares two ways of computing with the same file, not with the model)."""
    from fbtest import write_gguf

    def type_of(gname: str) -> T:
        if gname.startswith("blk."):
            return T[_TYPES[int(gname.split(".")[1])][gname.split(".")[2]]]
        return T.Q8_0 if gname == "token_embd.weight" else T.Q6_K

    def encode(gname: str, arr: np.ndarray, qtype: T) -> np.ndarray:
        if qtype.name in _RANDOM:
            return random_blocks(qtype, arr.shape, torch.Generator().manual_seed(len(gname)), float(arr.std())).numpy()
        return quantize(arr, qtype)

    return write_gguf(model, path, type_of, encode=encode)


def test_mixed_llama_blocks_give_the_same_greedy_tokens(tmp_path):
    from fbtest import tiny_hf_model

    from finback.loader.checkpoint import open_checkpoint
    from finback.runtime.model_runner import ModelRunner

    model = tiny_hf_model("llama", seed=3)
    path = _write_mixed_llama(model, str(tmp_path / "mixed.gguf"))
    prompt = [5, 77, 300, 12, 901, 44, 7]
    results = {}
    for blocks in (False, True):
        with open_checkpoint(path) as ckpt:
            runner = ModelRunner(ckpt, torch.device("cpu"), torch.float32, gguf_blocks=blocks)
        runner.allocate_kv_cache(4, 16)
        layers = [runner.model.model.layers[i] for i in range(2)]
        qkv = layers[0].self_attn.qkv_proj
        if blocks:  # every linear weight is blocks, in its own type
            assert [w.qtype for _, w in qkv.gguf_parts] == [T.Q4_K, T.Q4_K, T.Q6_K]
            assert qkv.weight.numel() == 0
            types = {w.qtype for layer in layers for m in layer.modules() if hasattr(m, "gguf_parts")
                     for _, w in m.gguf_parts}
            assert types == {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
                             T.IQ4_XS, T.IQ2_XXS}
        else:
            assert not qkv.gguf_parts and qkv.weight.shape == (512, 256)
        results[blocks] = runner_greedy(runner, prompt, 12)
    assert results[True][0] == results[False][0]
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels)")
def test_mixed_llama_on_cuda_matches_cpu(tmp_path):
    """On CUDA the blocks stay on the GPU by default and the kernels compute: prefill logits of a
    3-token prompt (GEMV), a 7-token and a 40-token prompt (gguf_mma for Q4_K/Q6_K/Q8_0, fp32 "ieee"
    dots; GEMV / GEMM for the other types) match the CPU dequantized path."""
    from fbtest import tiny_hf_model

    from finback.loader.checkpoint import open_checkpoint
    from finback.runtime.model_runner import ModelRunner

    path = _write_mixed_llama(tiny_hf_model("llama", seed=3), str(tmp_path / "mixed.gguf"))
    runners = {}
    for device in ("cpu", "cuda"):
        with open_checkpoint(path) as ckpt:
            runners[device] = ModelRunner(ckpt, torch.device(device), torch.float32, enforce_eager=True)
        runners[device].allocate_kv_cache(8, 16)
    qkv = runners["cuda"].model.model.layers[0].self_attn.qkv_proj
    assert [w.device.type for _, w in qkv.gguf_parts] == ["cuda"] * 3 and qkv.weight.numel() == 0
    assert not runners["cpu"].model.model.layers[0].self_attn.qkv_proj.gguf_parts
    gen = torch.Generator().manual_seed(0)
    for n in (3, 7, 40):
        ids = torch.randint(3, 1024, (n,), generator=gen).tolist()
        logits = {d: r.model.compute_logits(r.hidden_states(ids, [0, 1, 2])).float().cpu() for d, r in runners.items()}
        scale = logits["cpu"].abs().max()
        torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=0, atol=2e-2 * float(scale))

"""Block FP8 (e4m3 weights with 128x128 `weight_scale_inv`, DeepSeek-V3's checkpoint format):
dequantization against an element-by-block loop, the quantizer's error bound, scale pairing, and a
safetensors checkpoint (a tiny Llama, so the reader is tested apart from DeepSeek) that loads the
dequantized weights or fails with a clear error."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from finback.loader.checkpoint import open_checkpoint
from finback.loader.errors import ModelLoadError
from finback.loader.fp8 import FP8PairError, dequantize_block_fp8, pair_scales, quantize_block_fp8, scale_shape
from finback.runtime.model_runner import load_model


def _naive(q: torch.Tensor, s: torch.Tensor, block) -> np.ndarray:
    w = q.float().numpy()
    out = np.empty_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] = w[i, j] * s[i // block[0], j // block[1]].item()
    return out


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((64, 96), (32, 64)), ((5, 7), (128, 128))])
def test_dequantize_matches_loop(shape, block):
    torch.manual_seed(0)
    q = (torch.randn(shape) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(scale_shape(shape, block)) + 0.01
    out = dequantize_block_fp8(q, s, block)
    assert out.dtype == torch.float32 and out.shape == shape
    np.testing.assert_array_equal(out.numpy(), _naive(q, s, block))
    torch.testing.assert_close(dequantize_block_fp8(q.view(torch.uint8), s, block), out, rtol=0, atol=0)
    assert dequantize_block_fp8(q, s, block, torch.bfloat16).dtype == torch.bfloat16


def test_quantize_error_bound():
    """Round to nearest e4m3 (3 mantissa bits): relative error <= 2^-4 for normal values, and at most
    half the subnormal spacing (2^-10 of the block scale) near zero."""
    torch.manual_seed(1)
    w = torch.randn(260, 300) * torch.logspace(-3, 1, 300)  # columns of very different magnitude
    q, s = quantize_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 3)
    back = dequantize_block_fp8(q, s)
    scale = s.repeat_interleave(128, 0)[:260].repeat_interleave(128, 1)[:, :300]
    assert bool(((back - w).abs() <= w.abs() * 2 ** -4 + scale * 2 ** -10 + 1e-12).all())


def test_bad_inputs():
    q = torch.zeros(256, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="needs \\(2, 2\\)"):
        dequantize_block_fp8(q, torch.ones(2, 3))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_block_fp8(torch.zeros(256, 256), torch.ones(2, 2))


def test_pair_scales():
    shapes = {"a.weight": (300, 200), "a.weight_scale_inv": (3, 2), "n.weight": (200,)}
    assert pair_scales(shapes, {"a.weight"}, (128, 128)) == {"a.weight": "a.weight_scale_inv"}
    cases = [
        ({"a.weight": (300, 200)}, {"a.weight"}, (128, 128), "has no 'a.weight_scale_inv'"),
        ({"a.weight": (300, 200), "a.weight_scale_inv": (2, 2)}, {"a.weight"}, (128, 128), "needs \\(3, 2\\)"),
        ({"a.weight": (300, 200), "a.weight_scale_inv": (3, 2)}, set(), (128, 128), "scales no FP8 tensor"),
        ({"a.weight": (300, 200), "a.weight_scale_inv": (3, 2)}, {"a.weight"}, None, "no quantization_config"),
        ({"a.weight": (2, 3, 4)}, {"a.weight"}, (128, 128), "2-D"),
    ]
    for shapes, fp8, block, problem in cases:
        with pytest.raises(FP8PairError, match=problem):
            pair_scales(shapes, fp8, block)


def _tiny_llama_fp8(folder, drop_scale=None, block=(64, 64)):
    """A 1-layer Llama with every linear weight FP8 in `block` blocks; returns the dequantized weights."""
    h, inter, vocab = 128, 192, 64
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": h, "intermediate_size": inter,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}}
    torch.manual_seed(2)
    shapes = {"q_proj": (h, h), "k_proj": (h // 2, h), "v_proj": (h // 2, h), "o_proj": (h, h),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, h), "lm_head.weight": torch.randn(vocab, h),
               "model.norm.weight": torch.ones(h), "model.layers.0.input_layernorm.weight": torch.ones(h),
               "model.layers.0.post_attention_layernorm.weight": torch.ones(h)}
    expected = {}
    for name, shape in shapes.items():
        full = f"model.layers.0.{'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{name}.weight"
        q, s = quantize_block_fp8(torch.randn(shape) * 0.1, block)
        tensors[full], tensors[full + "_scale_inv"] = q, s
        expected[full] = dequantize_block_fp8(q, s, block)
    if drop_scale:
        del tensors[drop_scale]
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"))
    return expected


def test_checkpoint_loads_dequantized(tmp_path):
    expected = _tiny_llama_fp8(tmp_path / "m")
    with open_checkpoint(str(tmp_path / "m")) as ckpt:
        assert ckpt.config.fp8_block_size == (64, 64)
        assert not any(e.name.endswith("_scale_inv") for e in ckpt.entries)
        model = load_model(ckpt, torch.device("cpu"), torch.float32)
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    torch.testing.assert_close(qkv[:128], expected["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(qkv[192:], expected["model.layers.0.self_attn.v_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight,
                               expected["model.layers.0.mlp.down_proj.weight"], rtol=0, atol=0)


def test_checkpoint_missing_scale(tmp_path):
    _tiny_llama_fp8(tmp_path / "m", drop_scale="model.layers.0.mlp.up_proj.weight_scale_inv")
    with pytest.raises(ModelLoadError, match="model.safetensors: FP8 tensor 'model.layers.0.mlp.up_proj.weight' "
                                             "has no"):
        open_checkpoint(str(tmp_path / "m"))


def test_checkpoint_wrong_block(tmp_path):
    """Scales made for 64x64 blocks under a config that says 128x128: the shapes disagree."""
    _tiny_llama_fp8(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [128, 128]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="_scale_inv' has shape"):
        open_checkpoint(str(tmp_path / "m"))

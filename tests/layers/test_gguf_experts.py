"""Routed experts kept as GGUF blocks: GGUFExperts slicing, FusedMoE holding GGUF stacks (alone, split
over ranks, mixed with a dense part) against the same weights loaded dense, and a tiny DeepSeek
(deepseek2) GGUF of mixed types (IQ1_S / IQ2_XXS / Q2_K experts, K-quant attention and shared
experts) that gives the same greedy tokens with its blocks kept (forced on CPU: the dequantize-per-call
path) as when dequantized at load."""

import numpy as np
import pytest
import torch
from fbtest import runner_greedy
from gguf import GGMLQuantizationType as T

from finback.layers.gguf_moe import GGUFExperts
from finback.layers.linear import ShapeMismatch
from finback.layers.moe import FusedMoE
from finback.loader.random_blocks import random_blocks
from finback.runtime.parallel import ParallelGroup


def _experts(qtype, e, n, k, seed) -> GGUFExperts:
    data = random_blocks(qtype, (e, n, k), torch.Generator().manual_seed(seed), scale=k ** -0.5)
    return GGUFExperts(data.reshape(-1), qtype, (e, n, k))


def _routing(t, e, k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    return torch.rand(t, k, generator=g), ids


def test_slicing_matches_the_dequantized_stack():
    w = _experts(T.Q2_K, 3, 8, 512, 0)
    dense = w.dequantize()
    assert dense.shape == (3, 8, 512)
    assert torch.equal(w.narrow(1, 2, 4).dequantize(), dense[:, 2:6])
    cols = w.narrow(2, 256, 256)
    assert cols.data.data_ptr() == w.data.data_ptr() + 84  # a view: one Q2_K block in
    assert torch.equal(cols.dequantize(), dense[:, :, 256:])
    assert torch.equal(w.narrow(0, 1, 1).dequantize(), dense[1:2])
    assert torch.equal(w.expert(2).dequantize(), dense[2])
    with pytest.raises(ValueError, match="only on blocks of 256"):
        w.narrow(2, 128, 256)
    with pytest.raises(ValueError, match="needs 4032 bytes, got 4031"):
        GGUFExperts(w.data.reshape(-1)[:-1], T.Q2_K, (3, 8, 512))
    with pytest.raises(ValueError, match="\\[E, N, K\\]"):
        GGUFExperts(w.data, T.Q2_K, (24, 512))


def _moe(group=None, e=6, h=256, i=512):
    return FusedMoE(e, h, i, group or ParallelGroup(), params_dtype=torch.float32)


@pytest.mark.parametrize("world", [1, 2])
def test_fused_moe_keeps_gguf_stacks(world):
    """IQ1_S gate, IQ2_XXS up, Q2_K down; with two ranks each holds half of I (down split on blocks)
    and the partial sums add up to the whole."""
    e, h, i = 6, 256, 512
    parts = {"gate": _experts(T.IQ1_S, e, i, h, 1), "up": _experts(T.IQ2_XXS, e, i, h, 2),
             "down": _experts(T.Q2_K, e, h, i, 3)}
    dense = _moe()
    for part, w in parts.items():
        dense.weight_loader(dense.w2 if part == "down" else dense.w13, w.dequantize(), (None, part))
    x = torch.randn(5, h, generator=torch.Generator().manual_seed(4))
    weights, ids = _routing(5, e, 2, 5)
    want = dense(x, weights, ids)
    got = torch.zeros_like(want)
    for r in range(world):
        moe = _moe(ParallelGroup(rank=r, world_size=world))
        for part, w in parts.items():
            moe.weight_loader(moe.w2 if part == "down" else moe.w13, w, (None, part))
        assert set(moe.gguf_experts) == {"gate", "up", "down"} and moe.w13.numel() == moe.w2.numel() == 0
        assert moe.gguf_experts["down"].shape == (e, h, i // world)
        got += moe(x, weights, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_dense_part_makes_the_experts_dense():
    e, h, i = 4, 256, 256
    gate, up, down = _experts(T.Q4_K, e, i, h, 6), _experts(T.IQ1_S, e, i, h, 7), _experts(T.Q6_K, e, h, i, 8)
    moe = _moe(e=e, h=h, i=i)
    moe.weight_loader(moe.w13, gate, (None, "gate"))
    moe.weight_loader(moe.w13, up.dequantize(), (None, "up"))  # e.g. an F16 tensor
    moe.weight_loader(moe.w2, down, (None, "down"))
    assert not moe.gguf_experts and moe.w13.shape == (e, 2 * i, h)
    torch.testing.assert_close(moe.w13.data, torch.cat([gate.dequantize(), up.dequantize()], 1))
    torch.testing.assert_close(moe.w2.data, down.dequantize())


def test_bad_stacks():
    moe = _moe(e=4, h=256, i=256)
    with pytest.raises(ShapeMismatch, match="checkpoint shape \\(5, 256, 256\\)"):
        moe.weight_loader(moe.w13, _experts(T.Q4_K, 5, 256, 256, 0), (None, "gate"))
    split = _moe(ParallelGroup(rank=1, world_size=2), e=2, h=256, i=256)  # down's halves: 128, not whole blocks
    with pytest.raises(ShapeMismatch, match="only on blocks of 256"):
        split.weight_loader(split.w2, _experts(T.Q4_K, 2, 256, 256, 0), (None, "down"))


# ---------------------------------------------------------------- a tiny deepseek2 GGUF

H, V, Q_LORA, KV_LORA, ROPE, NOPE, VH, HEADS, E, I = 256, 320, 256, 256, 64, 64, 128, 2, 8, 256
TYPES = {  # llama.cpp name (after blk.N.) -> type; Q8_0 kv_b halves are dequantized at load either way
    "attn_q_a": T.Q4_K, "attn_q_b": T.Q5_K, "attn_kv_a_mqa": T.Q6_K, "attn_k_b": T.Q8_0, "attn_v_b": T.Q8_0,
    "attn_output": T.Q4_K, "ffn_gate": T.Q3_K, "ffn_up": T.Q4_K, "ffn_down": T.Q6_K,
    "ffn_gate_exps": T.IQ1_S, "ffn_up_exps": T.IQ2_XXS, "ffn_down_exps": T.Q2_K,
    "ffn_gate_shexp": T.Q4_K, "ffn_up_shexp": T.IQ4_XS, "ffn_down_shexp": T.Q6_K,
}


def _write_tiny_deepseek2(path: str, types: dict | None = None) -> str:
    import gguf

    types = TYPES if types is None else types

    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_block_count(2)
    w.add_context_length(512)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(HEADS)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_leading_dense_block_count(1)
    w.add_q_lora_rank(Q_LORA)
    w.add_kv_lora_rank(KV_LORA)
    w.add_key_length(KV_LORA + ROPE)
    w.add_value_length(KV_LORA)
    w.add_key_length_mla(NOPE + ROPE)
    w.add_value_length_mla(VH)
    w.add_expert_feed_forward_length(I)
    w.add_expert_count(E)
    w.add_expert_used_count(2)
    w.add_expert_shared_count(1)
    w.add_expert_weights_scale(2.5)
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_group_count(2)
    w.add_expert_group_used_count(1)
    w.add_rope_dimension_count(ROPE)

    def blocks(name, qtype, *shape):
        data = random_blocks(qtype, shape, gen, scale=1.5 * shape[-1] ** -0.5).numpy()
        w.add_tensor(name, data.reshape(*shape[:-1], -1), raw_dtype=qtype)

    def vec(name, n, centre=1.0, spread=0.1):
        w.add_tensor(name, (centre + spread * rng.standard_normal(n)).astype(np.float32))

    blocks("token_embd.weight", T.Q4_K, V, H)
    for i in range(2):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", H)
        vec(p + "ffn_norm.weight", H)
        vec(p + "attn_q_a_norm.weight", Q_LORA)
        vec(p + "attn_kv_a_norm.weight", KV_LORA)
        blocks(p + "attn_q_a.weight", types["attn_q_a"], Q_LORA, H)
        blocks(p + "attn_q_b.weight", types["attn_q_b"], HEADS * (NOPE + ROPE), Q_LORA)
        blocks(p + "attn_kv_a_mqa.weight", types["attn_kv_a_mqa"], KV_LORA + ROPE, H)
        blocks(p + "attn_k_b.weight", types["attn_k_b"], HEADS, KV_LORA, NOPE)
        blocks(p + "attn_v_b.weight", types["attn_v_b"], HEADS, VH, KV_LORA)
        blocks(p + "attn_output.weight", types["attn_output"], H, HEADS * VH)
        if i == 0:
            blocks(p + "ffn_gate.weight", types["ffn_gate"], I, H)
            blocks(p + "ffn_up.weight", types["ffn_up"], I, H)
            blocks(p + "ffn_down.weight", types["ffn_down"], H, I)
            continue
        w.add_tensor(p + "ffn_gate_inp.weight", (rng.standard_normal((E, H)) * H ** -0.5).astype(np.float32))
        vec(p + "exp_probs_b.bias", E, 0.0, 1.0)
        blocks(p + "ffn_gate_exps.weight", types["ffn_gate_exps"], E, I, H)
        blocks(p + "ffn_up_exps.weight", types["ffn_up_exps"], E, I, H)
        blocks(p + "ffn_down_exps.weight", types["ffn_down_exps"], E, H, I)
        blocks(p + "ffn_gate_shexp.weight", types["ffn_gate_shexp"], I, H)
        blocks(p + "ffn_up_shexp.weight", types["ffn_up_shexp"], I, H)
        blocks(p + "ffn_down_shexp.weight", types["ffn_down_shexp"], H, I)
    vec("output_norm.weight", H)
    blocks("output.weight", T.Q6_K, V, H)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _cpu_runner(path: str, blocks: bool):
    """A float32 CPU runner of the GGUF at path (blocks kept, or dequantized at load) with a small KV cache."""
    from finback.loader.checkpoint import open_checkpoint
    from finback.runtime.model_runner import ModelRunner

    with open_checkpoint(path) as ckpt:
        runner = ModelRunner(ckpt, torch.device("cpu"), torch.float32, gguf_blocks=blocks)
    runner.allocate_kv_cache(4, 16)
    return runner


def test_tiny_deepseek2_blocks_give_the_same_greedy_tokens(tmp_path):
    path = _write_tiny_deepseek2(str(tmp_path / "ds2-mixed.gguf"))
    prompt = [5, 77, 300, 12, 201, 44, 7, 150, 9]
    results = {}
    for blocks in (False, True):
        runner = _cpu_runner(path, blocks)
        layers = runner.model.model.layers
        experts = layers[1].mlp.experts
        if blocks:  # routed experts, attention and shared experts as blocks, each in its own type
            assert {p: w.qtype for p, w in experts.gguf_experts.items()} == {
                "gate": T.IQ1_S, "up": T.IQ2_XXS, "down": T.Q2_K}
            assert experts.w13.numel() == 0 and experts.w2.numel() == 0
            assert experts.w13.is_meta and experts.w2.is_meta  # the dense stacks were never allocated
            attn = layers[1].self_attn
            for proj, name in ((attn.q_a_proj, "attn_q_a"), (attn.q_b_proj, "attn_q_b"),
                               (attn.kv_a_proj_with_mqa, "attn_kv_a_mqa"), (attn.o_proj, "attn_output"),
                               (layers[1].mlp.shared_experts.down_proj, "ffn_down_shexp")):
                assert [w.qtype for _, w in proj.gguf_parts] == [TYPES[name]], name
            assert [w.qtype for _, w in layers[1].mlp.shared_experts.gate_up_proj.gguf_parts] == [T.Q4_K, T.IQ4_XS]
        else:
            assert not experts.gguf_experts and experts.w13.shape == (E, 2 * I, H)
        results[blocks] = runner_greedy(runner, prompt, 8)
    assert results[True][0] == results[False][0]
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-4)
    assert results[False][1].std() > 0.1  # logits that say something


def test_dense_experts_in_a_gguf_get_real_stacks(tmp_path):
    """Experts stored F16 in a GGUF: the stacks the block path builds on meta become real at load, and
    the model gives the same tokens as the dense load."""
    types = dict(TYPES, ffn_gate_exps=T.F16, ffn_up_exps=T.F16, ffn_down_exps=T.F16)
    path = _write_tiny_deepseek2(str(tmp_path / "ds2-f16-experts.gguf"), types)
    prompt = [5, 77, 300, 12, 201, 44, 7, 150, 9]
    results = {}
    for blocks in (False, True):
        runner = _cpu_runner(path, blocks)
        experts = runner.model.model.layers[1].mlp.experts
        assert not experts.gguf_experts and not experts.w13.is_meta and experts.w13.shape == (E, 2 * I, H)
        results[blocks] = runner_greedy(runner, prompt, 6)
    assert results[True][0] == results[False][0]
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels)")
def test_tiny_deepseek2_on_cuda_matches_cpu(tmp_path):
    """On CUDA the blocks stay on the GPU and the kernels compute (GGUF GEMV/GEMM for the projections,
    the expert-grouped kernel for the routed experts): logits of a 9-token prompt (decode-sized) and a
    40-token prompt match the CPU path's."""
    from finback.loader.checkpoint import open_checkpoint
    from finback.runtime.model_runner import ModelRunner

    path = _write_tiny_deepseek2(str(tmp_path / "ds2-mixed.gguf"))
    g = torch.Generator().manual_seed(1)
    for n in (9, 40):
        prompt = torch.randint(3, V, (n,), generator=g).tolist()
        logits = {}
        for dev in ("cpu", "cuda"):
            with open_checkpoint(path) as ckpt:
                runner = ModelRunner(ckpt, torch.device(dev), torch.float32, enforce_eager=True)
            runner.allocate_kv_cache(4, 16)
            if dev == "cuda":
                assert runner.model.model.layers[1].mlp.experts.gguf_experts["gate"].device.type == "cuda"
            hidden = runner.hidden_states(prompt, list(range(-(-n // 16))))
            logits[dev] = runner.model.compute_logits(hidden).float().cpu()
        scale = logits["cpu"].abs().max().item()
        torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=2e-2, atol=2e-2 * scale)

"""DeepSeek-V3 architecture (MLA, grouped-top-k MoE, YaRN, FP8 blocks, GGUF deepseek2) against
transformers' DeepseekV3ForCausalLM on the same random weights: a tiny model with the real head sizes
(qk_nope 128, qk_rope 64, v 128, kv_lora 512), 32 experts in 4 groups (2 used), first layer dense.

Greedy output equals the reference token for token through the engine alone, batched with chunked
prefill, with a prefix-cache hit and under preemption; block-FP8 safetensors and GGUF (new split
attn_k_b/attn_v_b files in Q8_0, split in two shards; old attn_kv_b files in F16) load and give the
logits of the weights they hold."""

import copy
import json
import os
import random

import numpy as np
import pytest
import torch
from fbtest import (
    assert_greedy_matches,
    greedy_reference,
    tiny_deepseek_v3,
    tiny_deepseek_v3_config,
)

from finback import LLM, SamplingParams
from finback.layers.mla import mla_decode_ref
from finback.layers.moe import fused_moe_ref, grouped_topk
from finback.loader.checkpoint import open_checkpoint
from finback.loader.config import ModelConfig
from finback.loader.errors import ModelLoadError
from finback.loader.fp8 import quantize_block_fp8
from finback.models.deepseek_v3 import R1_CONFIG
from finback.models.registry import build_model
from finback.runtime.model_runner import ModelRunner, kv_bytes_per_token

VOCAB = tiny_deepseek_v3_config()["vocab_size"]
N_NEW = 12
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_deepseek_v3()
    folder = str(tmp_path_factory.mktemp("dsv3") / "st")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.fixture(scope="module")
def steady(tmp_path_factory):
    """For the quantized checkpoints: a smaller spread, and routing biases wide enough that the
    quantization noise does not flip expert choices (a flip changes a token's output discretely, and
    the tiny model above flips on noise as small as F16's), so the logits error is the weights'."""
    model = tiny_deepseek_v3(seed=1, spread=0.5, bias_spread=2.0)
    folder = str(tmp_path_factory.mktemp("dsv3") / "steady")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _prompts(seed, lengths):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def _engine(path, **kw):
    kw.setdefault("kv_cache_space_gb", 0.05)
    return LLM(str(path), dtype="float32", skip_tokenizer_init=True, **kw).engine


def _run(engine, prompts, stagger=1):
    """Requests arrive one every `stagger` steps; returns {index: RequestOutput}."""
    greedy = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    done, step, pending = {}, 0, list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending and step % stagger == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, greedy)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
        step += 1
    return done


def _compare(model, prompts, done, label):
    for i, p in enumerate(prompts):
        assert_greedy_matches(done[i].outputs[0].token_ids, greedy_reference(model, p, N_NEW), f"{label} {i}")


def test_greedy_alone(tiny):
    model, folder = tiny
    prompts = _prompts(1, [90])  # past the original 64 positions: YaRN's interpolated dimensions matter
    _compare(model, prompts, _run(_engine(folder), prompts), "alone")


def test_greedy_batched_chunked(tiny):
    """Different lengths arriving at different steps, prefill in chunks of 24 tokens beside decodes
    (chunks over a cached prefix take the expand-the-latent path, decodes the absorbed path)."""
    model, folder = tiny
    prompts = _prompts(2, [1, 5, 30, 70])
    _compare(model, prompts, _run(_engine(folder, max_num_batched_tokens=24), prompts, stagger=2), "batched")


def test_prefix_cache_hit(tiny):
    model, folder = tiny
    shared = _prompts(3, [40])[0]
    prompts = [shared + [7, 8, 9], shared + [11, 12]]
    engine = _engine(folder)
    first = _run(engine, prompts[:1])
    second = _run(engine, prompts[1:])
    assert second[0].metrics.num_cached_tokens >= 32  # two full blocks of the shared prefix
    _compare(model, prompts, {0: first[0], 1: second[0]}, "prefix")


def test_preemption(tiny):
    """6 blocks of 16 tokens for 3 sequences of 30 prompt tokens that grow to 3 blocks each: some
    are preempted and recomputed; the output does not change."""
    model, folder = tiny
    prompts = _prompts(4, [30, 30, 30])
    done = _run(_engine(folder, num_kv_blocks=6, max_num_seqs=3), prompts)
    assert sum(done[i].metrics.num_preemptions for i in done) > 0
    _compare(model, prompts, done, "preempted")


# ---------------------------------------------------------------- logits of one prompt through the runner

def _logits(path, ids, dtype=torch.float32):
    with open_checkpoint(path) as ckpt:
        runner = ModelRunner(ckpt, torch.device("cpu"), dtype)
    runner.allocate_kv_cache(8, 16)
    hidden = runner.hidden_states(ids, list(range(8)))
    return runner.model.compute_logits(hidden).float(), runner.model


@torch.no_grad()
def _reference_logits(model, ids):
    return model(torch.tensor([ids])).logits[0].float()


def _with_weights(model, state: dict):
    """A copy of `model` with the parameters and buffers named in `state` replaced."""
    ref = copy.deepcopy(model)
    own = ref.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.reshape(own[name].shape))
    return ref


def test_logits_match_fp32(tiny):
    model, folder = tiny
    ids = _prompts(5, [50])[0]
    ours, _ = _logits(folder, ids)
    err = (ours - _reference_logits(model, ids)).abs().max().item()
    assert err < 1e-3, err


def test_logits_bf16(steady):
    """The default dtype: bf16 compute (router in float32) against transformers in bf16 and fp32
    (measured max |diff| vs fp32: 0.024 for both, on logits of std 0.49)."""
    model, folder = steady
    ids = _prompts(5, [50])[0]
    ours, _ = _logits(folder, ids, torch.bfloat16)
    ref32 = _reference_logits(model, ids)
    ref16 = _reference_logits(copy.deepcopy(model).to(torch.bfloat16), ids)
    assert (ours - ref16).abs().max().item() < 0.02
    assert (ours - ref32).abs().max().item() < 0.05


def test_mtp_layer_loads_into_side_module(tiny, tmp_path):
    """The checkpoint's multi-token-prediction layer (index num_hidden_layers) lands in `mtp`; a
    checkpoint without it (the fixture's) loads too, with an empty `mtp`."""
    from safetensors.torch import load_file, save_file

    model, folder = tiny
    out = tmp_path / "mtp"
    out.mkdir()
    state = load_file(os.path.join(folder, "model.safetensors"))
    n = model.config.num_hidden_layers
    torch.manual_seed(7)
    mtp = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): torch.randn_like(v)
           for k, v in state.items() if k.startswith(f"model.layers.{n - 1}.")}
    h = model.config.hidden_size
    mtp.update({f"model.layers.{n}.{k}": torch.randn(*s) for k, s in [
        ("embed_tokens.weight", (VOCAB, h)), ("enorm.weight", (h,)), ("hnorm.weight", (h,)),
        ("eh_proj.weight", (h, 2 * h)), ("shared_head.norm.weight", (h,)), ("shared_head.head.weight", (VOCAB, h))]})
    save_file({**state, **mtp}, str(out / "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        (out / "config.json").write_text(f.read())
    ids = _prompts(6, [20])[0]
    with_mtp, m1 = _logits(str(out), ids)
    without, m0 = _logits(folder, ids)
    assert len(m1.mtp) == 1 and len(m0.mtp) == 0
    assert torch.equal(m1.mtp[0].eh_proj.weight, mtp[f"model.layers.{n}.eh_proj.weight"])
    assert torch.equal(m1.mtp[0].mlp.experts.w2[3], mtp[f"model.layers.{n}.mlp.experts.3.down_proj.weight"])
    assert torch.equal(with_mtp, without)  # the side module takes no part in forward


# ---------------------------------------------------------------- block FP8

def _dequant_numpy(q: torch.Tensor, scale: torch.Tensor, block=128) -> torch.Tensor:
    """fp8 * scale of its block, element by block with numpy (independent of finback's code)."""
    w = q.float().numpy()
    s = scale.numpy()
    out = np.empty_like(w)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            out[bi * block:(bi + 1) * block, bj * block:(bj + 1) * block] = \
                w[bi * block:(bi + 1) * block, bj * block:(bj + 1) * block] * s[bi, bj]
    return torch.from_numpy(out)


def test_fp8_block_checkpoint(steady, tmp_path):
    """Every linear weight FP8 with 128x128 scales (DeepSeek's layout; embeddings, norms, router and
    LM head stay float): finback's logits equal transformers' on the dequantized weights (measured
    max |diff| 1e-6), and differ from the fp32 model's by e4m3's error (3 mantissa bits: measured
    max |diff| 0.69 on logits of std 0.49, 16x Q8_0's below, as 4 fewer bits give)."""
    from safetensors.torch import load_file, save_file

    model, folder = steady
    state = load_file(os.path.join(folder, "model.safetensors"))
    fp8, dequant = {}, {}
    for name, w in state.items():
        if w.dim() == 2 and "proj" in name:
            q, s = quantize_block_fp8(w)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            dequant[name] = _dequant_numpy(q, s)
        else:
            fp8[name] = w
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(fp8, str(out / "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(cfg))

    experts = {}
    for name, w in dequant.items():
        m = name.split(".mlp.experts.")
        if len(m) == 2:  # transformers keeps experts stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            e, part = m[1].split(".")[:2]
            experts.setdefault(m[0], {}).setdefault(part, {})[int(e)] = w
    ref_state = {k: v for k, v in dequant.items() if ".mlp.experts." not in k}
    for prefix, parts in experts.items():
        n = len(parts["down_proj"])
        ref_state[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate_proj"][e], parts["up_proj"][e]]) for e in range(n)])
        ref_state[f"{prefix}.mlp.experts.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])
    reference = _with_weights(model, ref_state)

    ids = _prompts(8, [50])[0]
    ours, _ = _logits(str(out), ids)
    exact = (ours - _reference_logits(reference, ids)).abs().max().item()
    vs_fp32 = (ours - _reference_logits(model, ids)).abs().max().item()
    assert exact < 1e-4, exact
    assert vs_fp32 < 1.0, vs_fp32


# ---------------------------------------------------------------- GGUF deepseek2

# transformers' name (after "model.layers.N.") -> llama.cpp's (after "blk.N."), as its converter writes them
_GGUF_OF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight", "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight", "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def _gguf_tensors(model, split_kv_b: bool) -> dict[str, np.ndarray]:
    """llama.cpp's names and layouts (stacked experts; kv_b split per head into attn_k_b
    [H, kv_lora, nope] and attn_v_b [H, v, kv_lora], or whole in legacy files), from transformers'
    state dict (numpy, not finback's code)."""
    cfg = model.config
    h, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
    out = {}
    for name, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        if name in _GGUF_GLOBAL:
            out[_GGUF_GLOBAL[name]] = arr
            continue
        _, _, i, rest = name.split(".", 3)
        if rest == "mlp.experts.gate_up_proj":
            half = arr.shape[1] // 2
            out[f"blk.{i}.ffn_gate_exps.weight"], out[f"blk.{i}.ffn_up_exps.weight"] = arr[:, :half], arr[:, half:]
        elif rest == "self_attn.kv_b_proj.weight" and split_kv_b:
            kv_b = arr.reshape(h, -1, arr.shape[-1])
            out[f"blk.{i}.attn_k_b.weight"] = kv_b[:, :nope].transpose(0, 2, 1)
            out[f"blk.{i}.attn_v_b.weight"] = kv_b[:, nope:]
        elif rest == "self_attn.kv_b_proj.weight":
            out[f"blk.{i}.attn_kv_b.weight"] = arr
        else:
            out[f"blk.{i}.{_GGUF_OF[rest]}"] = arr
    return out


def _write_deepseek2_gguf(model, path, qtype_name, split_kv_b=True, split_max_tensors=0):
    import gguf

    from finback.loader.quantize import quantize

    cfg = model.config
    rope = cfg.rope_parameters
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(path, "deepseek2", split_max_tensors=split_max_tensors)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    if split_kv_b:  # newer converter: MQA over the latent, per-head sizes in *_mla
        w.add_head_count_kv(1)
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
    else:
        w.add_head_count_kv(cfg.num_attention_heads)
        w.add_key_length(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    for name, arr in _gguf_tensors(model, split_kv_b).items():
        if arr.ndim == 1 or name.endswith("ffn_gate_inp.weight"):  # norms, bias, router: F32 as llama.cpp keeps them
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            flat = np.ascontiguousarray(arr.reshape(-1, arr.shape[-1]), dtype=np.float32)
            q = quantize(flat, qtype)
            w.add_tensor(name, q.reshape(*arr.shape[:-1], q.shape[-1]), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_reference(model, paths):
    """transformers holding what the GGUF files hold, dequantized by gguf-py."""
    import gguf

    cfg = model.config
    h, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    held = {}
    for p in paths:
        for t in gguf.GGUFReader(p).tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            held[t.name] = torch.from_numpy(np.array(
                gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
    state = {}
    for name in model.state_dict():
        if name in _GGUF_GLOBAL:
            state[name] = held[_GGUF_GLOBAL[name]]
            continue
        _, _, i, rest = name.split(".", 3)
        if rest == "mlp.experts.gate_up_proj":
            state[name] = torch.cat([held[f"blk.{i}.ffn_gate_exps.weight"], held[f"blk.{i}.ffn_up_exps.weight"]], 1)
        elif rest == "self_attn.kv_b_proj.weight" and f"blk.{i}.attn_k_b.weight" in held:
            k_b, v_b = held[f"blk.{i}.attn_k_b.weight"], held[f"blk.{i}.attn_v_b.weight"]
            state[name] = torch.cat([k_b.transpose(1, 2), v_b], 1).reshape(h * (nope + v), -1)
        elif rest == "self_attn.kv_b_proj.weight":
            state[name] = held[f"blk.{i}.attn_kv_b.weight"]
        else:
            state[name] = held[f"blk.{i}.{_GGUF_OF[rest]}"]
    return _with_weights(model, state)


@pytest.mark.parametrize("qtype,split_kv_b,shards", [("Q8_0", True, 2), ("F16", False, 1)])
def test_gguf_deepseek2(steady, tmp_path, qtype, split_kv_b, shards):
    """A deepseek2 GGUF (newer files: attn_k_b/attn_v_b, MQA metadata; older: attn_kv_b) loads,
    split in shards or not, and gives transformers' logits on the weights it holds (measured max
    |diff| 7e-7); vs the fp32 model the error is the quantization's (measured max |diff|: Q8_0 0.044,
    F16 0.0015, on logits of std 0.49)."""
    model, _ = steady
    base = str(tmp_path / f"ds-{qtype}.gguf")
    _write_deepseek2_gguf(model, base, qtype, split_kv_b, split_max_tensors=40 if shards > 1 else 0)
    paths = sorted(str(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".gguf"))
    assert len(paths) == shards
    ids = _prompts(9, [50])[0]
    ours, _ = _logits(paths[0], ids)
    exact = (ours - _reference_logits(_gguf_reference(model, paths), ids)).abs().max().item()
    vs_fp32 = (ours - _reference_logits(model, ids)).abs().max().item()
    assert exact < 1e-4, exact
    assert vs_fp32 < (0.1 if qtype == "Q8_0" else 0.005), vs_fp32


# ---------------------------------------------------------------- pieces against transformers' own

def test_router_matches_transformers():
    model = tiny_deepseek_v3(seed=3)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(64, model.config.hidden_size)
    _, w_ref, ids_ref = gate(x)
    w, ids = grouped_topk(torch.nn.functional.linear(x, gate.weight), gate.e_score_correction_bias, 4, 4, 2, True, 2.5)
    assert ids.dtype == torch.int32
    order_ref, order = ids_ref.sort(dim=1), ids.long().sort(dim=1)
    assert torch.equal(order_ref.values, order.values)
    torch.testing.assert_close(w.gather(1, order.indices), w_ref.gather(1, order_ref.indices))


def test_fused_moe_ref_matches_transformers():
    model = tiny_deepseek_v3(seed=4)
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(40, model.config.hidden_size)
    ids = torch.stack([torch.randperm(32)[:4] for _ in range(40)])
    w = torch.rand(40, 4)
    with torch.no_grad():
        ref = experts(x, ids, w)
    out = fused_moe_ref(x, experts.gate_up_proj.data, experts.down_proj.data, w, ids.to(torch.int32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_mla_decode_ref_paged():
    """Against a plain per-sequence computation over contiguous latents; a seq_len-0 row is zeros."""
    torch.manual_seed(5)
    nb, bs, lat, rope, h = 10, 4, 16, 8, 3
    cache = torch.randn(nb, bs, lat + rope)
    tables = torch.tensor([[3, 7, 1], [5, 0, 0], [2, 9, 4]], dtype=torch.int32)
    lens = torch.tensor([11, 2, 0], dtype=torch.int32)
    q_lat, q_pe = torch.randn(3, h, lat), torch.randn(3, h, rope)
    out = mla_decode_ref(q_lat, q_pe, cache, tables, lens, 0.3)
    for b in range(2):
        kv = cache[tables[b].long()].reshape(-1, lat + rope)[:lens[b]]
        p = torch.softmax(0.3 * (q_lat[b] @ kv[:, :lat].T + q_pe[b] @ kv[:, lat:].T), -1)
        torch.testing.assert_close(out[b], p @ kv[:, :lat])
    assert torch.equal(out[2], torch.zeros(h, lat))


# ---------------------------------------------------------------- the real config



def test_real_config_kv_bytes_per_token():
    """61 layers x 576 latent values x 2 bytes (bf16) = 70,272 bytes per token, from cache_shape."""
    config = ModelConfig.from_hf(R1_CONFIG)
    assert config.fp8_block_size == (128, 128) and config.head_dim == 64
    with torch.device("meta"):
        model = build_model(config)
    assert model.attention_layers()[0].cache_shape(1, 16) == (1, 16, 576)
    assert kv_bytes_per_token(model, torch.bfloat16) == 70_272
    assert len(model.mtp) == 1 and model.model.layers[3].mlp.experts.w13.shape == (256, 4096, 7168)
    # DeepSeek's softmax scale: 192^-0.5 * (0.1 ln 40 + 1)^2
    assert abs(model.model.layers[0].self_attn.scale - 192 ** -0.5 * (0.1 * np.log(40) + 1) ** 2) < 1e-9


@pytest.mark.parametrize("change,problem", [
    ({"scoring_func": "softmax"}, "not supported"),
    ({"n_group": 6}, "groups"),
    ({"topk_group": 9}, "more than n_group"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}, "weight_block_size"),
    ({"rope_scaling": {"type": "yarn", "factor": 40}}, "original_max_position_embeddings"),
])
def test_bad_configs(change, problem):
    with pytest.raises(ModelLoadError, match=problem):
        ModelConfig.from_hf({**R1_CONFIG, **change})

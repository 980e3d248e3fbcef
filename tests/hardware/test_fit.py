"""The fit planner: the R1 family's shapes, what people observed fitting where, sizes read from real
file headers, TP/PP splits, the CPU case, the CLI, and the engine's up-front refusal."""

from __future__ import annotations

import json
import math
import os

import pytest

from finback.hardware import fit
from finback.hardware.fit import (
    BLOCK_SIZE,
    FitError,
    GiB,
    ModelDoesNotFit,
    check_engine_fits,
    plan,
)
from finback.store.catalog import UnknownModel, entries, lookup


def show(r: fit.FitReport) -> None:
    print(f"\n{r.model} on {r.gpus} x {fit.human(r.gpu_memory)} (TP {r.tensor_parallel_size} x PP "
          f"{r.pipeline_parallel_size}), ctx {r.context} x {r.concurrency}: fits={r.fits} "
          f"per_gpu={fit.human(r.per_gpu_bytes)} of {fit.human(r.budget_per_gpu)} "
          f"max_context={r.max_context} min_gpus={r.min_gpus} {r.min_gpus_layout}")


# ------------------------------------------------------------------------------------ the table

def test_architecture_table_reproduces_the_catalogue_parameter_counts():
    for tag, arch in fit.ARCHITECTURES.items():
        e = next(e for e in entries() if e.size_tag == tag)
        assert fit.parameter_count(arch) == e.parameter_count, tag
    # with DeepSeek's multi-token-prediction layer: the "685B" of the FP8 checkpoint
    assert 684e9 < fit.parameter_count(fit.ARCHITECTURES["671b"], mtp=True) < 685e9


def test_fp8_dtype_model_matches_the_published_size():
    e = lookup("deepseek-r1:671b-fp8")
    tensors = fit.catalogue_tensors(e, fit.ARCHITECTURES["671b"])
    total = sum(t.nbytes for t in tensors)
    print(f"\nFP8 modelled {total / 1e9:.1f} GB, published {e.size_bytes / 1e9:.1f} GB")
    assert abs(total - e.size_bytes) / e.size_bytes < 0.005
    loaded = sum(t.nbytes for t in tensors if t.kind != "mtp")
    assert 0.97 * total < loaded < 0.99 * total  # the MTP layer (~11.5B weights) is not loaded


def test_gguf_catalogue_bytes_equal_the_download_size():
    for tag in ("671b-q2_K_XL", "7b-q4_K_M", "70b-fp16"):
        e = lookup(f"deepseek-r1:{tag}")
        tensors = fit.catalogue_tensors(e, fit.ARCHITECTURES[e.size_tag])
        assert abs(sum(t.nbytes for t in tensors) - e.size_bytes) < len(tensors)  # rounding per tensor


# ------------------------------------------------------------------------------------ observations

H20, H200, H100, A10 = "96GB", "141GB", "80GB", "24GB"


def test_671b_ud_q2_k_xl_needs_three_to_four_h20():
    for ctx in (8192, 32768):
        r = plan("deepseek-r1:671b-q2_K_XL", gpus=4, gpu_memory=H20, context=ctx)
        show(r)
        assert r.min_gpus in (3, 4)
        assert r.fits
    assert not plan("deepseek-r1:671b-q2_K_XL", gpus=2, gpu_memory=H20, context=8192).fits


def test_671b_ud_iq1_s_runs_on_two_h20():
    r = plan("deepseek-r1:671b-iq1_s", gpus=2, gpu_memory=H20, context=8192)
    show(r)
    assert r.fits and r.min_gpus == 2
    assert not plan("deepseek-r1:671b-iq1_s", gpus=1, gpu_memory=H20, context=8192).fits


def test_671b_fp8_needs_8_h200_or_two_nodes_of_h100():
    r = plan("deepseek-r1:671b-fp8", gpus=8, gpu_memory=H200, context=32768)
    show(r)
    assert r.fits and r.tensor_parallel_size == 8
    for mem in (H100, "80GiB"):
        r = plan("deepseek-r1:671b-fp8", gpus=8, gpu_memory=mem, context=32768)
        show(r)
        assert not r.fits and r.max_context == 0
        assert 8 < r.min_gpus <= 16
    r = plan("deepseek-r1:671b-fp8", gpus=16, gpu_memory=H100, context=32768, tensor_parallel_size=8)
    show(r)
    assert r.fits and (r.tensor_parallel_size, r.pipeline_parallel_size) == (8, 2)


def test_32b_fits_one_a10_only_quantized():
    r = plan("deepseek-r1:32b", gpus=1, gpu_memory=A10, context=2048)
    show(r)
    assert r.fits and r.model == "deepseek-r1:32b-q4_K_M" and r.max_context >= 2048
    for q in ("fp16", "bf16"):
        r = plan(f"deepseek-r1:32b-{q}", gpus=1, gpu_memory=A10, context=2048)
        show(r)
        assert not r.fits and r.max_context == 0 and r.min_gpus > 1


# ------------------------------------------------------------------------------------ the parts

def test_kv_cache_per_token_gqa_and_mla():
    r1 = plan("deepseek-r1:671b-q2_K_XL", gpus=8, gpu_memory="141GB", tensor_parallel_size=8, context=4096)
    assert r1.kv_bytes_per_token == 61 * (512 + 64) * 2  # MLA latent, replicated on every TP rank
    r1_fp8kv = plan("deepseek-r1:671b-q2_K_XL", gpus=8, gpu_memory="141GB", tensor_parallel_size=8,
                    context=4096, kv_cache_dtype="fp8")
    assert r1_fp8kv.kv_bytes_per_token == 61 * 576
    for tp, heads_per_rank in ((1, 8), (8, 1), (16, 1)):  # 70B: 8 KV heads; TP 16 replicates them
        r = plan("deepseek-r1:70b", gpus=tp, gpu_memory="80GiB", tensor_parallel_size=tp, context=4096,
                 gpus_per_node=16)
        assert r.kv_bytes_per_token == 2 * 80 * heads_per_rank * 128 * 2
        assert r.kv_cache_bytes == 4096 * r.kv_bytes_per_token


def test_max_context_is_the_edge_of_fitting():
    r = plan("deepseek-r1:32b", gpus=1, gpu_memory=A10, context=2048, concurrency=2)
    show(r)
    assert r.max_context % BLOCK_SIZE == 0 and 0 < r.max_context < r.model_max_context
    assert plan("deepseek-r1:32b", gpus=1, gpu_memory=A10, context=r.max_context, concurrency=2).fits
    assert not plan("deepseek-r1:32b", gpus=1, gpu_memory=A10, context=r.max_context + BLOCK_SIZE,
                    concurrency=2).fits
    one = plan("deepseek-r1:32b", gpus=1, gpu_memory=A10, context=2048, concurrency=1)
    assert r.max_context <= one.max_context // 2 + BLOCK_SIZE


def test_pipeline_stages_and_bad_layouts():
    # 128 heads do not split 3 ways: three GPUs are three pipeline stages
    r = plan("deepseek-r1:671b-q2_K_XL", gpus=3, gpu_memory=H20, context=4096)
    assert (r.tensor_parallel_size, r.pipeline_parallel_size) == (1, 3)
    with pytest.raises(FitError, match="no way to split"):
        plan("deepseek-r1:671b-q2_K_XL", gpus=3, gpu_memory=H20, tensor_parallel_size=3)
    with pytest.raises(FitError, match="cannot be split"):
        plan("deepseek-r1:7b", gpus=3, gpu_memory=H20, tensor_parallel_size=2)
    with pytest.raises(FitError):
        plan("deepseek-r1:7b", gpus=1, gpu_memory=H20, context=0)
    with pytest.raises(FitError):
        plan("deepseek-r1:7b", gpus=1, gpu_memory=H20, gpu_memory_utilization=1.5)
    with pytest.raises(UnknownModel, match="did you mean"):
        plan("deepseek-r1:671b-q2_K_XXL", gpus=1, gpu_memory=H20)
    assert fit._stages(61, 4) == [range(16), range(16, 31), range(31, 46), range(46, 61)]


def test_parse_bytes():
    assert fit.parse_bytes("80GiB") == 80 * GiB
    assert fit.parse_bytes("96GB") == 96 * 10 ** 9
    assert fit.parse_bytes("24G") == 24 * GiB
    assert fit.parse_bytes("81920MiB") == 80 * GiB
    assert fit.parse_bytes("1.5TB") == 1.5e12
    assert fit.parse_bytes("512B") == 512
    for bad in ("eighty", "80XB", ""):
        with pytest.raises(FitError):
            fit.parse_bytes(bad)


def test_cpu_case():
    r = plan("deepseek-r1:7b", gpus=0, gpu_memory="16GiB", context=8192)
    show(r)
    assert r.device == "cpu" and r.fits and r.cuda_graph_bytes == 0 and r.min_gpus is None
    # bf16 everywhere but the 4-bit linears: between the 4-bit and the all-bf16 sizes
    assert 7_615_616_512 * 0.625 < r.weights_per_gpu < 7_615_616_512 * 2
    dense = plan("deepseek-r1:70b-fp16", gpus=0, gpu_memory="64GiB", context=8192)
    show(dense)
    assert not dense.fits and dense.weights_per_gpu == 70_553_706_496 * 2
    with pytest.raises(FitError, match="needs GPUs"):
        plan("deepseek-r1:7b", gpus=0, gpu_memory="16GiB", tensor_parallel_size=2)


# ------------------------------------------------------------------------------------ local files

@pytest.fixture(scope="module")
def tiny_model():
    from fbtest import tiny_hf_model

    return tiny_hf_model("qwen2", hidden=256)


def test_gguf_headers(tiny_model, tmp_path):
    import gguf
    from fbtest import write_gguf

    path = write_gguf(tiny_model, str(tmp_path / "tiny.gguf"), "Q4_K")
    reader = gguf.GGUFReader(path)  # gguf-py's reader: an independent count of the bytes
    total = sum(int(t.n_bytes) for t in reader.tensors)
    cfg = tiny_model.config
    r = plan(path, gpus=1, gpu_memory="1GiB", context=256)
    show(r)
    assert r.source == "gguf" and r.weight_bytes == total == r.weights_per_gpu
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert r.kv_bytes_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    # TP 2: every tensor halves but the replicated norms, which each rank holds whole
    norms = sum(int(t.n_bytes) for t in reader.tensors if "norm" in t.name)
    r2 = plan(path, gpus=2, gpu_memory="1GiB", context=256, tensor_parallel_size=2)
    assert 0 <= 2 * r2.weights_per_gpu - total - norms <= 2 * 4 * cfg.num_hidden_layers + 8
    # CPU: Q4_K linears stay 4-bit (groups of 32: 20 bytes), the rest is bf16
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    linear = sum(int(t.n_elements) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    other = sum(int(t.n_elements) for t in reader.tensors) - linear
    cpu = plan(path, gpus=0, gpu_memory="4GiB", context=256)
    assert linear % 32 == 0 and cpu.weights_per_gpu == linear * 20 // 32 + other * 2
    dense = plan(path, gpus=0, gpu_memory="4GiB", context=256, keep_int4=False)
    assert dense.weights_per_gpu == (linear + other) * 2


def test_safetensors_headers(tiny_model, tmp_path):
    from fbtest import save_safetensors
    from safetensors import safe_open

    folder = save_safetensors(tiny_model, str(tmp_path / "st"))
    total = 0
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), framework="pt") as st:
                total += sum(st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in st.keys())  # noqa: SIM118 (safe_open is not a mapping)
    r = plan(folder, gpus=1, gpu_memory="1GiB", context=256)
    show(r)
    assert r.source == "safetensors" and r.weight_bytes == total
    same = plan(os.path.join(folder, "model.safetensors"), gpus=1, gpu_memory="1GiB", context=256)
    assert same.weight_bytes == total
    with pytest.raises(FitError, match="config.json"):
        os.remove(os.path.join(folder, "config.json"))
        plan(folder, gpus=1, gpu_memory="1GiB")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    with pytest.raises(FitError, match="neither"):
        plan(str(junk), gpus=1, gpu_memory="1GiB")


# ------------------------------------------------------------------------------------ CLI and engine

def test_cli_json_and_table(capsys):
    from finback.cli.main import main

    assert main(["fit", "deepseek-r1:671b-iq1_s", "--gpus", "2", "--gpu-memory", "96GB", "--context", "8192",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["min_gpus"] == 2 and data["max_context"] > 8192
    assert data["per_gpu_bytes"] <= data["budget_per_gpu"]
    assert main(["fit", "deepseek-r1:32b-fp16", "--gpus", "1", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "NO" in out and "min GPUs" in out
    assert main(["fit", "deepseek-r1:nope", "--gpus", "1", "--gpu-memory", "24GB"]) == 1
    assert "not in the DeepSeek-R1 catalogue" in capsys.readouterr().err


def test_engine_refuses_up_front_what_cannot_fit(tiny_model, tmp_path):
    from fbtest import write_gguf

    from finback.server.manager import ModelManager
    from finback.store.store import Store

    path = write_gguf(tiny_model, str(tmp_path / "tiny.gguf"), "Q8_0")
    ok = check_engine_fits(path, {"device": "cpu", "kv_cache_space_gb": 0.01})
    assert ok is not None and ok.fits and ok.kv_cache_bytes == int(0.01 * GiB)
    with pytest.raises(ModelDoesNotFit) as info:  # a KV cache space beyond any machine's RAM
        check_engine_fits(path, {"device": "cpu", "kv_cache_space_gb": 1 << 24})
    assert "does not fit RAM" in str(info.value) and "KV cache RAM" in str(info.value)
    manager = ModelManager(Store(str(tmp_path / "store")), {"device": "cpu", "kv_cache_space_gb": 1 << 24})
    with pytest.raises(ModelDoesNotFit, match="budget RAM"):
        manager._load(path)
    assert check_engine_fits(str(tmp_path / "missing.gguf"), {"device": "cpu"}) is None  # the engine's to report


def test_classify_deepseek_names_both_ways():
    cases = {
        "token_embd.weight": (-1, "split"), "output.weight": (61, "split"), "output_norm.weight": (61, "replicated"),
        "blk.0.attn_q_a.weight": (0, "replicated"), "blk.0.attn_q_a_norm.weight": (0, "replicated"),
        "blk.0.attn_q_b.weight": (0, "split"), "blk.0.attn_kv_a_mqa.weight": (0, "replicated"),
        "blk.0.attn_kv_b.weight": (0, "split"), "blk.0.attn_k_b.weight": (0, "split"),
        "blk.0.attn_output.weight": (0, "split"), "blk.5.ffn_gate_inp.weight": (5, "replicated"),
        "blk.5.exp_probs_b.bias": (5, "replicated"), "blk.5.ffn_up_exps.weight": (5, "expert"),
        "blk.5.ffn_down_shexp.weight": (5, "split"), "blk.61.nextn.eh_proj.weight": (61, "mtp"),
        "model.layers.3.mlp.gate.weight": (3, "replicated"), "model.layers.3.mlp.gate_proj.weight": (3, "split"),
        "model.layers.3.mlp.experts.7.down_proj.weight_scale_inv": (3, "expert"),
        "model.layers.3.self_attn.kv_a_proj_with_mqa.weight_scale_inv": (3, "replicated"),
        "model.layers.61.eh_proj.weight": (61, "mtp"), "model.layers.2.self_attn.k_proj.bias": (2, "kv"),
        "blk.2.attn_v.weight": (2, "kv"), "lm_head.weight": (61, "split"),
    }
    for name, want in cases.items():
        assert fit.classify(name, 61) == want, name


def test_mla_gguf_headers(tmp_path):
    import gguf
    import numpy as np

    path = str(tmp_path / "mla.gguf")
    w = gguf.GGUFWriter(path, "deepseek2")
    layers, hidden, kv_lora, rope, heads = 2, 64, 32, 16, 4
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(128)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_key_value("deepseek2.attention.kv_lora_rank", kv_lora, gguf.GGUFValueType.UINT32)
    w.add_key_value("deepseek2.attention.key_length", 48, gguf.GGUFValueType.UINT32)
    w.add_key_value("deepseek2.attention.value_length", 32, gguf.GGUFValueType.UINT32)
    w.add_rope_dimension_count(rope)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (100, hidden), "output.weight": (100, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_kv_a_mqa.weight": (kv_lora + rope, hidden),
                   f"blk.{i}.attn_kv_b.weight": (heads * 64, kv_lora), f"blk.{i}.attn_q.weight": (heads * 48, hidden),
                   f"blk.{i}.attn_output.weight": (hidden, heads * 32)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float16 if len(shape) == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    total = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    r = plan(path, gpus=2, gpu_memory="1GiB", context=1024, tensor_parallel_size=2)
    assert r.family == "mla" and r.weight_bytes == total
    assert r.kv_bytes_per_token == layers * (kv_lora + rope) * 2  # the latent, whole on each TP rank
    replicated = sum(2 * math.prod(s) for n, s in shapes.items() if "kv_a_mqa" in n) + \
        sum(4 * math.prod(s) for n, s in shapes.items() if "norm" in n)
    assert 2 * r.weights_per_gpu - total == replicated

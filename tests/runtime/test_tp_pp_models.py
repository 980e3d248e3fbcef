"""More models across worker processes (gloo on CPU): tied embeddings split over pipeline stages,
DeepSeek-V3 (MLA, MoE) with tensor and pipeline parallelism, and JSON mode masked on the workers:
each equal to the single-process engine."""

import random

from fbtest import save_safetensors, tiny_hf_model

from finback import LLM, SamplingParams


def _prompts():
    rng = random.Random(7)
    return [[rng.randrange(3, 1024) for _ in range(n)] for n in (1, 6, 45, 20)]


def test_tied_embeddings_split_over_stages(tmp_path):
    """With tied embeddings the last stage, which has no embedding, loads its own LM head from it."""
    model = tiny_hf_model("llama", seed=4)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    folder = save_safetensors(model, str(tmp_path / "tied"))
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = []
    for kw in ({}, {"pipeline_parallel_size": 2}):
        llm = LLM(folder, dtype="float32", skip_tokenizer_init=True, kv_cache_space_gb=0.02, **kw)
        try:
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        finally:
            llm.engine.shutdown()
    assert outs[0] == outs[1]


def test_json_mode_and_schema_across_workers(tiny_chat_gguf):
    """The workers mask the logits with their own recognisers: the same JSON as one process."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    params = [SamplingParams(temperature=0, max_tokens=24, json_mode=True),
              SamplingParams(temperature=0, max_tokens=24, json_schema=schema),
              SamplingParams(temperature=0.8, seed=3, max_tokens=24, json_mode=True)]
    prompts = ["Describe a cat as JSON:", "A person:", "Numbers:"]
    outs = []
    for kw in ({}, {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}):
        llm = LLM(tiny_chat_gguf, dtype="float32", kv_cache_space_gb=0.02, **kw)
        try:
            outs.append([(o.outputs[0].token_ids, o.outputs[0].text) for o in llm.generate(prompts, params)])
        finally:
            llm.engine.shutdown()
    assert outs[0] == outs[1]  # unmasked, the random model would not write the same whitespace and JSON
    assert all(text.strip()[:1] in ("", "{", "[", '"', "-", "t", "f", "n") or text.strip()[:1].isdigit()
               for _, text in outs[1])
    assert outs[1][1][1].strip()[:1] in ("", "{")  # the schema's object


def _tiny_deepseek_v3(folder):
    """A tiny transformers DeepseekV3 (MLA with the real head sizes, 8 experts in 4 groups, first
    layer dense) with a wide weight spread, so greedy choices are clear."""
    import torch
    import transformers

    cfg = transformers.DeepseekV3Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, n_group=4,
        topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True, kv_lora_rank=512,
        q_lora_rank=64, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(5)
    model = transformers.DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 * 1.5)
    return save_safetensors(model, folder)


def test_deepseek_v3_parallel_equals_one_process(tmp_path):
    folder = _tiny_deepseek_v3(str(tmp_path / "ds"))
    prompts = [{"prompt_token_ids": p} for p in ([5], [9, 40, 77, 3, 120, 300, 8], list(range(10, 40)))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(**kw):
        llm = LLM(folder, dtype="float32", skip_tokenizer_init=True, kv_cache_space_gb=0.02, **kw)
        try:
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.engine.shutdown()

    ref = run()
    assert run(tensor_parallel_size=2) == ref
    assert run(pipeline_parallel_size=2) == ref

"""load_format="dummy": random weights of a config's shapes (what the benchmarks use)."""

import json

import pytest

from finback import LLM, SamplingParams
from finback.loader.errors import ModelLoadError

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
}


@pytest.fixture
def config_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return str(tmp_path)


def _generate(path, seed=0):
    llm = LLM(path, load_format="dummy", skip_tokenizer_init=True, dtype="float32", seed=seed,
              num_kv_blocks=32, max_model_len=128)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": [7, 8]}],
                       SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    return llm, [o.outputs[0].token_ids for o in out]


def test_dummy_weights_run_the_real_engine_and_are_deterministic(config_dir):
    llm, first = _generate(config_dir)
    _, again = _generate(config_dir)
    assert first == again
    assert all(len(t) == 12 for t in first)
    assert first[0] != first[1]  # different prompts, different continuations: the weights are not degenerate
    model = llm.engine.runner.model
    w = model.model.layers[0].self_attn.qkv_proj.weight
    assert 0.01 < float(w.std()) < 0.04
    assert float(model.model.norm.weight.mean()) == pytest.approx(1.0, abs=0.05)


def test_dummy_needs_a_readable_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config"):
        LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="load_format"):
        LLM(str(tmp_path), load_format="bogus", skip_tokenizer_init=True)

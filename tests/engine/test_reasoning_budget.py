"""A tiny random Qwen2 with the real DeepSeek-R1 tokenizer and chat template. The later R1
templates end the generation prompt with "<think>\n" (this GGUF's early template does not: we add
it as they do): the engine knows generation starts inside the block, and a reasoning budget
(max_thinking_tokens) closes it after exactly that many tokens."""

import pytest

from fbtest import tiny_hf_model, tokenizer_metadata, write_gguf

from finback import LLM, SamplingParams


@pytest.fixture(scope="module")
def r1_tiny(tmp_path_factory, r1_part_path):
    meta = tokenizer_metadata(r1_part_path)
    vocab = len(meta["tokenizer.ggml.tokens"])
    model = tiny_hf_model("qwen2", seed=5, vocab=vocab, hidden=64)
    path = write_gguf(model, str(tmp_path_factory.mktemp("r1") / "tiny-r1.gguf"), "F16", tokenizer_metadata=meta)
    return LLM(path, dtype="float32", kv_cache_space_gb=0.05)


def test_template_opens_reasoning_and_budget_closes_it(r1_tiny):
    tok = r1_tiny.get_tokenizer()
    close_id = tok.token_to_id("</think>")
    from finback.prompt.template import ChatTemplate

    template = ChatTemplate(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    text = template.render([{"role": "user", "content": "What is 2+2?"}]) + "<think>\n"
    prompt = {"prompt_token_ids": tok.encode(text)}
    assert "<｜Assistant｜>" in text
    free = r1_tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    for budget in (0, 3, 7):
        out = r1_tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                      max_thinking_tokens=budget))[0].outputs[0]
        ids = out.token_ids
        first_close = ids.index(close_id)
        assert first_close <= budget
        if close_id not in free.outputs[0].token_ids[:budget + 1]:
            assert first_close == budget  # forced exactly when the budget ran out
            assert ids[:budget] == free.outputs[0].token_ids[:budget]  # same reasoning until then
        assert "</think>" in out.text or not out.text

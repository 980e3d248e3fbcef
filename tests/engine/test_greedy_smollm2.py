"""Greedy output of the embedded SmolLM2-135M-Instruct equals transformers (fp32, same GGUF),
token for token: each prompt alone, all together arriving at different steps, with prefix-cache
hits, and under forced preemption."""

import os

import pytest
import torch

from fbtest import assert_greedy_matches, greedy_reference

from finback import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "What does a CPU cache do?",
    "Give me a short motivational quote.",
    "如何学习编程？请简短回答。",
]
SYSTEM = ("You are a meticulous assistant for a team of engineers. Answer precisely, prefer short "
          "sentences, and when you are unsure say so. Never invent facts. ") * 2
N_NEW = 64


@pytest.fixture(scope="module")
def hf(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(smollm2_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=smollm2_path, dtype=torch.float32).eval()
    return tok, model


def _prompts(tok, system=None):
    out = []
    for q in QUESTIONS:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(tok.encode(text, add_special_tokens=False))
    return out


@pytest.fixture(scope="module")
def prompts(hf):
    return _prompts(hf[0])


@pytest.fixture(scope="module")
def system_prompts(hf):
    return _prompts(hf[0], SYSTEM)


@pytest.fixture(scope="module")
def references(hf, prompts, system_prompts):
    model = hf[1]
    return {tuple(p): greedy_reference(model, p, N_NEW) for p in prompts + system_prompts}


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, dtype="float32", kv_cache_space_gb=0.5)


GREEDY = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)


def _check(outputs, prompts, references):
    compared = 0
    for p, out in zip(prompts, outputs):
        compared += assert_greedy_matches(out.outputs[0].token_ids, references[tuple(p)], label=str(p[-8:]))
    assert compared >= 0.9 * len(prompts) * N_NEW  # ties are rare: most tokens must be compared


def test_each_prompt_alone(llm, prompts, references):
    outs = [llm.generate({"prompt_token_ids": p}, GREEDY)[0] for p in prompts]
    _check(outs, prompts, references)


def test_all_together_arriving_at_different_steps(llm, prompts, references):
    engine = llm.engine
    pending = list(enumerate(prompts))
    done = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 5 == 0:  # a new request joins the running batch every 5 steps
            i, p = pending.pop(0)
            engine.add_request(f"arrive-{i}", p, GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    _check([done[f"arrive-{i}"] for i in range(len(prompts))], prompts, references)


def test_prefix_cache_hit(llm, system_prompts, references):
    llm.generate({"prompt_token_ids": system_prompts[0]}, GREEDY)  # fills the cache with the system prompt
    outs = llm.generate([{"prompt_token_ids": p} for p in system_prompts[1:]], GREEDY)
    assert all(o.metrics.num_cached_tokens >= 64 for o in outs), [o.metrics.num_cached_tokens for o in outs]
    _check(outs, system_prompts[1:], references)


def test_forced_preemption(smollm2_path, prompts, references):
    longest = max(len(p) for p in prompts) + N_NEW
    blocks = 3 * (-(-longest // 16))  # room for about three of the eight sequences
    small = LLM(smollm2_path, dtype="float32", num_kv_blocks=blocks, max_model_len=longest + 16,
                enable_prefix_caching=False)
    outs = small.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    _check(outs, prompts, references)

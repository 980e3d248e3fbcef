"""Random-weight tiny Qwen2 (QKV bias) and Llama 3 (rope scaling) models, as safetensors and as
GGUF (F16, Q8_0, Q4_K written here with gguf-py): greedy output equals transformers on the same
weights, token for token, with the prompts batched together and arriving at different steps."""

import copy
import random

import pytest
import torch

from fbtest import (assert_greedy_matches, dequantized_reference, greedy_reference, save_safetensors,
                    tiny_hf_model, write_gguf)

from finback import LLM, SamplingParams

N_NEW = 64
GREEDY = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)


def _prompts(seed):
    rng = random.Random(seed)
    lengths = [1, 3, 17, 40, 64, 100, 150, 255]
    return [[rng.randrange(3, 1024) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny(request, tmp_path_factory):
    arch = request.param
    return arch, tiny_hf_model(arch, seed=1 if arch == "qwen2" else 2), tmp_path_factory.mktemp(arch)


def _run(path, prompts, **kw):
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, kv_cache_space_gb=0.25, **kw)
    engine = llm.engine
    done, step, pending = {}, 0, list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        step += 1
    return [done[i] for i in range(len(prompts))]


def _compare(reference_model, outputs, prompts, label):
    compared = 0
    for p, ours in zip(prompts, outputs):
        compared += assert_greedy_matches(ours, greedy_reference(reference_model, p, N_NEW), label)
    assert compared >= 0.9 * len(prompts) * N_NEW


def test_safetensors(tiny):
    arch, model, tmp = tiny
    folder = save_safetensors(model, str(tmp / "st"))
    prompts = _prompts(10)
    # small chunks: long prompts are prefilled in several steps beside running decodes
    _compare(model, _run(folder, prompts, max_num_batched_tokens=64), prompts, f"{arch}/safetensors")


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_K"])
def test_gguf(tiny, qtype):
    arch, model, tmp = tiny
    path = write_gguf(model, str(tmp / f"{qtype}.gguf"), qtype)
    reference = dequantized_reference(model, path)
    prompts = _prompts(20)
    _compare(reference, _run(path, prompts), prompts, f"{arch}/{qtype}")


def test_bf16_safetensors_load(tiny):
    """A bf16 checkpoint loads (and runs in fp32 on request) with the same weights."""
    arch, model, tmp = tiny
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():  # weights rounded to bf16; rotary buffers untouched
            p.copy_(p.bfloat16().float())
    folder = save_safetensors(copy.deepcopy(model).to(torch.bfloat16), str(tmp / "bf16"))
    prompts = _prompts(30)[:3]
    _compare(reference, _run(folder, prompts), prompts, f"{arch}/bf16")

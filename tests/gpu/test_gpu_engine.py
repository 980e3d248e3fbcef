"""End to end on a GPU: the engine with the Triton backend and CUDA graphs against transformers.

Skipped without CUDA (CI has none). Run on a GPU machine: `python -m pytest -q tests/gpu tests/kernels`.

- fp32: greedy tokens equal transformers' (fp32, same weights) token for token, with the top-2 tie
  rule of tests/fbtest.py, for batched prompts decoded through CUDA graphs.
- bf16 (what serving uses): every step's log-probability of the chosen token is within BF16_TOL of the
  reference's log-softmax at that step, and tokens are equal while the reference's top-2 margin is
  above MARGIN (below it, bf16 rounding may legitimately pick the other token; comparison stops there).
- CUDA graphs change nothing: greedy tokens with graphs equal those of enforce_eager in fp32.
"""

import gc
import tempfile

import pytest
import torch

import fbtest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_TOL = 0.15   # |logprob ours - logprob reference| of the chosen token, bf16 weights and activations
MARGIN = 0.5      # top-2 logit gap above which bf16 must pick the reference's token
PROMPTS = [[5 + i, 6, 7, 8 + i] * (i + 1) for i in range(6)] + [list(range(10, 90))]
NEW = 40


def _llm(folder, dtype, eager=False):
    from finback import LLM

    gc.collect()  # the engines of earlier tests: give their memory back before sizing a new KV cache
    torch.cuda.empty_cache()
    return LLM(folder, skip_tokenizer_init=True, dtype=dtype, device="cuda", gpu_memory_utilization=0.3,
               max_model_len=512, max_num_seqs=16, enforce_eager=eager)


def _generate(llm, logprobs=None):
    from finback import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=logprobs))
    return [o.outputs[0] for o in outs]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model_dir(request):
    model = fbtest.tiny_hf_model(request.param, seed=3)
    folder = fbtest.save_safetensors(model, tempfile.mkdtemp())
    return request.param, model, folder


def test_fp32_greedy_equals_transformers_through_cuda_graphs(model_dir):
    arch, model, folder = model_dir
    llm = _llm(folder, "float32")
    assert llm.engine.runner.graphs is not None, "CUDA graphs were not captured"
    compared = 0
    for p, out in zip(PROMPTS, _generate(llm)):
        compared += fbtest.assert_greedy_matches(out.token_ids, fbtest.greedy_reference(model, p, NEW), arch)
    assert compared > 0.9 * len(PROMPTS) * NEW


def test_cuda_graphs_change_nothing(model_dir):
    arch, _, folder = model_dir
    graphs = [o.token_ids for o in _generate(_llm(folder, "float32"))]
    eager = [o.token_ids for o in _generate(_llm(folder, "float32", eager=True))]
    assert graphs == eager


def test_bf16_logprobs_within_tolerance_of_transformers(model_dir):
    arch, model, folder = model_dir
    outs = _generate(_llm(folder, "bfloat16"), logprobs=1)
    worst, compared = 0.0, 0
    for p, out in zip(PROMPTS, outs):
        ref = fbtest.greedy_reference(model, p, NEW)
        for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            ref_lp = torch.log_softmax(ref.logits[i], -1)
            ours = lp[tok]
            worst = max(worst, abs(float(ours) - float(ref_lp[tok])))
            top2 = torch.topk(ref.logits[i], 2).values
            if tok != ref.tokens[i]:
                assert float(top2[0] - top2[1]) < MARGIN, f"{arch}: step {i} picked {tok}, reference {ref.tokens[i]}"
                break
            compared += 1
    print(f"{arch}: bf16 worst |logprob diff| {worst:.4f} over {compared} tokens")
    assert worst < BF16_TOL
    assert compared > 0.5 * len(PROMPTS) * NEW

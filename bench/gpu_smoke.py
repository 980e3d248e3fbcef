"""GPU smoke check of the engine's torch path (no Triton kernels, no CUDA graphs yet):
greedy equality with transformers on tiny random models in fp32 on the GPU, then decode tok/s of
a random-weight model of the R1-Distill-Qwen-1.5B shape in bf16. Prints one table.

Run on the device machine:  pip install --no-deps .wheels/gguf-*.whl && python bench/gpu_smoke.py
"""

import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fbtest  # noqa: E402

from finback import LLM, SamplingParams  # noqa: E402


def correctness():
    rows = []
    for arch in ("qwen2", "llama"):
        model = fbtest.tiny_hf_model(arch, seed=1)
        folder = fbtest.save_safetensors(model, tempfile.mkdtemp())
        llm = LLM(folder, skip_tokenizer_init=True, dtype="float32", device="cuda", gpu_memory_utilization=0.3)
        prompts = [[5 + i, 6, 7, 8 + i] * (i + 1) for i in range(6)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        compared = 0
        for p, o in zip(prompts, outs):
            compared += fbtest.assert_greedy_matches(o.outputs[0].token_ids, fbtest.greedy_reference(model, p, 32), arch)
        rows.append((arch, compared, 6 * 32))
        del llm
        torch.cuda.empty_cache()
    return rows


def decode_speed():
    import transformers
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    del model
    llm = LLM(folder, skip_tokenizer_init=True, dtype="bfloat16", device="cuda", max_model_len=1024)
    e = llm.engine
    res = []
    for batch in (1, 8, 32, 64):
        for i in range(batch):
            e.add_request(f"b{batch}-{i}", list(range(100 + i, 228 + i)), SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
        e.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        steps = 0
        while e.has_unfinished_requests():
            e.step()
            steps += 1
        torch.cuda.synchronize()
        res.append((batch, batch * steps / (time.perf_counter() - t)))
    return res


if __name__ == "__main__":
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    for arch, compared, total in correctness():
        print(f"greedy vs transformers fp32 on GPU, {arch}: {compared}/{total} tokens compared equal")
    print("R1-Distill-Qwen-1.5B shape, bf16, torch attention path, no CUDA graphs (128+128):")
    print(f"{'concurrency':>12} {'decode tok/s':>14}")
    for b, tps in decode_speed():
        print(f"{b:>12} {tps:>14.1f}")

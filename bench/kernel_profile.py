"""Where a decode step's GPU time goes, kernel by kernel (torch.profiler), for the engines the other
benchmarks build: the bf16 R1-Distill shapes (dummy weights), their Q4_K_M GGUF (random valid blocks),
and the 671B in the UD-IQ1_S mix (a few layers, random blocks in GPU memory).

For each engine and batch size: `batch` requests of 128-token prompts are prefilled, then `--steps`
decode steps run under the profiler with CUDA graphs off (the kernels are the ones the graph holds;
a replay only removes the launch gaps). Prints, per step: every kernel's GPU microseconds and calls,
largest first, and the sum, beside the graph replay time of the same batch (what a step really costs
on the GPU) when the engine has graphs.

  python bench/kernel_profile.py [--engines bf16-1.5b,q4km-1.5b,ud-iq1s] [--batches 1,64] [--top 14]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import decode  # noqa: E402

from finback.engine.sampling import SamplingParams  # noqa: E402


def build(name: str, max_seqs: int, ds_layers: int):
    kind, _, shape = name.partition("-")
    if kind == "bf16":
        return decode.build_engine(shape, False, max_seqs)
    if kind in ("q4km", "q8"):
        qt = {"q4km": "Q4_K_M", "q8": "Q8_0"}[kind]
        path = f"/tmp/kp-{shape}-{qt}.gguf"
        decode.write_random_gguf(shape, qt, path)
        try:
            return decode.build_engine_from_file(path, False, max_seqs)
        finally:
            os.remove(path)
    if kind == "ud":
        import deepseek_gguf as dg
        from finback.engine.arg_utils import EngineArgs
        from finback.engine.llm_engine import LLMEngine

        args = EngineArgs(model="ud-iq1_s", skip_tokenizer_init=True, dtype="bfloat16", device="cuda",
                          max_model_len=1024, max_num_seqs=max_seqs, enable_prefix_caching=False,
                          num_kv_blocks=max_seqs * 24, kv_cache_space_gb=0.05)
        with dg.engine_on(dg.RandomUDCheckpoint(dg.R1, ds_layers, torch.device("cuda"))):
            return LLMEngine(args)
    raise SystemExit(f"unknown engine {name!r}")


def profile_steps(engine, batch: int, steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    reqs = [engine.add_request(f"kp{batch}-{i}", p, params) for i, p in enumerate(decode._prompts(batch, 128, vocab, 7))]
    while any(len(s.output_token_ids) == 0 for r in reqs for s in r.seqs):
        engine.step()
    engine.step()  # one eager step before the profiler: compiles what eager needs
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
    finally:
        engine.runner.graphs = graphs
    while engine.has_unfinished_requests():
        engine.step()
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        if ev.self_device_time_total > 0:
            per[ev.key][0] += ev.self_device_time_total
            per[ev.key][1] += ev.count
    total = sum(v[0] for v in per.values()) / steps
    replay = decode.graph_replay_ms(engine, batch) if graphs is not None else None
    print(f"  batch {batch}: kernels {total:.0f} us per step" +
          (f"; graph replay {replay * 1000:.0f} us" if replay else ""), flush=True)
    print("  |   us/step | calls/step | share | kernel |")
    for name, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  | {us / steps:9.1f} | {n / steps:10.1f} | {us / steps / total:5.1%} | {name[:100]} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="bf16-1.5b,q4km-1.5b,ud-iq1s")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--ds-layers", type=int, default=5, help="layers of the UD-IQ1_S model (3 dense first)")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    for name in a.engines.split(","):
        engine = build(name, max(batches), a.ds_layers)
        print(f"\n== {name}", flush=True)
        for b in batches:
            profile_steps(engine, b, a.steps, a.top)
        del engine
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

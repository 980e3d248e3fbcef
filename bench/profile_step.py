"""Where the host time of an engine step goes on the GPU (cProfile), for the 1.5B shape:
one 512-token prefill step and 20 decode steps at 64 concurrent requests (CUDA graphs on). Prints
the CUDA-event time of the step's GPU work beside its wall time, then the top functions by own time.

Run on the GPU machine:  python bench/profile_step.py [--model 1.5b]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

import decode  # noqa: E402  (bench/decode.py: shapes, engine builder, prompts)

from finback.engine.sampling import SamplingParams  # noqa: E402


def profiled(label: str, fn, top: int = 18) -> None:
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t = time.perf_counter()
    prof.enable()
    n = fn()
    prof.disable()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) * 1000
    print(f"\n== {label}: {wall:.2f} ms wall for {n} step(s), {wall / max(n, 1):.3f} ms per step")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1.5b")
    a = ap.parse_args()
    engine = decode.build_engine(a.model, False, 64)
    vocab = engine.model_config.vocab_size
    decode.decode_tok_s(engine, 4, gen=8, seed=5)  # warm-up
    decode.prefill_tok_s(engine, 512, reps=2)

    def prefill():
        p = decode._prompts(1, 512, vocab, 4242)[0]
        engine.add_request("pf", p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        n = 0
        while engine.has_unfinished_requests():
            engine.step()
            n += 1
        return n

    profiled("prefill 512", prefill)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(decode._prompts(64, 128, vocab, 99)):
        engine.add_request(f"c{i}", p, params)
    while any(len(s.output_token_ids) == 0 for r in engine.requests.values() for s in r.seqs):
        engine.step()

    def steps():
        for _ in range(20):
            engine.step()
        return 20

    profiled("decode, 64 concurrent", steps)
    ms = decode.graph_replay_ms(engine, 64, iters=20, warmup=0)
    if ms is not None:
        print(f"graph replay at bucket {engine.runner.graphs.bucket(64)}: {ms:.3f} ms GPU per step")


if __name__ == "__main__":
    main()

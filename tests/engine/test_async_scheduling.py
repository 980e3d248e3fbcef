"""Overlapped ("async") scheduling: a decode step is launched before the previous step's tokens are read
back, its pending input ids fed on the device. Whatever the overlap, what users get must be what the
synchronous engine gives: the same tokens per request (greedy and seeded sampling), stops and length
limits at the same place, streamed outputs that never show a placeholder, aborts and late arrivals
and preemption handled. On CPU the same path runs eagerly (CUDA adds graphs and pinned read-back)."""

import json

import pytest

from finback.engine.arg_utils import EngineArgs
from finback.engine.llm_engine import LLMEngine
from finback.engine.request import PENDING
from finback.engine.sampling import SamplingParams

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "config.json").write_text(json.dumps(CONFIG))
    return str(d)


def _engine(path, overlap: bool, **kw) -> LLMEngine:
    args = dict(load_format="dummy", skip_tokenizer_init=True, dtype="float32", device="cpu", seed=0,
                num_kv_blocks=64, max_model_len=256, block_size=4)
    args.update(kw)
    return LLMEngine(EngineArgs(model=path, async_scheduling=overlap, **args))


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [12] * 9]


def _run(engine, params, prompts=PROMPTS, late=None, abort_at=None):
    """Step to the end; returns ({request id: token ids}, {request id: finish reason}, whether any step
    was left in flight). late: (step, prompt, params) added then; abort_at: (step, request id)."""
    reqs = [engine.add_request(f"r{i}", p, params[i] if isinstance(params, list) else params)
            for i, p in enumerate(prompts)]
    tokens, reasons, overlapped, step = {}, {}, False, 0
    while engine.has_unfinished_requests():
        if late is not None and step == late[0]:
            engine.add_request("late", late[1], late[2])
        if abort_at is not None and step == abort_at[0]:
            out = engine.abort_request(abort_at[1])
            assert PENDING not in out.outputs[0].token_ids
            tokens[out.request_id] = out.outputs[0].token_ids
            reasons[out.request_id] = out.outputs[0].finish_reason
        for out in engine.step():
            o = out.outputs[0]
            assert PENDING not in o.token_ids and PENDING not in o.new_token_ids
            assert o.token_ids[len(o.token_ids) - len(o.new_token_ids):] == o.new_token_ids
            if out.finished:
                tokens[out.request_id], reasons[out.request_id] = o.token_ids, o.finish_reason
        overlapped |= engine._inflight is not None
        step += 1
    assert engine._inflight is None and engine.block_manager.num_free == engine.num_kv_blocks
    engine.preemptions = sum(r.metrics.num_preemptions for r in reqs)
    return tokens, reasons, overlapped


def test_overlapped_equals_synchronous_greedy_and_seeded(model_dir):
    params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=1.2, top_k=20, seed=7, max_tokens=20, ignore_eos=True)]
    ref, ref_reasons, ref_overlap = _run(_engine(model_dir, False), params)
    got, reasons, overlapped = _run(_engine(model_dir, True), params)
    assert not ref_overlap and overlapped
    assert got == ref and reasons == ref_reasons
    assert [len(ref[f"r{i}"]) for i in range(4)] == [14, 9, 3, 20]


def test_stop_token_found_a_step_late_is_cut_the_same(model_dir):
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref, _, _ = _run(_engine(model_dir, False), greedy)
    stop = ref["r0"][5]  # a token the first request samples at its 6th step
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop])
    want, want_reasons, _ = _run(_engine(model_dir, False), params)
    got, reasons, overlapped = _run(_engine(model_dir, True), params)
    assert overlapped and got == want and reasons == want_reasons
    assert want["r0"][-1] == stop and want_reasons["r0"] == "stop"


def test_late_arrival_abort_and_a_request_that_needs_logprobs(model_dir):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    late = (4, [20, 21, 22], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    ref, _, _ = _run(_engine(model_dir, False), greedy, late=late, abort_at=(7, "r1"))
    got, reasons, overlapped = _run(_engine(model_dir, True), greedy, late=late, abort_at=(7, "r1"))
    assert overlapped and reasons["r1"] == "abort"
    assert {k: v for k, v in got.items() if k != "r1"} == {k: v for k, v in ref.items() if k != "r1"}
    assert len(got["late"]) == 6
    # the aborted request stopped where it was: a prefix of what it would have generated
    full, _, _ = _run(_engine(model_dir, False), greedy)
    assert got["r1"] == full["r1"][:len(got["r1"])] and 0 < len(got["r1"]) < 12
    # logprobs need the tokens on the host: such a batch runs synchronously, with the same result
    lp = [greedy, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2), greedy, greedy]
    ref, _, _ = _run(_engine(model_dir, False), lp)
    got, _, overlapped = _run(_engine(model_dir, True), lp)
    assert got == ref and not overlapped


def test_tight_kv_cache_preempts_as_the_synchronous_engine_does(model_dir):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[i + 1] * 6 for i in range(4)]
    kw = dict(num_kv_blocks=14, max_model_len=32, enable_prefix_caching=False)
    ref_engine = _engine(model_dir, False, **kw)
    ref, _, _ = _run(ref_engine, params, prompts)
    engine = _engine(model_dir, True, **kw)
    got, _, overlapped = _run(engine, params, prompts)
    assert overlapped and got == ref and all(len(v) == 24 for v in got.values())
    assert ref_engine.preemptions > 0 and engine.preemptions > 0


def test_cli_flag_reaches_the_engine_and_the_started_server():
    from finback.cli.main import _engine_args, _serve_argv, build_parser

    for argv, want in ((["serve"], None), (["serve", "--no-async-scheduling"], False),
                       (["serve", "--async-scheduling"], True)):
        ns = build_parser().parse_args(argv)
        assert _engine_args(ns).get("async_scheduling") == want
    ns = build_parser().parse_args(["run", "m", "--no-async-scheduling"])
    assert "--no-async-scheduling" in _serve_argv(ns)

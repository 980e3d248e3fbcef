"""Behaviour of the engine through `LLM` / `LLMEngine` with real models: stop conditions (strings,
token ids, EOS, length), streaming, seeded sampling, logprobs, abort, bad input, Ollama timings,
chat prompts and prefix caching.

Text behaviour runs on the embedded SmolLM2-135M (real tokenizer, real text, kept to few tokens);
everything else on a tiny random Qwen2 checked against transformers."""

import os
import time

import pytest
import torch

from fbtest import assert_greedy_matches, greedy_reference, save_safetensors, tiny_hf_model

from finback import LLM, SamplingParams
from finback.engine.request import SequenceStatus

SP = SamplingParams


# ============================================================================ helpers


def drive(engine, arrivals=None, max_steps=2000):
    """Step the engine until nothing is unfinished. `arrivals`: {step: [(rid, ids, params)]}, added
    before that step. Returns ({rid: final RequestOutput}, {rid: [every RequestOutput streamed]})."""
    arrivals = dict(arrivals or {})
    final, stream = {}, {}
    step = 0
    while arrivals or engine.has_unfinished_requests():
        for rid, ids, params in arrivals.pop(step, []):
            engine.add_request(rid, ids, params)
        for out in engine.step():
            stream.setdefault(out.request_id, []).append(out)
            if out.finished:
                assert out.request_id not in final, f"{out.request_id} finished twice"
                final[out.request_id] = out
        step += 1
        assert step < max_steps
    return final, stream


def assert_idle(engine, free_blocks):
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert not engine.block_manager.tables
    assert engine.block_manager.num_free == free_blocks


@pytest.fixture(autouse=True)
def _no_leftover_requests(request):
    """A failing test must not leave requests behind in the shared engines."""
    yield
    for name in ("tiny", "smol"):
        if name in request.fixturenames:
            engine = request.getfixturevalue(name).engine
            for rid in list(engine.requests):
                engine.abort_request(rid)


# ============================================================================ tiny model


@pytest.fixture(scope="module")
def tiny_hf():
    return tiny_hf_model("qwen2")


@pytest.fixture(scope="module")
def tiny_dir(tiny_hf, tmp_path_factory):
    return save_safetensors(tiny_hf, str(tmp_path_factory.mktemp("tiny-qwen2")))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return LLM(tiny_dir, skip_tokenizer_init=True, dtype="float32", kv_cache_space_gb=0.05)


def tiny_prompt(n, start=3):
    return [(start + 7 * i) % 1000 + 3 for i in range(n)]


GREEDY = SP(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_baseline(tiny):
    """A greedy run the other tests repeat to show the engine still works."""
    p = tiny_prompt(11)
    return p, tiny.generate({"prompt_token_ids": p}, GREEDY)[0].outputs[0].token_ids


def still_works(llm, baseline):
    p, tokens = baseline
    assert llm.generate({"prompt_token_ids": p}, GREEDY)[0].outputs[0].token_ids == tokens
    assert not llm.engine.has_unfinished_requests()
    assert not llm.engine.scheduler.waiting and not llm.engine.scheduler.running


# ---------------------------------------------------------------------------- stop conditions


def test_max_tokens_gives_length(tiny):
    out = tiny.generate({"prompt_token_ids": tiny_prompt(9)}, SP(temperature=0, max_tokens=5, ignore_eos=True))[0]
    o = out.outputs[0]
    assert len(o.token_ids) == 5 and o.finish_reason == "length" and o.stop_reason is None
    assert out.finished


def test_stop_token_ids(tiny):
    p = tiny_prompt(13, start=40)
    ref = tiny.generate({"prompt_token_ids": p}, SP(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    toks = ref.token_ids
    # a token that first appears in the middle of the greedy output
    k = next(i for i in range(3, len(toks)) if toks[i] not in toks[:i])
    stop = toks[k]
    out = tiny.generate({"prompt_token_ids": p},
                        SP(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[999_999, stop]))[0]
    o = out.outputs[0]
    assert o.token_ids == toks[:k + 1]
    assert o.finish_reason == "stop" and o.stop_reason == stop


def _tiny_with_eos(tiny_hf, folder, eos):
    tiny_hf.config.eos_token_id = eos
    try:
        save_safetensors(tiny_hf, folder)
    finally:
        tiny_hf.config.eos_token_id = 2
    return LLM(folder, skip_tokenizer_init=True, dtype="float32", num_kv_blocks=16)


def test_eos_stops_unless_ignore_eos(tiny, tiny_hf, tmp_path):
    p = tiny_prompt(10, start=5)
    ref = tiny.generate({"prompt_token_ids": p}, SP(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    toks = ref.token_ids
    k = next(i for i in range(2, len(toks)) if toks[i] not in toks[:i])
    # the same weights, but with the token greedy produces at step k declared the EOS token
    llm = _tiny_with_eos(tiny_hf, str(tmp_path / "eos"), toks[k])
    assert toks[k] in llm.engine.eos_token_ids
    o = llm.generate({"prompt_token_ids": p}, SP(temperature=0, max_tokens=10))[0].outputs[0]
    assert o.token_ids == toks[:k + 1]  # the EOS token is reported, generation stops there
    assert o.finish_reason == "stop" and o.stop_reason is None
    o = llm.generate({"prompt_token_ids": p}, SP(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    assert o.token_ids == toks and o.finish_reason == "length"


def test_reaching_max_model_len_gives_length(tiny_dir):
    llm = LLM(tiny_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=24, num_kv_blocks=8)
    assert llm.engine.max_model_len == 24
    for plen in (20, 23):
        for mt in (None, 100):
            out = llm.generate({"prompt_token_ids": tiny_prompt(plen)},
                               SP(temperature=0, max_tokens=mt, ignore_eos=True))[0]
            o = out.outputs[0]
            assert plen + len(o.token_ids) == 24, (plen, mt, len(o.token_ids))
            assert o.finish_reason == "length"
    # max_tokens smaller than the room left still wins
    o = llm.generate({"prompt_token_ids": tiny_prompt(20)}, SP(temperature=0, max_tokens=2, ignore_eos=True))[0]
    assert len(o.outputs[0].token_ids) == 2
    with pytest.raises(ValueError):
        llm.generate({"prompt_token_ids": tiny_prompt(24)}, SP(max_tokens=1))


def test_max_tokens_none_fills_the_context(tiny_dir):
    llm = LLM(tiny_dir, skip_tokenizer_init=True, dtype="float32", num_kv_blocks=3, block_size=8)
    assert llm.engine.max_model_len == 24  # capped by the KV cache
    o = llm.generate({"prompt_token_ids": tiny_prompt(5)}, SP(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(o.outputs[0].token_ids) == 19 and o.outputs[0].finish_reason == "length"


# ---------------------------------------------------------------------------- seeded sampling


def test_seed_reproducible_alone_and_in_a_busy_batch(tiny):
    p = tiny_prompt(14, start=100)
    seeded = SP(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = tiny.generate({"prompt_token_ids": p}, seeded)[0].outputs[0].token_ids
    again = tiny.generate({"prompt_token_ids": p}, seeded)[0].outputs[0].token_ids
    assert alone == again and len(alone) == 12

    unseeded = SP(temperature=1.0, max_tokens=9, ignore_eos=True)
    arrivals = {
        0: [("g0", tiny_prompt(30, start=7), SP(temperature=0, max_tokens=15, ignore_eos=True)),
            ("u0", tiny_prompt(5, start=9), unseeded)],
        1: [("other-seed", p, SP(temperature=0.8, seed=99, max_tokens=10, ignore_eos=True))],
        2: [("target", p, seeded)],
        3: [("u1", p[:9], unseeded)],
        4: [("g1", p + [17, 18], SP(temperature=0, max_tokens=4, ignore_eos=True)),
            ("u2", tiny_prompt(40, start=11), SP(temperature=1.3, top_k=50, max_tokens=6, ignore_eos=True))],
    }
    final, stream = drive(tiny.engine, arrivals)
    assert len(final) == 7
    assert final["target"].outputs[0].token_ids == alone
    # it really shared steps with others
    assert any(len(outs) > 1 for outs in stream.values())


def test_different_seeds_give_different_outputs(tiny):
    p = tiny_prompt(8, start=200)
    outs = tiny.generate([{"prompt_token_ids": p}] * 4,
                         [SP(temperature=1.0, seed=s, max_tokens=10, ignore_eos=True) for s in (1, 2, 3, 4)])
    seqs = [tuple(o.outputs[0].token_ids) for o in outs]
    assert len(set(seqs)) == 4


def test_n_with_seed(tiny):
    p = tiny_prompt(8, start=300)
    params = SP(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    out = tiny.generate({"prompt_token_ids": p}, params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 6 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert out.eval_count == 18
    again = tiny.generate({"prompt_token_ids": p}, params)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_preemption_keeps_seeded_and_greedy_output(tiny, tiny_dir):
    """Under a KV cache too small for the batch, preempted requests are recomputed and give the
    same tokens as alone (seeded sampling included); outputs come back in prompt order."""
    prompts = [tiny_prompt(10 + 3 * i, start=50 * i + 1) for i in range(6)]
    params = [SP(temperature=0, max_tokens=20 - i, ignore_eos=True) if i % 2 else
              SP(temperature=1.0, seed=100 + i, max_tokens=20 - i, ignore_eos=True) for i in range(6)]
    alone = [tiny.generate({"prompt_token_ids": p}, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    small = LLM(tiny_dir, skip_tokenizer_init=True, dtype="float32", num_kv_blocks=8, block_size=8,
                enable_prefix_caching=False)
    outs = small.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert_idle(small.engine, 8)


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_match_transformers(tiny, tiny_hf):
    p = tiny_prompt(12, start=400)
    n_new = 6
    ref = greedy_reference(tiny_hf, p, n_new)
    out = tiny.generate({"prompt_token_ids": p},
                        SP(temperature=0, max_tokens=n_new, ignore_eos=True, logprobs=5))[0].outputs[0]
    compared = assert_greedy_matches(out.token_ids, ref, "logprobs")
    assert compared >= n_new - 1
    assert len(out.logprobs) == n_new
    for i in range(compared):
        entry = out.logprobs[i]
        tok = out.token_ids[i]
        lp = torch.log_softmax(ref.logits[i].double(), dim=-1)
        assert tok in entry
        assert len(entry) in (5, 6)  # top 5 plus the chosen token (greedy: it is the top one)
        assert abs(entry[tok] - float(lp[tok])) < 1e-4
        top5 = torch.topk(lp, 5)
        ours = sorted(entry.values(), reverse=True)[:5]
        assert ours == pytest.approx(top5.values.tolist(), abs=1e-4)
        for t, v in entry.items():
            assert abs(v - float(lp[t])) < 1e-4
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for e, t in zip(out.logprobs, out.token_ids)), abs=1e-6)


def test_logprobs_sampled_and_zero(tiny):
    p = tiny_prompt(10, start=500)
    o = tiny.generate({"prompt_token_ids": p},
                      SP(temperature=1.5, seed=3, max_tokens=8, ignore_eos=True, logprobs=2))[0].outputs[0]
    for tok, entry in zip(o.token_ids, o.logprobs):
        assert tok in entry and len(entry) in (2, 3)
        assert all(v <= 0 for v in entry.values())
        top = sorted(entry.items(), key=lambda kv: -kv[1])
        if len(entry) == 3:  # the chosen token is not among the top 2: it is below them
            assert top[-1][0] == tok
    o0 = tiny.generate({"prompt_token_ids": p}, SP(temperature=0, max_tokens=3, logprobs=0))[0].outputs[0]
    assert [list(e) for e in o0.logprobs] == [[t] for t in o0.token_ids]
    none = tiny.generate({"prompt_token_ids": p}, SP(temperature=0, max_tokens=3))[0].outputs[0]
    assert none.logprobs is None and none.cumulative_logprob is None


# ---------------------------------------------------------------------------- abort


def test_abort_mid_generation(tiny):
    engine = tiny.engine
    free0 = engine.block_manager.num_free
    assert not engine.has_unfinished_requests()
    params = SP(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = {"ab-a": tiny_prompt(20, start=600), "ab-b": tiny_prompt(37, start=610),
               "ab-c": tiny_prompt(9, start=620), "ab-w": tiny_prompt(5, start=630)}
    for rid in ("ab-a", "ab-b", "ab-c"):
        engine.add_request(rid, prompts[rid], params)
    for _ in range(4):
        engine.step()
    b_seq = engine.requests["ab-b"].seqs[0]
    assert b_seq.status is SequenceStatus.RUNNING and 0 < b_seq.num_output_tokens < 12
    out = engine.abort_request("ab-b")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert len(out.outputs[0].token_ids) == b_seq.num_output_tokens
    assert b_seq.seq_id not in engine.block_manager.tables
    assert b_seq not in engine.scheduler.running
    assert engine.abort_request("ab-b") is None  # already gone
    assert engine.abort_request("no-such-request") is None
    # abort one that is still waiting
    engine.add_request("ab-w", prompts["ab-w"], params)
    out_w = engine.abort_request("ab-w")
    assert out_w.finished and out_w.outputs[0].finish_reason == "abort" and out_w.outputs[0].token_ids == []
    # abort a request with n=2 whose sequences are running
    engine.add_request("ab-n", prompts["ab-c"], SP(n=2, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))
    engine.step()
    out_n = engine.abort_request("ab-n")
    assert [o.finish_reason for o in out_n.outputs] == ["abort", "abort"]
    final, stream = drive(engine)
    assert set(final) == {"ab-a", "ab-c"}
    assert "ab-n" not in final
    assert "ab-b" not in stream and "ab-w" not in stream
    assert_idle(engine, free0)
    # the others are unaffected: the same tokens as alone
    for rid in ("ab-a", "ab-c"):
        alone = tiny.generate({"prompt_token_ids": prompts[rid]}, params)[0].outputs[0].token_ids
        assert final[rid].outputs[0].token_ids == alone


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["too_long", "exactly_max_len", "empty", "vocab", "negative", "float",
                                  "dup_id", "bad_params", "params_count", "bad_prompt_type"])
def test_bad_input_clear_error_and_engine_keeps_working(tiny, tiny_baseline, case):
    engine = tiny.engine
    free0 = engine.block_manager.num_free
    vocab = engine.model_config.vocab_size
    L = engine.max_model_len
    ok = {"prompt_token_ids": tiny_prompt(5)}
    if case == "too_long":
        with pytest.raises(ValueError, match="max_model_len"):
            tiny.generate({"prompt_token_ids": tiny_prompt(L + 5)})
    elif case == "exactly_max_len":
        with pytest.raises(ValueError):
            tiny.generate({"prompt_token_ids": tiny_prompt(L)})
    elif case == "empty":
        with pytest.raises(ValueError, match="empty"):
            tiny.generate({"prompt_token_ids": []})
    elif case == "vocab":
        with pytest.raises(ValueError, match="token"):
            tiny.generate({"prompt_token_ids": [5, vocab, 6]})
    elif case == "negative":
        with pytest.raises(ValueError):
            engine.add_request("neg", [5, -1], SP())
    elif case == "float":
        with pytest.raises(ValueError):
            engine.add_request("flt", [5, 3.5], SP())
    elif case == "dup_id":
        engine.add_request("dup", tiny_prompt(4), SP(max_tokens=2))
        with pytest.raises(ValueError, match="dup"):
            engine.add_request("dup", tiny_prompt(4), SP(max_tokens=2))
        final, _ = drive(engine)
        assert len(final["dup"].outputs[0].token_ids) <= 2
    elif case == "bad_params":
        for kwargs in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(n=0),
                       dict(stop=[""]), dict(stop_token_ids=[-3]), dict(logprobs=99)):
            with pytest.raises(ValueError):
                SP(**kwargs)
    elif case == "params_count":
        with pytest.raises(ValueError):
            tiny.generate([ok, ok], [SP(), SP(), SP()])
    elif case == "bad_prompt_type":
        # a bad prompt after a good one: the good one must not stay behind in the engine
        with pytest.raises((TypeError, ValueError)):
            tiny.generate([ok, 12345])
        with pytest.raises(ValueError):
            tiny.generate([ok, {"prompt_token_ids": [vocab + 1]}])
        with pytest.raises(ValueError):  # text needs a tokenizer
            tiny.generate("hello")
    assert_idle(engine, free0)
    still_works(tiny, tiny_baseline)


def test_non_integer_token_ids_through_llm_are_rejected(tiny, tiny_baseline):
    with pytest.raises(ValueError):
        tiny.generate({"prompt_token_ids": [5, 3.7, 9]})
    still_works(tiny, tiny_baseline)


def test_sampling_params_of_the_wrong_type(tiny, tiny_baseline):
    with pytest.raises(TypeError):
        tiny.generate({"prompt_token_ids": tiny_prompt(5)}, {"temperature": 0})
    still_works(tiny, tiny_baseline)


def test_bad_engine_arguments(tiny_dir, tiny, tiny_baseline, tmp_path):
    from finback.loader.errors import ModelLoadError
    from finback.store.resolve import UnknownModel

    with pytest.raises(TypeError, match="no_such_arg"):
        LLM(tiny_dir, skip_tokenizer_init=True, no_such_arg=1)
    with pytest.raises(ValueError):
        LLM(tiny_dir, skip_tokenizer_init=True, max_num_seqs=0)
    with pytest.raises(ValueError):
        LLM(tiny_dir, skip_tokenizer_init=True, dtype="float7")
    with pytest.raises(ValueError, match="max_model_len"):  # more than the KV cache holds
        LLM(tiny_dir, skip_tokenizer_init=True, num_kv_blocks=2, max_model_len=1000)
    with pytest.raises(UnknownModel):
        LLM("deepseek-r1:9999b")
    with pytest.raises(ModelLoadError, match="no such file"):  # a path, not a name: the file's error
        LLM(str(tmp_path / "missing" / "model.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model at all")
    with pytest.raises(ModelLoadError):
        LLM(str(junk))
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(ModelLoadError):
        LLM(str(empty))
    still_works(tiny, tiny_baseline)


# ---------------------------------------------------------------------------- Ollama timings


def test_ollama_timings(tiny):
    engine = tiny.engine
    assert not engine.has_unfinished_requests()
    p = tiny_prompt(33, start=700)
    t_add = time.perf_counter_ns()
    engine.add_request("timed", p, SP(temperature=0, max_tokens=8, ignore_eos=True))
    t_first = time.perf_counter_ns()
    engine.step()  # the prefill, which samples the first token
    t_prefilled = time.perf_counter_ns()
    final, _ = drive(engine)
    t_end = time.perf_counter_ns()
    out = final["timed"]
    assert out.prompt_eval_count == 33
    assert out.eval_count == len(out.outputs[0].token_ids) == 8
    m = out.metrics
    assert m.arrival_ns <= m.first_scheduled_ns <= m.first_token_ns <= m.finished_ns
    assert out.prompt_eval_duration > 0 and out.eval_duration > 0 and out.total_duration > 0
    assert out.load_duration >= 0
    total = out.total_duration - out.load_duration
    assert out.prompt_eval_duration + out.eval_duration <= total
    # nanoseconds, and each duration covers the steps it names (measured around them here)
    # (the forward pass is most of the step: a duration in other units would be far off)
    assert 0.1 * (t_prefilled - t_first) <= out.prompt_eval_duration <= t_prefilled - t_first
    assert 0.5 * (t_end - t_prefilled) <= out.eval_duration <= t_end - t_first
    assert 0.5 * (t_end - t_add) <= total <= t_end - t_add
    time.sleep(0.002)
    assert out.total_duration - out.load_duration == total  # fixed once finished


# ---------------------------------------------------------------------------- prefix caching


def test_prefix_caching_on_off_same_greedy_output(tiny_dir, tiny_hf):
    prefix = tiny_prompt(40, start=800)
    prompts = [prefix + tiny_prompt(k, start=900 + 13 * k) for k in (3, 7, 16, 21, 1)]
    params = SP(temperature=0, max_tokens=6, ignore_eos=True)
    results, cached = {}, {}
    for caching in (True, False):
        llm = LLM(tiny_dir, skip_tokenizer_init=True, dtype="float32", num_kv_blocks=64,
                  enable_prefix_caching=caching)
        first = llm.generate({"prompt_token_ids": prompts[0]}, params)
        arrivals = {0: [("p1", prompts[1], params)], 1: [("p2", prompts[2], params)],
                    3: [("p3", prompts[3], params), ("p4", prompts[4], params)]}
        final, _ = drive(llm.engine, arrivals)
        outs = [first[0]] + [final[f"p{i}"] for i in range(1, 5)]
        results[caching] = [o.outputs[0].token_ids for o in outs]
        cached[caching] = [o.metrics.num_cached_tokens for o in outs]
    assert results[True] == results[False]
    assert cached[False] == [0] * 5
    assert all(c >= 32 for c in cached[True][1:]), cached[True]
    for p, toks in zip(prompts, results[True]):
        assert_greedy_matches(toks, greedy_reference(tiny_hf, p, 6), "prefix")


# ============================================================================ SmolLM2: text


COLORS = [{"role": "user", "content": "List three colors, separated by commas."}]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return LLM(smollm2_path, dtype="float32", kv_cache_space_gb=0.5)


@pytest.fixture(scope="module")
def hf_tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path), gguf_file=smollm2_path)


@pytest.fixture(scope="module")
def colors_ref(smol):
    """The greedy answer (ends with EOS): prompt ids, token ids, text, per-token text offsets."""
    out = smol.chat(COLORS, SP(temperature=0, max_tokens=24))[0]
    o = out.outputs[0]
    tok = smol.get_tokenizer()
    assert o.finish_reason == "stop" and o.stop_reason is None, "the reference answer should end with EOS"
    assert o.token_ids[-1] in smol.engine.eos_token_ids
    assert len(o.text) >= 20
    ends = [len(tok.decode(o.token_ids[:k + 1], skip_special_tokens=True)) for k in range(len(o.token_ids))]
    assert ends[-1] == len(o.text)
    return out.prompt_token_ids, o.token_ids, o.text, ends


def _pick_stops(text, ends):
    """A stop string that starts inside a token and spans the boundary to the next ones (its first
    occurrence in the middle of the text), and a later one."""
    boundaries = set(ends)
    for p in range(len(text) // 3, len(text) - 8):
        if p in boundaries or p - 1 in boundaries:
            continue
        s = text[p:p + 6]
        if text.find(s) == p and any(p < b < p + len(s) for b in boundaries) and s.strip() == s and s:
            later = text[-4:]
            if text.find(later) > p and text.find(s[3:]) == p + 3:
                return p, s, later
    raise AssertionError(f"no stop string found in {text!r}")


@pytest.fixture(scope="module")
def stop_runs(smol, colors_ref):
    """All stop-string variants streamed together through engine.step()."""
    prompt, toks, text, ends = colors_ref
    p, s, later = _pick_stops(text, ends)
    n = len(toks)
    k_s = next(i for i, e in enumerate(ends) if e >= p + len(s))  # the token completing `s`
    # a plain (not special) token first generated in the second half
    k_id = next(i for i in range(n // 2, n - 1) if toks[i] not in toks[:i])
    cases = {
        "mid": (SP(temperature=0, max_tokens=24, stop=s), text[:p], s),
        "include": (SP(temperature=0, max_tokens=24, stop=[s], include_stop_str_in_output=True),
                    text[:p + len(s)], s),
        # `s` and its suffix complete on the same token: the earlier occurrence wins, whatever
        # the order of the list
        "earliest": (SP(temperature=0, max_tokens=24, stop=[later, s, s[3:]]), text[:p], s),
        "first": (SP(temperature=0, max_tokens=24, stop=text[:3]), "", text[:3]),
        "never": (SP(temperature=0, max_tokens=24, stop=[s[:3] + "\u2603\u2603"]), text, None),
        "ignore_eos": (SP(temperature=0, max_tokens=n + 2, ignore_eos=True), None, None),
        "special": (SP(temperature=0, max_tokens=24, skip_special_tokens=False), None, None),
        "stop_id": (SP(temperature=0, max_tokens=24, stop_token_ids=[toks[k_id]]), None, toks[k_id]),
        "stop_id_incl": (SP(temperature=0, max_tokens=24, stop_token_ids=[toks[k_id]],
                            include_stop_str_in_output=True), None, toks[k_id]),
        "min_tokens": (SP(temperature=0, max_tokens=24, stop=s, min_tokens=k_s + 2), None, None),
    }
    arrivals = {0: [(f"stop-{k}", prompt, v[0]) for k, v in cases.items()]}
    final, stream = drive(smol.engine, arrivals)
    return cases, final, stream, (p, s, later)


@pytest.mark.parametrize("case", ["mid", "include", "earliest", "first", "never"])
def test_stop_strings(stop_runs, colors_ref, case):
    cases, final, stream, _ = stop_runs
    _, toks, text, ends = colors_ref
    params, want_text, want_reason = cases[case]
    o = final[f"stop-{case}"].outputs[0]
    assert o.text == want_text
    assert o.finish_reason == "stop"
    assert o.stop_reason == want_reason
    if want_reason is not None:
        # generation stopped at the token that completed the stop string
        cut = want_text.find(want_reason) if params.include_stop_str_in_output else len(want_text)
        k = next(i for i, e in enumerate(ends) if e >= cut + len(want_reason))
        assert o.token_ids == toks[:k + 1]
    else:
        assert o.token_ids == toks


@pytest.mark.parametrize("case", ["mid", "include", "earliest", "first", "never", "ignore_eos"])
def test_streaming_never_emits_a_matched_stop_string(stop_runs, colors_ref, case):
    cases, final, stream, _ = stop_runs
    _, toks, _, ends = colors_ref
    params = cases[case][0]
    outs = stream[f"stop-{case}"]
    final_out = final[f"stop-{case}"].outputs[0]
    hold = max((len(s) for s in params.stop), default=1) - 1
    emitted, n_tokens = "", 0
    for out in outs:
        o = out.outputs[0]
        emitted += o.new_text
        n_tokens += len(o.new_token_ids)
        assert o.text == emitted  # the cumulative text is what was streamed so far
        assert o.token_ids == final_out.token_ids[:n_tokens]
        # never anything beyond the final text: no piece of the stop string that ends up matched
        assert final_out.text.startswith(emitted)
        if not out.finished and n_tokens <= len(toks):
            # and no more held back than the longest stop string could need
            assert len(emitted) >= ends[n_tokens - 1] - hold
    assert emitted == final_out.text
    assert n_tokens == len(final_out.token_ids)
    if case in ("never", "ignore_eos"):
        assert sum(1 for out in outs if out.outputs[0].new_text) > 3  # it did stream


def test_stop_token_ids_on_real_model(stop_runs, colors_ref):
    cases, final, _, _ = stop_runs
    _, toks, _, _ = colors_ref
    for case in ("stop_id", "stop_id_incl"):
        o = final[f"stop-{case}"].outputs[0]
        stop = cases[case][2]
        k = toks.index(stop)
        assert o.token_ids == toks[:k + 1]
        assert o.finish_reason == "stop" and o.stop_reason == stop


def test_stop_token_text_excluded_unless_include_stop_str(stop_runs, colors_ref, smol):
    cases, final, _, _ = stop_runs
    _, toks, text, _ = colors_ref
    tok = smol.get_tokenizer()
    k = toks.index(cases["stop_id"][2])
    assert final["stop-stop_id_incl"].outputs[0].text == tok.decode(toks[:k + 1], skip_special_tokens=True)
    special = final["stop-special"].outputs[0]
    assert special.token_ids == toks and special.finish_reason == "stop"
    assert special.text == tok.decode(toks[:-1], skip_special_tokens=False)  # no "<|im_end|>"
    assert final["stop-stop_id"].outputs[0].text == tok.decode(toks[:k], skip_special_tokens=True)


def test_min_tokens_holds_for_stop_strings(stop_runs):
    cases, final, _, _ = stop_runs
    o = final["stop-min_tokens"].outputs[0]
    assert len(o.token_ids) >= cases["min_tokens"][0].min_tokens


def test_eos_and_ignore_eos_on_real_model(stop_runs, colors_ref, smol):
    cases, final, _, _ = stop_runs
    _, toks, text, _ = colors_ref
    o = final["stop-ignore_eos"].outputs[0]
    assert o.finish_reason == "length" and len(o.token_ids) == len(toks) + 2
    assert o.token_ids[:len(toks)] == toks  # went on past the EOS token
    assert o.text.startswith(text)


# ---------------------------------------------------------------------------- chat + tokenizer


def _hf_ids(hf_tok, messages, add_generation_prompt=True):
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def test_chat_prompt_ids_match_transformers(smol, hf_tok):
    convs = [
        COLORS,
        [{"role": "system", "content": "You answer in French."},
         {"role": "user", "content": "Bonjour ! Ça va ? 你好"},
         {"role": "assistant", "content": "Oui, merci."},
         {"role": "user", "content": "Et toi?"}],
    ]
    outs = smol.chat(convs, SP(temperature=0, max_tokens=1))
    for conv, out in zip(convs, outs):
        assert out.prompt_token_ids == _hf_ids(hf_tok, conv)
    out = smol.chat(convs[1], SP(temperature=0, max_tokens=1), add_generation_prompt=False)[0]
    assert out.prompt_token_ids == _hf_ids(hf_tok, convs[1], add_generation_prompt=False)


def test_tokenizer_encode_decode(smol, hf_tok):
    tok = smol.get_tokenizer()
    for text in ["Hello, world!", "  leading spaces and\ttabs\n\nnew lines", "naïve café — 你好, 🙂 ok",
                 "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf_tok.decode(ids) == text
    with pytest.raises(ValueError):  # a text that encodes to nothing
        smol.generate("", SP(max_tokens=1))
    out = smol.generate("The capital of France is", SP(temperature=0, max_tokens=1))[0]
    assert out.prompt_token_ids == hf_tok("The capital of France is")["input_ids"]
    assert out.prompt == "The capital of France is"

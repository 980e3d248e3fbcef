import math

import pytest
import torch

from finback.engine.sampling import Sampler, SamplerOutput, SamplingParams

SP = SamplingParams


def run(sampler, logits, params, prompts=None, outputs=None, gens=None, eos=frozenset()):
    n = len(params)
    prompts = prompts if prompts is not None else [[] for _ in range(n)]
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    gens = gens if gens is not None else [None] * n
    return sampler(logits, params, prompts, outputs, gens, eos)


def draws(logits_row, params, steps, rows=500, seed=0):
    """Many unseeded draws of one distribution: `rows` copies of the row, `steps` times."""
    s = Sampler(default_seed=seed)
    batch = logits_row.unsqueeze(0).expand(rows, -1).contiguous()
    out = []
    for _ in range(steps):
        out += run(s, batch, [params] * rows).token_ids
    return torch.tensor(out)


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(presence_penalty=-2.1), "presence_penalty"),
        (dict(frequency_penalty=3.0), "frequency_penalty"),
        (dict(frequency_penalty=-2.01), "frequency_penalty"),
        (dict(repeat_last_n=-2), "repeat_last_n"),
        (dict(seed=1.5), "seed"),
        (dict(stop=""), "stop"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(stop=[1]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(max_tokens=4, min_tokens=5), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=21), "logprobs"),
        (dict(max_thinking_tokens=-1), "max_thinking_tokens"),
    ],
)
def test_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_defaults_normalisation_and_clone():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (1, 1.0, 1.0, 0, 16)
    assert p.stop == [] and p.stop_token_ids == [] and not p.is_greedy
    assert SamplingParams(stop="</s>").stop == ["</s>"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy
    SamplingParams(max_tokens=None, min_tokens=1000, top_k=-1, logprobs=20, repeat_last_n=-1)
    q = SamplingParams(stop=["x"], stop_token_ids=[1], seed=3)
    c = q.clone()
    assert c == q and c is not q
    c.stop.append("y")
    c.stop_token_ids.append(2)
    assert q.stop == ["x"] and q.stop_token_ids == [1]


# ---------------------------------------------------------------- basic sampling


def test_empty_batch():
    out = Sampler()(torch.empty(0, 10), [], [], [], [])
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == [] and out.logprobs == []


def test_greedy_is_argmax_and_ignores_top_k_top_p():
    torch.manual_seed(0)
    logits = torch.randn(32, 100)
    params = [SP(temperature=0.0, top_k=3, top_p=0.1, min_p=0.5)] * 32
    out = run(Sampler(), logits, params)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 32


def test_half_precision_logits_accepted():
    torch.manual_seed(1)
    logits = torch.randn(4, 50).to(torch.bfloat16)
    out = run(Sampler(0), logits, [SP(temperature=0), SP(), SP(top_k=5), SP(logprobs=2)])
    assert out.token_ids[0] == logits.float()[0].argmax().item()
    assert all(0 <= t < 50 for t in out.token_ids)


def test_top_k_never_outside_top_k():
    torch.manual_seed(2)
    row = torch.randn(64)
    k = 5
    allowed = set(row.topk(k).indices.tolist())
    got = draws(row, SP(temperature=1.5, top_k=k), steps=8)
    seen = set(got.tolist())
    assert seen <= allowed
    assert len(seen) == k  # and it does sample all of them


def test_top_p_stays_in_nucleus_and_tiny_p_is_argmax():
    torch.manual_seed(3)
    row = torch.randn(40) * 2
    p = 0.7
    probs = torch.softmax(row, -1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    size = int((cum < p).sum().item()) + 1  # smallest prefix with mass >= p
    nucleus = set(order[:size].tolist())
    got = set(draws(row, SP(top_p=p), steps=8).tolist())
    assert got <= nucleus
    assert len(got) == len(nucleus)
    assert set(draws(row, SP(top_p=1e-6), steps=2).tolist()) == {int(row.argmax())}


def test_top_k_and_top_p_combined_in_one_batch():
    torch.manual_seed(4)
    logits = torch.randn(2, 30)
    s = Sampler(0)
    params = [SP(top_k=3), SP(top_p=0.5)]
    seen = [set(), set()]
    for _ in range(300):
        out = run(s, logits, params).token_ids
        seen[0].add(out[0])
        seen[1].add(out[1])
    assert seen[0] <= set(logits[0].topk(3).indices.tolist())
    probs = torch.softmax(logits[1], -1)
    order = probs.argsort(descending=True)
    size = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    assert seen[1] <= set(order[:size].tolist())


def test_min_p():
    row = torch.log(torch.tensor([0.40, 0.25, 0.15, 0.09, 0.06, 0.05]))
    got = set(draws(row, SP(min_p=0.3), steps=8).tolist())
    # keep p >= 0.3 * 0.40 = 0.12
    assert got == {0, 1, 2}


def test_small_temperature_matches_greedy():
    torch.manual_seed(5)
    logits = torch.randn(64, 200)
    # a margin of >= 0.05 at T=1e-3 leaves the runner-up a probability below e^-50
    logits[torch.arange(64), logits.argmax(-1)] += 0.05
    greedy = run(Sampler(), logits, [SP(temperature=0.0)] * 64).token_ids
    cold = run(Sampler(0), logits, [SP(temperature=1e-3)] * 64).token_ids
    assert cold == greedy


def chi_square(counts, probs):
    n = counts.sum()
    expected = probs * n
    return float(((counts - expected) ** 2 / expected).sum())


def test_empirical_distribution_matches_softmax_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    t = 0.7
    got = draws(logits, SP(temperature=t), steps=40, rows=500, seed=123)  # 20000 draws
    counts = torch.bincount(got, minlength=8).double()
    target = torch.softmax(logits.double() / t, -1)
    wrong = torch.softmax(logits.double(), -1)  # forgetting the temperature
    # 7 degrees of freedom: P(chi2 > 29) ~ 1.4e-4
    assert chi_square(counts, target) < 29.0
    assert chi_square(counts, wrong) > 200.0


def test_seeded_unseeded_default_seed_reproducible():
    torch.manual_seed(6)
    logits = torch.randn(8, 100)
    a = run(Sampler(default_seed=7), logits, [SP()] * 8).token_ids
    b = run(Sampler(default_seed=7), logits, [SP()] * 8).token_ids
    assert a == b


# ---------------------------------------------------------------- penalties


def ref_penalties(logits, p, prompt, output):
    """Plain-python reference on one row."""
    x = list(logits)
    w = p.repeat_last_n
    hist = prompt + output
    rep_toks = set(hist[-w:] if w > 0 else hist)
    out_toks = output[-w:] if w > 0 else output
    for t in rep_toks:
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(out_toks):
        c = out_toks.count(t)
        x[t] -= p.presence_penalty + p.frequency_penalty * c
    return x


def test_penalties_against_reference():
    base = [2.0, -1.0, 0.5, -0.5, 3.0, 0.0, 1.0, -2.0]
    logits = torch.tensor([base] * 5)
    prompt = [0, 1, 1, 6]
    output = [2, 3, 3, 4, 3]
    params = [
        SP(temperature=0, repetition_penalty=1.5),
        SP(temperature=0, presence_penalty=0.7),
        SP(temperature=0, frequency_penalty=0.4),
        SP(temperature=0, repetition_penalty=2.0, presence_penalty=-0.5, frequency_penalty=1.0),
        SP(temperature=0),  # untouched row in the same batch
    ]
    got = Sampler().process_logits(logits, params, [prompt] * 5, [output] * 5)
    for i, p in enumerate(params):
        assert got[i].tolist() == pytest.approx(ref_penalties(base, p, prompt, output)), i
    # hand-checked values for row 0 (repetition 1.5 over prompt+output = {0,1,2,3,4,6})
    assert got[0].tolist() == pytest.approx([2 / 1.5, -1.5, 0.5 / 1.5, -0.75, 2.0, 0.0, 1 / 1.5, -2.0])
    # row 2: frequency 0.4, counts {2:1, 3:3, 4:1}; prompt tokens do not count
    assert got[2].tolist() == pytest.approx([2.0, -1.0, 0.1, -1.7, 2.6, 0.0, 1.0, -2.0])
    assert torch.equal(got[4], logits[4])
    assert torch.equal(logits[0], torch.tensor(base))  # input untouched


def test_repeat_last_n_window():
    base = [1.0] * 8
    prompt = [0, 1, 2]
    output = [3, 4, 4, 5]
    p = SP(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, repeat_last_n=5)
    got = Sampler().process_logits(torch.tensor([base]), [p], [prompt], [output])[0].tolist()
    # repetition window: last 5 of prompt+output = [2, 3, 4, 4, 5]; freq window: output[-5:] = all
    assert got == pytest.approx([1.0, 1.0, 0.5, 0.0, -0.5, 0.0, 1.0, 1.0])
    assert got == pytest.approx(ref_penalties(base, p, prompt, output))
    p2 = SP(temperature=0, presence_penalty=1.0, repeat_last_n=2)
    got2 = Sampler().process_logits(torch.tensor([base]), [p2], [prompt], [output])[0].tolist()
    assert got2 == pytest.approx([1, 1, 1, 1, 0, 0, 1, 1])  # only output[-2:] = [4, 5]


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[5.0, 4.9, 0.0]])
    s = Sampler()
    assert run(s, logits, [SP(temperature=0)], [[0]], [[]]).token_ids == [0]
    assert run(s, logits, [SP(temperature=0, repetition_penalty=1.1)], [[0]], [[]]).token_ids == [1]
    # presence counts only the output, not the prompt
    assert run(s, logits, [SP(temperature=0, presence_penalty=0.5)], [[0]], [[]]).token_ids == [0]
    assert run(s, logits, [SP(temperature=0, presence_penalty=0.5)], [[]], [[0]]).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0]] * 3)
    eos = frozenset({1})
    params = [
        SP(temperature=0, min_tokens=3, stop_token_ids=[2]),
        SP(temperature=0, min_tokens=3, stop_token_ids=[2]),
        SP(temperature=0, stop_token_ids=[2]),
    ]
    outputs = [[4, 4], [4, 4, 4], []]
    s = Sampler()
    proc = s.process_logits(logits, params, [[]] * 3, outputs, eos)
    assert proc[0, 1] == -math.inf and proc[0, 2] == -math.inf and proc[0, 3] == 7.0
    assert torch.equal(proc[1], logits[1]) and torch.equal(proc[2], logits[2])
    assert run(s, logits, params, [[]] * 3, outputs, eos=eos).token_ids == [3, 1, 1]
    # sampled rows never emit them either
    sp = SP(min_tokens=1, stop_token_ids=[2], temperature=5.0)
    row = torch.tensor([0.0, 3.0, 3.0, 0.0, 0.0])
    for _ in range(5):
        got = run(Sampler(), row.expand(200, -1), [sp] * 200, eos=eos).token_ids
        assert 1 not in got and 2 not in got


# ---------------------------------------------------------------- determinism


def test_seeded_row_independent_of_batch():
    V, steps = 257, 50
    target = SP(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02,
                repetition_penalty=1.2, presence_penalty=0.3, seed=1234)
    step_rng = torch.Generator().manual_seed(99)
    target_logits = [torch.randn(V, generator=step_rng) * 3 for _ in range(steps)]
    prompt = [1, 2, 3, 5, 8]

    def alone():
        s = Sampler(default_seed=0)
        g = target.make_generator()
        out: list[int] = []
        for t in range(steps):
            out += run(s, target_logits[t].unsqueeze(0), [target], [prompt], [out[:]], [g]).token_ids
        return out

    def in_batch():
        s = Sampler(default_seed=5)
        rng = torch.Generator().manual_seed(7)
        others = [
            SP(temperature=0.0), SP(), SP(top_k=5), SP(top_p=0.5, temperature=1.3),
            SP(seed=1, top_k=3), SP(repetition_penalty=1.5, temperature=0.0), SP(min_p=0.2),
            SP(seed=2, presence_penalty=1.0, frequency_penalty=0.5), SP(temperature=0.5),
            SP(seed=1234), SP(temperature=0.0, logprobs=3), SP(top_k=1), SP(logprobs=0),
            SP(seed=77, top_p=0.3, repeat_last_n=3, repetition_penalty=1.1), SP(temperature=2.0),
        ]
        gens = [p.make_generator() for p in others]
        outs: list[list[int]] = [[] for _ in range(15)]
        g_t = target.make_generator()
        result: list[int] = []
        for t in range(steps):
            pos = (t * 5) % 16  # the target moves around the batch
            params = others[:pos] + [target] + others[pos:]
            row_gens = gens[:pos] + [g_t] + gens[pos:]
            logits = torch.randn(16, V, generator=rng) * 2
            logits[pos] = target_logits[t]
            row_outs = outs[:pos] + [result] + outs[pos:]
            out = run(s, logits, params, [prompt] * 16, [o[:] for o in row_outs], row_gens)
            ids = out.token_ids
            result.append(ids[pos])
            others_ids = ids[:pos] + ids[pos + 1:]
            for o, tok in zip(outs, others_ids):
                o.append(tok)
        return result

    a = alone()
    assert a == alone()
    assert a == in_batch()
    assert len(set(a)) > 5  # it really sampled


# ---------------------------------------------------------------- logprobs


def test_logprobs_from_raw_logits():
    torch.manual_seed(8)
    logits = torch.randn(4, 50)
    params = [
        SP(logprobs=5, temperature=0.3, repetition_penalty=1.3),
        SP(),
        SP(logprobs=0, temperature=0.0),
        SP(logprobs=20, top_k=2, seed=3),
    ]
    gens = [None, None, None, params[3].make_generator()]
    out = run(Sampler(0), logits, params, [[0, 1, 2]] * 4, [[3]] * 4, gens)
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs[1] is None
    for i, n in ((0, 5), (2, 0), (3, 20)):
        chosen_lp, top = out.logprobs[i]
        tok = out.token_ids[i]
        assert chosen_lp == pytest.approx(ref[i, tok].item(), abs=1e-6)
        assert len(top) == n
        vals, ids = ref[i].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-6)
        assert all(top[j][1] >= top[j + 1][1] for j in range(len(top) - 1))
        assert all(isinstance(t, int) for t, _ in top)
    assert out.logprobs[2][0] == pytest.approx(ref[2].max().item(), abs=1e-6)

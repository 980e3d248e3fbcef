"""Scheduler with a real BlockManager and real Request/Sequence objects; a model step is simulated:
each scheduled sequence computes its chunk, and one whose chunk reaches the end of its tokens
gets a new token (deterministic: 1000 + its output index), finishing at max_tokens."""

import itertools
import random

import pytest

from finback.engine.block_manager import BlockManager
from finback.engine.request import Request, Sequence, SequenceStatus
from finback.engine.sampling import SamplingParams
from finback.engine.scheduler import Scheduler, SchedulerConfig

_rid = itertools.count()


def make_seq(prompt, max_tokens=8):
    prompt = list(range(prompt)) if isinstance(prompt, int) else list(prompt)
    params = SamplingParams(max_tokens=max_tokens)
    req = Request(f"r{next(_rid)}", prompt, params)
    seq = Sequence(req, 0, params, None)
    req.seqs.append(seq)
    return seq


def make(num_blocks, block_size=4, budget=64, max_num_seqs=16, caching=True):
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, num_blocks * block_size), bm), bm


def check_state(sched, bm):
    refs = [0] * bm.num_blocks
    for t in bm.tables.values():
        for b in t:
            refs[b] += 1
    assert [b.ref_count for b in bm.blocks] == refs
    assert set(bm.free) == {i for i, r in enumerate(refs) if r == 0}
    for i, r in enumerate(refs):
        if r > 1:
            assert bm.blocks[i].hash is not None
    # running sequences hold tables, waiting ones don't
    assert set(bm.tables) == {s.seq_id for s in sched.running}
    assert all(s.status is SequenceStatus.RUNNING for s in sched.running)
    assert all(s.status is SequenceStatus.WAITING and s.num_computed_tokens == 0 for s in sched.waiting)
    assert not {s.seq_id for s in sched.running} & {s.seq_id for s in sched.waiting}
    assert len(sched.running) <= sched.config.max_num_seqs


def step(sched, bm, batch=None):
    """Schedule (unless given) and simulate one model step; returns (batch, sampled seqs)."""
    if batch is None:
        batch = sched.schedule()
    assert batch.total_tokens <= sched.config.max_num_batched_tokens
    assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs)
    sampled = []
    for seq, n in zip(batch.seqs, batch.num_tokens):
        assert seq.status is SequenceStatus.RUNNING
        assert 1 <= n <= seq.num_tokens - seq.num_computed_tokens
        assert len(bm.block_table(seq.seq_id)) * bm.block_size >= seq.num_computed_tokens + n
        seq.num_computed_tokens += n
        bm.commit(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(1000 + seq.num_output_tokens)
            sampled.append(seq)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq)
    check_state(sched, bm)
    return batch, sampled


def chunk_of(batch, seq):
    for s, n in zip(batch.seqs, batch.num_tokens):
        if s is seq:
            return n
    return 0


# ------------------------------------------------------------------------ budget, chunking


def test_token_budget_respected_every_step():
    sched, bm = make(num_blocks=200, budget=10)
    seqs = [make_seq(p, max_tokens=5) for p in (3, 25, 7, 1, 13, 9)]
    for s in seqs:
        sched.add(s)
    totals = []
    for _ in range(200):
        if not sched.has_work():
            break
        batch, _ = step(sched, bm)
        totals.append(batch.total_tokens)
    assert not sched.has_work()
    assert max(totals) == 10  # the budget was the binding limit at some point
    assert all(s.finished and s.num_output_tokens == 5 for s in seqs)
    assert bm.num_free == bm.num_blocks


def test_chunked_prefill_while_decodes_continue():
    sched, bm = make(num_blocks=100, budget=8)
    d1, d2 = make_seq(3, max_tokens=50), make_seq(3, max_tokens=50)
    sched.add(d1)
    sched.add(d2)
    batch, sampled = step(sched, bm)
    assert batch.num_tokens == [3, 3] and sampled == [d1, d2]
    long = make_seq(range(100, 130), max_tokens=3)
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        batch, sampled = step(sched, bm)
        # the two decodes run every step, one token each, before the prefill
        assert batch.seqs[:2] == [d1, d2] and batch.num_tokens[:2] == [1, 1]
        assert d1 in sampled and d2 in sampled
        n = chunk_of(batch, long)
        assert n == min(6, 30 - sum(chunks))  # the prefill takes the budget left
        chunks.append(n)
        assert (long in sampled) == (sum(chunks) == 30)  # no token before the prompt is done
    assert chunks == [6, 6, 6, 6, 6]
    assert long.num_computed_tokens == 30
    batch, _ = step(sched, bm)
    assert batch.num_tokens == [1, 1, 1]  # now it decodes too


def test_long_prompt_alone_is_chunked_by_budget():
    sched, bm = make(num_blocks=100, budget=7)
    s = make_seq(20, max_tokens=1)
    sched.add(s)
    chunks = []
    while sched.has_work():
        batch, _ = step(sched, bm)
        chunks.append(batch.num_tokens)
        # blocks are given only for what is computed so far
        if not s.finished:
            assert len(bm.block_table(s.seq_id)) == -(-s.num_computed_tokens // 4)
    assert chunks == [[7], [7], [6]]
    assert s.finished and s.output_token_ids == [1000]


def test_max_num_seqs_respected():
    sched, bm = make(num_blocks=100, budget=100, max_num_seqs=2)
    seqs = [make_seq(4, max_tokens=3) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    batch, _ = step(sched, bm)
    assert batch.seqs == seqs[:2]
    assert list(sched.waiting) == seqs[2:]
    finished_order = []
    while sched.has_work():
        batch, _ = step(sched, bm)
        assert len(batch.seqs) <= 2
        for s in seqs:
            if s.finished and s not in finished_order:
                finished_order.append(s)
    assert finished_order == seqs  # FCFS: equal work, arrival order


def test_fcfs_head_of_line_is_not_overtaken():
    """The first waiting sequence does not fit: a later one that would fit must wait too."""
    sched, bm = make(num_blocks=6, budget=100)
    a = make_seq(12, max_tokens=4)  # 3 blocks, growing to 4
    sched.add(a)
    step(sched, bm)
    big, small = make_seq(range(50, 62), max_tokens=2), make_seq(range(70, 72), max_tokens=2)
    sched.add(big)    # needs 3 blocks: only 2 free after `a`'s growth
    sched.add(small)  # needs 1
    batch, _ = step(sched, bm)
    assert batch.seqs == [a]
    assert list(sched.waiting) == [big, small]
    admitted = []
    while sched.has_work():
        batch, _ = step(sched, bm)
        for s in batch.seqs:
            if s not in admitted and s is not a:
                admitted.append(s)
    assert admitted == [big, small]
    assert all(s.finished for s in (a, big, small))


def test_admission_in_arrival_order():
    sched, bm = make(num_blocks=100, budget=9)
    seqs = [make_seq(4, max_tokens=2) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    batch, _ = step(sched, bm)
    assert batch.seqs == seqs[:3] and batch.num_tokens == [4, 4, 1]  # third: a chunk of 1
    batch, _ = step(sched, bm)
    assert batch.seqs[:3] == seqs[:3] and batch.num_tokens[:3] == [1, 1, 3]


# ------------------------------------------------------------------------ preemption


def test_preempts_the_newest_running_sequence():
    sched, bm = make(num_blocks=4, budget=64, caching=False)
    a, b = make_seq(range(0, 6), max_tokens=6), make_seq(range(10, 16), max_tokens=6)
    sched.add(a)
    sched.add(b)
    step(sched, bm)  # both prefill: 2 blocks each, nothing free; 7 tokens each
    assert bm.num_free == 0
    c = make_seq(range(20, 23), max_tokens=2)
    sched.add(c)  # waits: no block free
    for _ in range(2):  # both decode within their second block: 9 tokens each, 8 computed
        batch, _ = step(sched, bm)
        assert batch.seqs == [a, b] and not batch.preempted
        assert list(sched.waiting) == [c]
    b_tokens = list(b.token_ids)
    assert b.num_output_tokens == 3

    batch, _ = step(sched, bm)  # a needs a third block: b (newest) is preempted
    assert batch.preempted == [b]
    assert batch.seqs == [a]  # no admission in a step that preempted
    assert b.status is SequenceStatus.WAITING
    assert b.num_computed_tokens == 0
    assert b.token_ids == b_tokens  # its generated tokens are kept
    assert b.request.metrics.num_preemptions == 1
    assert list(sched.waiting) == [b, c]  # at the FRONT of the queue
    assert b.seq_id not in bm.tables
    assert sched.running == [a]

    # b comes back before c and recomputes prompt + generated tokens in one chunk, then continues
    readmit = None
    for t in range(200):
        if not sched.has_work():
            break
        batch, _ = step(sched, bm)
        if readmit is None and b in batch.seqs:
            readmit = t
            assert chunk_of(batch, b) == len(b_tokens)  # no prefix caching: everything again
        if c in batch.seqs:
            assert readmit is not None and (readmit < t or batch.seqs.index(b) < batch.seqs.index(c))
    assert readmit is not None
    assert b.output_token_ids == [1000 + i for i in range(6)]
    assert a.output_token_ids == [1000 + i for i in range(6)]
    assert c.output_token_ids == [1000, 1001]
    assert bm.num_free == 4


def test_newest_sequence_preempts_itself():
    sched, bm = make(num_blocks=4, budget=64, caching=False)
    a, b = make_seq(range(0, 7), max_tokens=3), make_seq(range(10, 18), max_tokens=3)
    sched.add(a)
    sched.add(b)
    step(sched, bm)  # a: 8 tokens in 2 blocks, b: 9 tokens (2 blocks, needs a third)
    batch, _ = step(sched, bm)
    assert batch.seqs == [a] and batch.preempted == [b]
    assert list(sched.waiting) == [b] and sched.running == [a]
    while sched.has_work():
        step(sched, bm)
    assert a.finished and b.finished
    assert b.output_token_ids == [1000, 1001, 1002]


def test_no_admission_in_a_step_that_preempted():
    """The victim is not readmitted in the same step, even when a chunk of it would fit."""
    sched, bm = make(num_blocks=5, budget=64, caching=False)
    a, b = make_seq(range(0, 8), max_tokens=5), make_seq(range(10, 20), max_tokens=5)
    sched.add(a)
    sched.add(b)
    step(sched, bm)  # a: 2 blocks (9 tokens known), b: 3 blocks (11 known); nothing free
    assert bm.num_free == 0
    sched.config.max_num_batched_tokens = 6  # a chunk of b (5 tokens, 2 blocks) would fit after
    batch, _ = step(sched, bm)
    assert batch.preempted == [b] and batch.seqs == [a]
    assert bm.num_free == 2 and list(sched.waiting) == [b]
    batch, _ = step(sched, bm)
    assert batch.seqs == [a, b] and batch.num_tokens == [1, 5]


def test_preempted_victims_keep_arrival_order_at_the_front():
    sched, bm = make(num_blocks=3, budget=64, caching=False)
    a = make_seq(range(0, 3), max_tokens=9)  # 12 tokens: what the 3 blocks hold
    b = make_seq(range(10, 13), max_tokens=9)
    c = make_seq(range(20, 23), max_tokens=9)
    d = make_seq(range(30, 31), max_tokens=1)
    for s in (a, b, c):
        sched.add(s)
    step(sched, bm)  # each 1 block, 4 tokens after sampling
    sched.add(d)
    batch, _ = step(sched, bm)  # 4 tokens computed, 5 known: all full, no room for d
    batch, _ = step(sched, bm)  # a needs a block: c then b are preempted
    assert batch.preempted == [c, b]
    assert list(sched.waiting) == [b, c, d]
    for _ in range(200):
        if not sched.has_work():
            break
        step(sched, bm)
    assert all(s.finished for s in (a, b, c, d))


def test_finish_and_abort_free_blocks():
    sched, bm = make(num_blocks=10, budget=64)
    a, b, c = make_seq(9, 10), make_seq(range(50, 55), 10), make_seq(range(70, 90), 10)
    for s in (a, b):
        sched.add(s)
    step(sched, bm)
    sched.add(c)
    free_before = bm.num_free
    n_a = len(bm.block_table(a.seq_id))
    sched.finish(a)  # abort a running sequence
    assert a.status is SequenceStatus.FINISHED and a not in sched.running
    assert bm.num_free == free_before + n_a
    sched.finish(c)  # abort a waiting one
    assert c not in sched.waiting and c.finished
    check_state(sched, bm)
    while sched.has_work():
        batch, _ = step(sched, bm)
        assert a not in batch.seqs and c not in batch.seqs
    assert b.finished and b.num_output_tokens == 10
    assert bm.num_free == 10
    assert a.num_output_tokens == 1 and c.num_output_tokens == 0


# ------------------------------------------------------------------------ randomized workload


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("caching", [True, False])
def test_random_workload_tiny_kv_everyone_finishes(caching, seed):
    rng = random.Random(10 * seed + caching)
    bs, num_blocks = 4, 12  # 48 tokens of KV in all
    sched, bm = make(num_blocks=num_blocks, block_size=bs, budget=10, max_num_seqs=5, caching=caching)
    prefixes = [[rng.randrange(1, 500) for _ in range(8)] for _ in range(3)]
    arrivals = []
    for i in range(40):
        plen = rng.randrange(1, 25)
        prompt = (list(rng.choice(prefixes)) + [rng.randrange(1, 500) for _ in range(plen)])[:plen] \
            if rng.random() < 0.5 else [rng.randrange(1, 500) for _ in range(plen)]
        mt = rng.randrange(1, num_blocks * bs - plen + 1) if rng.random() < 0.2 else rng.randrange(1, 12)
        arrivals.append((rng.randrange(0, 60), make_seq(prompt, max_tokens=mt)))
    arrivals.sort(key=lambda x: x[0])
    order = [s for _, s in arrivals]
    first_admission = []
    preemptions = 0
    t = 0
    pending = list(arrivals)
    while pending or sched.has_work():
        while pending and pending[0][0] <= t:
            sched.add(pending.pop(0)[1])
        batch, _ = step(sched, bm)
        preemptions += len(batch.preempted)
        for s in batch.seqs:
            if s not in first_admission:
                first_admission.append(s)
        if sched.has_work():
            assert batch or batch.preempted, "stuck: work left but nothing scheduled"
        t += 1
        assert t < 5000, "starvation: the workload did not finish"
    assert first_admission == order  # FCFS
    for s in order:
        assert s.finished
        assert s.output_token_ids == [1000 + i for i in range(s.params.max_tokens)]
    assert preemptions > 0  # the KV budget was tight enough to exercise preemption
    assert bm.num_free == num_blocks and not bm.tables

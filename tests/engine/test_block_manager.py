"""BlockManager: paged KV bookkeeping with ref counts and chained-hash prefix caching."""

import random

import pytest

from finback.engine.block_manager import BlockManager, NoFreeBlocks, chain_hash

BS = 4


def toks(n, start=0):
    return list(range(start, start + n))


def snapshot(bm):
    return (
        list(bm.free),
        dict(bm.cached),
        {k: list(v) for k, v in bm.tables.items()},
        {k: list(v) for k, v in bm.hashes.items()},
        [(b.ref_count, b.hash) for b in bm.blocks],
        bm.hits,
        bm.queries,
    )


def check_invariants(bm):
    refs = [0] * bm.num_blocks
    for table in bm.tables.values():
        for b in table:
            refs[b] += 1
    assert [b.ref_count for b in bm.blocks] == refs
    assert set(bm.free) == {i for i, r in enumerate(refs) if r == 0}
    assert len(bm.free) == len(set(bm.free))
    for h, b in bm.cached.items():
        assert bm.blocks[b].hash == h
    for b in bm.blocks:
        if b.hash is not None:
            assert bm.cached.get(b.hash) == b.block_id
    # a block in two tables (or twice in one) must be a cached full block
    for i, r in enumerate(refs):
        if r > 1:
            assert bm.blocks[i].hash is not None, f"block {i} shared by {r} tables but not cached"
    for table in bm.tables.values():
        assert len(table) == len(set(table))


# ------------------------------------------------------------------------ basics


def test_rejects_empty_config():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_allocate_grow_free():
    bm = BlockManager(8, BS)
    cached, n = bm.allocate(1, toks(10), max_new=100)
    assert (cached, n) == (0, 10)
    assert len(bm.block_table(1)) == 3  # ceil(10 / 4)
    assert bm.num_free == 5
    assert bm.usage() == pytest.approx(3 / 8)
    # growing within the last block needs nothing
    assert bm.blocks_needed(1, 12) == 0
    assert bm.grow(1, 12) and len(bm.block_table(1)) == 3
    assert bm.blocks_needed(1, 13) == 1
    assert bm.grow(1, 13) and len(bm.block_table(1)) == 4
    assert bm.num_free == 4
    table = bm.block_table(1)
    assert len(set(table)) == 4
    bm.free_seq(1)
    assert bm.num_free == 8 and bm.usage() == 0.0
    assert all(b.ref_count == 0 for b in bm.blocks)
    bm.free_seq(1)  # freeing twice is harmless
    assert bm.num_free == 8
    check_invariants(bm)


def test_allocate_only_the_chunk_asked_for():
    bm = BlockManager(8, BS)
    cached, n = bm.allocate(1, toks(20), max_new=6)  # chunked prefill: 6 tokens now
    assert (cached, n) == (0, 6)
    assert len(bm.block_table(1)) == 2
    assert bm.grow(1, 20) and len(bm.block_table(1)) == 5


def test_grow_without_room_changes_nothing():
    bm = BlockManager(3, BS)
    bm.allocate(1, toks(8), 100)
    bm.allocate(2, toks(3, 100), 100)
    assert bm.num_free == 0
    before = snapshot(bm)
    assert bm.grow(1, 9) is False
    assert snapshot(bm) == before


def test_no_free_blocks_leaves_state_unchanged():
    bm = BlockManager(4, BS)
    p = toks(12)
    bm.allocate(1, p, 100)
    bm.commit(1, p, 12)
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(2, toks(8, 500), 100)  # needs 2 blocks, 1 free
    assert snapshot(bm) == before
    # a prefix hit that would still need too many fresh blocks also changes nothing
    with pytest.raises(NoFreeBlocks):
        bm.allocate(3, p[:8] + toks(9, 900), 100)  # 2 hit blocks + 3 fresh > 1 free
    assert snapshot(bm) == before
    # nothing to compute is refused too
    with pytest.raises(NoFreeBlocks):
        bm.allocate(4, toks(4, 700), 0)
    assert snapshot(bm) == before
    check_invariants(bm)


def test_no_free_blocks_counts_revived_cached_blocks():
    """Reviving a freed cached block takes it off the free list, so it counts against the room."""
    bm = BlockManager(3, BS)
    p = toks(8)
    bm.allocate(1, p, 100)
    bm.commit(1, p, 8)
    bm.free_seq(1)
    bm.allocate(2, toks(4, 100), 100)  # one fresh block (the never-used one goes first)
    assert bm.num_free == 2
    before = snapshot(bm)
    # p + 2 tokens hits both freed cached blocks: reviving 2 + 1 fresh block > 2 free
    with pytest.raises(NoFreeBlocks):
        bm.allocate(3, p + [77, 78], 100)
    assert snapshot(bm) == before


# ------------------------------------------------------------------------ prefix caching


def test_same_prefix_shares_physical_blocks():
    bm = BlockManager(16, BS)
    prefix = toks(8, 1000)
    a = prefix + [1, 2, 3]
    bm.allocate(1, a, 100)
    bm.commit(1, a, len(a))
    b = prefix + [7, 8, 9, 10, 11]
    cached, n = bm.allocate(2, b, 100)
    assert (cached, n) == (8, 5)
    ta, tb = bm.block_table(1), bm.block_table(2)
    assert tb[:2] == ta[:2]
    assert tb[2] not in ta and len(tb) == 4
    assert bm.blocks[ta[0]].ref_count == 2 and bm.blocks[ta[1]].ref_count == 2
    assert bm.blocks[ta[2]].ref_count == 1
    assert bm.hits == 1 and bm.queries == 2
    check_invariants(bm)
    # a third sharer
    cached, _ = bm.allocate(3, prefix + [5], 100)
    assert cached == 8
    assert bm.blocks[ta[0]].ref_count == 3
    bm.free_seq(1)
    assert bm.blocks[ta[0]].ref_count == 2
    assert ta[0] not in bm.free
    check_invariants(bm)


def test_hit_stops_at_first_uncommitted_block():
    bm = BlockManager(16, BS)
    a = toks(12)
    bm.allocate(1, a, 100)
    bm.commit(1, a, 5)  # only the first block is full and computed
    cached, _ = bm.allocate(2, a + [99], 100)
    assert cached == 4
    assert bm.block_table(2)[0] == bm.block_table(1)[0]
    assert bm.block_table(2)[1] != bm.block_table(1)[1]


def test_different_first_block_breaks_the_chain():
    bm = BlockManager(16, BS)
    a = toks(12)
    bm.allocate(1, a, 100)
    bm.commit(1, a, 12)
    # same second and third blocks, different first block: no hit at all
    b = [500, 501, 502, 503] + a[4:] + [9]
    cached, n = bm.allocate(2, b, 100)
    assert (cached, n) == (0, len(b))
    assert not set(bm.block_table(2)) & set(bm.block_table(1))
    assert bm.hits == 0
    # a difference in the middle keeps only the blocks before it
    c = a[:4] + [600] + a[5:] + [9]
    cached, _ = bm.allocate(3, c, 100)
    assert cached == 4
    check_invariants(bm)


def test_a_block_is_identified_by_its_whole_prefix():
    """Equal tokens after different prefixes are different KV: the hit must follow the chain."""
    bm = BlockManager(16, BS)
    A, B, C = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    x, y = A + B + [0], C + B + [0]
    for sid, s in ((1, x), (2, y)):
        bm.allocate(sid, s, 100)
        bm.commit(sid, s, len(s))
    assert bm.allocate(3, C + B + [42], 100)[0] == 8
    assert bm.block_table(3)[:2] == bm.block_table(2)[:2]  # y's B (after C), not x's B (after A)
    assert bm.allocate(4, A + B + [42], 100)[0] == 8
    assert bm.block_table(4)[:2] == bm.block_table(1)[:2]
    check_invariants(bm)


def test_hit_never_covers_the_whole_prompt():
    bm = BlockManager(16, BS)
    a = toks(12)  # exactly three full blocks
    bm.allocate(1, a, 100)
    bm.commit(1, a, 12)
    cached, n = bm.allocate(2, list(a), 100)
    assert (cached, n) == (8, 4)  # the last block is recomputed to produce logits
    assert bm.block_table(2)[:2] == bm.block_table(1)[:2]
    assert bm.block_table(2)[2] != bm.block_table(1)[2]
    check_invariants(bm)
    # a one-block prompt fully cached: nothing is reused
    bm2 = BlockManager(4, BS)
    bm2.allocate(1, toks(4), 100)
    bm2.commit(1, toks(4), 4)
    assert bm2.allocate(2, toks(4), 100) == (0, 4)


def test_prefix_caching_disabled_never_shares():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    a = toks(12)
    bm.allocate(1, a, 100)
    bm.commit(1, a, 12)
    assert bm.allocate(2, a + [1], 100) == (0, 13)
    assert not set(bm.block_table(2)) & set(bm.block_table(1))
    assert not bm.cached
    check_invariants(bm)


def test_freed_cached_blocks_are_revived_by_a_later_hit():
    bm = BlockManager(8, BS)
    a = toks(10, 300)
    bm.allocate(1, a, 100)
    bm.commit(1, a, 10)
    first_two = bm.block_table(1)[:2]
    bm.free_seq(1)
    assert bm.num_free == 8
    assert all(bm.blocks[b].hash is not None for b in first_two)  # not wiped
    cached, n = bm.allocate(2, a[:8] + [1, 2, 3], 100)
    assert (cached, n) == (8, 3)
    assert bm.block_table(2)[:2] == first_two
    assert all(bm.blocks[b].ref_count == 1 for b in first_two)
    assert not set(first_two) & set(bm.free)
    assert bm.num_free == 8 - 3
    check_invariants(bm)


def test_commit_does_not_register_partial_blocks_or_duplicates():
    bm = BlockManager(16, BS)
    a = toks(10)
    bm.allocate(1, a, 100)
    bm.commit(1, a, 10)
    assert len(bm.cached) == 2  # the third block holds only 2 tokens
    assert bm.blocks[bm.block_table(1)[2]].hash is None
    # a second sequence computing the same contents without a hit (computed before the commit)
    bm2 = BlockManager(16, BS)
    bm2.allocate(1, a, 100)
    bm2.allocate(2, a, 100)  # no hit yet: nothing committed
    bm2.commit(1, a, 10)
    bm2.commit(2, a, 10)
    assert len(bm2.cached) == 2
    assert set(bm2.cached.values()) == set(bm2.block_table(1)[:2])
    assert all(bm2.blocks[b].hash is None for b in bm2.block_table(2))
    check_invariants(bm2)
    bm2.free_seq(1)
    bm2.free_seq(2)
    check_invariants(bm2)
    assert bm2.num_free == 16


def test_incremental_commit_during_decode():
    bm = BlockManager(16, BS)
    seq = toks(6)
    bm.allocate(1, seq, 100)
    bm.commit(1, seq, 6)
    assert len(bm.cached) == 1
    for t in range(6):  # decode: one token computed per step
        seq.append(100 + t)
        assert bm.grow(1, len(seq))
        bm.commit(1, seq, len(seq) - 1)  # the newest token is not computed yet
    # tokens computed: 11 -> 2 full blocks
    assert len(bm.cached) == 2
    cached, _ = bm.allocate(2, seq[:8] + [1], 100)
    assert cached == 8


def test_reset_prefix_cache_forgets_only_free_blocks():
    bm = BlockManager(16, BS)
    a, b = toks(8), toks(8, 100)
    for sid, p in ((1, a), (2, b)):
        bm.allocate(sid, p, 100)
        bm.commit(sid, p, 8)
    bm.free_seq(1)
    bm.reset_prefix_cache()
    assert bm.allocate(3, a + [1], 100)[0] == 0
    assert bm.allocate(4, b + [1], 100)[0] == 8
    check_invariants(bm)


# ------------------------------------------------------------------------ eviction order


def test_lru_eviction_least_recently_freed_first():
    bm = BlockManager(4, BS)
    p1, p2 = toks(4, 100), toks(4, 200)
    for sid, p in ((1, p1), (2, p2)):
        bm.allocate(sid, p + [0], 100)  # one full cached block + one partial
        bm.commit(sid, p + [0], 5)
    b1, b2 = bm.block_table(1)[0], bm.block_table(2)[0]
    bm.free_seq(1)  # p1's block freed first (least recently)
    bm.free_seq(2)
    # free order: [p1 partial, p1 cached, p2 partial, p2 cached]; an unrelated sequence taking
    # 2 blocks takes p1's (freed earliest): p2's cached block survives
    bm.allocate(3, toks(8, 900), 100)
    assert b1 in bm.block_table(3) and b2 not in bm.block_table(3)
    assert bm.allocate(4, p2 + [5], 100)[0] == 4  # p2 still hits
    bm.free_seq(4)
    bm.free_seq(3)
    assert bm.allocate(5, p1 + [5], 100)[0] == 0  # p1 was evicted
    check_invariants(bm)


def test_a_prefix_outlives_its_continuation():
    bm = BlockManager(4, BS)
    a = toks(12, 400)
    bm.allocate(1, a + [1], 100)  # 4 blocks
    bm.commit(1, a + [1], 13)
    blocks = list(bm.block_table(1))
    bm.free_seq(1)
    assert list(bm.free) == blocks[::-1]  # tail first
    # an unrelated 1-block sequence evicts the tail (partial block) first, then the 3rd block
    bm.allocate(2, toks(4, 800), 100)
    assert bm.block_table(2) == [blocks[3]]
    bm.allocate(3, toks(4, 850), 100)
    assert bm.block_table(3) == [blocks[2]]
    bm.free_seq(2)
    bm.free_seq(3)
    cached, _ = bm.allocate(4, a[:8] + [7], 100)
    assert cached == 8  # the first two blocks (the prefix) survived
    check_invariants(bm)


def test_revived_block_is_taken_out_of_lru_order():
    bm = BlockManager(3, BS)
    a = toks(4, 10)
    bm.allocate(1, a + [1], 100)
    bm.commit(1, a + [1], 5)
    cached_block = bm.block_table(1)[0]
    bm.free_seq(1)
    bm.allocate(2, a + [2], 100)  # revives the cached block
    assert bm.block_table(2)[0] == cached_block
    bm.allocate(3, toks(4, 50), 100)  # takes the only other free block... must not evict
    assert cached_block not in bm.block_table(3)
    assert bm.blocks[cached_block].hash is not None
    check_invariants(bm)


# ------------------------------------------------------------------------ randomized


@pytest.mark.parametrize("caching", [True, False])
def test_randomized_invariants(caching):
    rng = random.Random(1234)
    bm = BlockManager(24, BS, enable_prefix_caching=caching)
    prefixes = [[rng.randrange(50) for _ in range(rng.choice([4, 8, 12]))] for _ in range(4)]
    live: dict[int, dict] = {}  # seq id -> {"tokens", "computed"}
    next_id = 0
    hits = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.3 or not live:
            tokens = list(rng.choice(prefixes)) if rng.random() < 0.7 else []
            tokens += [rng.randrange(50) for _ in range(rng.randrange(1, 14))]
            before = snapshot(bm)
            try:
                cached, n = bm.allocate(next_id, tokens, rng.randrange(1, 12))
            except NoFreeBlocks:
                assert snapshot(bm) == before
            else:
                assert cached % BS == 0 and 0 <= cached < len(tokens)
                assert 1 <= n <= len(tokens) - cached
                assert len(bm.block_table(next_id)) == -(-(cached + n) // BS)
                hits += cached > 0
                live[next_id] = {"tokens": tokens, "computed": cached, "scheduled": cached + n}
                next_id += 1
        elif op < 0.65:
            sid = rng.choice(list(live))
            s = live[sid]
            # compute what was scheduled, then commit
            s["computed"] = s["scheduled"]
            bm.commit(sid, s["tokens"], s["computed"])
            if s["computed"] == len(s["tokens"]):
                s["tokens"].append(rng.randrange(50))  # decode
            want = min(len(s["tokens"]), s["computed"] + rng.randrange(1, 6))
            before = snapshot(bm)
            if bm.grow(sid, want):
                s["scheduled"] = want
                assert len(bm.block_table(sid)) >= -(-want // BS)
            else:
                assert snapshot(bm) == before
        else:
            sid = rng.choice(list(live))
            bm.free_seq(sid)
            del live[sid]
        check_invariants(bm)
        assert set(bm.tables) == set(live)
        for sid, s in live.items():  # a cached block in a table holds that sequence's tokens
            parent = None
            for i, b in enumerate(bm.block_table(sid)):
                if (i + 1) * BS > s["computed"]:
                    break
                parent = chain_hash(parent, tuple(s["tokens"][i * BS:(i + 1) * BS]))
                assert bm.blocks[b].hash in (None, parent)
    for sid in list(live):
        bm.free_seq(sid)
    check_invariants(bm)
    assert bm.num_free == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not bm.tables and not bm.hashes
    if caching:
        assert hits > 50  # the workload did exercise prefix hits
    else:
        assert hits == 0

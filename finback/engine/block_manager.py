"""Paged KV cache bookkeeping: fixed-size blocks, ref counts, prefix caching.

A sequence's KV lives in a list of block ids (its block table). With prefix caching, every *full*
block is identified by a hash chained from the hash of the block before it and its own token ids,
so two sequences with the same prefix map the same full blocks to the same physical blocks (ref
counted). A freed block that holds a hash is not wiped: it goes to the end of the free queue and
can be revived by a later hit until it is reused for something else (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its tokens are known


class NoFreeBlocks(RuntimeError):
    pass


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        # per sequence id: block table and hashes of its full blocks
        self.tables: dict[int, list[int]] = {}
        self.hashes: dict[int, list[int]] = {}
        self.hits = 0
        self.queries = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def block_table(self, seq_id: int) -> list[int]:
        return self.tables[seq_id]

    def _prefix_hashes(self, tokens: list[int]) -> list[int]:
        out, parent = [], None
        bs = self.block_size
        for i in range(len(tokens) // bs):
            parent = chain_hash(parent, tuple(tokens[i * bs:(i + 1) * bs]))
            out.append(parent)
        return out

    def _lookup(self, hashes: list[int]) -> list[int]:
        hit = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    # -- allocation ------------------------------------------------------------------------
    def allocate(self, seq_id: int, tokens: list[int], max_new: int) -> tuple[int, int]:
        """Give a new sequence blocks, reusing cached prefix blocks, for its cached prefix plus up
        to `max_new` tokens to compute now. Returns (cached_tokens, num_to_compute): the cached
        prefix is a multiple of block_size and never all of `tokens` (at least one token is
        computed, to produce logits). Raises NoFreeBlocks, changing nothing, if it can't."""
        assert seq_id not in self.tables
        hit, hashes = self._hit(tokens)
        cached = len(hit) * self.block_size
        n = min(len(tokens) - cached, max_new)
        need = self._blocks_for(cached + n) - len(hit)
        revived = sum(1 for b in hit if self.blocks[b].ref_count == 0)
        if n <= 0 or need + revived > len(self.free):
            raise NoFreeBlocks
        self.queries += 1
        self.hits += bool(hit)
        table = []
        for b in hit:
            self._take(b)
            table.append(b)
        for _ in range(need):
            table.append(self._take_fresh())
        self.tables[seq_id] = table
        self.hashes[seq_id] = hashes[:len(hit)]
        return cached, n

    def _hit(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        hashes = self._prefix_hashes(tokens) if self.enable_prefix_caching else []
        hit = self._lookup(hashes)
        while hit and len(hit) * self.block_size >= len(tokens):
            hit.pop()
        return hit, hashes

    def grow(self, seq_id: int, num_tokens: int) -> bool:
        """Make the sequence's table cover `num_tokens` tokens. False (nothing changed) if the
        free blocks do not suffice."""
        table = self.tables[seq_id]
        need = self._blocks_for(num_tokens) - len(table)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        for _ in range(need):
            table.append(self._take_fresh())
        return True

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        return max(0, self._blocks_for(num_tokens) - len(self.tables[seq_id]))

    def commit(self, seq_id: int, tokens: list[int], num_computed: int) -> None:
        """Register the hashes of blocks that became full once `num_computed` tokens of `tokens`
        are in the cache, so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        hashes = self.hashes[seq_id]
        table = self.tables[seq_id]
        bs = self.block_size
        while (len(hashes) + 1) * bs <= num_computed:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            h = chain_hash(parent, tuple(tokens[i * bs:(i + 1) * bs]))
            hashes.append(h)
            b = table[i]
            if self.blocks[b].hash is None and h not in self.cached:
                self.blocks[b].hash = h
                self.cached[h] = b

    def free_seq(self, seq_id: int) -> None:
        table = self.tables.pop(seq_id, None)
        self.hashes.pop(seq_id, None)
        if table is None:
            return
        # free the tail first so that, under LRU eviction, a prefix outlives its continuation
        for b in reversed(table):
            blk = self.blocks[b]
            blk.ref_count -= 1
            assert blk.ref_count >= 0
            if blk.ref_count == 0:
                self.free[b] = None

    def borrow(self, n: int) -> list[int]:
        """n fresh blocks outside any sequence (scratch space for a one-off pass); NoFreeBlocks if
        there are not enough. Give them back with `give_back`."""
        if n > len(self.free):
            raise NoFreeBlocks
        return [self._take_fresh() for _ in range(n)]

    def give_back(self, blocks: list[int]) -> None:
        for b in blocks:
            self.blocks[b].ref_count -= 1
            if self.blocks[b].ref_count == 0:
                self.free[b] = None

    def reset_prefix_cache(self) -> None:
        for h, b in list(self.cached.items()):
            if self.blocks[b].ref_count == 0:
                del self.cached[h]
                self.blocks[b].hash = None

    # -- internals -------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self, b: int) -> None:
        blk = self.blocks[b]
        if blk.ref_count == 0:
            del self.free[b]
        blk.ref_count += 1

    def _take_fresh(self) -> int:
        b, _ = self.free.popitem(last=False)
        blk = self.blocks[b]
        if blk.hash is not None:  # evict its cached contents
            if self.cached.get(blk.hash) == b:
                del self.cached[blk.hash]
            blk.hash = None
        blk.ref_count = 1
        return b

"""BlockManager: allocation, reference counts, prefix caching, LRU eviction, collision safety."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Sequence as SequenceABC

import pytest

from lmstack.infer.engine import _block_manager
from lmstack.infer.engine._block_manager import BlockManager
from lmstack.infer.engine._sequence import Sequence

_ids = itertools.count()


def make_seq(tokens: list[int], max_total: int | None = None) -> Sequence:
    return Sequence(next(_ids), "r", list(tokens), max_total if max_total is not None else len(tokens) + 16)


def compute(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """Play the engine: allocate, 'write' K/V for the next tokens and commit them."""
    if num_tokens is None:
        num_tokens = (
            seq.num_tokens - len(bm.match_prefix(seq)) * bm.block_size
            if not seq.block_table
            else seq.num_uncomputed_tokens
        )
    assert bm.allocate(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.commit(seq)


def test_allocate_and_free_without_leaks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(10)))
    assert bm.allocate(a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.ref_count(b) == 1 for b in a.block_table)
    a.num_computed_tokens = 10
    assert bm.allocate(a, 2)  # 12 tokens still fit 3 blocks
    assert len(a.block_table) == 3
    assert bm.allocate(a, 3)  # 13 tokens need a 4th
    assert len(a.block_table) == 4 and bm.num_free_blocks == 4
    bm.check_invariants([a])
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 8
    bm.check_invariants([])


def test_allocate_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(8)))
    assert bm.allocate(a, 8)
    b = make_seq(list(range(100, 112)))
    assert not bm.allocate(b, 12)
    assert b.block_table == [] and b.num_computed_tokens == 0 and bm.num_free_blocks == 2
    bm.check_invariants([a, b])


def test_can_ever_fit() -> None:
    bm = BlockManager(num_blocks=3, block_size=16)
    assert bm.can_ever_fit(48)
    assert not bm.can_ever_fit(49)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
    bm = BlockManager(4, 4)
    with pytest.raises(ValueError):
        bm.allocate(make_seq([1, 2]), -1)


def test_prefix_hits_are_shared_full_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    a = make_seq(prompt)
    compute(bm, a)
    assert bm.num_cached_blocks == 2  # the partial block is not cached

    b = make_seq([*prompt, 99])
    assert bm.lookup_prefix(b.all_token_ids) == a.block_table[:2]
    assert bm.match_prefix(b) == a.block_table[:2]
    assert bm.allocate(b, b.num_tokens - 8)
    assert b.num_computed_tokens == 8 and b.num_cached_prompt_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(x) for x in b.block_table] == [2, 2, 1]
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 10 + 11
    bm.check_invariants([a, b])

    # A prompt diverging in the second block shares only the first.
    c = make_seq([*prompt[:4], 0, 0, 0, 0, 5])
    assert bm.match_prefix(c) == a.block_table[:1]
    for seq in (a, b):
        bm.free(seq)
    assert bm.num_free_blocks == 16
    bm.check_invariants([])


def test_the_last_tokens_block_is_never_a_hit() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))  # exactly two full blocks
    a = make_seq(prompt)
    compute(bm, a)
    assert bm.num_cached_blocks == 2
    # Reusing both blocks would leave no token to compute, so no logits: only the first is a hit.
    assert bm.lookup_prefix(prompt) == a.block_table[:1]
    assert bm.lookup_prefix(prompt[:4]) == []
    assert bm.lookup_prefix([*prompt, 8]) == a.block_table[:2]
    b = make_seq(prompt)
    assert bm.allocate(b, 4)
    assert b.num_computed_tokens == 4 and len(b.block_table) == 2


def test_evicted_blocks_come_last_lru_and_deepest_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(8)))
    compute(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    b = make_seq(list(range(100, 108)))
    compute(bm, b)  # takes the 2 uncached free blocks, A's cached ones stay
    b_blocks = list(b.block_table)
    assert not set(a_blocks) & set(b_blocks)
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 4

    query_a = [*range(8), 0]
    query_b = [*range(100, 108), 0]
    c = make_seq([200, 201, 202, 203])
    assert bm.allocate(c, 4)
    # Least recently released is A; within A the deepest block goes first.
    assert c.block_table == [a_blocks[1]]
    assert bm.lookup_prefix(query_a) == a_blocks[:1]
    assert bm.num_cached_blocks == 3
    d = make_seq([300, 301, 302, 303])
    assert bm.allocate(d, 4)
    assert d.block_table == [a_blocks[0]]
    assert bm.lookup_prefix(query_a) == []
    assert bm.lookup_prefix(query_b) == b_blocks
    bm.check_invariants([c, d])


def test_reuse_refreshes_lru_position() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq([*range(4), 50])
    compute(bm, a)
    b = make_seq([*range(100, 104), 50])
    compute(bm, b)
    a_block, b_block = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)
    # A is older, but a hit on it makes it the most recently released.
    a2 = make_seq([*range(4), 60])
    compute(bm, a2)
    assert a2.block_table[0] == a_block
    bm.free(a2)
    filler = make_seq(list(range(1000, 1012)))
    assert bm.allocate(filler, 12)  # the two uncached blocks, then one eviction
    assert b_block in filler.block_table and a_block not in filler.block_table
    bm.check_invariants([filler])


def test_shared_block_is_not_evicted_while_referenced() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    prompt = [*range(4), 7]
    a = make_seq(prompt)
    compute(bm, a)
    b = make_seq(prompt)
    compute(bm, b)
    shared = a.block_table[0]
    assert b.block_table[0] == shared and bm.ref_count(shared) == 2
    bm.free(a)
    assert bm.ref_count(shared) == 1 and bm.num_free_blocks == 2
    hog = make_seq(list(range(100, 112)))
    assert not bm.allocate(hog, 12)  # would need the shared block
    assert bm.allocate(hog, 8)
    assert shared not in hog.block_table
    assert bm.lookup_prefix(prompt) == [shared]
    bm.check_invariants([b, hog])
    bm.free(b)
    bm.free(hog)
    assert bm.num_free_blocks == 4
    bm.check_invariants([])


def test_uncached_free_blocks_are_used_before_evicting() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a = make_seq(list(range(9)))
    compute(bm, a)
    bm.free(a)
    other = make_seq(list(range(100, 112)))
    assert bm.allocate(other, 12)  # 3 uncached free blocks exist
    assert bm.lookup_prefix(list(range(9))) != []
    assert bm.num_cached_blocks == 2


def test_side_by_side_duplicates_register_once_and_chain_on() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(8))
    a, b = make_seq(prompt), make_seq(prompt)
    for seq in (a, b):
        assert bm.allocate(seq, 8)
    for seq in (a, b):
        seq.num_computed_tokens = 8
        bm.commit(seq)
    assert bm.num_cached_blocks == 2
    # B decodes to fill its third block; that block chains on A's registered ones.
    b.output_token_ids.extend([40, 41, 42, 43])
    assert bm.allocate(b, 4)
    b.num_computed_tokens = 12
    bm.commit(b)
    assert bm.num_cached_blocks == 3
    c = make_seq([*b.all_token_ids, 44])
    assert bm.match_prefix(c) == a.block_table[:2] + b.block_table[2:3]
    bm.check_invariants([a, b])


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    prompt = list(range(9))
    a = make_seq(prompt)
    compute(bm, a, 9)
    assert bm.num_cached_blocks == 0
    assert bm.lookup_prefix(prompt) == []
    b = make_seq(prompt)
    compute(bm, b, 9)
    assert not set(a.block_table) & set(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.prefix_cache_queries == 0


def test_reset_prefix_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(9)))
    compute(bm, a)
    b = make_seq(list(range(100, 109)))
    compute(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
    assert bm.lookup_prefix(list(range(9))) == []
    assert bm.lookup_prefix(list(range(100, 109))) == []
    bm.check_invariants([b])
    # B keeps running; its later blocks are not registered (their parents are gone).
    b.output_token_ids.extend([1, 2, 3, 4])
    compute(bm, b)
    assert bm.num_cached_blocks == 0
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants([])


def test_stats_count_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.prefix_cache_hit_rate == 0.0
    a = make_seq(list(range(9)))
    compute(bm, a)
    b = make_seq(list(range(9)))
    compute(bm, b)
    assert bm.prefix_cache_queries == 18 and bm.prefix_cache_hits == 8
    assert bm.prefix_cache_hit_rate == pytest.approx(8 / 18)


# ---------------------------------------------------------------------------------------------
# Collisions: a digest match must never return K/V computed on other tokens.
# ---------------------------------------------------------------------------------------------


def _constant_hash(parent: bytes | None, tokens: SequenceABC[int], salt: int | None = None) -> bytes:
    return b"\x00" * 16


def _parentless_hash(parent: bytes | None, tokens: SequenceABC[int], salt: int | None = None) -> bytes:
    # Ignores the chain: equal blocks at different places collide.
    return hashlib.blake2b(repr(list(tokens)).encode(), digest_size=16).digest()


def test_collision_compares_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_block_manager, "_hash_block", _constant_hash)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(bm, a)
    # Block 1 collides with block 0, which A still holds: it stays unregistered.
    assert bm.num_cached_blocks == 1
    assert bm.lookup_prefix([9, 9, 9, 9, 9]) == []
    assert bm.lookup_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9]) == a.block_table[:1]
    bm.free(a)
    # An unreferenced colliding entry gives way to a new registration...
    b = make_seq([9, 9, 9, 9, 9])
    compute(bm, b)
    assert bm.lookup_prefix([9, 9, 9, 9, 0]) == b.block_table[:1]
    # ...and the old tokens now miss instead of getting B's K/V.
    assert bm.lookup_prefix([1, 2, 3, 4, 5]) == []
    bm.check_invariants([b])


def test_a_salted_sequence_shares_blocks_only_with_the_same_salt() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    a.cache_salt = 9
    compute(bm, a)
    assert bm.lookup_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9]) == []  # unsalted: another chain
    assert bm.lookup_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9], salt=8) == []
    assert bm.lookup_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9], salt=9) == a.block_table[:2]
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    b.cache_salt = 9
    assert bm.match_prefix(b) == a.block_table[:2]
    bm.check_invariants([a])


def test_collision_compares_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_block_manager, "_hash_block", _constant_hash)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 5])
    a.cache_salt = 5
    compute(bm, a)
    # The same tokens under the same digest, but another salt: a miss, never the other's K/V.
    assert bm.lookup_prefix([1, 2, 3, 4, 5], salt=6) == []
    assert bm.lookup_prefix([1, 2, 3, 4, 5]) == []
    assert bm.lookup_prefix([1, 2, 3, 4, 5], salt=5) == a.block_table[:1]


def test_collision_compares_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_block_manager, "_hash_block", _parentless_hash)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    compute(bm, a)
    assert bm.num_cached_blocks == 2
    # [5, 6, 7, 8] as a first block collides with A's second block, computed after [1, 2, 3, 4].
    assert bm.lookup_prefix([5, 6, 7, 8, 0]) == []
    # [1, 2, 3, 4] as a second block collides with A's first block, computed with no parent.
    assert bm.lookup_prefix([1, 2, 3, 4, 1, 2, 3, 4, 0]) == a.block_table[:1]
    assert bm.lookup_prefix([1, 2, 3, 4, 5, 6, 7, 8, 0]) == a.block_table[:2]


def test_digest_is_deterministic_and_chained() -> None:
    h1 = _block_manager._hash_block(None, [1, 2, 3])
    assert h1 == _block_manager._hash_block(None, (1, 2, 3)) and len(h1) == 16
    assert _block_manager._hash_block(h1, [1, 2, 3]) != h1
    assert _block_manager._hash_block(None, [1, 2, 4]) != h1


# ---------------------------------------------------------------------------------------------
# Randomized stress: invariants after every operation, and every hit holds exactly the right K/V.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("region_blocks", [None, 5], ids=["first-free", "regions"])
@pytest.mark.parametrize(
    "hash_fn", [None, _parentless_hash, _constant_hash], ids=["blake2b", "weak", "constant"]
)
def test_random_operations_keep_invariants(
    monkeypatch: pytest.MonkeyPatch, hash_fn: object, region_blocks: int | None
) -> None:
    if hash_fn is not None:
        monkeypatch.setattr(_block_manager, "_hash_block", hash_fn)
    rng = random.Random(1234)
    bs = 4
    # With regions: 4 regions of 5 blocks (20 tokens, a sequence's most) and 4 blocks outside them.
    bm = BlockManager(num_blocks=24, block_size=bs, region_blocks=region_blocks)
    # What each slot "holds": the token prefix whose last token's K/V was written there.
    kv: dict[tuple[int, int], tuple[int, ...]] = {}
    families = [[rng.randrange(6) for _ in range(12)] for _ in range(4)]
    live: list[Sequence] = []
    seen = {"hits": 0, "failures": 0, "shared": 0, "in_place": 0}

    def check_reads(seq: Sequence, upto: int) -> None:
        tokens = seq.all_token_ids
        for p in range(upto):
            assert kv[seq.block_table[p // bs], p % bs] == tuple(tokens[: p + 1])

    def write(seq: Sequence, num: int) -> None:
        start = seq.num_computed_tokens
        check_reads(seq, start)  # includes prefix-cache hits
        tokens = seq.all_token_ids
        for p in range(start, start + num):
            block = seq.block_table[p // bs]
            assert bm.ref_count(block) == 1  # never write into a shared block
            kv[block, p % bs] = tuple(tokens[: p + 1])
        seq.num_computed_tokens += num
        bm.commit(seq)

    def run(seq: Sequence, num: int) -> None:
        before = (list(seq.block_table), seq.num_computed_tokens, bm.num_free_blocks)
        if bm.allocate(seq, num):
            write(seq, num)
        else:
            seen["failures"] += 1
            assert (seq.block_table, seq.num_computed_tokens, bm.num_free_blocks) == before

    for _ in range(3000):
        op = rng.random()
        if op < 0.3 or not live:
            prompt = rng.choice(families)[: rng.randint(1, 12)] + [
                rng.randrange(6) for _ in range(rng.randint(0, 6))
            ]
            seq = make_seq(prompt, max_total=len(prompt) + 8)
            hits = bm.match_prefix(seq)
            remaining = seq.num_tokens - len(hits) * bs
            num = rng.randint(1, remaining)
            if bm.allocate(seq, num, prefix_blocks=hits):
                assert seq.block_table[: len(hits)] == hits and seq.num_computed_tokens == len(hits) * bs
                write(seq, num)
                live.append(seq)
                seen["hits"] += bool(hits)
                seen["shared"] += any(bm.ref_count(b) > 1 for b in hits)
            else:
                seen["failures"] += 1
                assert seq.block_table == [] and seq.num_computed_tokens == 0
        elif op < 0.8:
            seq = rng.choice(live)
            if seq.num_uncomputed_tokens == 0:
                if seq.num_tokens >= seq.max_total_tokens:
                    bm.free(seq)
                    live.remove(seq)
                    continue
                seq.output_token_ids.append(rng.randrange(6))
            run(seq, rng.randint(1, seq.num_uncomputed_tokens))
        elif op < 0.99:
            seq = live.pop(rng.randrange(len(live)))
            seen["in_place"] += len(seq.block_table) > 1 and _consecutive(seq.block_table)
            bm.free(seq)
        else:
            bm.reset_prefix_cache()
        bm.check_invariants(live)

    for seq in live:
        bm.free(seq)
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks
    # The workload exercised what it is meant to.
    assert seen["failures"] > 50 and seen["hits"] > 50 and seen["shared"] > 10
    if region_blocks is not None:
        assert seen["in_place"] > 10  # the in-place path was exercised, not only the fallbacks


# ---------------------------------------------------------------------------------------------
# Contiguous regions: sequences growing side by side keep consecutive blocks.
# ---------------------------------------------------------------------------------------------


def _consecutive(table: list[int]) -> bool:
    return table == list(range(table[0], table[0] + len(table)))


def test_regions_keep_interleaved_growth_consecutive() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False, region_blocks=4)
    seqs = [make_seq(list(range(100 * i, 100 * i + 5)), max_total=16) for i in range(3)]
    for s in seqs:
        compute(bm, s)
    for _ in range(11):  # decode one token each, in turn, up to 16 tokens = the whole region
        for s in seqs:
            s.output_token_ids.append(7)
            compute(bm, s, 1)
    assert [s.block_table for s in seqs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    bm.check_invariants(seqs)
    # Outgrowing the region: the next block comes from elsewhere, the sequence is no longer consecutive.
    seqs[0].output_token_ids.append(7)
    compute(bm, seqs[0], 1)
    assert not _consecutive(seqs[0].block_table) and seqs[0].block_table[-1] >= 12
    # A freed region is claimed again, lowest first.
    bm.free(seqs[1])
    late = make_seq([1, 2, 3])
    compute(bm, late)
    assert late.block_table == [4]
    bm.check_invariants([seqs[0], seqs[2], late])
    for s in (seqs[0], seqs[2], late):
        bm.free(s)
    assert bm.num_free_blocks == 16
    bm.check_invariants([])


def test_prefix_hits_at_a_region_start_continue_in_that_region() -> None:
    # A chat's next turn (or the same prompt again) hits the blocks its earlier sequence left at the
    # start of a region: it takes that region over and stays consecutive, so attention reads it in place.
    bm = BlockManager(num_blocks=16, block_size=4, region_blocks=4)
    first = make_seq(list(range(1, 10)), max_total=16)  # 9 tokens: 2 full blocks + 1
    compute(bm, first)
    assert first.block_table == [0, 1, 2]
    bm.free(first)
    turn2 = make_seq([*range(1, 10), 50, 51, 52], max_total=16)
    compute(bm, turn2)
    assert turn2.num_cached_prompt_tokens == 8  # the two full blocks were hits
    assert turn2.block_table == [0, 1, 2]  # block 2 (the partial block) was taken again in place
    for _ in range(4):
        turn2.output_token_ids.append(7)
        compute(bm, turn2, 1)
    assert turn2.block_table == [0, 1, 2, 3]
    bm.check_invariants([turn2])
    # A second sequence hitting the same blocks while the region is owned gathers (any free block).
    other = make_seq([*range(1, 10), 60], max_total=16)
    compute(bm, other)
    assert other.block_table[:2] == [0, 1] and not _consecutive(other.block_table)
    bm.check_invariants([turn2, other])
    # Hits that are not a region's first blocks claim nothing.
    bm.free(turn2)
    bm.free(other)
    bm.check_invariants([])


def test_regions_without_room_fall_back_and_count_blocks_the_same() -> None:
    # 2 regions of 3 blocks plus 1 block outside any region.
    bm = BlockManager(num_blocks=7, block_size=2, enable_prefix_caching=False, region_blocks=3)
    a, b, c = make_seq([1] * 5), make_seq([2] * 2), make_seq([3] * 3)
    compute(bm, a)
    compute(bm, b)
    assert a.block_table == [0, 1, 2] and b.block_table == [3]
    compute(bm, c)  # no region left: blocks from the recently-freed (high) end of the free list
    assert c.block_table == [6, 5]
    b.output_token_ids.append(2)
    compute(bm, b, 1)  # c took 6 and 5, so b's region continues in place
    assert b.block_table == [3, 4]
    assert bm.num_free_blocks == 0
    d = make_seq([4])
    assert not bm.allocate(d, 1)  # regions are a preference: every block is counted the same
    bm.check_invariants([a, b, c])


def test_region_block_held_by_another_sequence_breaks_the_run() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False, region_blocks=4)
    a = make_seq([1] * 2, max_total=20)
    compute(bm, a)
    big = make_seq([5] * 14)  # no free region: it takes 7 blocks from the rest, including region 0's
    compute(bm, big)
    assert set(big.block_table) == set(range(1, 8))
    bm.free(big)
    a.output_token_ids.append(1)
    compute(bm, a, 1)
    # Region 0 is still a's: block 1 was released, so the run continues in place.
    assert a.block_table == [0, 1]
    bm.check_invariants([a])


def test_prefix_hits_and_evictable_blocks_with_regions() -> None:
    bm = BlockManager(num_blocks=12, block_size=2, enable_prefix_caching=True, region_blocks=4)
    a = make_seq([1, 2, 3, 4, 5])
    compute(bm, a)
    assert a.block_table == [0, 1, 2]
    b = make_seq([1, 2, 3, 4, 9])  # hits a's first 2 blocks: shared, so no region of its own
    compute(bm, b)
    assert b.block_table[:2] == [0, 1] and len(b.block_table) == 3
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    # Region 0 now holds a's cached prefix: fresh sequences claim regions without cache entries first.
    c, d = make_seq([7] * 6), make_seq([8] * 6)
    compute(bm, c)
    compute(bm, d)
    assert c.block_table == [4, 5, 6] and d.block_table == [8, 9, 10]
    assert bm.lookup_prefix([1, 2, 3, 4, 5]) == [0, 1]
    # Only region 0 is left: it is claimed, and its cached blocks are evicted for the run.
    e = make_seq([6] * 6)
    compute(bm, e)
    assert e.block_table == [0, 1, 2]
    assert bm.lookup_prefix([1, 2, 3, 4, 5]) == []
    bm.check_invariants([c, d, e])


def test_invalid_region_blocks() -> None:
    with pytest.raises(ValueError, match="region_blocks"):
        BlockManager(8, 4, region_blocks=0)


def test_regions_make_paged_attention_read_in_place() -> None:
    """Sequences allocated side by side by the block manager are all read without gathering."""
    import torch

    from lmstack.core import ModelConfig
    from lmstack.infer.engine._paged_attention import KVCache, PagedAttention

    bs, region = 4, 8
    bm = BlockManager(num_blocks=5 * region, block_size=bs, enable_prefix_caching=False, region_blocks=region)
    seqs = [make_seq(list(range(n)), max_total=32) for n in (3, 9, 17, 6)]
    for s in seqs:
        compute(bm, s)
    for _ in range(5):
        for s in seqs:
            s.output_token_ids.append(1)
            compute(bm, s, 1)
    config = ModelConfig(model_type="llama", vocab_size=8, hidden_size=32, intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    cache = KVCache(config, bm.num_blocks, bs, torch.float32, torch.device("cpu"))
    ctx = [s.num_computed_tokens for s in seqs]
    slots = [s.block_table[(n - 1) // bs] * bs + (n - 1) % bs for s, n in zip(seqs, ctx, strict=True)]
    attn = PagedAttention(
        cache, torch.tensor(slots), [1] * 4, ctx, [s.block_table for s in seqs], use_kernel=False
    )
    assert attn.num_zero_copy == 4

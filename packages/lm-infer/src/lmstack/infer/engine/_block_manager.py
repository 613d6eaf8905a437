"""Paged KV-cache blocks: allocation with reference counts, and a prefix cache over full blocks.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots. Each sequence owns a block table
(its blocks, in order). Blocks are reference counted so that sequences sharing a prompt prefix share
its blocks instead of computing and storing them twice.

Prefix caching. Once the engine has written the K/V of a *full* block, :meth:`BlockManager.commit`
registers it under a digest of its tokens chained with its parent block's digest, so the digest
names the whole prefix up to the end of that block. A new sequence then reuses the longest run of
registered blocks matching its prefix (:meth:`BlockManager.lookup_prefix`). Only full blocks are
shared, and a shared block is never written again, so no copy-on-write is needed. A block whose
reference count drops to 0 keeps its K/V and stays registered: it is *free* (allocatable) but
*evictable*, and it is recycled least-recently-released first, only when no uncached free block is
left.

Why blake2b and not ``hash()``: an unkeyed 128-bit blake2b digest is the same in every process and
on every machine (``hash()`` of ``str``/``bytes`` is salted per process; a future cross-process or
on-disk KV cache needs stable names) and practically collision-free, while ``hash()`` of a tuple is
64 bits and easy to collide on purpose. It costs one short hash per full block, once per sequence.
Exactness does not rest on the digest, though: every registered block also stores its own token ids
and the registration id of its parent, and a lookup only accepts a block whose tokens equal the
query's and whose parent is the block matched just before it. By induction a hit's K/V were computed
on exactly the query's prefix, so a collision (even a forced one) can only cost a cache miss, never
wrong K/V.

Contiguous regions (``region_blocks``). Attention reads a sequence's keys without copying them when
its blocks are consecutive and start on a region boundary: the cache is then a strided view over the
batch (see ``_paged_attention``). With ``region_blocks = R`` the cache is cut into
``num_blocks // R`` regions of ``R`` blocks; a fresh sequence without prefix hits claims the lowest
region none of whose blocks is in use, and its ``j``-th block is block ``region * R + j`` whenever
that block is unreferenced (a cached block there is evicted for it). Blocks are still counted one by
one, so a region is only a preference: when its next block is held by someone else, or the sequence
outgrows it, the sequence takes any free block and is read by the gathering path from then on.
Blocks for sequences without a region are taken from the most recently freed end of the free list,
away from the claimed regions at the low end.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceABC

from lmstack.infer.engine._sequence import Sequence

__all__ = ["BlockManager"]

# Token ids are hashed as little-endian int64 on every platform, so digests are machine-independent.
_BIG_ENDIAN = sys.byteorder == "big"


def _hash_block(parent_digest: bytes | None, token_ids: SequenceABC[int], salt: int | None = None) -> bytes:
    """The prefix-cache digest of one full block.

    Args:
        parent_digest: The digest of the previous block of the sequence, ``None`` for the first block.
        token_ids: The block's token ids.
        salt: The sequence's cache salt (first block only; see :attr:`Sequence.cache_salt`).

    Returns:
        A 16-byte blake2b digest of the parent digest and the token ids.
    """
    tokens = array("q", token_ids)
    if _BIG_ENDIAN:
        tokens.byteswap()
    digest = hashlib.blake2b(digest_size=16)
    # The root gets a marker no digest can equal, so a root block and a child never share an input.
    if parent_digest is not None:
        digest.update(parent_digest)
    else:
        digest.update(b"root" if salt is None else b"root:%d" % salt)
    digest.update(tokens.tobytes())
    return digest.digest()


class BlockManager:
    """Allocates KV-cache blocks to sequences, with reference counts and prefix caching.

    Invariants (checked by :meth:`check_invariants`): reference counts are never negative; a block is
    in exactly one of the uncached free list, the evictable set (registered, reference count 0) or in
    use (reference count > 0); a registered block is findable under its digest; after every sequence
    is freed, :attr:`num_free_blocks` equals :attr:`num_blocks`.

    Args:
        num_blocks: Blocks in the KV cache.
        block_size: Token slots per block.
        enable_prefix_caching: Register full blocks and reuse them across sequences.
        region_blocks: Blocks per contiguous region (see the module docstring), typically the blocks
            of one ``max_model_len`` sequence; ``None`` allocates first-free-first.

    Raises:
        ValueError: If ``num_blocks``, ``block_size`` or ``region_blocks`` is not positive.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        region_blocks: int | None = None,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if region_blocks is not None and region_blocks <= 0:
            raise ValueError(f"region_blocks must be positive or None, got {region_blocks}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching

        self._ref_counts = [0] * num_blocks
        # Free blocks holding nothing worth keeping, reused before any cached block is evicted. An
        # ordered dict, not a deque: a region's next block is taken out of the middle.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Registered blocks with reference count 0, least recently released first.
        self._evictable: OrderedDict[int, None] = OrderedDict()

        # Prefix-cache registry. A registered block has a digest, its tokens, a registration id
        # (unique for ever, so a stale parent link never matches a later registration of the same
        # block) and its parent's registration id.
        self._by_digest: dict[bytes, int] = {}
        self._block_digest: list[bytes | None] = [None] * num_blocks
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        # The cache salt of the sequence that registered each block (part of its identity, like tokens).
        self._block_salt: list[int | None] = [None] * num_blocks
        self._block_entry: list[int | None] = [None] * num_blocks
        self._block_parent_entry: list[int | None] = [None] * num_blocks
        self._entry_to_block: dict[int, int] = {}
        self._next_entry = 0

        # Per running sequence: how many of its leading blocks commit() has handled, and the
        # registration id matching the last of them (None before the first block, -1 once its chain
        # is broken: its next blocks could never be found, so they are not registered).
        self._commit_state: dict[int, tuple[int, int | None]] = {}

        self._prefix_queries = 0
        self._prefix_hits = 0

        # Contiguous regions: blocks per region, the referenced and the registered blocks in each
        # region, and which running sequence claims which region.
        self._region_blocks = region_blocks
        self._num_regions = num_blocks // region_blocks if region_blocks else 0
        self._region_in_use = [0] * self._num_regions
        self._region_registered = [0] * self._num_regions
        self._region_owner: list[int | None] = [None] * self._num_regions
        self._seq_region: dict[int, int] = {}

    # ------------------------------------------------------------------------------------------
    # Sizes and statistics
    # ------------------------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        """Token slots per block."""
        return self._block_size

    @property
    def num_blocks(self) -> int:
        """Blocks in the KV cache."""
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: unreferenced ones, including evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or evictable)."""
        return len(self._by_digest)

    @property
    def prefix_cache_queries(self) -> int:
        """Tokens looked up in the prefix cache by successful admissions of fresh sequences."""
        return self._prefix_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Tokens of those admissions served from the prefix cache."""
        return self._prefix_hits

    @property
    def prefix_cache_hit_rate(self) -> float:
        """``prefix_cache_hits / prefix_cache_queries`` (0.0 before any query)."""
        return self._prefix_hits / self._prefix_queries if self._prefix_queries else 0.0

    def ref_count(self, block: int) -> int:
        """The number of sequences holding ``block``."""
        return self._ref_counts[block]

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` tokens fits the whole cache (when nothing else runs)."""
        return self._blocks_for(num_tokens) <= self._num_blocks

    # ------------------------------------------------------------------------------------------
    # Prefix lookup
    # ------------------------------------------------------------------------------------------

    def lookup_prefix(self, token_ids: list[int], salt: int | None = None) -> list[int]:
        """The longest run of cached full blocks holding the K/V of a prefix of ``token_ids``.

        The block holding the last token is never returned: the engine must compute at least one
        token to get logits. Nothing changes: the blocks are not referenced by this call.

        Args:
            token_ids: A sequence's tokens.
            salt: The sequence's cache salt (see :attr:`Sequence.cache_salt`).

        Returns:
            Block ids, in order; block ``i`` holds tokens ``[i * block_size, (i + 1) * block_size)``.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self._block_size

        def digests() -> Iterator[bytes]:
            parent: bytes | None = None
            for i in range(self._max_hit_blocks(len(token_ids))):
                parent = _hash_block(parent, token_ids[i * bs : (i + 1) * bs], salt)
                yield parent

        return self._match(digests(), lambda i: token_ids[i * bs : (i + 1) * bs], salt)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """:meth:`lookup_prefix` for a sequence, reusing the digests cached on it.

        Args:
            seq: The sequence (its :attr:`Sequence.all_token_ids` are matched).

        Returns:
            Block ids of the cache hits, in order.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self._block_size
        digests = (self._seq_digest(seq, i) for i in range(self._max_hit_blocks(seq.num_tokens)))
        return self._match(digests, lambda i: seq.token_ids_slice(i * bs, (i + 1) * bs), seq.cache_salt)

    def _max_hit_blocks(self, num_tokens: int) -> int:
        # Full blocks strictly before the one holding the last token.
        return max(num_tokens - 1, 0) // self._block_size

    def _match(
        self, digests: Iterator[bytes], block_tokens: Callable[[int], SequenceABC[int]], salt: int | None
    ) -> list[int]:
        hits: list[int] = []
        parent_entry: int | None = None
        for i, digest in enumerate(digests):
            block = self._by_digest.get(digest)
            # A digest match is only a candidate: the tokens and the parent link make it exact.
            if (
                block is None
                or self._block_parent_entry[block] != parent_entry
                or self._block_salt[block] != salt
                or self._block_tokens[block] != tuple(block_tokens(i))
            ):
                break
            hits.append(block)
            parent_entry = self._block_entry[block]
        return hits

    def _seq_digest(self, seq: Sequence, index: int) -> bytes:
        hashes = seq.block_hashes
        bs = self._block_size
        while len(hashes) <= index:
            n = len(hashes)
            tokens = seq.token_ids_slice(n * bs, (n + 1) * bs)
            hashes.append(_hash_block(hashes[-1] if hashes else None, tokens, seq.cache_salt))
        return hashes[index]

    # ------------------------------------------------------------------------------------------
    # Allocation
    # ------------------------------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] | None = None) -> bool:
        """Make ``seq.block_table`` cover ``seq.num_computed_tokens + num_new_tokens`` tokens.

        On a fresh sequence (empty block table), prefix-cache hits are reused first: they are
        referenced, and ``seq.num_computed_tokens`` and ``seq.num_cached_prompt_tokens`` are set to
        the number of cached tokens; ``num_new_tokens`` then counts the tokens after them.

        Args:
            seq: The sequence.
            num_new_tokens: Tokens to be computed next (after the cached ones for a fresh sequence).
            prefix_blocks: For a fresh sequence, the result of :meth:`match_prefix` just computed by
                the caller (saves matching twice); ``None`` to match here.

        Returns:
            Whether the blocks were allocated. On ``False`` nothing changed.

        Raises:
            ValueError: If ``num_new_tokens`` is negative, or a fresh sequence claims computed tokens.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        fresh = not seq.block_table
        if fresh and seq.num_computed_tokens:
            raise ValueError(
                f"sequence {seq.seq_id} has no blocks but {seq.num_computed_tokens} computed tokens"
            )
        hits: list[int] = []
        if fresh:
            hits = self.match_prefix(seq) if prefix_blocks is None else prefix_blocks
        num_computed = len(hits) * self._block_size if fresh else seq.num_computed_tokens
        num_needed = self._blocks_for(num_computed + num_new_tokens)
        num_new_blocks = max(num_needed - len(seq.block_table) - len(hits), 0)
        # Evictable hits leave the free pool too once referenced.
        num_revived = sum(1 for block in hits if self._ref_counts[block] == 0)
        if num_new_blocks + num_revived > self.num_free_blocks:
            return False

        if fresh:
            # Reference the hits first, so that taking new blocks cannot evict them.
            for block in hits:
                self._incref(block)
            seq.block_table.extend(hits)
            seq.num_computed_tokens = num_computed
            seq.num_cached_prompt_tokens = num_computed
            if self.enable_prefix_caching:
                self._prefix_queries += seq.num_tokens
                self._prefix_hits += num_computed
                self._commit_state[seq.seq_id] = (
                    len(hits),
                    self._block_entry[hits[-1]] if hits else None,
                )
        if fresh and self._num_regions:
            if not hits:
                self._claim_region(seq.seq_id)
            else:
                self._claim_hit_region(seq.seq_id, hits)
        region = self._seq_region.get(seq.seq_id)
        for _ in range(num_new_blocks):
            taken = None if region is None else self._take_region_block(region, len(seq.block_table))
            if region is not None and taken is None:
                # The run is broken: this sequence is read by gathering from now on.
                self._release_region(seq.seq_id)
                region = None
            seq.block_table.append(taken if taken is not None else self._take_free_block())
        return True

    def _claim_region(self, seq_id: int) -> None:
        # The lowest free region holding no prefix-cache entries, else the lowest free one (its
        # cached blocks are evicted one by one as the sequence grows into them).
        free = [
            r
            for r in range(self._num_regions)
            if self._region_owner[r] is None and not self._region_in_use[r]
        ]
        if free:
            region = next((r for r in free if not self._region_registered[r]), free[0])
            self._region_owner[region] = seq_id
            self._seq_region[seq_id] = region

    def _claim_hit_region(self, seq_id: int, hits: list[int]) -> None:
        # Prefix hits that are the first blocks of an unowned region (the previous turn of a chat, the
        # same prompt again: its earlier sequence left them there) continue in that region, so the
        # sequence stays consecutive and is read in place instead of gathered every step.
        region = self._region_of(hits[0])
        if region is None or self._region_owner[region] is not None:
            return
        assert self._region_blocks is not None
        first = region * self._region_blocks
        if hits == list(range(first, first + len(hits))):
            self._region_owner[region] = seq_id
            self._seq_region[seq_id] = region

    def _region_of(self, block: int) -> int | None:
        if not self._region_blocks:
            return None
        region = block // self._region_blocks
        return region if region < self._num_regions else None

    def _release_region(self, seq_id: int) -> None:
        region = self._seq_region.pop(seq_id, None)
        if region is not None:
            self._region_owner[region] = None

    def _take_region_block(self, region: int, index: int) -> int | None:
        """Block ``index`` of ``region`` if it exists and nobody holds it, else None."""
        assert self._region_blocks is not None
        if index >= self._region_blocks:
            return None
        block = region * self._region_blocks + index
        if self._ref_counts[block]:
            return None
        if block in self._free:
            del self._free[block]
        else:
            del self._evictable[block]
            self._unregister(block)
        self._set_referenced(block)
        return block

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self._block_size)

    def _incref(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            # Registered and unreferenced, so it sits in the evictable set.
            del self._evictable[block]
            self._set_referenced(block)
        else:
            self._ref_counts[block] += 1

    def _set_referenced(self, block: int) -> None:
        """Count a block going from unreferenced to referenced once."""
        self._ref_counts[block] = 1
        region = self._region_of(block)
        if region is not None:
            self._region_in_use[region] += 1

    def _set_unreferenced(self, block: int) -> None:
        self._ref_counts[block] = 0
        region = self._region_of(block)
        if region is not None:
            self._region_in_use[region] -= 1

    def _take_free_block(self) -> int:
        if self._free:
            # Without regions, first freed first used; with them, the most recently freed end,
            # away from the regions claimed (lowest first) at the other.
            block, _ = self._free.popitem(last=bool(self._num_regions))
        else:
            block, _ = self._evictable.popitem(last=False)
            self._unregister(block)
        self._set_referenced(block)
        return block

    # ------------------------------------------------------------------------------------------
    # Commit, free, reset
    # ------------------------------------------------------------------------------------------

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly full blocks in the prefix cache.

        Call it after the engine has written K/V up to ``seq.num_computed_tokens``. A block whose
        prefix is already registered under another block (two sequences computed the same prompt
        side by side) is not registered twice; the sequence's chain continues from the registered
        one, since both hold the same K/V.

        Args:
            seq: The sequence.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self._block_size, len(seq.block_table))
        num_done, parent = self._commit_state.get(seq.seq_id, (0, None))
        bs = self._block_size
        while num_done < num_full:
            if num_done > 0 and (parent is None or parent not in self._entry_to_block):
                # The parent registration is gone (evicted or reset): descendants would be unreachable.
                num_done, parent = num_full, -1
                break
            digest = self._seq_digest(seq, num_done)
            tokens = tuple(seq.token_ids_slice(num_done * bs, (num_done + 1) * bs))
            existing = self._by_digest.get(digest)
            if existing is not None:
                if (
                    self._block_parent_entry[existing] == parent
                    and self._block_salt[existing] == seq.cache_salt
                    and self._block_tokens[existing] == tokens
                ):
                    parent = self._block_entry[existing]
                    num_done += 1
                    continue
                if self._ref_counts[existing] > 0:
                    # A collision (or stale entry) that someone still uses: leave ours unregistered.
                    num_done, parent = num_full, -1
                    break
                # A collision or a stale entry nobody uses: ours is worth more, take its place.
                del self._evictable[existing]
                self._unregister(existing)
                self._free[existing] = None
            block = seq.block_table[num_done]
            entry = self._next_entry
            self._next_entry += 1
            self._by_digest[digest] = block
            self._block_digest[block] = digest
            self._block_tokens[block] = tokens
            self._block_salt[block] = seq.cache_salt
            self._block_entry[block] = entry
            self._block_parent_entry[block] = parent
            self._entry_to_block[entry] = block
            region = self._region_of(block)
            if region is not None:
                self._region_registered[region] += 1
            parent = entry
            num_done += 1
        self._commit_state[seq.seq_id] = (num_done, parent)

    def free(self, seq: Sequence) -> None:
        """Release all blocks of the sequence and clear its block table.

        Blocks nobody references any more stay registered (and evictable) when they are in the
        prefix cache, else return to the free list. A sequence's blocks are released last block
        first, so that its deepest blocks are evicted before the prefix they hang from.

        Args:
            seq: The sequence.
        """
        for block in reversed(seq.block_table):
            count = self._ref_counts[block]
            if count <= 0:
                raise RuntimeError(f"block {block} of sequence {seq.seq_id} is not referenced")
            if count == 1:
                self._set_unreferenced(block)
                if self._block_entry[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free[block] = None
            else:
                self._ref_counts[block] = count - 1
        seq.block_table.clear()
        self._commit_state.pop(seq.seq_id, None)
        self._release_region(seq.seq_id)

    def reset_prefix_cache(self) -> None:
        """Forget every registered block; evictable ones return to the free list.

        Blocks in use keep their K/V for their sequences but are no longer shared. Useful after the
        weights change (the cached K/V would be stale).
        """
        for block in list(self._entry_to_block.values()):
            self._unregister(block)
        self._free.update(self._evictable)
        self._evictable.clear()

    def _unregister(self, block: int) -> None:
        digest = self._block_digest[block]
        entry = self._block_entry[block]
        if digest is not None and self._by_digest.get(digest) == block:
            del self._by_digest[digest]
        if entry is not None:
            del self._entry_to_block[entry]
            region = self._region_of(block)
            if region is not None:
                self._region_registered[region] -= 1
        self._block_digest[block] = None
        self._block_tokens[block] = None
        self._block_salt[block] = None
        self._block_entry[block] = None
        self._block_parent_entry[block] = None

    # ------------------------------------------------------------------------------------------
    # Debugging
    # ------------------------------------------------------------------------------------------

    def check_invariants(self, sequences: list[Sequence] | None = None) -> None:
        """Raise ``AssertionError`` if the bookkeeping is inconsistent (for tests and debugging).

        Args:
            sequences: All sequences holding blocks; when given, reference counts must equal the
                number of times each block appears in their block tables.
        """
        free = set(self._free)
        assert len(free) == len(self._free), "a block is twice on the free list"
        assert not free & set(self._evictable), "a block is both on the free list and evictable"
        for block in range(self._num_blocks):
            count = self._ref_counts[block]
            assert count >= 0, f"block {block} has a negative reference count"
            in_pool = block in free or block in self._evictable
            assert in_pool == (count == 0), f"block {block}: ref count {count}, in free pool {in_pool}"
            if block in free:
                assert self._block_entry[block] is None, f"free block {block} is still registered"
            if block in self._evictable:
                assert self._block_entry[block] is not None, f"evictable block {block} is not registered"
        for digest, block in self._by_digest.items():
            assert self._block_digest[block] == digest
            entry = self._block_entry[block]
            assert entry is not None and self._entry_to_block[entry] == block
        assert len(self._entry_to_block) == len(self._by_digest)
        if sequences is not None:
            expected = [0] * self._num_blocks
            for seq in sequences:
                for block in seq.block_table:
                    expected[block] += 1
            assert expected == self._ref_counts, "reference counts differ from the block tables"
        for r in range(self._num_regions):
            assert self._region_blocks is not None
            blocks = range(r * self._region_blocks, (r + 1) * self._region_blocks)
            in_use = sum(1 for b in blocks if self._ref_counts[b])
            assert in_use == self._region_in_use[r], f"region {r}: {self._region_in_use[r]} != {in_use}"
            registered = sum(1 for b in blocks if self._block_entry[b] is not None)
            assert registered == self._region_registered[r], f"region {r}: registered count is off"
            owner = self._region_owner[r]
            assert owner is None or self._seq_region.get(owner) == r, f"region {r}: stale owner"

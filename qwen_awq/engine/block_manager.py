"""Paged KV block pool: free list, reference counts, and a prefix cache of full blocks with LRU eviction.

A full block is keyed by sha256 over (parent block's key, its token ids, the cache salt for the first block).
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque

from qwen_awq.engine.sequence import Sequence
from qwen_awq.errors import ConfigError


def block_hash(parent: bytes | None, token_ids: list[int], cache_salt: str | None) -> bytes:
    """Stable across processes (unlike hash()); lengths are packed so no two inputs share an encoding."""
    h = hashlib.sha256()
    if parent is None:  # first block: the salt separates tenants; b"\0" / b"\1" tells None from ""
        salt = b"" if cache_salt is None else cache_salt.encode()
        h.update(struct.pack("<BI", cache_salt is not None, len(salt)) + salt)
    else:
        h.update(parent)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"the KV cache needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks  # key of a block registered in the cache
        self._cached: dict[bytes, int] = {}  # key -> block id
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, holding nothing reusable
        # Unreferenced but still cached, least recently released first: a prefix hit revives one,
        # an allocation that finds no free block evicts the first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._num_registered: dict[int, int] = {}  # seq_id -> leading blocks already offered to the cache
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # --- counters -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: truly free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        return self._hash[block_id] is not None

    # --- allocation -----------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, token_budget: int) -> bool:
        """Whether `allocate(seq, token_budget)` would succeed."""
        return self._fits(seq, self._match(seq), token_budget)

    def allocate(self, seq: Sequence, token_budget: int) -> bool:
        """Admit a sequence with no blocks: share its prefix-cache hits and take blocks for its first chunk
        of min(uncomputed, token_budget) tokens. Sets num_computed_tokens to the hit length.
        False (pool too short) changes nothing."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks")
        hits = self._match(seq)
        if not self._fits(seq, hits, token_budget):
            return False
        for b in hits:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_prefix_tokens = seq.num_computed_tokens
        self._num_registered[seq.seq_id] = len(hits)
        self.prefix_query_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens
        taken = self.append_slots(seq, min(seq.num_uncomputed, token_budget))
        assert taken, "_fits promised room for the first chunk"
        return True

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold `num_new_tokens` more tokens after the computed ones; False (and no
        change) when the pool is short."""
        needed = self._blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take() for _ in range(needed))
        return True

    def on_tokens_computed(self, seq: Sequence) -> None:
        """Offer the blocks that became full of computed KV to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        start = self._num_registered[seq.seq_id]
        end = seq.num_computed_tokens // self.block_size
        for i, key in enumerate(self._hashes(seq, end)[start:end], start):
            block = seq.block_table[i]
            # An equal block computed earlier by another sequence stays the canonical copy; this one is
            # returned to the free list when released.
            if key not in self._cached and self._hash[block] is None:
                self._cached[key] = block
                self._hash[block] = key
        self._num_registered[seq.seq_id] = max(start, end)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks. Tail blocks are released first so that eviction, which takes the
        least recently released, drops a prefix's tail before its head (the head is the likelier hit)."""
        for b in reversed(seq.block_table):
            self._ref[b] -= 1
            if self._ref[b] > 0:
                continue
            if self._hash[b] is None:
                self._free.append(b)
            else:
                self._evictable[b] = None
        seq.block_table = []
        self._num_registered.pop(seq.seq_id, None)

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat index of the token at `position` in the KV pool of num_blocks * block_size slots."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    # --- internals ------------------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The sequence's chained keys for its first `num_blocks` full blocks, extending its memo."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(block_hash(parent, seq.token_ids(i * bs, (i + 1) * bs), seq.cache_salt))
        return seq.block_hashes

    def _match(self, seq: Sequence) -> list[int]:
        """Cached blocks equal to the sequence's leading full blocks, leaving >= 1 token to compute so the
        model produces logits for the next token."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for key in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def _fits(self, seq: Sequence, hits: list[int], token_budget: int) -> bool:
        hit_tokens = len(hits) * self.block_size
        chunk = min(seq.num_tokens - hit_tokens, token_budget)
        new_blocks = self._blocks_for(hit_tokens + chunk) - len(hits)
        revived = sum(1 for b in hits if self._ref[b] == 0)  # leave the evictable pool when shared
        return new_blocks + revived <= self.num_free_blocks

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            key = self._hash[block]
            assert key is not None and self._cached[key] == block
            del self._cached[key]
            self._hash[block] = None
        self._ref[block] = 1
        return block

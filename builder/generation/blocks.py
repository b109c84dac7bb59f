"""The paged KV cache's bookkeeping: fixed-size blocks in one pool, shared prefix blocks, reference counts.

This file is copied unchanged next to the served model (`<model>/1/blocks.py`): it needs the standard library
only. The decoder holds the blocks' memory (Decoder.allocate_paged); this module decides which block holds
what. The layout follows nano-vllm's block manager: a sequence owns a list of block ids (its block table);
a full block of prompt tokens is keyed by a hash of its tokens and of every token before it, so a later
sequence that starts with the same tokens takes the same block instead of computing it again. A block nobody
uses any more keeps its contents and its key until the pool needs it (least recently released first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def chain(previous: bytes, tokens) -> bytes:
    """The key of a full block: a digest of the previous block's key and this block's tokens (so of every token
    from the start). 128 bits of BLAKE2b: two different prefixes do not meet in practice, and Python's own hash
    of a tuple would (64 bits, and salted per process for anything but ints)."""
    return hashlib.blake2b(previous + array("q", tokens).tobytes(), digest_size=16).digest()


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockManager:
    """`num_blocks` blocks of `block_size` tokens. A block is free (never keyed, or its key dropped), in use
    (ref > 0), or cached (ref 0 with a key: its contents wait for a sequence with the same prefix, and are
    given up, oldest release first, when no free block is left)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a paged KV cache needs blocks: {num_blocks} blocks of {block_size} tokens")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: list[int] = list(range(num_blocks))[::-1]  # pop() takes the lowest id first
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, oldest release first
        # prefix-cache statistics: prompt tokens looked up at admission, and how many of them were found
        self.queried = self.hits = 0

    @property
    def available(self) -> int:
        """Blocks a sequence could take now: free ones and cached ones nobody uses."""
        return len(self.free) + len(self.idle)

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queried if self.queried else 0.0

    def keys(self, tokens: list[int], count: int) -> list[bytes]:
        """The keys of the first `count` full blocks of `tokens`."""
        out, previous, b = [], b"", self.block_size
        for i in range(count):
            previous = chain(previous, tokens[i * b:(i + 1) * b])
            out.append(previous)
        return out

    def match(self, tokens: list[int]) -> list[int]:
        """The cached blocks that hold the longest prefix of `tokens` in whole blocks, leaving at least one token
        to compute (the step that computes it gives the first token's logits). Takes nothing."""
        if not self.prefix_caching:
            return []
        out = []
        for key in self.keys(tokens, (len(tokens) - 1) // self.block_size):
            block = self.cached.get(key)
            if block is None:
                break
            out.append(block)
        return out

    def admit(self, tokens: list[int], capacity: int) -> tuple[list[int], int] | None:
        """A block table for a new sequence whose cache must hold `capacity` tokens, the first of them `tokens`:
        the cached blocks of its prefix, shared, and fresh blocks for the rest; and how many of `tokens` those
        cached blocks hold already. None (and nothing taken) when the pool cannot hold it now."""
        hit = self.match(tokens)
        need = blocks_for(capacity, self.block_size) - len(hit)
        reusable = sum(1 for block in hit if self.ref[block] == 0)  # idle blocks the hit would take off the list
        if need > self.available - reusable:
            return None
        for block in hit:
            self._take(block)
        if self.prefix_caching:
            self.queried += len(tokens)
            self.hits += len(hit) * self.block_size
        return hit + [self._fresh() for _ in range(need)], len(hit) * self.block_size

    def grow(self, table: list[int], capacity: int) -> bool:
        """Append fresh blocks to `table` until it holds `capacity` tokens; False (nothing taken) if the pool
        cannot."""
        need = blocks_for(capacity, self.block_size) - len(table)
        if need > self.available:
            return False
        table.extend(self._fresh() for _ in range(max(need, 0)))
        return True

    def publish(self, table: list[int], tokens: list[int], start: int, end: int) -> None:
        """The tokens start..end-1 of a sequence are now in its blocks: key its blocks that became full, so
        later sequences with the same prefix find them. A block whose key another block holds already (two
        sequences computed the same prefix at once) stays private."""
        if not self.prefix_caching:
            return
        b = self.block_size
        first, last = start // b, end // b  # blocks first..last-1 are full now
        if last <= first:
            return
        previous = self.key[table[first - 1]] if first else b""
        if previous is None:  # the block before was not keyed (it was shared already): key from the start
            first, previous = 0, b""
        for i in range(first, last):
            previous = chain(previous, tokens[i * b:(i + 1) * b])
            block = table[i]
            if self.key[block] is None and previous not in self.cached:
                self.key[block] = previous
                self.cached[previous] = block

    def release(self, table: list[int]) -> None:
        """A sequence's blocks come back: each loses a reference; an unused keyed block is kept for later hits,
        an unused unkeyed one is free."""
        for block in reversed(table):  # the prefix's blocks released last: evicted after its tail's
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if self.key[block] is not None:
                    self.idle[block] = None
                else:
                    self.free.append(block)
        table.clear()

    def _take(self, block: int) -> None:
        if self.ref[block] == 0:
            self.idle.pop(block, None)
        self.ref[block] += 1

    def _fresh(self) -> int:
        """A free block, else the least recently released cached one (its key forgotten)."""
        if self.free:
            block = self.free.pop()
        else:
            block, _ = self.idle.popitem(last=False)
            del self.cached[self.key[block]]
            self.key[block] = None
        self.ref[block] = 1
        return block

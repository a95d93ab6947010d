"""The pool of physical KV-cache blocks: a free queue, reference counts, and the prefix cache.

A full block can be registered under a key chained over its parent's key and its token ids (plus any extra key that
changes its contents). A registered block whose last owner lets go stays in the cache, at the tail of the free queue:
a later request with the same prefix takes it back (share), and allocation evicts from the head first, so the least
recently freed cached blocks go first. Plain Python, no torch.
"""
from __future__ import annotations

from typing import Hashable

BlockKey = tuple  # (parent key's hash, token ids tuple, extra key)


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        # dict as an ordered set: O(1) removal from the middle (cached blocks are taken back out of it).
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.cached: dict[BlockKey, int] = {}
        self.block_keys: list[BlockKey | None] = [None] * num_blocks
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks but only {len(self._free)} are free")
        blocks = []
        for _ in range(n):
            block_id = next(iter(self._free))
            del self._free[block_id]
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def share(self, block_id: int) -> None:
        """One more owner of a block that is in use, or back out of the free queue (a cache hit)."""
        if self.ref_counts[block_id] == 0:
            del self._free[block_id]
        self.ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds goes to the tail of the free queue."""
        for block_id in block_ids:
            count = self.ref_counts[block_id]
            if count <= 0:
                raise RuntimeError(f"KV block {block_id} freed more times than it was allocated")
            self.ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None

    # -- prefix cache ------------------------------------------------------------------------------------------------
    def lookup(self, key: BlockKey) -> int | None:
        return self.cached.get(key)

    def register(self, block_id: int, key: BlockKey) -> None:
        """Remember a full block's contents; the first block registered under a key keeps it."""
        if self.enable_caching and self.block_keys[block_id] is None and key not in self.cached:
            self.cached[key] = block_id
            self.block_keys[block_id] = key

    def is_cached(self, block_id: int) -> bool:
        return self.block_keys[block_id] is not None

    def _evict(self, block_id: int) -> None:
        key = self.block_keys[block_id]
        if key is not None:
            del self.cached[key]
            self.block_keys[block_id] = None
            self.num_evictions += 1

    def reset_cache(self) -> None:
        """Forget every cached block that nobody holds."""
        for block_id in list(self._free):
            if self.block_keys[block_id] is not None:
                self._evict(block_id)
                self.num_evictions -= 1


def block_key(parent: BlockKey | None, token_ids: tuple[int, ...], extra: Hashable = None) -> BlockKey:
    return (hash(parent) if parent is not None else None, token_ids, extra)

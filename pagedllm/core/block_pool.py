"""The pool of physical KV-cache blocks: a free queue and reference counts. Plain Python, no torch."""
from __future__ import annotations


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # dict as an ordered set: O(1) removal from the middle (prefix caching takes cached blocks back out).
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks but only {len(self._free)} are free")
        blocks = []
        for _ in range(n):
            block_id = next(iter(self._free))
            del self._free[block_id]
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def share(self, block_id: int) -> None:
        """One more owner of a block that is in use (or back from the free queue)."""
        if self.ref_counts[block_id] == 0:
            del self._free[block_id]
        self.ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds goes back to the free queue (last)."""
        for block_id in block_ids:
            count = self.ref_counts[block_id]
            if count <= 0:
                raise RuntimeError(f"KV block {block_id} freed more times than it was allocated")
            self.ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None

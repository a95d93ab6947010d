"""Owns the block tables: which physical blocks hold each request's tokens. Shares blocks by reference count
(prefix-cache hits, forked sequences), copies a shared block before anyone writes into it (copy-on-write), and moves
blocks to and from host memory for swap preemption. Plain Python, no torch."""
from __future__ import annotations

from pagedllm.core.block_pool import BlockPool, block_key
from pagedllm.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.host_pool = BlockPool(num_host_blocks) if num_host_blocks > 0 else None
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        self.host_tables: dict[str, list[int]] = {}  # swapped-out requests
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the next step
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # -- prefix cache ------------------------------------------------------------------------------------------------
    def _update_keys(self, request: Request, num_full_blocks: int) -> None:
        keys, bs = request.block_keys, self.block_size
        while len(keys) < num_full_blocks:
            i = len(keys)
            keys.append(block_key(keys[-1] if keys else None, tuple(request.token_ids[i * bs:(i + 1) * bs]),
                                  request.cache_salt))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request's tokens. The last token is always left to
        compute, so a fully cached prompt still produces logits."""
        if not self.enable_prefix_caching:
            return []
        num_full = (request.num_tokens - 1) // self.block_size
        self._update_keys(request, num_full)
        blocks = []
        for key in request.block_keys[:num_full]:
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def record_lookup(self, request: Request, num_hit_tokens: int) -> None:
        self.num_queried_tokens += request.num_tokens
        self.num_hit_tokens += num_hit_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Register the blocks whose every token now has its K/V computed."""
        if not self.enable_prefix_caching:
            return
        # only tokens whose ids are known: a token in flight (async scheduling) has its K/V but not yet its key
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        if num_full <= request.num_registered_blocks:  # most decode steps fill no block
            return
        table = self.block_tables.get(request.request_id)
        num_full = min(num_full, len(table or ()))
        if num_full <= request.num_registered_blocks:
            return
        request.num_registered_blocks = num_full
        self._update_keys(request, num_full)
        for i in range(num_full):
            self.pool.register(table[i], request.block_keys[i])

    # -- allocation ------------------------------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Make room for num_new_tokens more tokens (after any cached_blocks taken from the prefix cache); copy
        shared blocks that these tokens will write into. False, with nothing changed, when the pool is short."""
        table = self.block_tables.get(request.request_id, [])
        end = request.num_computed_tokens + num_new_tokens
        if not cached_blocks and end <= len(table) * self.block_size:  # fast path: room already there
            last = table[request.num_computed_tokens // self.block_size]
            if self.pool.ref_counts[last] == 1 and (end - 1) // self.block_size == request.num_computed_tokens // self.block_size:
                return True
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        total = self.blocks_needed(num_computed + num_new_tokens)
        need_new = total - len(table) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.pool.ref_counts[b] == 0)  # leave the free queue
        shared = self._shared_blocks_written(table, num_computed)
        if need_new + revived + len(shared) > self.pool.num_free_blocks:
            return False
        table = self.block_tables.setdefault(request.request_id, table)
        for block_id in cached_blocks:
            self.pool.share(block_id)
        table.extend(cached_blocks)
        for index in shared:
            (copy,) = self.pool.allocate(1)
            self.pending_copies.append((table[index], copy))
            self.pool.free([table[index]])
            table[index] = copy
        if need_new > 0:
            table.extend(self.pool.allocate(need_new))
        return True

    def _shared_blocks_written(self, table: list[int], first_position: int) -> list[int]:
        """Indices of blocks in the table that the next write (from first_position on) lands in while another
        sequence also holds them. A registered (full, cached) block is only ever rewritten with the same values."""
        start = first_position // self.block_size
        return [i for i in range(start, len(table))
                if self.pool.ref_counts[table[i]] > 1 and not self.pool.is_cached(table[i])]

    def fork(self, parent: Request, child: Request, num_tokens: int) -> None:
        """The child shares the parent's blocks for its first num_tokens tokens (reference counts, no copies)."""
        shared = self.block_tables[parent.request_id][:self.blocks_needed(num_tokens)]
        for block_id in shared:
            self.pool.share(block_id)
        self.block_tables[child.request_id] = list(shared)

    def free(self, request: Request) -> None:
        table = self.block_tables.pop(request.request_id, None)
        if table:
            # Tail first, so that the head of a prefix stays cached longest.
            self.pool.free(table[::-1])
        host = self.host_tables.pop(request.request_id, None)
        if host:
            self.host_pool.free(host)

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables[request_id]

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # -- swap ----------------------------------------------------------------------------------------------------------
    def swap_out(self, request: Request) -> list[tuple[int, int]] | None:
        """Move the request's blocks to host memory: (device block, host block) pairs; None if the host is full."""
        table = self.block_tables.get(request.request_id, [])
        if self.host_pool is None or len(table) > self.host_pool.num_free_blocks:
            return None
        host = self.host_pool.allocate(len(table))
        self.host_tables[request.request_id] = host
        del self.block_tables[request.request_id]
        self.pool.free(table[::-1])
        return list(zip(table, host))

    def can_swap_in(self, request: Request, num_new_tokens: int) -> bool:
        host = self.host_tables[request.request_id]
        total = self.blocks_needed(request.num_computed_tokens + num_new_tokens)
        return max(total, len(host)) <= self.pool.num_free_blocks

    def swap_in(self, request: Request) -> list[tuple[int, int]]:
        host = self.host_tables.pop(request.request_id)
        table = self.pool.allocate(len(host))
        self.block_tables[request.request_id] = table
        self.host_pool.free(host)
        return list(zip(host, table))

    # -- accounting ----------------------------------------------------------------------------------------------------
    def waste(self, requests: list[Request]) -> tuple[int, int, int]:
        """(token slots holding a token, slots in the sequences' block tables, slots of the physical blocks in use)
        over the given requests: internal fragmentation is 1 - used / allocated; sharing saves
        1 - physical / allocated (blocks held only by the prefix cache are free, so not counted)."""
        used = allocated = 0
        tables = self.block_tables
        for request in requests:
            table = tables.get(request.request_id)
            if table:
                used += request.num_computed_tokens
                allocated += len(table)
        return used, allocated * self.block_size, self.pool.num_used_blocks * self.block_size

"""Automatic prefix caching: the keys/values of prompt prefixes already computed, reused by later requests.

The engine keeps one contiguous KV slot per running sequence (the fused CPU decode kernels read it as
such), so this is a block store beside it rather than paged attention: a prompt is cut into blocks of
`block_size` tokens, and each full block's keys and values for every layer can be kept in a preallocated
pool. On admission the engine copies the longest cached run of blocks the new prompt starts with into its
slot and prefills only the rest; after a prefill it stores the prompt's full blocks from the slot. RoPE
positions are absolute and a prefix always starts at position 0, so a copied block is exactly what
computing it again would write.

Blocks form chains: block i of a prompt is keyed by hash((key of block i-1, its tokens)), one key naming
the whole prefix up to its end (vLLM's scheme). A hit is accepted only when the stored block's tokens
equal the prompt's and its parent is the block matched just before, so by induction the whole prefix is
equal: a hash collision costs a miss, never a wrong continuation.

A block is pinned (refs > 0) while it has cached children (a child's keys are useless without its
parent's) and while an operation holds it; only unpinned blocks are evicted, least recently used first,
when the pool needs room. The engine's thread is the only caller: nothing here locks.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_BLOCK_SIZE = 16
DEFAULT_POOL_BYTES = 512 << 20  # ~21k tokens of the 0.5B's float32 KV, ~9k of a 1.5B's


@dataclass(eq=False)
class Block:
    index: int                  # its row in the pool
    key: int                    # hash((parent's key, tokens)): names the whole prefix
    parent: Block | None
    tokens: tuple[int, ...]
    refs: int = 0               # cached children + operations holding it
    last_used: int = 0


@dataclass
class PrefixCacheStats:
    queries: int = 0            # look-ups (one per admitted request that may use the cache)
    hits: int = 0               # ... that found at least one block
    query_tokens: int = 0       # prompt tokens of those look-ups
    hit_tokens: int = 0         # ... served from the cache
    blocks: int = 0             # blocks cached now
    capacity: int = 0           # blocks the pool holds


def block_bytes(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int) -> int:
    """Pool bytes of one block: keys and values of every layer."""
    return 2 * n_layers * n_kv_heads * block_size * head_dim * torch.empty((), dtype=dtype).element_size()


def _split(positions: Tensor, n: int) -> Tensor:
    """[kv heads, n * bs, head dim] (a slot's positions) as [kv heads, n, bs, head dim], a view."""
    heads, length, head_dim = positions.shape
    return positions.view(heads, n, length // n, head_dim)


class PrefixCache:
    def __init__(self, *, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, block_size: int, capacity_blocks: int) -> None:
        if block_size < 1 or capacity_blocks < 1:
            raise ValueError(f"block_size and capacity must be >= 1 (got {block_size}, {capacity_blocks})")
        self.block_size = block_size
        self.capacity = capacity_blocks
        self.n_layers = n_layers
        # [layer, k|v, block, kv head, position in block, head dim]: pool[l, 0] is one contiguous tensor, so a
        # run of blocks moves with one gather (index_select / index_copy_) per layer and kind. torch.empty:
        # on CPU the pages are committed only as blocks are first written.
        self.pool = torch.empty((n_layers, 2, capacity_blocks, n_kv_heads, block_size, head_dim), dtype=dtype,
                                device=device)
        self._free = list(range(capacity_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._table: dict[int, Block] = {}
        self._lru: list[tuple[int, int, Block]] = []  # (last_used, seq, block) of unpinned blocks; lazy deletes
        self._seq = itertools.count()
        self._tick = 0
        self.stats = PrefixCacheStats(capacity=capacity_blocks)

    # ------------------------------------------------------------------ chain
    @staticmethod
    def _key(parent: Block | None, tokens: tuple[int, ...]) -> int:
        return hash((parent.key if parent is not None else 0, tokens))

    def _find(self, parent: Block | None, tokens: tuple[int, ...]) -> Block | None:
        block = self._table.get(self._key(parent, tokens))
        if block is None or block.parent is not parent or block.tokens != tokens:
            return None  # absent, or a hash collision: a different prefix under the same key
        return block

    def _chain(self, tokens: Sequence[int], max_blocks: int) -> list[Block]:
        chain: list[Block] = []
        bs = self.block_size
        parent: Block | None = None
        for i in range(max_blocks):
            block = self._find(parent, tuple(tokens[i * bs:(i + 1) * bs]))
            if block is None:
                break
            chain.append(block)
            parent = block
        return chain

    def _touch(self, chain: list[Block]) -> None:
        self._tick += 1
        for block in chain:
            block.last_used = self._tick
            if block.refs == 0:
                heapq.heappush(self._lru, (self._tick, next(self._seq), block))
        if len(self._lru) > 4 * self.capacity + 64:  # drop stale entries now and then
            self._lru = [e for e in self._lru if self._evictable(e)]
            heapq.heapify(self._lru)

    def _evictable(self, entry: tuple[int, int, Block]) -> bool:
        last_used, _, block = entry
        return block.refs == 0 and block.last_used == last_used and self._table.get(block.key) is block

    def _unref(self, block: Block) -> None:
        block.refs -= 1
        if block.refs == 0:
            heapq.heappush(self._lru, (block.last_used, next(self._seq), block))

    def _allocate(self) -> int | None:
        """A free pool row, evicting the least recently used unpinned block if needed; None if all are pinned."""
        if self._free:
            return self._free.pop()
        while self._lru:
            entry = heapq.heappop(self._lru)
            if self._evictable(entry):
                block = entry[2]
                del self._table[block.key]
                if block.parent is not None:
                    self._unref(block.parent)
                return block.index
        return None

    # ------------------------------------------------------------------ engine API
    def match(self, tokens: Sequence[int], max_tokens: int) -> list[Block]:
        """The longest cached run of whole blocks `tokens` starts with, at most `max_tokens` tokens (the
        engine keeps at least the last prompt token to compute); counted in the hit-rate statistics."""
        chain = self._chain(tokens, max(0, max_tokens) // self.block_size)
        s = self.stats
        s.queries += 1
        s.query_tokens += len(tokens)
        if chain:
            s.hits += 1
            s.hit_tokens += len(chain) * self.block_size
            self._touch(chain)
        return chain

    def cached_blocks(self, tokens: Sequence[int], max_tokens: int) -> int:
        """How many whole blocks of `tokens` (at most `max_tokens` tokens) a look-up would find now; not
        counted as a look-up, no block marked used."""
        return len(self._chain(tokens, max(0, max_tokens) // self.block_size))

    def load(self, chain: list[Block], k_cache: Sequence[Tensor], v_cache: Sequence[Tensor], slot: int) -> int:
        """Copy a matched chain into positions [0, n * block_size) of `slot` (per layer [batch, kv heads,
        max_len, head dim] caches); returns the number of positions written."""
        if not chain:
            return 0
        n, bs = len(chain), self.block_size
        ids = torch.tensor([b.index for b in chain], device=self.pool.device)
        for layer in range(self.n_layers):
            for kind, cache in enumerate((k_cache[layer], v_cache[layer])):
                blocks = self.pool[layer, kind].index_select(0, ids)          # [n, kv heads, bs, hd]
                _split(cache[slot, :, : n * bs], n).copy_(blocks.transpose(0, 1))
        return n * bs

    def store(self, tokens: Sequence[int], k_cache: Sequence[Tensor], v_cache: Sequence[Tensor], slot: int) -> int:
        """Keep the full blocks of `tokens`, whose keys/values are at positions [0, len) of `slot`: blocks
        already cached are only marked used, the rest copied into the pool (as many as room can be made
        for). Returns the number of blocks newly stored."""
        bs = self.block_size
        chain = self._chain(tokens, len(tokens) // bs)
        parent = chain[-1] if chain else None
        new: list[Block] = []
        if parent is not None:
            parent.refs += 1  # pinned while allocating, so making room never evicts the chain being extended
        try:
            for i in range(len(chain), len(tokens) // bs):
                block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
                key = self._key(parent, block_tokens)
                if key in self._table:
                    break  # a different prefix under this key (a hash collision): leave the cached one alone
                index = self._allocate()
                if index is None:
                    break  # every block is pinned
                block = Block(index=index, key=key, parent=parent, tokens=block_tokens)
                self._table[key] = block
                if parent is not None:
                    parent.refs += 1
                new.append(block)
                parent = block
                block.refs += 1  # pinned until the copy below is done
        finally:
            if chain:
                self._unref(chain[-1])
        if new:
            start = len(chain) * bs
            ids = torch.tensor([b.index for b in new], device=self.pool.device)
            n = len(new)
            try:
                for layer in range(self.n_layers):
                    for kind, cache in enumerate((k_cache[layer], v_cache[layer])):
                        src = _split(cache[slot, :, start:start + n * bs], n).transpose(0, 1)
                        self.pool[layer, kind].index_copy_(0, ids, src)       # [n, kv heads, bs, hd]
            except BaseException:
                self._forget(new)  # half-copied blocks must never be found
                raise
            for block in new:
                self._unref(block)
        self._touch(chain + new)
        self.stats.blocks = len(self._table)
        return len(new)

    def _forget(self, new: list[Block]) -> None:
        """Drop blocks just inserted by store() (a chain, root first), their rows back to the free list."""
        for block in reversed(new):
            del self._table[block.key]
            if block.parent is not None:
                block.parent.refs -= 1
                if block.parent.refs == 0:
                    heapq.heappush(self._lru, (block.parent.last_used, next(self._seq), block.parent))
            self._free.append(block.index)
        self.stats.blocks = len(self._table)

    def clear(self) -> None:
        """Forget every block (the pool's memory stays allocated)."""
        self._table.clear()
        self._lru.clear()
        self._free = list(range(self.capacity - 1, -1, -1))
        self.stats.blocks = 0

"""The block manager: the KV cache is `num_blocks` fixed-size blocks of `block_size` token slots; each sequence
owns a *block table* (a list of block ids) where entry i holds positions [i*block_size, (i+1)*block_size).

Memory only: the manager knows nothing of models or schedules. Allocation is all-or-nothing, so a failed
`allocate` leaves the manager exactly as it was. Blocks are handed out oldest-freed first (a FIFO free list).

Sliding windows (a model whose every layer attends to its last `window` positions, or StreamingLLM's
`sink_tokens` + recent window as an opt-in policy) let a sequence give back the blocks wholly before its window:
`evict_before(seq, first_live_position)` frees them and marks their table entries `DEAD` (-1), so the table
keeps its position -> entry arithmetic. Blocks holding any of the first `sink_tokens` positions are never
evicted.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

DEAD = -1  # a table entry whose block was evicted (its positions are outside the window)


@dataclass(frozen=True)
class CachePolicy:
    """Which cached positions a query still reads: with `window` set, a query at position q reads the keys at
    [q - window + 1, q] (transformers' sliding-window mask) plus the first `sink_tokens` positions; with
    `window=None`, every earlier position (nothing is ever evicted)."""
    window: int | None = None
    sink_tokens: int = 0

    def __post_init__(self):
        if self.window is not None and self.window < 1:
            raise ValueError(f"einfuse: a cache window must hold at least one position, got {self.window}")
        if self.sink_tokens < 0 or (self.sink_tokens and self.window is None):
            raise ValueError("einfuse: sink tokens need a window (StreamingLLM keeps sinks + a recent window)")

    @staticmethod
    def streaming_llm(window: int = 1020, sink_tokens: int = 4) -> CachePolicy:
        """StreamingLLM (Xiao et al., 2023): keep the first `sink_tokens` positions and the last `window`."""
        return CachePolicy(window=window, sink_tokens=sink_tokens)

    @staticmethod
    def of_model(config) -> CachePolicy:
        """The model's own policy: its sliding window when every layer has it (Mistral), else full attention
        (a model mixing sliding and global layers, Gemma-2, needs every position for its global layers)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        window = getattr(config, "sliding_window", None)
        if not window or getattr(config, "use_sliding_window", True) is False:
            return CachePolicy()
        kinds = getattr(config, "layer_types", None)
        if kinds is not None and any(k != "sliding_attention" for k in kinds):
            return CachePolicy()
        return CachePolicy(window=int(window))

    def first_live(self, next_position: int) -> int:
        """The first position (after the sinks) a query at `next_position` or later still reads."""
        return 0 if self.window is None else max(0, next_position - self.window + 1)


class BlockManager:
    """`num_blocks` blocks of `block_size` token slots, a free list and one block table per sequence (sequences
    are any hashable ids)."""

    def __init__(self, num_blocks: int, block_size: int = 16, sink_tokens: int = 0):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"einfuse: a KV cache needs at least one block of at least one token "
                             f"(got num_blocks={num_blocks}, block_size={block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sink_tokens = sink_tokens
        self._free = collections.deque(range(num_blocks))
        self._tables: dict[object, list[int]] = {}

    # --------------------------------------------------------------------------------------------- queries
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    def table(self, seq) -> list[int]:
        """The sequence's block table (a copy; empty for a sequence holding no blocks)."""
        return list(self._tables.get(seq, ()))

    def blocks_needed(self, seq, n_tokens_total: int) -> int:
        """How many more blocks `seq` needs for its table to cover positions [0, n_tokens_total)."""
        return max(0, -(-n_tokens_total // self.block_size) - len(self._tables.get(seq, ())))

    def can_allocate(self, seq, n_tokens_total: int) -> bool:
        return self.blocks_needed(seq, n_tokens_total) <= len(self._free)

    def max_tokens(self, seq) -> int:
        """The most positions `seq`'s table could cover if it took every free block."""
        return (len(self._tables.get(seq, ())) + len(self._free)) * self.block_size

    # ------------------------------------------------------------------------------------------- changes
    def allocate(self, seq, n_tokens_total: int) -> bool:
        """Grow `seq`'s table to cover positions [0, n_tokens_total); False (and nothing changed) when the free
        list is too short. A table never shrinks here."""
        need = self.blocks_needed(seq, n_tokens_total)
        if need > len(self._free):
            return False
        table = self._tables.setdefault(seq, [])
        table.extend(self._free.popleft() for _ in range(need))
        return True

    def free(self, seq) -> list[int]:
        """Return every live block of `seq` to the free list and forget its table; the blocks freed (none for
        a sequence holding no blocks: freeing twice is a no-op)."""
        blocks = [b for b in self._tables.pop(seq, ()) if b != DEAD]
        self._free.extend(blocks)
        return blocks

    def evict_before(self, seq, first_live_position: int) -> list[int]:
        """Free `seq`'s blocks lying wholly before `first_live_position`, except those holding any of the first
        `sink_tokens` positions; their table entries become DEAD. Returns the blocks freed."""
        table = self._tables.get(seq, [])
        first_kept = -(-self.sink_tokens // self.block_size)  # blocks [0, first_kept) hold sink positions
        freed = []
        for i in range(first_kept, min(first_live_position // self.block_size, len(table))):
            if table[i] != DEAD:
                freed.append(table[i])
                table[i] = DEAD
        self._free.extend(freed)
        return freed

    def __repr__(self) -> str:
        return (f"BlockManager({self.blocks_in_use}/{self.num_blocks} blocks of {self.block_size} in use, "
                f"{len(self._tables)} sequences)")

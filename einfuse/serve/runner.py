"""The model runner: what executes one engine step. The engine (engine.py) decides *what* runs; a runner
only runs it. The protocol, exactly:

    runner.bind(cache: CacheConfig) -> None
        Called once by `LLM(...)`, before any step: the cache's geometry (num_blocks, block_size), the step
        budget (max_batch_tokens: no step carries more tokens), the dtype and the cache policy (window, sinks).
        A paged runner allocates its KV storage here: block b holds positions' K/V for slots
        [b*block_size, (b+1)*block_size) of whichever sequence owns b, for every layer.

    runner.step(entries: list[StepEntry]) -> torch.Tensor   # [len(entries), vocab], float32
        One call per engine step. Each entry (request_id, token_ids, start, block_table, sample) says: process
        `token_ids`, which sit at positions [start, start + len(token_ids)) of that request's sequence; the
        positions [0, start) were processed by earlier steps (their K/V are in the blocks). Write the new
        tokens' K/V into the table's blocks (position p -> block_table[p // block_size], slot
        p % block_size), attend over every live cached position before them plus themselves (causally),
        and return row i = the logits of entries[i]'s *last* token. Rows whose entry has `sample=False`
        (a prefill chunk that does not finish its prompt) are never read: a runner may skip the LM head for
        them and return anything there. An entry with start=0 begins a sequence (also a request coming back
        after preemption: it is recomputed from its first token). Entries come in no particular order;
        a request appears at most once per step; at most `max_batch_tokens` tokens in all.
        An entry's `layers` is None (the whole model) except under a layered scheduler (layered.py), which
        only runs with a runner that says `runs_layer_groups = True`: then (lo, hi) means pass the tokens
        through the model's layers lo..hi-1 only (a prefill advancing one layer group per step; the hidden
        state waits in the runner for the next group, and the logits row is read only when hi is the last).

    runner.release(request_id: int, blocks: list[int]) -> None    (optional)
        Called right after the engine returned `blocks` to the free list: on eviction (blocks wholly before a
        sliding window; the request goes on), and when a request finishes, is aborted or is preempted (all its
        blocks; a preempted request comes back later under the same id with start=0).

    runner.last_step_bytes: int | None                              (optional attribute)
        Bytes the last step moved to and from memory; copied into the engine's StepStats.bytes_moved.

When a block's contents are valid: a block's slots hold K/V only for the sequence whose table holds it, and
only for positions that sequence already passed to `step` (slots past a sequence's last processed position
are garbage, and so is every slot of a block just allocated). From the moment the engine frees a block
(the `release` call reports it) its contents are invalid: the engine may put it into another sequence's table
in the very next `step`, where that sequence writes over it. A table entry DEAD (-1) marks an evicted block;
a query reads only live entries (sinks and its window). The engine never moves a live block from one table
slot to another, never shares a block between sequences, and never frees a block a step is about to read.

Positions are absolute (`start` counts every token of the sequence, evicted ones too); a runner that re-bases
positions for StreamingLLM (position = slot in the cache) does so itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .blocks import DEAD, CachePolicy


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache the engine manages, as `bind` hands it to a runner."""
    num_blocks: int
    block_size: int
    max_batch_tokens: int
    dtype: torch.dtype
    policy: CachePolicy = field(default_factory=CachePolicy)


@dataclass(frozen=True)
class StepEntry:
    """One request's share of a step (see the module docstring)."""
    request_id: int
    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]
    sample: bool = True
    layers: tuple[int, int] | None = None


@runtime_checkable
class ModelRunner(Protocol):
    def bind(self, cache: CacheConfig) -> None: ...

    def step(self, entries: list[StepEntry]) -> torch.Tensor: ...


class EagerRunner:
    """The reference runner: ignores the block tables for computing and recomputes each sampled request's
    whole sequence so far with the transformers model in eager PyTorch (`model(input_ids=...).logits[0, -1]`,
    `use_cache=False`) — slow, exact. It does check the engine keeps the protocol: each entry's start is where
    the request's previous entries ended (or 0), its table covers the positions written, and no live block is
    in two requests' tables unless the engine released it first. Under a StreamingLLM policy it still
    attends to every position (full attention): it computes from tokens, not from the cache."""

    def __init__(self, model):
        self.model = model
        self.cache: CacheConfig | None = None
        self.last_step_bytes = None
        self._tokens: dict[int, list[int]] = {}  # every token each request passed to step, in order
        self.owners: dict[int, int] = {}  # block -> the request whose table holds it, as steps showed it
        self.forwards = 0  # model calls made (a prefill chunk that is not sampled costs none)

    def bind(self, cache: CacheConfig) -> None:
        self.cache = cache

    def release(self, request_id: int, blocks: list[int]) -> None:
        for b in blocks:
            if self.owners.get(b, request_id) != request_id:  # a block no step used yet has no owner
                raise RuntimeError(f"einfuse: request {request_id} released block {b}, owned by "
                                   f"{self.owners.get(b)}")
            self.owners.pop(b, None)
        if not any(owner == request_id for owner in self.owners.values()):
            self._tokens.pop(request_id, None)  # finished, aborted or preempted: it holds no block any more

    def _check(self, e: StepEntry) -> None:
        seen = self._tokens.setdefault(e.request_id, [])
        if e.start == 0:
            seen.clear()
        if e.start != len(seen):
            raise RuntimeError(f"einfuse: request {e.request_id} sent tokens from position {e.start}, but "
                               f"{len(seen)} came before")
        end = e.start + len(e.token_ids)
        bs = self.cache.block_size
        for i in range(e.start // bs, -(-end // bs)):
            block = e.block_table[i] if i < len(e.block_table) else DEAD
            if block == DEAD:
                raise RuntimeError(f"einfuse: request {e.request_id} writes position {i * bs}+ with no live block")
        for block in e.block_table:
            if block != DEAD and self.owners.setdefault(block, e.request_id) != e.request_id:
                raise RuntimeError(f"einfuse: block {block} is in request {e.request_id}'s table but still "
                                   f"belongs to request {self.owners[block]}")
        seen.extend(e.token_ids)

    @torch.no_grad()
    def step(self, entries: list[StepEntry]) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("einfuse: EagerRunner.step before bind(); LLM binds its runner when it is made")
        if not 0 < sum(len(e.token_ids) for e in entries) <= self.cache.max_batch_tokens:
            raise RuntimeError(f"einfuse: a step of {sum(len(e.token_ids) for e in entries)} tokens; the budget "
                               f"is {self.cache.max_batch_tokens}")
        rows = []
        device = next(self.model.parameters()).device
        for e in entries:
            self._check(e)
            if e.sample:
                ids = torch.tensor([self._tokens[e.request_id]], device=device)
                rows.append(self.model(input_ids=ids, use_cache=False).logits[0, -1].float())
                self.forwards += 1
            else:
                rows.append(None)
        unread = torch.zeros(self.model.config.get_text_config().vocab_size, device=device)  # sample=False rows
        return torch.stack([r if r is not None else unread for r in rows])


def make_runner(model, cache: CacheConfig, backend: str | None = None) -> ModelRunner:
    """The runner `LLM(model, runner=None)` uses: "eager" is the EagerRunner (the reference); any other
    backend (None: einfuse's default, "torch", "triton", "reference") is the compiled PagedRunner (paged.py):
    prefill and decode programs derived from one capture of `model`, keeping K/V in the blocks `cache`
    describes. `cache.dtype` other than the model's converts the model in place (`model.to(dtype)`), as
    loading it in that dtype would."""
    if next(model.parameters()).dtype != cache.dtype:
        model.to(cache.dtype)
    if backend == "eager":
        return EagerRunner(model)
    from .paged import PagedRunner

    return PagedRunner(model, backend)

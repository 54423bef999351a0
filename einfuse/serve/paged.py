"""The compiled paged runner: the ModelRunner (runner.py) that serves from einfuse's own programs.

`bind` compiles the model once (`einfuse.api.compile_cached`): a prefill program (one sequence, T new
tokens after a cached prefix) and a decode program (B sequences, one token each), both reading and writing
the KV cache this runner allocates — one state per attention's key and value source, `[num_blocks,
block_size, ...]`, zeroed (a slot no sequence wrote is never read, and zeros never make NaNs through a
masked-off product). A step runs

- every entry of one token (decodes, and a one-token prompt or chunk) as one batched decode call, the
  batch padded to a bucket (1, 2, 4, ...) with rows whose block table is all DEAD: they write nothing
  and read nothing, so each bucket is one CUDA graph on CUDA;
- every other entry in batched prefill calls (chunked prefill: `start` > 0 attends to the cached prefix),
  each padded to its call's longest by repeating its last token at its last position (the copies compute
  what that token computes and write the same K/V to the same slot); entries of similar lengths share a
  call, split where the padding saved outweighs a call's fixed cost (`_prefill_batches`).

Block tables are padded with DEAD (-1) to the longest table of the call (with CUDA graphs, to a bucketed
width: a power of two of blocks); a DEAD column's
keys are masked, as evicted blocks are (passes.serving). Positions are absolute, evicted ones counted:
under StreamingLLM the model sees the positions the tokens really have (no re-basing).
"""
from __future__ import annotations

import torch

from .blocks import DEAD
from .runner import CacheConfig, StepEntry


def bucket(n: int) -> int:
    """The smallest power of two >= n (n >= 1): decode batches and table widths are padded to one."""
    return 1 << max(0, n - 1).bit_length()


class PagedRunner:
    """Runs `model` through einfuse's compiled prefill and decode programs over a paged KV cache (see the
    module docstring). backend: as for einfuse.compile; cuda_graphs: replay each decode bucket as a CUDA
    graph (default: on CUDA); graph_factory: makes the replayer for a bucket, called like
    `runtime.graphs.GraphReplay(run, stable=..., keep=...)` (tests pass one whose CUDA calls are replaced,
    to run the bookkeeping on CPU); prepare: passes run on the captured module before anything else
    (`einfuse.passes.compress.compress_experts` serves dictionary-coded experts)."""

    def __init__(self, model, backend: str | None = None, *, cuda_graphs: bool | None = None,
                 graph_factory=None, dump_dir: str | None = None, dist=None, prepare=()):
        self.model = model
        self.prepare = tuple(prepare)  # passes run on the captured module first (compress_experts, ...)
        self.dist = dist  # an einfuse.Dist: this rank's share of the programs (in a torchrun job)
        self.backend = backend
        self.device = next(model.parameters()).device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graph_factory = graph_factory
        self.dump_dir = dump_dir
        self.cache: CacheConfig | None = None
        self.programs = None
        self.states: dict = {}
        self.graphs: dict = {}  # (batch bucket, table width) -> replayer of the decode program
        self.last_step_bytes = None
        self.calls = {"prefill": 0, "decode": 0}
        self.call_tokens = 8  # a prefill call's fixed cost, in token rows (how prefills are grouped into calls)

    def bind(self, cache: CacheConfig) -> None:
        from ..api import compile_cached

        self.cache = cache
        self.programs = compile_cached(self.model, block_size=cache.block_size, backend=self.backend,
                                       dump_dir=self.dump_dir, dist=self.dist, prepare=self.prepare)
        nb = next(s for s in self.programs.decode.ir.sizes if str(s) == "NB")
        self.states = {}
        for i in self.programs.states:
            shape = i.type.concrete_shape({nb: cache.num_blocks})
            self.states[i.name] = torch.zeros(shape, dtype=i.type.dtype.torch, device=self.device)

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())

    def release(self, request_id: int, blocks: list[int]) -> None:
        """Nothing to do: a freed block's slots are overwritten by its next owner before any read."""

    def _prefill_batches(self, group: list[StepEntry], index: list[int]) -> list[list[int]]:
        """The prefill entries split into calls, each padded to its longest entry: the split (of the entries
        sorted by length) that computes the fewest token rows, counting each call as `call_tokens` more rows
        (its fixed cost). Eight prompts of 11 to 42 tokens: 3 calls of 231 rows instead of 1 of 336."""
        order = sorted(range(len(group)), key=lambda k: -len(group[k].token_ids))
        lens = [len(group[k].token_ids) for k in order]
        best = [0.0] + [float("inf")] * len(lens)  # best[j]: cost of the first j (longest first)
        cut = [0] * (len(lens) + 1)
        for j in range(1, len(lens) + 1):
            for i in range(j):  # entries i..j-1 in one call, padded to lens[i]
                c = best[i] + self.call_tokens + lens[i] * (j - i)
                if c < best[j]:
                    best[j], cut[j] = c, i
        calls, j = [], len(lens)
        while j > 0:
            calls.append([index[k] for k in order[cut[j]:j]])
            j = cut[j]
        return calls[::-1]

    def _table(self, entries: list[StepEntry], rows: int) -> torch.Tensor:
        width = max(len(e.block_table) for e in entries)
        width = bucket(width) if self.cuda_graphs else width  # a graph per bucket; else no padded keys
        table = torch.full((rows, width), DEAD, dtype=torch.int32)
        for n, e in enumerate(entries):
            table[n, :len(e.block_table)] = torch.tensor(e.block_table, dtype=torch.int32)
        return table.to(self.device)

    def _call(self, label: str, ids: torch.Tensor, pos: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        v = getattr(self.programs, label)
        inputs = {**v.bindings, **self.states, "input_ids": ids, "position_ids": pos, "block_table": table}
        run = v.run
        if label == "decode" and self.cuda_graphs:
            key = (ids.shape[0], table.shape[1])
            if key not in self.graphs:
                self.graphs[key] = self._replayer(v)
            run = self.graphs[key]
        self.calls[label] += 1
        out = run(inputs)[v.ir.outputs[0]]
        return out.reshape(out.shape[0], -1, out.shape[-1])[:, -1].float()

    def _replayer(self, v):
        from ..runtime.graphs import GraphReplay

        make = self.graph_factory or GraphReplay
        return make(v.run, stable=set(v.bindings) | set(self.states), keep=v.ir.outputs[:1])

    @torch.no_grad()
    def step(self, entries: list[StepEntry]) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("einfuse: PagedRunner.step before bind(); LLM binds its runner when it is made")
        rows: list = [None] * len(entries)
        decode = [n for n, e in enumerate(entries) if len(e.token_ids) == 1]
        prefill = [n for n, e in enumerate(entries) if len(e.token_ids) > 1]
        for part in self._prefill_batches([entries[n] for n in prefill], prefill):
            group = [entries[n] for n in part]
            width = max(len(e.token_ids) for e in group)
            ids = torch.empty((len(group), width), dtype=torch.int64)
            pos = torch.empty((len(group), width), dtype=torch.int64)
            for r, e in enumerate(group):
                # a shorter chunk repeats its last token at its last position: the copies compute exactly
                # what that token computes and write the same K/V into the same slot
                n = len(e.token_ids)
                ids[r, :n], ids[r, n:] = torch.tensor(e.token_ids), e.token_ids[-1]
                pos[r, :n], pos[r, n:] = torch.arange(e.start, e.start + n), e.start + n - 1
            logits = self._call("prefill", ids.to(self.device), pos.to(self.device), self._table(group, len(group)))
            for n, row in zip(part, logits):
                rows[n] = row
        if decode:
            group = [entries[n] for n in decode]
            b = bucket(len(group)) if self.cuda_graphs else len(group)
            ids = torch.zeros((b, 1), dtype=torch.int64)
            pos = torch.zeros((b, 1), dtype=torch.int64)
            for n, e in enumerate(group):
                ids[n, 0], pos[n, 0] = e.token_ids[0], e.start
            logits = self._call("decode", ids.to(self.device), pos.to(self.device), self._table(group, b))
            for n, row in zip(decode, logits):
                rows[n] = row
        return torch.stack(rows)

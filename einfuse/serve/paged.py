"""The compiled paged runner: the ModelRunner (runner.py) that serves from einfuse's own programs.

`bind` compiles the model once (`einfuse.api.compile_cached`): a prefill program (one sequence, T new
tokens after a cached prefix) and a decode program (B sequences, one token each), both reading and writing
the KV cache this runner allocates — one state per attention's key and value source, `[num_blocks,
block_size, ...]`, zeroed (a slot no sequence wrote is never read, and zeros never make NaNs through a
masked-off product). A step runs

- every entry of one token (decodes, and a one-token prompt or chunk) as one batched decode call, the
  batch padded to a bucket (1, 2, 4, ...) with rows whose block table is all DEAD: they write nothing
  and read nothing, so each bucket is one CUDA graph on CUDA;
- every other entry as its own prefill call (chunked prefill: `start` > 0 attends to the cached prefix).

Block tables are padded with DEAD (-1) to a bucketed width (a power of two of blocks); a DEAD column's
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
    to run the bookkeeping on CPU)."""

    def __init__(self, model, backend: str | None = None, *, cuda_graphs: bool | None = None,
                 graph_factory=None, dump_dir: str | None = None, dist=None):
        self.model = model
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

    def bind(self, cache: CacheConfig) -> None:
        from ..api import compile_cached

        self.cache = cache
        self.programs = compile_cached(self.model, block_size=cache.block_size, backend=self.backend,
                                       dump_dir=self.dump_dir, dist=self.dist)
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

    def _table(self, entries: list[StepEntry], rows: int) -> torch.Tensor:
        width = bucket(max(len(e.block_table) for e in entries))
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
        for n, e in enumerate(entries):
            if len(e.token_ids) > 1:
                ids = torch.tensor([e.token_ids], dtype=torch.int64, device=self.device)
                pos = torch.arange(e.start, e.start + len(e.token_ids), device=self.device)[None]
                rows[n] = self._call("prefill", ids, pos, self._table([e], 1))[0]
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

"""Compute-communication overlap passes.

`split_tokens` (TokenWeave): the token dimension is split in two halves; every statement that works per
token is computed once per half (the sharding propagation of `passes.sharding`, with both parts kept in one
program), statements that mix tokens (attention over keys) read both halves joined, and the halves'
statements are interleaved so one half's all-reduce is in flight while the other half computes: a list
schedule that runs, among the statements ready, the one of the earliest *stage* (how many of its half's
collectives precede it), half 0 before half 1. The collectives are issued asynchronously and waited for
where read, so on any backend that overlaps (gloo's threads, NCCL's streams) the exposed time drops."""
from __future__ import annotations

import heapq

import sympy

from ..ir import collective as coll
from ..ir import index as ix
from ..ir.expr import Access, Call, Const, IndexValue
from ..ir.module import Module, Statement
from .base import Pass
from .sharding import Shard, ShardingError

COMBINE = {"sum": "add", "max": "max", "min": "min"}


def token_inputs(m: Module) -> dict:
    """The integer user inputs with a token dimension (input_ids, position_ids: [batch, tokens]): {name: dim}."""
    return {i.name: i.type.rank - 1 for i in m.inputs
            if i.kind == "in" and i.type.rank >= 2 and not i.type.dtype.is_float and i.type.shape[-1].is_Integer}


class SplitTokens(Pass):
    """Split the tokens in two halves and interleave the halves around their collectives (TokenWeave).
    A module without a token input, or an odd number of tokens, is returned unchanged."""

    name = "split_tokens"

    def run(self, m: Module) -> Module:
        seeds = token_inputs(m)
        if not seeds or not any(isinstance(op, coll.Collective) for op in m.body):
            return m
        tokens = {int(m.types()[n].shape[d]) for n, d in seeds.items()}
        if len(tokens) != 1 or next(iter(tokens)) % 2 or next(iter(tokens)) < 2:
            return m
        parts = []
        for b in (0, 1):
            sh = Shard((0, 1), b, plan={n: (d, 1) for n, d in seeds.items()}, vocab_parallel=False,
                       keep_whole=tuple(seeds))
            try:
                out = sh.run(m)
            except ShardingError:
                return m
            parts.append((sh, out))
        return _merge(m, parts)


def _merge(m: Module, parts: list) -> Module:
    """One program with both halves: per-half names get `__t0`/`__t1`, statements shared by both are kept
    once, the pass's own (virtual) collectives become statements joining or combining the halves."""
    ops: dict = {}  # name -> op (first definition wins: shared ops are identical in both halves)
    half: dict = {}  # name -> 0 | 1 | None (shared)
    order: dict = {}
    for b, (sh, out) in enumerate(parts):
        dep = sh.dependent
        rename = {n: f"{n}__t{b}" for n in dep}
        types = out.types()
        for n, op in enumerate(out.body):
            name = op.outputs[0]
            if name in sh.created:
                join = _join(op, parts, types)
                if join is not None:
                    ops.setdefault(join.name, join)
                    half.setdefault(join.name, None)
                    order.setdefault(join.name, (n, b))
                    continue
            new = op.renamed(rename)
            key = new.outputs[0]
            if key in ops:
                continue
            ops[key] = new
            half[key] = b if name in dep else None
            order[key] = (n, b)
    body = _schedule(ops, half, order, {i.name for i in m.inputs})
    return m.replace(body=tuple(body), kernels=())


def _join(op, parts: list, types: dict):
    """The statement replacing a virtual collective: an all-gather joins the halves along the token dim,
    an all-reduce combines the halves' partial results."""
    if not isinstance(op, coll.Collective):
        return None  # a fused-split reorder statement: not made for tokens
    src = op.src
    t = op.type
    rs = [ix.rank(f"d{d}") for d in range(t.rank)]
    a0, a1 = f"{src}__t0", f"{src}__t1"
    if op.kind == "all_reduce":
        expr = Call(COMBINE[op.op], (Access(a0, tuple(rs)), Access(a1, tuple(rs))))
        return Statement(op.name, t, tuple(rs), expr, loc=op.loc)
    if op.kind == "all_gather":
        d = op.dim
        h = types[src].shape[d]
        lo, hi = list(rs), list(rs)
        hi[d] = rs[d] - h
        cond = Call("lt", (IndexValue(rs[d]), Const(int(h)) if sympy.sympify(h).is_Integer else IndexValue(h)))
        expr = Call("where", (cond, Access(a0, tuple(lo)), Access(a1, tuple(hi))))
        return Statement(op.name, t, tuple(rs), expr, loc=op.loc)
    return None


def _schedule(ops: dict, half: dict, order: dict, inputs: set) -> list:
    """A list schedule: of the ops whose inputs exist, the one of the earliest stage, then half 0 before
    half 1 before shared, then original order. A half's stage grows past each of its collectives."""
    readers: dict = {}
    waiting: dict = {}
    for name, op in ops.items():
        deps = {r for r in op.reads() if r in ops and r != name}
        waiting[name] = len(deps)
        for r in deps:
            readers.setdefault(r, []).append(name)
    stage: dict = {}

    def key(name):
        h = half[name]
        return (stage[name], 2 if h is None else h, order[name])

    ready = []
    for name, n in waiting.items():
        if n == 0:
            stage[name] = 0
            heapq.heappush(ready, (key(name), name))
    body = []
    while ready:
        _, name = heapq.heappop(ready)
        op = ops[name]
        body.append(op)
        bump = 1 if isinstance(op, coll.Collective) else 0
        for r in readers.get(name, []):
            stage[r] = max(stage.get(r, 0), stage[name] + bump)
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, (key(r), r))
    if len(body) != len(ops):
        raise ShardingError("einfuse: split_tokens found a cycle (a bug): "
                            f"{sorted(set(ops) - {op.outputs[0] for op in body})[:5]}")
    return body


OVERLAP = {"split_tokens": SplitTokens}


def overlap_pipeline(names, passes=None) -> list:
    """The pipeline after the overlap passes: with split_tokens, contractions of the two halves must not
    share a kernel (fusion's shared-operand groups would run both halves' projections at once and undo
    the interleaving), so shared-operand grouping is off; `passes` given by the user are kept as they are."""
    from . import default_pipeline
    from .fusion import FuseKernels

    if passes is not None:
        return list(passes)
    pipeline = default_pipeline()
    if "split_tokens" in names:
        pipeline = [FuseKernels(shared_operands=False) if isinstance(p, FuseKernels) else p for p in pipeline]
    return pipeline


def overlap_passes(names) -> list:
    """The overlap passes named (Dist(overlap=...)), in order."""
    return [OVERLAP[n]() for n in names]

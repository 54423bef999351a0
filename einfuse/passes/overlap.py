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
import torch

from ..ir import collective as coll
from ..ir import index as ix
from ..ir.expr import Access, Call, Const, IndexValue
from ..ir.module import Module, Opaque, Statement, TensorRef
from .base import Pass
from .expert_overlap import OverlapExperts
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


class FuseAllReduceNorm(Pass):
    """An all-reduce whose only reader adds it to the residual stream, followed by that sum's RMSNorm, becomes
    one call (`einfuse.dist.fused.allreduce_residual_rmsnorm`: on CUDA with symmetric memory one kernel reads
    the peers' partial sums and normalizes; elsewhere an all-reduce and torch ops). The norm is matched by
    its statements' structure and then checked by evaluating them against the formula; anything else is
    left alone."""

    name = "allreduce_rmsnorm"
    TARGET = "einfuse.dist.fused:allreduce_residual_rmsnorm"

    def run(self, m: Module) -> Module:
        users, types = m.users(), m.types()
        fused: dict = {}  # position of the residual add -> the call; names whose definitions go
        drop: set = set()
        for c in m.body:
            if not (isinstance(c, coll.Collective) and c.kind == "all_reduce" and c.op == "sum"):
                continue
            found = _residual_norm(m, c, users, types)
            if found is None:
                continue
            h, res, w, y, eps = found
            call = Opaque(((h.name, h.type), (y.name, y.type)), self.TARGET,
                          (TensorRef(c.src), TensorRef(res), TensorRef(w)), (("eps", eps), ("ranks", c.ranks)),
                          h.loc)
            fused[h.name] = call
            drop |= {c.name, y.name}
        if not fused:
            return m
        body = []
        for op in m.body:
            name = op.outputs[0]
            if name in fused:
                body.append(fused[name])
            elif name not in drop:
                body.append(op)
        return m.replace(body=tuple(body))


def _single_user(users, name):
    us = users.get(name, [])
    return us[0] if len(us) == 1 and isinstance(us[0], Statement) else None


def _flat_identity(access: Access, out: Statement, src_shape) -> bool:
    """The access reads the tensor at the statement's own row-major position (a view of the same rows)."""
    from .sharding import eval_index, index_grid

    ext = {r: int(n) for r, n in out.output_ranks().items()}
    env = index_grid(sorted(ext, key=str), ext)
    if not env:
        return False
    shape = next(iter(env.values())).shape

    def flat(positions, dims):
        total = torch.zeros(shape, dtype=torch.long)
        for p, d in zip(positions, dims):
            total = total * int(d) + eval_index(p, env).expand(shape)
        return total

    return torch.equal(flat(access.indices, src_shape), flat(out.index, out.type.shape))


def _residual_norm(m: Module, c, users, types):
    """(h, residual, weight, y, eps) when `h = residual + c` is c's one reader and y = weight * rmsnorm(h)."""
    from ..ir.evaluator import evaluate
    from ..ir.module import Input

    h = _single_user(users, c.name)
    if h is None or h.reduce is not None or not (isinstance(h.expr, Call) and h.expr.op == "add"):
        return None
    a, b = h.expr.args
    if not (isinstance(a, Access) and isinstance(b, Access)):
        return None
    ar, res = (a, b) if a.tensor == c.name else (b, a)
    if ar.tensor != c.name or res.tensor == c.name or types[res.tensor].shape != h.type.shape:
        return None
    if not (_flat_identity(ar, h, types[c.name].shape) and _flat_identity(res, h, h.type.shape)):
        return None
    if h.type.dtype.name != "f32" or types[c.src].dtype.name != "f32":
        return None
    # the norm's statements: every statement reachable from h until a weight multiplies it
    chain, frontier, y, weight = [], [h.name], None, None
    n_last = h.type.shape[-1]
    for _ in range(8):
        nxt = [u for name in frontier for u in users.get(name, []) if isinstance(u, Statement)
               and u.name not in {s.name for s in chain} and u.reads() - {x.name for x in chain} <= {h.name} | {
                   i.name for i in m.inputs if i.kind == "param"} | set(frontier)]
        if not nxt:
            break
        for u in nxt:
            if u not in chain:
                chain.append(u)
        frontier = [u.name for u in nxt]
        params = [t for u in nxt for t in u.reads() if any(i.name == t and i.kind == "param" for i in m.inputs)]
        if params:
            weight, y = params[0], nxt[0]
            break
    if y is None or types[weight].shape != (n_last,) or y.type != h.type or len(chain) > 8:
        return None
    consts = [x.value for s in chain for x in _consts(s.expr) if isinstance(x.value, float) and 0 < x.value < 1e-2]
    eps = consts[0] if consts else None
    if eps is None:
        return None
    order = {op.outputs[0]: n for n, op in enumerate(m.body)}
    chain.sort(key=lambda s: order[s.name])
    sub = Module("norm_check", (Input(h.name, h.type), Input(weight, types[weight], "param")), tuple(chain),
                 (y.name,))
    g = torch.Generator().manual_seed(0)
    hv = torch.randn(tuple(int(d) for d in h.type.shape), generator=g)
    wv = torch.randn((int(n_last),), generator=g)
    try:
        got = evaluate(sub, {h.name: hv, weight: wv})[y.name]
    except Exception:  # noqa: BLE001 (not the statements of a norm)
        return None
    want = wv * (hv * torch.rsqrt(torch.mean(hv * hv, dim=-1, keepdim=True) + eps))
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        return None
    return h, res.tensor, weight, y, eps


def _consts(e):
    from ..ir.expr import walk

    return [n for n in walk(e) if isinstance(n, Const)]


OVERLAP = {"split_tokens": SplitTokens, "allreduce_rmsnorm": FuseAllReduceNorm, "overlap_experts": OverlapExperts}


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

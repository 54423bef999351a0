"""overlap_experts (Comet-style): with expert parallelism each rank runs its experts on every token and an
all-reduce sums the experts' weighted outputs across ranks. That combine waits for the whole expert
computation, then the next layer waits for the combine. This pass cuts the experts chain (gate/up, SwiGLU,
down, combine — `kinds.moe.find_chains`) and its all-reduce into `chunks` pieces along the tokens: chunk c
computes tokens [c*T/C, (c+1)*T/C) and issues its own all-reduce, so chunk c's communication is in flight
while chunk c+1's expert GEMMs run; one statement joins the chunks where the layer's result was. Each
chunk is still one experts chain (the MoE kind runs it); the collectives are asynchronous and waited for
where read (the join), on gloo's threads or NCCL's streams.

A chunk's statements are the chain's with the token rank t shifted by the chunk's first token: reads of
tensors outside the chain read row t + c*T/C, reads of the chunk's own statements row t. Chains whose
token count is symbolic (serving programs) or does not divide into chunks are left as they are."""
from __future__ import annotations

import sympy

from ..ir import collective as coll
from ..ir import index as ix
from ..ir.expr import Access, Call, Const, Expr, IndexValue, accesses, rewrite, substitute
from ..ir.module import Module, Statement, TensorType
from .base import Pass
from ..kinds.moe import find_chains


class OverlapExperts(Pass):
    """Chunk each experts chain followed by an all-reduce into up to `chunks` pieces along the tokens, each
    with its own all-reduce: the most chunks that divide the T tokens and keep at least `min_tokens` each.
    A chunk's expert GEMMs load the experts' weights again, so small chunks turn compute-bound GEMMs into
    weight-bound ones: on the 8xH100 model (benchmarks/bench_dist.py model --ep, Mixtral-8x7B shapes, one
    expert per rank) 2 chunks of 2048 tokens hide 46% of the combine at no cost, 4 chunks hide 68% but
    make the layer 7.6% slower; at 8192 tokens 4 chunks hide 73% and the layer is 2.5% faster."""

    name = "overlap_experts"

    def __init__(self, chunks: int = 2, min_tokens: int = 64):
        if chunks < 1 or min_tokens < 1:
            raise ValueError("einfuse: overlap_experts needs chunks >= 1 and min_tokens >= 1")
        self.chunks, self.min_tokens = chunks, min_tokens
        self.notes: list = []

    def fingerprint(self) -> str:
        return f"overlap_experts:{self.chunks}:{self.min_tokens}"

    def run(self, m: Module) -> Module:
        self.notes = []
        users, grouped = m.users(), set(m.group_of())
        for chain in find_chains(m, grouped):
            if any(x.name in grouped for x in chain.statements):
                continue
            reduce = _combine_all_reduce(chain, users)
            if reduce is None:
                continue
            tokens = chain.comb.type.shape[0]
            if not sympy.sympify(tokens).is_Integer:
                self.notes.append(f"{chain.comb.name}: symbolic token count, not chunked")
                continue
            n = next(c for c in range(min(self.chunks, int(tokens)), 0, -1)
                     if int(tokens) % c == 0 and (int(tokens) // c >= self.min_tokens or c == 1))
            if n < 2:
                continue
            chunked = _chunk(m, chain, reduce, n)
            if chunked is None:
                self.notes.append(f"{chain.comb.name}: another statement reads inside the chain, or the chain reads "
                                  "itself at other token rows: not chunked")
                continue
            m, users = chunked, chunked.users()
        return m


def _combine_all_reduce(chain, users: dict):
    """The all-reduce that sums the chain's combine over the ranks (its only reader), or None."""
    readers = users.get(chain.comb.name, [])
    if len(readers) == 1 and isinstance(readers[0], coll.Collective) and readers[0].kind == "all_reduce":
        return readers[0]
    return None


def _chunk(m: Module, chain, reduce: coll.Collective, n: int) -> Module | None:
    inside = {s.name for s in chain.statements}
    users = m.users()
    for s in chain.statements:  # the chain reads itself row for row: dim 0 at the reader's token rank
        if any(a.tensor in inside and a.indices[0] != s.index[0] for a in accesses(s.expr)):
            return None
    if any(u.outputs[0] not in inside and u is not reduce for name in inside for u in users.get(name, [])):
        return None
    tokens = int(chain.comb.type.shape[0])
    size = tokens // n
    pieces: list = []
    for c in range(n):
        names = {s: f"{s}__c{c}" for s in inside}
        for s in chain.statements:
            pieces.append(_shifted(s, names, c * size, size))
        part = pieces[-1]
        pieces.append(coll.make(f"{reduce.name}__c{c}", "all_reduce", part.name, part.type, reduce.ranks,
                                op=reduce.op, loc=reduce.loc))
    join = _join(reduce, [p.name for p in pieces if isinstance(p, coll.Collective)], size)
    body, placed = [], False
    for op in m.body:
        name = op.outputs[0]
        if name == chain.up.stmt.name:
            body += pieces
            placed = True
        elif name == reduce.name:
            body.append(join)
        elif name not in inside:
            body.append(op)
    return m.replace(body=tuple(body)) if placed else None


def _shifted(s: Statement, names: dict, offset: int, size: int) -> Statement:
    """`s` for tokens [offset, offset + size): its token rank (dim 0) shifted in reads from outside the chain."""
    t = s.index[0]
    moved = substitute(s.expr, {t: t + offset}) if offset else s.expr

    def visit(e: Expr):
        if isinstance(e, Access) and e.tensor in names:
            return Access(names[e.tensor], (t,) + tuple(e.indices[1:]))
        return None

    expr = rewrite(moved, visit)
    typ = TensorType(s.type.dtype, (sympy.Integer(size),) + tuple(s.type.shape[1:]))
    return s.replace(name=names[s.name], type=typ, expr=expr)


def _join(reduce: coll.Collective, parts: list, size: int) -> Statement:
    """reduce[t, ...] = part c at row t - c*size for the chunk c holding row t."""
    t = reduce.type
    rs = tuple(ix.rank(f"d{d}") for d in range(t.rank))
    last = len(parts) - 1
    expr: Expr = Access(parts[last], (rs[0] - last * size,) + rs[1:])
    for c in range(last - 1, -1, -1):
        expr = Call("where", (Call("lt", (IndexValue(rs[0]), Const((c + 1) * size))),
                              Access(parts[c], (rs[0] - c * size,) + rs[1:]), expr))
    return Statement(reduce.name, t, rs, expr, loc=reduce.loc)

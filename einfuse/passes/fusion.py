"""Fusion: elementwise chains are inlined into their consumers; contractions take their epilogues and
share operands; row statistics run together. Groups are small declarative rules (RULES), so a user adds
one the way docs/passes.md shows. Fusion never recomputes a contraction or reduction: only maps are
inlined (recomputed), everything else is grouped into a kernel that computes it once."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import sympy

from ..ir import index as ix
from ..ir.contraction import contraction
from ..ir.expr import Access, Call, Expr, accesses, index_symbols, map_indices, rewrite, substitute, walk
from ..ir.module import Kernel, Module, Opaque, Statement
from .base import Pass
from .cascade import is_map

MAX_ACCUMULATORS = 2  # contractions sharing a kernel: a third 64x64 f32 accumulator spills registers
INLINE_LIMIT = 160  # expression nodes: beyond this an inlined chain is kept as its own statement


def _ranges(s: Statement) -> dict:
    return {r: (sympy.Integer(0), sympy.sympify(n) - 1) for r, n in s.ranks().items()}


def flat_identity(m_types: dict, a: Access, reader: Statement) -> bool:
    """Does `a` read its tensor at the same flat offset the reader writes (an identity up to views)?"""
    t = m_types[a.tensor]
    if any(isinstance(p, Expr) for p in a.indices) or reader.iterate is not None:
        return False
    if sympy.simplify(t.numel() - reader.type.numel()) != 0:
        return False
    src, dst = ix.flat_offset(a.indices, t.shape), ix.flat_offset(reader.index, reader.type.shape)
    return ix.simplify(sympy.expand(src - dst), _ranges(reader)) == 0


def _size(e: Expr) -> int:
    return sum(1 for _ in walk(e))


def inline(m: Module, names: set) -> Module:
    """Replace reads of the map statements `names` by their expressions; a statement stays while something
    still reads it (through a gather, an opaque call, or an expression that grew past INLINE_LIMIT)."""
    prod = m.producers()
    done: dict = {}  # name -> inlined statement (its own reads already inlined)
    body = []
    for op in m.body:
        if isinstance(op, Statement):
            rng = _ranges(op)

            def visit(n: Expr):
                if not (isinstance(n, Access) and n.tensor in names) or any(isinstance(p, Expr) for p in n.indices):
                    return None
                src = done.get(n.tensor, prod[n.tensor])
                e = substitute(src.expr, dict(zip(src.index, n.indices)))
                return map_indices(e, lambda p: ix.simplify(p, rng))

            new = rewrite(op.expr, visit)
            op = op.replace(expr=new) if _size(new) <= INLINE_LIMIT else op
            if op.name in names:
                done[op.name] = op
        body.append(op)
    live = set(m.outputs)
    kept = []
    for op in reversed(body):  # drop inlined statements nothing reads any more
        if op.outputs[0] in names and not any(o in live for o in op.outputs):
            continue
        kept.append(op)
        live |= op.reads()
    return m.replace(body=tuple(reversed(kept)))


def epilogues(m: Module) -> set:
    """Maps that belong in a contraction's epilogue: they read the contraction's result in place (bias,
    activation, residual, scale, cast), or continue such a chain without forking (the value they read
    has no other reader, so fusing saves its store). Whatever else they read exists before the
    contraction runs."""
    types, order = m.types(), {op.outputs[0]: n for n, op in enumerate(m.body)}
    dtype = lambda n: types[n].dtype  # noqa: E731
    readers = {name: len(ops) for name, ops in m.users().items()}
    root: dict = {s.name: s.name for s in m.statements if contraction(s, dtype) is not None}
    for s in m.statements:
        if not is_map(s):
            continue
        chain = [root[a.tensor] for a in accesses(s.expr) if a.tensor in root and flat_identity(types, a, s)
                 and (root[a.tensor] == a.tensor or readers.get(a.tensor, 0) == 1)]
        if not chain:
            continue
        start = min(order[r] for r in chain)
        others = {a.tensor for a in accesses(s.expr) if a.tensor in order and a.tensor not in root}
        if all(order[t] < start for t in others):
            root[s.name] = min(chain, key=order.__getitem__)
    return {n for n, r in root.items() if n != r}


TRANSCENDENTAL = {"exp", "exp2", "log", "log2", "log1p", "expm1", "sin", "cos", "tan", "tanh", "erf", "sigmoid",
                  "silu", "gelu", "gelu_tanh", "atan2", "pow", "rsqrt", "sqrt"}


def _table(s: Statement) -> bool:
    """A transcendental function of two or more ranks: a table (RoPE's cos over positions x frequencies),
    not a per-row scalar like RMSNorm's rsqrt, which a contraction hoists out of its loop anyway."""
    wide = {r for r, n in s.ranks().items() if n != 1}
    return any(isinstance(n, Call) and n.op in TRANSCENDENTAL and len(index_symbols(n) & wide) >= 2
               for n in walk(s.expr))


def shared_and_costly(m: Module, inlinable: set) -> set:
    """Maps several statements read that compute transcendental tables, themselves or through maps that
    will be inlined into them (RoPE's cos/sin): computing them once beats recomputing them inside every
    reader's loops."""
    users, prod = m.users(), m.producers()
    costly: dict = {}
    for s in m.statements:
        if s.name in inlinable:
            costly[s.name] = _table(s) or any(
                costly.get(a.tensor, False) for a in accesses(s.expr) if a.tensor in inlinable)
    return {n for n, c in costly.items() if c and len(users.get(n, [])) > 1 and isinstance(prod[n], Statement)}


class FuseElementwise(Pass):
    """Inlines elementwise statements into every reader (recomputing a map is cheaper than storing it and
    reading it back), except maps that read a contraction's result in place (they become its epilogue)
    and shared transcendental tables (computed once)."""

    name = "fuse_elementwise"

    def run(self, m: Module) -> Module:
        grouped = set(m.group_of())
        pinned = set(m.outputs) | grouped | {r for op in m.body if isinstance(op, Opaque) for r in op.reads()}
        candidates = {s.name for s in m.statements if is_map(s)} - pinned - epilogues(m)
        return inline(m, candidates - shared_and_costly(m, candidates))


# ---------------------------------------------------------------- kernel groups

@dataclass(frozen=True)
class Rule:
    """Join a producer's group and a reader's group into one kernel of `kind` when `join` says so."""

    name: str
    kind: str
    join: Callable  # (module, producer, reader, access) -> bool


def _contraction(m: Module, s) -> bool:
    types = m.types()
    return isinstance(s, Statement) and contraction(s, lambda n: types[n].dtype) is not None


def _epilogue(m: Module, p: Statement, c: Statement, a: Access) -> bool:
    return is_map(c) and flat_identity(m.types(), a, c)


def _row_stats(m: Module, p: Statement, c: Statement, a: Access) -> bool:
    if p.reduce is None or p.iterate is not None or _contraction(m, p) or c.iterate is not None:
        return False
    if _contraction(m, c) or sympy.simplify(p.type.numel() - c.type.numel()) != 0:
        return False
    return flat_identity(m.types(), a, c)


def stat_binding(m: Module, stat: Statement, reader: Statement) -> dict | None:
    """How a row statistic (a reduction over one rank) is computed inside the contraction `reader`
    (an RMSNorm's sum of squares feeding the projection it normalizes): its ranks in the reader's ranks
    (output ranks through the reader's access, the reduced rank as the reader's K), when the
    statistic reads only a row of what the contraction's own K loop walks over."""
    types = m.types()
    c = contraction(reader, lambda n: types[n].dtype)
    if c is None or stat.reduce is None or stat.iterate is not None or len(stat.reduce.ranks) != 1 or len(c.k) != 1:
        return None
    if stat.reduce.op not in ("sum", "max", "min") or contraction(stat, lambda n: types[n].dtype) is not None:
        return None
    uses = [a for a in accesses(reader.expr) if a.tensor == stat.name]
    if not uses or any(a.tensor == stat.name for f in (c.a, c.b) for a in accesses(f)):
        return None  # read inside an operand: not a post factor of the contraction
    pos = uses[0].indices
    if any(u.indices != pos for u in uses) or any(isinstance(p, Expr) for p in pos):
        return None
    (r, n), = stat.reduce.ranks
    if sympy.simplify(n - reader.ranks()[c.k[0]]) != 0:
        return None
    bind = {**dict(zip(stat.index, pos)), r: c.k[0]}
    if index_symbols(substitute(stat.expr, bind)) - set(c.m) - set(c.k) - set(c.batch):
        return None  # it would need the contraction's N ranks: not one row
    return bind


def _stat_prologue(m: Module, p: Statement, c: Statement, a: Access) -> bool:
    return stat_binding(m, p, c) is not None


RULES = [
    Rule("contraction + epilogue (bias, activation, residual, scale, cast)", "dot", _epilogue),
    Rule("row statistic computed in the contraction's K loop (norm + projection)", "dot", _stat_prologue),
    Rule("row statistics computed together (norms, softmax)", "rows", _row_stats),
]


def valid_group(m: Module, kind: str, members: list) -> bool:
    """What the code generator of each kind can emit (checked before two groups merge)."""
    prod, types = m.producers(), m.types()
    dtype = lambda n: types[n].dtype  # noqa: E731
    stmts = [prod[n] for n in members]
    inside = set(members)
    if kind == "dot":
        dots = [s for s in stmts if contraction(s, dtype) is not None]
        stats = [s for s in stmts if s.reduce is not None and s not in dots]
        if not dots or len(dots) > MAX_ACCUMULATORS or any(not is_map(s) for s in stmts if s not in dots + stats):
            return False
        if any(not any(stat_binding(m, st, d) for d in dots) for st in stats):
            return False
        stmts = [s for s in stmts if s not in stats]
        c0 = contraction(dots[0], dtype)
        shape = lambda c, s, rs: sympy.Mul(*[s.ranks()[r] for r in rs])  # noqa: E731
        for d in dots:
            c = contraction(d, dtype)
            if any(a.tensor in inside and prod[a.tensor] not in stats for a in accesses(d.expr)):
                return False  # a contraction reads only tensors from outside its kernel (or its statistics)
            if any(sympy.simplify(shape(c, d, getattr(c, x)) - shape(c0, dots[0], getattr(c0, x))) != 0
                   for x in ("m", "n", "k", "batch")):
                return False
        numel = dots[0].type.numel()
        for s in stmts:
            if sympy.simplify(s.type.numel() - numel) != 0:
                return False
            if s not in dots and any(a.tensor in inside and not flat_identity(types, a, s) for a in accesses(s.expr)):
                return False
        return True
    if kind == "rows":
        rows = stmts[0].type.numel()
        reds = [s for s in stmts if s.reduce is not None]
        if not reds or any(s.iterate is not None or contraction(s, dtype) is not None for s in stmts):
            return False
        width = sympy.Mul(*[n for _, n in reds[0].reduce.ranks])
        for s in stmts:
            if sympy.simplify(s.type.numel() - rows) != 0:
                return False
            if s.reduce is not None and sympy.simplify(sympy.Mul(*[n for _, n in s.reduce.ranks]) - width) != 0:
                return False
            if any(a.tensor in inside and not flat_identity(types, a, s) for a in accesses(s.expr)):
                return False
        return True
    return False


def _acyclic(m: Module, members: set) -> bool:
    """No statement outside the group both depends on a member and feeds one (the kernel runs at once)."""
    prod = m.producers()
    order = {op.outputs[0]: n for n, op in enumerate(m.body)}
    first, last = min(order[n] for n in members), max(order[n] for n in members)
    tainted = set(members)
    for op in m.body[first:last + 1]:
        name = op.outputs[0]
        if name in members:
            if any(r in tainted and r not in members and prod.get(r) is not None for r in op.reads()):
                return False
            continue
        if op.reads() & tainted:
            tainted |= set(op.outputs)
    return True


class FuseKernels(Pass):
    """Forms kernel groups by RULES (and shared-operand contractions), in body order."""

    name = "fuse_kernels"

    def __init__(self, rules=None, shared_operands: bool = True):
        self._rules = list(rules or RULES)
        self.shared_operands = shared_operands

    def fingerprint(self) -> str:
        names = ",".join(f"{r.name}:{r.kind}:{r.join.__module__}.{r.join.__qualname__}" for r in self._rules)
        return hashlib.sha256(f"fuse_kernels:{names}:{self.shared_operands}".encode()).hexdigest()[:16]

    def run(self, m: Module) -> Module:
        fixed = m.group_of()  # groups other passes made (attention) stay as they are
        group: dict = {s.name: [s.name] for s in m.statements if s.name not in fixed}
        kind: dict = {}
        prod = m.producers()

        def try_merge(a: str, b: str, k: str) -> bool:
            ga, gb = group[a], group[b]
            if ga is gb or kind.get(id(ga), k) != k or kind.get(id(gb), k) != k:
                return False
            order = {op.outputs[0]: n for n, op in enumerate(m.body)}
            merged = sorted(set(ga) | set(gb), key=order.__getitem__)
            if not valid_group(m, k, merged) or not _acyclic(m, set(merged)):
                return False
            for n in merged:
                group[n] = merged
            kind.pop(id(ga), None)
            kind.pop(id(gb), None)
            kind[id(merged)] = k
            return True

        for rule in self._rules:
            for c in m.statements:
                if c.name not in group:
                    continue
                for a in accesses(c.expr):
                    p = prod.get(a.tensor)
                    if isinstance(p, Statement) and p.name in group and rule.join(m, p, c, a):
                        try_merge(p.name, c.name, rule.kind)
        if self.shared_operands:
            self._share_operands(m, group, try_merge)
        kernels = list(m.kernels)
        seen = set()
        for members in group.values():
            if id(members) in seen or len(members) < 2:
                continue
            seen.add(id(members))
            kernels.append(Kernel(f"k_{members[-1]}", kind[id(members)], tuple(members)))
        return schedule(m.replace(kernels=tuple(kernels)))

    @staticmethod
    def _share_operands(m: Module, group: dict, try_merge) -> None:
        """Contractions over the same operand (gate and up projections, K and V projections) share a kernel:
        the operand tile is loaded once for both accumulators."""
        types = m.types()
        dtype = lambda n: types[n].dtype  # noqa: E731
        dots = [(s, contraction(s, dtype)) for s in m.statements if s.name in group]
        dots = [(s, c) for s, c in dots if c is not None]
        for i, (s, c) in enumerate(dots):
            for t, d in dots[i + 1:]:
                ren = dict(zip(t.ranks(), s.ranks()))
                if substitute(d.a, ren) == c.a or substitute(d.b, ren) == c.b:
                    try_merge(s.name, t.name, "dot")


def schedule(m: Module) -> Module:
    """Reorder the body so each kernel group's members are adjacent (a kernel runs them at once),
    otherwise keeping the original order: a topological sort of groups, earliest first."""
    group_of = m.group_of()
    units: dict = {}  # unit key -> ops
    key_of: dict = {}
    for op in m.body:
        name = op.outputs[0]
        key = group_of[name].name if name in group_of else name
        units.setdefault(key, []).append(op)
        for o in op.outputs:
            key_of[o] = key
    deps = {k: {key_of[r] for op in ops for r in op.reads() if r in key_of} - {k} for k, ops in units.items()}
    first = {k: n for n, k in reversed(list(enumerate(key_of[op.outputs[0]] for op in m.body)))}
    done: set = set()
    body = []
    while len(done) < len(units):
        ready = [k for k in units if k not in done and deps[k] <= done]
        k = min(ready, key=first.__getitem__)
        done.add(k)
        body += units[k]
    return m.replace(body=tuple(body))


def fusion_passes() -> list[Pass]:
    """Attention first (it reads through maps), drop what it replaced, inline maps, group kernels."""
    from .attention import FuseAttention
    from .cleanup import DCE

    return [FuseAttention(), DCE(), FuseElementwise(), FuseKernels()]

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
from ..ir.contraction import contraction, flat_identity, is_map, rank_ranges
from ..ir.expr import Access, Call, Expr, accesses, index_symbols, map_indices, rewrite, substitute, walk
from ..ir.module import Kernel, Module, Opaque, Statement
from ..kinds import kind_named
from ..kinds.dot import MAX_ACCUMULATORS, is_contraction, stat_binding
from .base import Pass

INLINE_LIMIT = 160  # expression nodes: beyond this an inlined chain is kept as its own statement


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
            rng = rank_ranges(op)

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


def transcendental_table(s: Statement) -> bool:
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
            costly[s.name] = transcendental_table(s) or any(
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


def _epilogue(m: Module, p: Statement, c: Statement, a: Access) -> bool:
    return is_map(c) and flat_identity(m.types(), a, c)


def _row_stats(m: Module, p: Statement, c: Statement, a: Access) -> bool:
    if p.reduce is None or p.iterate is not None or is_contraction(m, p) or c.iterate is not None:
        return False
    if is_contraction(m, c) or sympy.simplify(p.type.numel() - c.type.numel()) != 0:
        return False
    return flat_identity(m.types(), a, c)


def _stat_prologue(m: Module, p: Statement, c: Statement, a: Access) -> bool:
    return stat_binding(m, p, c) is not None


def _quantized_epilogue(m: Module, p: Statement, c: Statement, a: Access) -> bool:
    return kind_named("qdot").claims(m, p) and _epilogue(m, p, c, a)


RULES = [
    Rule("quantized contraction (packed 4-bit operand) + epilogue", "qdot", _quantized_epilogue),
    Rule("contraction + epilogue (bias, activation, residual, scale, cast)", "dot", _epilogue),
    Rule("row statistic computed in the contraction's K loop (norm + projection)", "dot", _stat_prologue),
    Rule("row statistics computed together (norms, softmax)", "rows", _row_stats),
]


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
            if kind_named(k).group_roles(m, merged) is None or not _acyclic(m, set(merged)):
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
            k = kind[id(members)]
            kernels.append(Kernel(f"k_{members[-1]}", k, tuple(members), (), kind_named(k).group_roles(m, members)))
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
    """Attention first (it reads through maps), drop what it replaced, experts calls (before their
    SwiGLU is inlined), inline maps, group kernels."""
    from .attention import FuseAttention
    from .cleanup import DCE
    from .moe import FuseMoE

    return [FuseAttention(), DCE(), FuseMoE(), FuseElementwise(), FuseKernels()]

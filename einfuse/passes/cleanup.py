"""Cleanup passes: index simplification, constant folding, copy inlining, CSE and dead-code elimination."""
from __future__ import annotations

import hashlib
import math

import sympy
import torch

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.evaluator import apply_call, literal_tensor
from ..ir.expr import Access, Call, Const, Expr, index_difference, map_indices, rewrite, substitute, walk
from ..ir.module import Module, Opaque, Statement
from ..ir.ops import infer
from .base import Pass, stable_repr


def _ranges(s: Statement) -> dict:
    return {r: (sympy.Integer(0), sympy.sympify(n) - 1) for r, n in s.ranks().items()}


def _map_statements(m: Module, fn) -> Module:
    return m.replace(body=tuple(fn(op) if isinstance(op, Statement) else op for op in m.body))


class SimplifyIndices(Pass):
    """Rewrites floor-division and modulo in every index using the ranges of the statement's ranks."""

    name = "simplify_indices"

    def run(self, m: Module) -> Module:
        def one(s: Statement) -> Statement:
            rng = _ranges(s)
            return s.replace(expr=map_indices(s.expr, lambda p: ix.simplify(p, rng)))

        return _map_statements(m, one)


# ---------------------------------------------------------------- constant folding as a rule table

class _Ctx:
    """What a folding rule may ask: dtypes of expressions, and the ranges of the statement's ranks."""

    def __init__(self, m: Module, s: Statement):
        types = m.types()
        self.dtype = lambda e: infer(e, lambda n: types[n].dtype)
        self.ranges = _ranges(s)


_NOT_LITERAL = object()


def _is_typed_literal(e: Expr) -> bool:
    """`f32(1.0)`, `bool(true)`: a literal cast to its category's default type, i.e. a literal that is not weak."""
    return (isinstance(e, Call) and e.op == "cast" and isinstance(e.args[0], Const)
            and e.attr == dt.DEFAULT_FOR_CATEGORY.get(e.attr.category))


def _literal_tensor(e: Expr) -> torch.Tensor:
    t = literal_tensor(e.args[0].value if _is_typed_literal(e) else e.value)
    return t.to(e.attr.torch) if _is_typed_literal(e) else t


def _literal(e: Expr):
    """The Python value of a literal, weak or typed; `_NOT_LITERAL` for anything else."""
    if isinstance(e, Const) or _is_typed_literal(e):
        return _literal_tensor(e).item()
    return _NOT_LITERAL


def _lit(e: Expr, v) -> bool:
    x = _literal(e)
    return x is not _NOT_LITERAL and not isinstance(x, bool) and x == v


def _same_type(ctx: _Ctx, old: Expr, new: Expr):
    """`new` replaces `old` only if it has the same dtype (x * 1.0 on an int tensor is a float)."""
    return new if ctx.dtype(new) == ctx.dtype(old) else None


def _fold_literals(e: Call, ctx: _Ctx):
    if e.op == "cast" or any(_literal(a) is _NOT_LITERAL for a in e.args):
        return None
    d, weak = ctx.dtype(e)
    v = apply_call(e, [_literal_tensor(a) for a in e.args], d, weak).item()  # exactly as the evaluator computes
    if isinstance(v, float) and math.isnan(v):
        return None  # keep the expression that makes the NaN readable
    return Const(bool(v) if d.category == "bool" else int(v) if d.category == "int" else float(v))


def _index_compare(e: Call, ctx: _Ctx):
    """`r + 1 < 1` over ranks known to be >= 0 is false: decide comparisons of index values by bounds."""
    diff = index_difference(e)
    if diff is None:
        return None
    lo, hi = ix.bounds(diff, ctx.ranges)
    t = ix.proven
    decided = {
        "lt": (t(hi < 0), t(lo >= 0)), "le": (t(hi <= 0), t(lo > 0)),
        "gt": (t(lo > 0), t(hi <= 0)), "ge": (t(lo >= 0), t(hi < 0)),
        "eq": (t(sympy.Eq(lo, 0)) and t(sympy.Eq(hi, 0)), t(lo > 0) or t(hi < 0)),
        "ne": (t(lo > 0) or t(hi < 0), t(sympy.Eq(lo, 0)) and t(sympy.Eq(hi, 0))),
    }[e.op]
    return Const(True) if decided[0] else Const(False) if decided[1] else None


def _identity(e: Call, ctx: _Ctx):
    a = e.args
    if e.op == "mul":
        return _same_type(ctx, e, a[0]) if _lit(a[1], 1) else _same_type(ctx, e, a[1]) if _lit(a[0], 1) else None
    if e.op == "add":
        return _same_type(ctx, e, a[0]) if _lit(a[1], 0) else _same_type(ctx, e, a[1]) if _lit(a[0], 0) else None
    if e.op in ("sub",) and _lit(a[1], 0) or e.op == "div" and _lit(a[1], 1):
        return _same_type(ctx, e, a[0])
    return None


def _logic(e: Call, ctx: _Ctx):
    a = e.args
    lits = [_literal(x) for x in a]
    true, false = Const(True), Const(False)
    if e.op == "and":
        if lits[0] is True or lits[1] is True:
            return _same_type(ctx, e, a[1] if lits[0] is True else a[0])
        if False in [x for x in lits if isinstance(x, bool)]:
            return false
    if e.op == "or":
        if lits[0] is False or lits[1] is False:
            return _same_type(ctx, e, a[1] if lits[0] is False else a[0])
        if True in [x for x in lits if isinstance(x, bool)]:
            return true
    if e.op == "not" and isinstance(a[0], Call) and a[0].op == "not":
        return _same_type(ctx, e, a[0].args[0])
    if e.op == "where":
        if lits[0] is True:
            return _same_type(ctx, e, a[1])
        if lits[0] is False:
            return _same_type(ctx, e, a[2])
        if a[1] == a[2]:
            return _same_type(ctx, e, a[1])
        if lits[1] is not _NOT_LITERAL and repr(lits[1]) == repr(lits[2]):
            return a[1]  # where(c, i64(0), 0): the same value either way; the driver keeps the type
    return None


def _casts(e: Call, ctx: _Ctx):
    if e.op == "cast" and _is_typed_literal(e.args[0]) and e.attr == dt.DEFAULT_FOR_CATEGORY.get(e.attr.category):
        return Const(_literal_tensor(e.args[0]).to(e.attr.torch).item())  # f32(bool(true)) -> f32(1.0)
    if e.op == "cast":
        inner, weak = ctx.dtype(e.args[0])
        if inner == e.attr and not weak:
            return e.args[0]
    if e.op == "neg" and isinstance(e.args[0], Call) and e.args[0].op == "neg":
        return e.args[0].args[0]
    return None


# Each rule: (what it does, function(call, ctx) -> replacement or None). Users can append their own.
FOLD_RULES = [
    ("evaluate operators on literals", _fold_literals),
    ("decide index comparisons by rank ranges", _index_compare),
    ("x*1, x+0, x-0, x/1 -> x", _identity),
    ("and/or with true/false, where(true|false|same)", _logic),
    ("casts of literals, cast to own type, double negation", _casts),
]


def _fold_constant_reduction(s: Statement) -> Statement:
    """A reduction of a literal is a literal: sum[r:N] c = c*N, max/min/any/all[r] c = c."""
    e = s.expr
    if s.reduce is None or not isinstance(e, Const) or isinstance(e.value, bool) and s.reduce.op in ("sum", "prod"):
        return s
    n = sympy.Mul(*[ext for _, ext in s.reduce.ranks])
    if s.reduce.op in ("sum", "prod") and not n.is_Integer:
        return s
    if s.reduce.op == "sum":
        v = e.value * int(n)
    elif s.reduce.op == "prod":
        v = e.value ** int(n)
    elif s.reduce.op in ("max", "min", "any", "all"):
        v = e.value
    else:
        return s
    out = Const(v)
    if dt.DEFAULT_FOR_CATEGORY[out.category] != s.type.dtype:
        out = Call("cast", (out,), s.type.dtype)
    return s.replace(expr=out, reduce=None)


def _keep_type(ctx: _Ctx, old: Expr, new: Expr, rule: str) -> Expr:
    """A rewrite keeps type and weakness, which parents promote by: `h * f32(1.0)` (h f16) keeps its f32 literal."""
    (d0, weak0), (d1, weak1) = ctx.dtype(old), ctx.dtype(new)
    if d0 == d1 and weak0 == weak1:
        return new
    if d0 == d1 and weak1 and not weak0 and dt.DEFAULT_FOR_CATEGORY.get(d0.category) == d0:
        return Call("cast", (new,), d0)
    raise TypeError(f"fold rule {rule!r} rewrote a {d0}{' (weak)' * weak0} expression into a "
                    f"{d1}{' (weak)' * weak1} one")


class FoldConstants(Pass):
    """Applies FOLD_RULES bottom-up to every expression until nothing changes."""

    name = "fold_constants"

    def __init__(self, rules=None):
        self._rules = list(rules or FOLD_RULES)

    def run(self, m: Module) -> Module:
        def one(s: Statement) -> Statement:
            ctx = _Ctx(m, s)

            def visit(n: Expr):
                if not isinstance(n, Call):
                    return None
                for what, fn in self._rules:
                    out = fn(n, ctx)
                    if out is not None:
                        out = _keep_type(ctx, n, out, what)
                    if out is not None and out != n:
                        return out
                return None

            expr = s.expr
            for _ in range(8):
                new = rewrite(expr, visit)
                if new == expr:
                    break
                expr = new
            if _is_typed_literal(expr):  # the statement's declared type types the whole expression: i64(0) -> 0
                inner = expr.args[0]
                expr = inner if inner.category == expr.attr.category else Const(_literal(expr))
            return _fold_constant_reduction(s.replace(expr=expr))

        return _map_statements(m, one)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"fold_constants:{stable_repr(self._rules)}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------- copy inlining

def _is_copy(s: Statement) -> bool:
    """A statement that moves no arithmetic: one access through an index map, or pure index values."""
    if s.reduce is not None or s.iterate is not None:
        return False
    e = s.expr
    if isinstance(e, Access):
        return all(not isinstance(p, Expr) for p in e.indices)
    return not any(isinstance(n, Access) for n in walk(e))


class InlineCopies(Pass):
    """Replaces reads of copy statements (views materialized by lowering, constants) by their source."""

    name = "inline_copies"

    def run(self, m: Module) -> Module:
        outputs = set(m.outputs)
        opaque_reads = {r for op in m.body if isinstance(op, Opaque) for r in op.reads()}
        types = m.types()
        dtype = lambda n: types[n].dtype  # noqa: E731
        copies: dict[str, Statement] = {}
        body = []
        for op in m.body:
            if isinstance(op, Statement):
                op = self._inline_into(op, copies, dtype)
                if _is_copy(op) and op.name not in outputs and op.name not in opaque_reads:
                    copies[op.name] = op
            body.append(op)
        # a copy stays only while something still reads it (a gather cannot be inlined)
        needed: set = set()
        while True:
            grown = {r for op in body if op.outputs[0] not in copies or op.outputs[0] in needed for r in op.reads()}
            if grown <= needed:
                break
            needed |= grown
        return m.replace(body=tuple(op for op in body if op.outputs[0] not in copies or op.outputs[0] in needed))

    @staticmethod
    def _inline_into(s: Statement, copies: dict, dtype) -> Statement:
        if not copies or not (s.reads() & set(copies)):
            return s
        rng = _ranges(s)

        def visit(n: Expr):
            if not (isinstance(n, Access) and n.tensor in copies):
                return None
            if any(isinstance(p, Expr) for p in n.indices):
                return None
            src = copies[n.tensor]
            e = substitute(src.expr, dict(zip(src.index, n.indices)))
            d, weak = infer(e, dtype)
            if weak or d != src.type.dtype:
                e = Call("cast", (e,), src.type.dtype)
            return map_indices(e, lambda p: ix.simplify(p, rng))

        return s.replace(expr=rewrite(s.expr, visit))


class CSE(Pass):
    """Statements computing the same thing (equal but for name and source line) are computed once."""

    name = "cse"

    def run(self, m: Module) -> Module:
        seen: dict = {}
        rename: dict = {}
        body = []
        for op in m.body:
            op = op.rename_reads(rename)
            if isinstance(op, Statement) and op.iterate is None:
                key = (op.type, op.index, op.expr, op.reduce)
                if key in seen and op.name not in m.outputs:
                    rename[op.name] = seen[key]
                    continue
                seen.setdefault(key, op.name)
            body.append(op)
        return m.replace(body=tuple(body), outputs=tuple(rename.get(o, o) for o in m.outputs))


class DCE(Pass):
    """Removes statements and opaque calls whose results no output depends on."""

    name = "dce"

    def run(self, m: Module) -> Module:
        live = set(m.outputs)
        body = []
        for op in reversed(m.body):
            if any(o in live for o in op.outputs):
                body.append(op)
                live |= op.reads()
        return m.replace(body=tuple(reversed(body)))


def cleanup_passes() -> list[Pass]:
    """Simplify, fold, inline copies, fold what inlining exposed, then CSE and DCE."""
    return [SimplifyIndices(), FoldConstants(), InlineCopies(), FoldConstants(), CSE(), DCE()]

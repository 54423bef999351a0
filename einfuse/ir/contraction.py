"""Statement structure the passes and kernel kinds share: maps, accesses that read a tensor in the
reader's own layout, and contractions — when a statement is `sum[K] A(M, K) * B(K, N)` times an
epilogue over (M, N), the shape a tensor-core kernel (and the fusion passes that group around one) needs."""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from . import dtypes as dt
from . import index as ix
from .expr import Access, Call, Expr, index_symbols
from .module import Statement
from .ops import infer


def is_map(s) -> bool:
    """A statement computing each output point from its inputs alone (no reduction, no iteration)."""
    return isinstance(s, Statement) and s.reduce is None and s.iterate is None


def rank_ranges(s: Statement) -> dict:
    """Each rank of `s` with its inclusive range [0, extent - 1]."""
    return {r: (sympy.Integer(0), sympy.sympify(n) - 1) for r, n in s.ranks().items()}


def flat_identity(types: dict, a: Access, reader: Statement) -> bool:
    """Does `a` read its tensor at the same flat offset the reader writes (an identity up to views)?"""
    t = types[a.tensor]
    if any(isinstance(p, Expr) for p in a.indices) or reader.iterate is not None:
        return False
    if sympy.simplify(t.numel() - reader.type.numel()) != 0:
        return False
    src, dst = ix.flat_offset(a.indices, t.shape), ix.flat_offset(reader.index, reader.type.shape)
    return ix.simplify(sympy.expand(src - dst), rank_ranges(reader)) == 0


@dataclass
class Contraction:
    """A: factors over (M, K); B: factors over (K, N); post: (op, factor) applied to the sum over (M, N)."""

    a: Expr
    b: Expr
    operand: dt.DType  # the type both operands feed the tensor cores in
    int8: bool
    post: list  # [("mul" | "div", expr)]
    m: tuple  # output ranks only A uses
    n: tuple  # output ranks only B uses
    batch: tuple  # other output ranks
    k: tuple  # reduced ranks


def peel_invariant(e: Expr, red: set) -> tuple[Expr, list]:
    """sum_r (x * y) with y free of r is (sum_r x) * y: split off such outer factors and divisors,
    returning the rest and the (op, factor) pairs in the order to apply them to the sum."""
    post = []
    while isinstance(e, Call) and e.op in ("mul", "div"):
        a, b = e.args
        if not (index_symbols(b) & red):
            post.append((e.op, b))
            e = a
        elif e.op == "mul" and not (index_symbols(a) & red):
            post.append(("mul", a))
            e = b
        else:
            break
    return e, post[::-1]


def mul_factors(e: Expr) -> list:
    if isinstance(e, Call) and e.op == "mul":
        return mul_factors(e.args[0]) + mul_factors(e.args[1])
    return [e]


def product(factors: list) -> Expr:
    out = factors[0]
    for f in factors[1:]:
        out = Call("mul", (out, f))
    return out


def narrow_operand(e: Expr, dtype_of):
    """`f32(x)` of a 16-bit float, or `i32(x)` of an i8, feeds the tensor core in x's own type."""
    if isinstance(e, Call) and e.op == "cast":
        inner = infer(e.args[0], dtype_of)[0]
        if e.attr == dt.f32 and inner in (dt.bf16, dt.f16):
            return e.args[0], inner
        if e.attr == dt.i32 and inner == dt.i8:
            return e.args[0], inner
    return e, infer(e, dtype_of)[0]


def contraction(s: Statement, dtype_of) -> Contraction | None:
    """Recognize `sum[K] A * B [* / epilogue]`; None when the statement is not a contraction."""
    if s.reduce is None or s.reduce.op != "sum" or s.iterate is not None:
        return None
    red = {r for r, _ in s.reduce.ranks}
    e, post = peel_invariant(s.expr, red)
    factors = mul_factors(e)
    outer = [f for f in factors if not (index_symbols(f) & red)]
    inner = [f for f in factors if index_symbols(f) & red]
    out = set(s.index)
    uses = [index_symbols(f) & out for f in inner]
    seed = next((u for u in uses if u), None)
    if seed is None:
        return None
    # A: the factors whose output ranks fit within the first factor's; B: the others
    a_side = [f for f, u in zip(inner, uses) if u <= seed]
    b_side = [f for f, u in zip(inner, uses) if not u <= seed]
    if not b_side:
        return None
    a_ranks = set().union(*[u for u in uses if u <= seed])
    b_ranks = set().union(*[u for u in uses if not u <= seed])
    m = tuple(r for r in s.index if r in a_ranks - b_ranks)
    n = tuple(r for r in s.index if r in b_ranks - a_ranks)
    if not m or not n:
        return None
    (a, ta), (b, tb) = (narrow_operand(product(side), dtype_of) for side in (a_side, b_side))
    if ta != tb or not (ta.is_float or ta == dt.i8):
        return None
    batch = tuple(r for r in s.index if r not in m and r not in n)
    post = [("mul", f) for f in outer] + post
    return Contraction(a, b, ta, ta == dt.i8, post, m, n, batch, tuple(red))

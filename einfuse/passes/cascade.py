"""Cascade analyses: how many passes a cascade of Einsums makes over a rank (FuseMax's pass count),
and the expression helpers fusion passes share (looking through map statements, products)."""
from __future__ import annotations

import functools

import sympy

from ..ir.contraction import is_map
from ..ir.expr import Access, Call, Expr, accesses, rewrite, substitute
from ..ir.module import Module, Statement

__all__ = ["is_map", "monomial", "passes_over", "read_through"]


def read_through(e: Expr, producers: dict, keep=frozenset()) -> Expr:
    """`e` with every read of a map statement in `producers` replaced by that statement's expression
    (recursively), except names in `keep`. Reads through a gather position are left as they are."""

    def visit(n: Expr):
        if not isinstance(n, Access) or n.tensor in keep:
            return None
        s = producers.get(n.tensor)
        if not is_map(s) or any(isinstance(p, Expr) for p in n.indices):
            return None
        return read_through(substitute(s.expr, dict(zip(s.index, n.indices))), producers, keep)

    return rewrite(e, visit)


def monomial(e: Expr) -> tuple[list, list]:
    """A product/quotient tree as (numerator factors, denominator factors)."""
    if isinstance(e, Call) and e.op == "mul":
        a, b = (monomial(x) for x in e.args)
        return a[0] + b[0], a[1] + b[1]
    if isinstance(e, Call) and e.op == "div":
        a, b = (monomial(x) for x in e.args)
        return a[0] + b[1], a[1] + b[0]
    return [e], []


def passes_over(m: Module, key: dict) -> int:
    """FuseMax's pass count: how many times a cascade must traverse its key rank. `key` maps each cascade
    statement to its ranks that run along the key axis (ranks are per statement: `m` in one, `r` in
    the next, or `m1`/`m0` after a split). A statement starts a new pass when it reads a value that
    needs a *complete* traversal first: a reduction along the axis, or the final step of an iteration
    along it. 3 for max / sum-of-exp / normalize-and-multiply, 1 for FuseMax's iterative cascade. Maps
    outside `key` that sit between cascade statements (a scale, a mask add, softmax's division) traverse
    nothing themselves and are looked through, so the count does not depend on how lowering split them."""
    prod = m.producers()
    level: dict[str, int] = {}
    through: dict[str, tuple] = {}  # a map outside `key`: (level it carries, level if its reader touches the axis)

    def carried(a: Access) -> tuple:
        """What reading `a` brings: (level, level for a reader that runs along the axis)."""
        if a.tensor in level:
            t = prod[a.tensor]
            along = key[a.tensor]
            # complete: the producer reduced the axis away (not just its inner part, as a tile's max does)
            complete = bool(t.reduce and {r for r, _ in t.reduce.ranks} & along and not set(t.output_ranks()) & along)
            if t.iterate is not None and t.iterate.rank in along:
                complete = complete or _reads_final(t, a)
            return level[a.tensor], level[a.tensor] + (1 if complete else 0)
        t = prod.get(a.tensor)
        if not is_map(t):
            return 0, 0
        if a.tensor not in through:
            parts = [carried(n) for n in accesses(t.expr)]
            through[a.tensor] = (max((p[0] for p in parts), default=0), max((p[1] for p in parts), default=0))
        return through[a.tensor]

    for s in (op for op in m.statements if op.name in key):
        name, ranks = s.name, key[s.name]
        touches = bool(set(s.ranks()) & ranks)
        here = 1 if touches else 0
        for a in accesses(s.expr):
            plain, along = carried(a)
            here = max(here, along if touches else plain)
        level[name] = here
    return max((level[n] for n, r in key.items() if set(prod[n].ranks()) & r), default=0)


def _reads_final(t: Statement, a: Access) -> bool:
    """Does `a` read the iterative tensor `t` at its last position (after the whole iteration)?"""
    d = next(k for k, p in enumerate(t.index) if not isinstance(p, sympy.Symbol))
    p = a.indices[d]
    return not isinstance(p, Expr) and _equal(sympy.sympify(p), sympy.sympify(t.iterate.extent))


@functools.lru_cache(maxsize=4096)
def _equal(a: sympy.Expr, b: sympy.Expr) -> bool:
    """a == b as integers: expanded, which decides it for polynomials; sympy's simplify (slow, and every
    dump header's pass counts would call it per read) only for floor divisions and the like."""
    diff = sympy.expand(a - b)
    if diff == 0 or diff.is_number or diff.is_polynomial():  # expanded polynomials are canonical
        return diff == 0
    return sympy.simplify(diff) == 0


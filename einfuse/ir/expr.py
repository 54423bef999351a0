"""The right-hand side of a statement: a tree of tensor accesses, constants, index values and map calls."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Union

import sympy

from . import index as ix
from .dtypes import DType, i64

IndexPos = Union[sympy.Expr, "Expr"]  # an index position: affine/div/mod arithmetic, or an integer-valued Expr


class Expr:
    """Base of expression nodes; nodes are immutable and compare structurally."""

    __slots__ = ()

    def children(self) -> tuple["Expr", ...]:
        return ()

    def with_children(self, new: tuple["Expr", ...]) -> "Expr":
        return self


@dataclass(frozen=True, eq=False)
class Const(Expr):
    """A scalar literal; `weak` like a Python scalar in torch: it adopts the other operand's dtype."""

    value: bool | int | float

    def key(self):
        return (type(self.value).__name__, repr(self.value))

    def __eq__(self, other):
        return isinstance(other, Const) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    @property
    def category(self) -> str:
        return {"bool": "bool", "int": "int", "float": "float"}[type(self.value).__name__]


@dataclass(frozen=True)
class IndexValue(Expr):
    """An index expression used as a value (i64): `arange`, causal masks `m <= p`, positions."""

    expr: sympy.Expr


@dataclass(frozen=True)
class Access(Expr):
    """`tensor[i0, i1, ...]`; a position is an index expression or, for gathers, an integer Expr."""

    tensor: str
    indices: tuple

    def children(self):
        return tuple(p for p in self.indices if isinstance(p, Expr))

    def with_children(self, new):
        it = iter(new)
        return Access(self.tensor, tuple(next(it) if isinstance(p, Expr) else p for p in self.indices))


@dataclass(frozen=True)
class Call(Expr):
    """A map operator applied elementwise: `exp(x)`, `a + b`, `where(c, a, b)`; `attr` holds a cast's dtype."""

    op: str
    args: tuple
    attr: DType | str | None = None

    def children(self):
        return self.args

    def with_children(self, new):
        return Call(self.op, tuple(new), self.attr)


# ---------------------------------------------------------------- canonical form

_INDEX_FOLD = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "floordiv": ix.FloorDiv,
    "mod": ix.Mod,
    "neg": lambda a: -a,
    "min": sympy.Min,  # `x[min(i, 3)]` is index arithmetic, as the printer writes sympy's Min
    "max": sympy.Max,
}


def _as_index(e: Expr):
    if isinstance(e, IndexValue):
        return e.expr
    if isinstance(e, Const) and type(e.value) is int:
        return sympy.Integer(e.value)
    return None


def canonical(e: Expr) -> Expr:
    """The one form a text prints and parses back to: index-only arithmetic folded into IndexValue,
    a negated literal folded into the literal, an IndexValue without symbols turned into a Const, and
    index-valued access positions written as index arithmetic."""
    if isinstance(e, Call):
        if e.op == "neg" and isinstance(e.args[0], Const) and type(e.args[0].value) is not bool:
            return Const(-e.args[0].value)
        if e.op in _INDEX_FOLD and any(isinstance(a, IndexValue) for a in e.args):
            parts = [_as_index(a) for a in e.args]
            if all(p is not None for p in parts):
                return canonical(IndexValue(_INDEX_FOLD[e.op](*parts)))
        return e
    if isinstance(e, IndexValue):
        v = ix.evaluated(sympy.sympify(e.expr))
        if not v.free_symbols:
            return Const(int(v))
        return e if v is e.expr else IndexValue(v)
    if isinstance(e, Access) and any(ix.evaluated(p) is not p for p in e.indices if not isinstance(p, Expr)):
        return canonical(Access(e.tensor, tuple(p if isinstance(p, Expr) else ix.evaluated(p) for p in e.indices)))
    if isinstance(e, Access) and any(_index_position(p) is not None for p in e.indices if isinstance(p, Expr)):
        # a gather whose position became index arithmetic (an inlined `c[i] = i // 2`) is a plain access
        return Access(e.tensor, tuple(_index_position(p) if isinstance(p, Expr) and _index_position(p) is not None
                                      else p for p in e.indices))
    return e


def _index_position(p: Expr):
    """A gather position that is really index arithmetic (`i // 2`, `3`, `i64(3)`), as sympy; else None."""
    if isinstance(p, Call) and p.op == "cast" and p.attr == i64:
        return _index_position(p.args[0])
    return _as_index(p)


# ---------------------------------------------------------------- traversal

def walk(e: Expr) -> Iterator[Expr]:
    """Every node, parents before children (left to right)."""
    stack = [e]
    while stack:
        n = stack.pop()
        yield n
        kids = n.children()
        if kids:
            stack.extend(reversed(kids))


def rewrite(e: Expr, fn: Callable[[Expr], Expr | None]) -> Expr:
    """Bottom-up rewrite: `fn` returns a replacement or None; results are kept canonical."""
    kids = e.children()
    if kids:
        new = tuple(rewrite(c, fn) for c in kids)
        if any(a is not b for a, b in zip(new, kids)):
            e = canonical(e.with_children(new))
    out = fn(e)
    return e if out is None else canonical(out)


def map_indices(e: Expr, fn: Callable[[sympy.Expr], sympy.Expr]) -> Expr:
    """Apply `fn` to every sympy index expression inside `e` (access positions and index values)."""

    def visit(n: Expr):
        if isinstance(n, Access):
            return Access(n.tensor, tuple(p if isinstance(p, Expr) else fn(p) for p in n.indices))
        if isinstance(n, IndexValue):
            return IndexValue(fn(n.expr))
        return None

    return rewrite(e, visit)


def substitute(e: Expr, mapping: dict) -> Expr:
    """Replace index symbols (sympy xreplace) everywhere in `e`."""
    if not mapping:
        return e
    return map_indices(e, lambda p: sympy.sympify(p).xreplace(mapping))


def rename_tensors(e: Expr, mapping: dict) -> Expr:
    """Point accesses at other tensors: `mapping` is old name -> new name."""
    if not mapping:
        return e
    return rewrite(e, lambda n: Access(mapping[n.tensor], n.indices)
                   if isinstance(n, Access) and n.tensor in mapping else None)


def rename_fast(e: Expr, mapping: dict) -> Expr:
    """`rename_tensors` without re-canonicalizing (renaming cannot change the canonical form)."""
    if isinstance(e, Access):
        idx = tuple(rename_fast(p, mapping) if isinstance(p, Expr) else p for p in e.indices)
        return Access(mapping.get(e.tensor, e.tensor), idx)
    if isinstance(e, Call):
        return Call(e.op, tuple(rename_fast(a, mapping) for a in e.args), e.attr)
    return e


def accesses(e: Expr) -> Iterator[Access]:
    return (n for n in walk(e) if isinstance(n, Access))


def tensors_read(e: Expr) -> set[str]:
    return {a.tensor for a in accesses(e)}


def index_symbols(e: Expr) -> set:
    """Index symbols appearing anywhere in `e`."""
    out = set()
    for n in walk(e):
        if isinstance(n, Access):
            for p in n.indices:
                if not isinstance(p, Expr):
                    out |= sympy.sympify(p).free_symbols
        elif isinstance(n, IndexValue):
            out |= n.expr.free_symbols
    return out


def index_difference(cond: Expr):
    """For a comparison of index values (`m0 + 64*m1 <= p`): lhs - rhs as one index expression, so the
    comparison is `difference <op> 0`; None for any other condition."""
    if not (isinstance(cond, Call) and cond.op in ("lt", "le", "gt", "ge", "eq", "ne")):
        return None
    sides = []
    for a in cond.args:
        if isinstance(a, IndexValue):
            sides.append(a.expr)
        elif isinstance(a, Const) and type(a.value) is int:
            sides.append(sympy.Integer(a.value))
        else:
            return None
    return sympy.expand(sides[0] - sides[1])

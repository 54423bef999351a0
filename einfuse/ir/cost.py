"""Costs read off the IR: FLOPs of a statement and the minimum bytes a module must move."""
from __future__ import annotations

import sympy

from .expr import Call, index_symbols, walk
from .module import Module, Statement

# Map operators that are not arithmetic (selection, comparison, logic, type conversion).
NOT_FLOPS = {"cast", "where", "lt", "le", "gt", "ge", "eq", "ne", "and", "or", "xor", "not", "isnan", "isinf",
             "bitand", "bitor", "bitxor", "bitnot", "shl", "shr"}


def _concrete(e, sizes: dict) -> int:
    v = sympy.sympify(e).xreplace({k: sympy.Integer(x) for k, x in sizes.items()})
    if not v.is_Integer:
        raise ValueError(f"{e} is symbolic; give sizes")
    return int(v)


def statement_flops(s: Statement, sizes: dict | None = None) -> int:
    """Arithmetic operations the statement needs: an operator independent of the reduced ranks counts
    once per output point (it can be hoisted), one that depends on them once per point of the whole
    space, and the reduction one combine per reduced element (a GEMM comes out as 2*M*N*K)."""
    sizes = sizes or {}
    ext = {r: _concrete(n, sizes) for r, n in s.ranks().items()}
    red = {r for r, _ in s.reduce.ranks} if s.reduce else set()
    out_points = 1
    for r, n in ext.items():
        if r not in red:
            out_points *= n
    all_points = out_points
    for r in red:
        all_points *= ext[r]
    total = 0
    for node in walk(s.expr):
        if isinstance(node, Call) and node.op not in NOT_FLOPS:
            total += all_points if index_symbols(node) & red else out_points
    if s.reduce:
        total += all_points - out_points
    return total


def min_bytes(m: Module, sizes: dict | None = None) -> int:
    """Every input and weight the module reads, and every output, touched exactly once."""
    sizes = sizes or {}
    read = set()
    for op in m.body:
        read |= op.reads()
    types = m.types()
    names = [i.name for i in m.inputs if i.name in read or i.name in m.outputs] + list(dict.fromkeys(m.outputs))
    total = 0
    for n in dict.fromkeys(names):
        t = types[n]
        numel = _concrete(t.numel(), sizes)
        total += (numel * t.dtype.bits + 7) // 8
    return total

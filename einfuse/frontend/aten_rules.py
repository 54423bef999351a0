"""Lowering rules, one small function per ATen op family, registered in RULES by op name.

A rule returns the node's value: a template (index maps: views, broadcasts, factories, concatenation)
or the template of a statement it emitted (compute: maps, reductions, contractions, gathers). A rule
raises Unsupported when it cannot express the node; the node then runs through torch as an opaque call.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import sympy
import torch

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.expr import Call, Const, Expr, IndexValue, map_indices
from .lower import Lowerer, Tmpl, Unsupported, placeholder

RULES: dict = {}


def rule(*names):
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _remap(lw: Lowerer, t: Tmpl, shape: tuple, fn, dtype=None) -> Tmpl:
    """A view: the value at output index `ph` is `t` at `fn(ph)`; positions simplified by range."""
    ph = [placeholder(d) for d in range(len(shape))]
    rng = {p: (sympy.Integer(0), sympy.sympify(n) - 1) for p, n in zip(ph, shape)}
    e = lw.at(t, fn(ph))
    e = _fold_where(map_indices(e, lambda p: ix.simplify(p, rng)), rng)
    return Tmpl(e, tuple(shape), dtype or t.dtype)


_SIGNS = {"lt": lambda lo, hi: (hi < 0, lo >= 0), "le": lambda lo, hi: (hi <= 0, lo > 0),
          "gt": lambda lo, hi: (lo > 0, hi <= 0), "ge": lambda lo, hi: (lo >= 0, hi < 0)}


def _decided(cond: Expr, rng: dict):
    """True or False when the ranges decide an index comparison (or an and/or of them), else None."""
    if isinstance(cond, Call) and cond.op in ("and", "or") and len(cond.args) == 2:
        a, b = (_decided(c, rng) for c in cond.args)
        if cond.op == "and":
            return False if False in (a, b) else (True if a is True and b is True else None)
        return True if True in (a, b) else (False if a is False and b is False else None)
    if not (isinstance(cond, Call) and cond.op in _SIGNS):
        return None
    a, b = (_index_of(x) for x in cond.args)
    if a is None or b is None:
        return None
    lo, hi = ix.bounds(a - b, rng)
    always, never = (rel is sympy.true for rel in _SIGNS[cond.op](lo, hi))  # an undecided comparison stays symbolic
    return True if always else (False if never else None)


def _index_of(e: Expr):
    """An index-valued expression (a rank, a size, an integer literal) as sympy, else None."""
    if isinstance(e, IndexValue):
        return e.expr
    if isinstance(e, Const) and type(e.value) is int:
        return sympy.Integer(e.value)
    return None


def _fold_where(e: Expr, rng: dict) -> Expr:
    """`e` with every where() whose condition the ranges decide replaced by its branch: a view that reads one
    part of a concatenation (`cat([a, b], 1)[:, 0]`) reads that part alone, never the other at an index
    outside it."""
    if not isinstance(e, Call):
        return e
    if e.op == "where":
        pick = _decided(e.args[0], rng)
        if pick is not None:
            return _fold_where(e.args[1] if pick else e.args[2], rng)
    args = tuple(_fold_where(a, rng) for a in e.args)
    return e if args == e.args else Call(e.op, args, e.attr)


# ---------------------------------------------------------------- elementwise

_BINARY = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "maximum": "max", "minimum": "min",
    "pow": "pow", "remainder": "mod", "floor_divide": "floordiv", "atan2": "atan2",
    "bitwise_left_shift": "shl", "bitwise_right_shift": "shr", "fmax": "max", "fmin": "min",
}
_COMPARE = {"eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge"}
_LOGICAL = {"logical_and": "and", "logical_or": "or", "logical_xor": "xor"}
_BITWISE = {"bitwise_and": ("and", "bitand"), "bitwise_or": ("or", "bitor"), "bitwise_xor": ("xor", "bitxor")}
_UNARY = {
    "neg": "neg", "exp": "exp", "exp2": "exp2", "log": "log", "log2": "log2", "log1p": "log1p",
    "expm1": "expm1", "sqrt": "sqrt", "rsqrt": "rsqrt", "sin": "sin", "cos": "cos", "tan": "tan",
    "tanh": "tanh", "erf": "erf", "sigmoid": "sigmoid", "relu": "relu", "abs": "abs", "floor": "floor",
    "ceil": "ceil", "round": "round", "trunc": "trunc", "sign": "sign", "reciprocal": "reciprocal",
    "silu": "silu", "isnan": "isnan", "isinf": "isinf", "logical_not": "not",
}
_OVERLOADS = ("Tensor", "Scalar", "default", "Tensor_Scalar", "Tensor_Tensor", "Scalar_Tensor")


def _names(op: str):
    return [f"aten.{op}.{o}" for o in _OVERLOADS]


def _binary(op):
    def lower(lw: Lowerer, node):
        a, b = lw.tmpl(node.args[0]), lw.tmpl(node.args[1])
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            b = Tmpl(Call("mul", (b.expr, Const(alpha))), b.shape, b.dtype)
        return _map_tmpls(lw, node, op, [a, b])

    return lower


def _map_tmpls(lw: Lowerer, node, op, ts, compute=None):
    """An elementwise statement over templates, each broadcast and cast to `compute` (default: the result)."""
    shape, out = lw.shape(node), lw.dtype(node)
    compute = compute or out
    return lw.statement(node.name, shape, out,
                        lambda rs, _: Call(op, tuple(lw.cast(lw.broadcast_at(t, rs, shape), compute) for t in ts)))


def _result_type(lw: Lowerer, args) -> dt.DType:
    """The dtype torch computes a comparison in (promotion over the operands, scalars weak)."""
    vals = []
    for a in args:
        if hasattr(a, "meta"):
            v = a.meta["val"]
            vals.append(torch.empty((1,) * v.dim(), dtype=v.dtype) if isinstance(v, torch.Tensor) else v)
        else:
            vals.append(a)
    if not any(isinstance(v, torch.Tensor) for v in vals):
        return dt.from_torch(torch.result_type(torch.tensor(vals[0]), vals[1]))
    if isinstance(vals[0], torch.Tensor):
        return dt.from_torch(torch.result_type(vals[0], vals[1]))
    return dt.from_torch(torch.result_type(vals[1], vals[0]))


for _op, _ir in _BINARY.items():
    rule(*_names(_op))(_binary(_ir))

for _op, _ir in _COMPARE.items():
    def _cmp(lw, node, _ir=_ir):
        return lw.map(node, _ir, list(node.args[:2]), compute=_result_type(lw, node.args[:2]))

    rule(*_names(_op))(_cmp)

for _op, _ir in _LOGICAL.items():
    rule(*_names(_op))(lambda lw, node, _ir=_ir: _map_tmpls(lw, node, _ir, [lw.tmpl(a) for a in node.args[:2]],
                                                          compute=dt.bool_))

for _op, (_b, _i) in _BITWISE.items():
    def _bit(lw, node, _b=_b, _i=_i):
        out = lw.dtype(node)
        return lw.map(node, _b if out == dt.bool_ else _i, list(node.args[:2]),
                      compute=dt.bool_ if out == dt.bool_ else out)

    rule(*_names(_op))(_bit)

for _op, _ir in _UNARY.items():
    def _un(lw, node, _ir=_ir):
        x = lw.tmpl(node.args[0])
        return _map_tmpls(lw, node, _ir, [x], compute=x.dtype if _ir in ("not", "isnan", "isinf") else None)

    rule(*_names(_op))(_un)


@rule("aten.bitwise_not.default")
def _bitwise_not(lw, node):
    return lw.map(node, "not" if lw.dtype(node) == dt.bool_ else "bitnot", [node.args[0]])


@rule("aten.gelu.default")
def _gelu(lw, node):
    approx = node.kwargs.get("approximate", _arg(node, 1, "approximate", "none"))
    return lw.map(node, "gelu_tanh" if approx == "tanh" else "gelu", [node.args[0]])


@rule("aten.div.Tensor_mode", "aten.div.Scalar_mode")
def _div_mode(lw, node):
    mode = node.kwargs.get("rounding_mode", _arg(node, 2, "rounding_mode"))
    if mode is None:
        return lw.map(node, "div", list(node.args[:2]))
    if mode == "floor":
        return lw.map(node, "floordiv", list(node.args[:2]))
    if lw.dtype(node).is_float:
        shape, out = lw.shape(node), lw.dtype(node)
        ts = [lw.tmpl(a) for a in node.args[:2]]
        return lw.statement(node.name, shape, out, lambda rs, _: Call("trunc", (Call(
            "div", tuple(lw.cast(lw.broadcast_at(t, rs, shape), out) for t in ts)),)))
    raise Unsupported("integer division rounding toward zero")


@rule("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def _where(lw, node):
    shape, out = lw.shape(node), lw.dtype(node)
    c, a, b = (lw.tmpl(x) for x in node.args[:3])
    return lw.statement(node.name, shape, out, lambda rs, _: Call("where", (
        lw.cast(lw.broadcast_at(c, rs, shape), dt.bool_),
        lw.cast(lw.broadcast_at(a, rs, shape), out),
        lw.cast(lw.broadcast_at(b, rs, shape), out))))


@rule("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(lw, node):
    shape, out = lw.shape(node), lw.dtype(node)
    x, m, v = (lw.tmpl(a) for a in node.args[:3])
    return lw.statement(node.name, shape, out, lambda rs, _: Call("where", (
        lw.broadcast_at(m, rs, shape), lw.cast(lw.broadcast_at(v, rs, shape), out),
        lw.cast(lw.broadcast_at(x, rs, shape), out))))


@rule("aten.clamp.default", "aten.clamp.Tensor", "aten.clamp_min.default", "aten.clamp_max.default",
      "aten.clamp_min.Tensor", "aten.clamp_max.Tensor")
def _clamp(lw, node):
    shape, out = lw.shape(node), lw.dtype(node)
    name = str(node.target)
    lo = _arg(node, 1, "min") if "clamp_max" not in name else None
    hi = _arg(node, 2, "max") if "clamp_min" not in name and "clamp_max" not in name else None
    if "clamp_max" in name:
        hi = _arg(node, 1, "max")
    x = lw.tmpl(node.args[0])
    bounds = [(op, lw.tmpl(v)) for op, v in (("max", lo), ("min", hi)) if v is not None]

    def build(rs, _):
        e = lw.cast(lw.broadcast_at(x, rs, shape), out)
        for op, t in bounds:
            e = Call(op, (e, lw.cast(lw.broadcast_at(t, rs, shape), out)))
        return e

    return lw.statement(node.name, shape, out, build)


@rule("aten._to_copy.default", "prims.convert_element_type.default", "aten.to.dtype")
def _to_copy(lw, node):
    t = lw.tmpl(node.args[0])
    out = lw.dtype(node)
    if out == t.dtype:
        return t
    shape = lw.shape(node)
    return lw.statement(node.name, shape, out, lambda rs, _: Call("cast", (lw.at(t, rs),), out))


# ---------------------------------------------------------------- views and index maps

@rule("aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.lift_fresh_copy.default",
      "aten.contiguous.default")
def _identity(lw, node):
    return lw.tmpl(node.args[0])


@rule("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")
def _view(lw, node):
    t = lw.tmpl(node.args[0])
    new = lw.shape(node)
    old = t.shape

    so, sn = ix.strides(old), ix.strides(new)

    def fn(ph):
        flat = sum((p * s for p, s in zip(ph, sn)), sympy.Integer(0))
        return [ix.FloorDiv(flat, s) if d == 0 else ix.Mod(ix.FloorDiv(flat, s), n)
                for d, (s, n) in enumerate(zip(so, old))]

    return _remap(lw, t, new, fn)


@rule("aten.permute.default")
def _permute(lw, node):
    t = lw.tmpl(node.args[0])
    dims = [_dim(d, t.ndim) for d in node.args[1]]

    def fn(ph):
        idx = [None] * t.ndim
        for o, d in enumerate(dims):
            idx[d] = ph[o]
        return idx

    return _remap(lw, t, tuple(t.shape[d] for d in dims), fn)


@rule("aten.transpose.int")
def _transpose(lw, node):
    t = lw.tmpl(node.args[0])
    a, b = (_dim(d, t.ndim) for d in node.args[1:3])
    perm = list(range(t.ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return _remap(lw, t, tuple(t.shape[d] for d in perm), lambda ph: [ph[perm.index(d)] for d in range(t.ndim)])


@rule("aten.t.default", "aten.numpy_T.default")
def _t(lw, node):
    t = lw.tmpl(node.args[0])
    if t.ndim < 2:
        return t
    return _remap(lw, t, tuple(reversed(t.shape)), lambda ph: list(reversed(ph)))


@rule("aten.unsqueeze.default")
def _unsqueeze(lw, node):
    t = lw.tmpl(node.args[0])
    d = _dim(node.args[1], t.ndim + 1)
    return _remap(lw, t, lw.shape(node), lambda ph: ph[:d] + ph[d + 1:])


@rule("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(lw, node):
    t = lw.tmpl(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else range(t.ndim)
    dims = {_dim(d, t.ndim) for d in ([dims] if isinstance(dims, int) else dims)}
    dims = {d for d in dims if t.shape[d] == 1}
    keep = [d for d in range(t.ndim) if d not in dims]

    def fn(ph):
        it = iter(ph)
        return [sympy.Integer(0) if d in dims else next(it) for d in range(t.ndim)]

    return _remap(lw, t, tuple(t.shape[d] for d in keep), fn)


@rule("aten.expand.default", "aten.expand_copy.default", "aten.broadcast_to.default")
def _expand(lw, node):
    t = lw.tmpl(node.args[0])
    shape = lw.shape(node)
    return _remap(lw, t, shape, lambda ph: _broadcast_idx(t, ph, shape))


def _broadcast_idx(t: Tmpl, ph, shape):
    off = len(shape) - t.ndim
    return [sympy.Integer(0) if (n == 1 and shape[off + d] != 1) else ph[off + d] for d, n in enumerate(t.shape)]


@rule("aten.copy.default")
def _copy(lw, node):
    dst, src = lw.tmpl(node.args[0]), lw.tmpl(node.args[1])
    shape = dst.shape
    if src.dtype != dst.dtype:
        return lw.statement(node.name, shape, dst.dtype, lambda rs, _: lw.cast(lw.broadcast_at(src, rs, shape), dst.dtype))
    return _remap(lw, src, shape, lambda ph: _broadcast_idx(src, ph, shape))


@rule("aten.slice.Tensor")
def _slice(lw, node):
    t = lw.tmpl(node.args[0])
    d = _dim(_arg(node, 1, "dim", 0), t.ndim)
    start = _arg(node, 2, "start", None) or 0
    step = _arg(node, 4, "step", 1)
    start = lw.int_arg(start)
    n = t.shape[d]
    if start.is_Integer and start < 0:
        start = sympy.Max(start + n, 0) if not n.is_Integer else sympy.Integer(max(int(start) + int(n), 0))
    shape = lw.shape(node)

    def fn(ph):
        idx = list(ph)
        idx[d] = start + lw.int_arg(step) * ph[d]
        return idx

    return _remap(lw, t, shape, fn)


@rule("aten.narrow.default")
def _narrow(lw, node):
    t = lw.tmpl(node.args[0])
    d = _dim(node.args[1], t.ndim)
    start = lw.int_arg(node.args[2])
    return _remap(lw, t, lw.shape(node), lambda ph: [start + p if k == d else p for k, p in enumerate(ph)])


@rule("aten.select.int")
def _select(lw, node):
    t = lw.tmpl(node.args[0])
    d = _dim(node.args[1], t.ndim)
    i = lw.int_arg(node.args[2])
    if i.is_Integer and i < 0:
        i = i + t.shape[d]
    return _remap(lw, t, lw.shape(node), lambda ph: ph[:d] + [i] + ph[d:])


@rule("aten.split_with_sizes.default", "aten.split.Tensor", "aten.split_with_sizes_copy.default")
def _split(lw, node):
    t = lw.tmpl(node.args[0])
    d = _dim(_arg(node, 2, "dim", 0), t.ndim)
    outs, start = [], sympy.Integer(0)
    for v in node.meta["val"]:
        shape = lw.shape(v)
        outs.append(_remap(lw, t, shape, lambda ph, s=start: [s + p if k == d else p for k, p in enumerate(ph)]))
        start = start + shape[d]
    return outs


@rule("aten.unbind.int")
def _unbind(lw, node):
    t = lw.tmpl(node.args[0])
    d = _dim(_arg(node, 1, "dim", 0), t.ndim)
    shape = tuple(n for k, n in enumerate(t.shape) if k != d)
    return [_remap(lw, t, shape, lambda ph, i=i: ph[:d] + [sympy.Integer(i)] + ph[d:]) for i in range(int(t.shape[d]))]


@rule("aten.cat.default")
def _cat(lw, node):
    parts = [lw.tmpl(a) for a in node.args[0]]
    shape, out = lw.shape(node), lw.dtype(node)
    d = _dim(_arg(node, 1, "dim", 0), len(shape))
    parts = [p for p in parts if not (p.ndim == 1 and p.shape[0] == 0)]  # legacy empty tensors
    ph = [placeholder(k) for k in range(len(shape))]
    offsets, acc = [], sympy.Integer(0)
    for p in parts:
        offsets.append(acc)
        acc = acc + p.shape[d]
    expr = None
    for p, off in reversed(list(zip(parts, offsets))):
        idx = list(ph)
        idx[d] = sympy.Integer(0) if p.shape[d] == 1 else ph[d] - off  # a size-1 part is read at 0 in its branch
        here = lw.cast(lw.at(p, idx), out)
        expr = here if expr is None else Call("where", (Call("lt", (IndexValue(ph[d]), IndexValue(off + p.shape[d]))),
                                                          here, expr))
    return Tmpl(expr, shape, out)


@rule("aten.stack.default")
def _stack(lw, node):
    parts = [lw.tmpl(a) for a in node.args[0]]
    shape, out = lw.shape(node), lw.dtype(node)
    d = _dim(_arg(node, 1, "dim", 0), len(shape))
    ph = [placeholder(k) for k in range(len(shape))]
    expr = None
    for i in reversed(range(len(parts))):
        here = lw.cast(lw.at(parts[i], ph[:d] + ph[d + 1:]), out)
        expr = here if expr is None else Call("where", (Call("eq", (IndexValue(ph[d]), Const(i))), here, expr))
    return Tmpl(expr, shape, out)


@rule("aten.repeat.default")
def _repeat(lw, node):
    t = lw.tmpl(node.args[0])
    shape = lw.shape(node)
    off = len(shape) - t.ndim
    return _remap(lw, t, shape, lambda ph: [ix.Mod(ph[off + k], n) for k, n in enumerate(t.shape)])


# ---------------------------------------------------------------- factories

def _factory_dtype(node):
    return dt.from_torch(node.meta["val"].dtype)


@rule("aten.arange.start_step", "aten.arange.default", "aten.arange.start")
def _arange(lw, node):
    args = [lw.int_arg(a) if not isinstance(a, float) else a for a in node.args]
    if str(node.target).endswith("default"):
        start, step = 0, 1
    else:
        start = args[0]
        step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
    out = _factory_dtype(node)
    p = placeholder(0)
    if out.is_int and all(isinstance(v, (int, sympy.Integer)) for v in (start, step)):
        e = IndexValue(sympy.Integer(start) + sympy.Integer(step) * p)
        return Tmpl(e if out == dt.i64 else Call("cast", (e,), out), lw.shape(node), out)
    e = Call("add", (Call("mul", (Call("cast", (IndexValue(p),), dt.f64), Const(float(step)))), Const(float(start))))
    return Tmpl(Call("cast", (e,), out), lw.shape(node), out)


@rule("aten.full.default", "aten.new_full.default")
def _full(lw, node):
    value = node.args[-1] if str(node.target).startswith("aten.full") else node.args[2]
    return lw.constant(value, lw.shape(node), _factory_dtype(node))


@rule("aten.full_like.default", "aten.fill.Scalar")
def _full_like(lw, node):
    return lw.constant(node.args[1], lw.shape(node), _factory_dtype(node))


@rule("aten.scalar_tensor.default")
def _scalar_tensor(lw, node):
    return lw.constant(node.args[0], (), _factory_dtype(node))


@rule("aten.zeros.default", "aten.zeros_like.default", "aten.new_zeros.default")
def _zeros(lw, node):
    out = _factory_dtype(node)
    return lw.constant(False if out == dt.bool_ else (0.0 if out.is_float else 0), lw.shape(node), out)


@rule("aten.empty.memory_format", "aten.empty_like.default", "aten.new_empty.default",
      "aten.empty_permuted.default", "aten.empty_strided.default")
def _empty(lw, node):
    """Uninitialized memory may hold anything, so zeros are a valid content and stay an index map."""
    return _zeros(lw, node)


@rule("aten.ones.default", "aten.ones_like.default", "aten.new_ones.default")
def _ones(lw, node):
    out = _factory_dtype(node)
    return lw.constant(True if out == dt.bool_ else (1.0 if out.is_float else 1), lw.shape(node), out)


# ---------------------------------------------------------------- gathers

def _index_position(lw: Lowerer, t: Tmpl, out_idx, bshape, n):
    """An index tensor read at the output index: an index expression if it is one, else a gather
    (negative values wrap, as in torch)."""
    e = lw.broadcast_at(t, out_idx, bshape)
    if isinstance(e, IndexValue):
        return e.expr
    if isinstance(e, Const) and type(e.value) is int:
        return sympy.Integer(e.value + n if e.value < 0 else e.value)
    e = lw.cast(e, dt.i64)
    return Call("where", (Call("lt", (e, Const(0))), Call("add", (e, IndexValue(sympy.sympify(n)))), e))


def _broadcast_shapes(shapes) -> tuple:
    nd = max(len(s) for s in shapes)
    out = []
    for d in range(nd):
        dims = {s[d - nd + len(s)] for s in shapes if d - nd + len(s) >= 0} - {sympy.Integer(1)}
        if len(dims) > 1:
            raise Unsupported(f"index shapes {shapes} do not broadcast")
        out.append(dims.pop() if dims else sympy.Integer(1))
    return tuple(out)


@rule("aten.index.Tensor", "aten._unsafe_index.Tensor")
def _index(lw, node):
    t = lw.tmpl(node.args[0])
    idx_args = list(node.args[1])
    shape, out = lw.shape(node), lw.dtype(node)
    idx_args += [None] * (t.ndim - len(idx_args))
    present = [k for k, a in enumerate(idx_args) if a is not None]
    tmpls = {k: lw.tmpl(idx_args[k]) for k in present}
    if any(tm.dtype == dt.bool_ for tm in tmpls.values()):
        raise Unsupported("boolean mask indexing has a data-dependent shape")
    bshape = _broadcast_shapes([tmpls[k].shape for k in present])
    adjacent = present == list(range(present[0], present[-1] + 1))
    lead = present[0] if adjacent else 0
    nb = len(bshape)

    def positions(rs):
        brs = rs[lead:lead + nb]
        gathered = {k: _index_position(lw, tmpls[k], brs, bshape, t.shape[k]) for k in present}
        rest = iter(rs[:lead] + rs[lead + nb:])
        return [gathered[k] if k in gathered else next(rest) for k in range(t.ndim)]

    probe = positions([placeholder(d) for d in range(len(shape))])
    if all(not isinstance(p, Expr) for p in probe):  # a pure index map: stays a template
        return _remap(lw, t, shape, positions)
    return lw.statement(node.name, shape, out, lambda rs, _: lw.at(t, positions(rs)))


@rule("aten.embedding.default")
def _embedding(lw, node):
    w, ids = lw.tmpl(node.args[0]), lw.tmpl(node.args[1])
    shape, out = lw.shape(node), lw.dtype(node)

    def build(rs, _):
        pos = lw.at(ids, rs[:-1])
        if isinstance(pos, IndexValue):
            return lw.at(w, [pos.expr, rs[-1]])
        return lw.at(w, [lw.cast(pos, dt.i64), rs[-1]])

    return lw.statement(node.name, shape, out, build)


@rule("aten.index_select.default")
def _index_select(lw, node):
    t, idx = lw.tmpl(node.args[0]), lw.tmpl(node.args[2])
    d = _dim(node.args[1], t.ndim)
    shape, out = lw.shape(node), lw.dtype(node)
    return lw.statement(node.name, shape, out,
                        lambda rs, _: lw.at(t, rs[:d] + [lw.cast(lw.at(idx, [rs[d]]), dt.i64)] + rs[d + 1:]))


@rule("aten.gather.default")
def _gather(lw, node):
    t, idx = lw.tmpl(node.args[0]), lw.tmpl(node.args[2])
    d = _dim(node.args[1], t.ndim)
    shape, out = lw.shape(node), lw.dtype(node)
    return lw.statement(node.name, shape, out,
                        lambda rs, _: lw.at(t, rs[:d] + [lw.cast(lw.at(idx, rs), dt.i64)] + rs[d + 1:]))


# ---------------------------------------------------------------- reductions

def _acc_dtype(d: dt.DType) -> dt.DType:
    return dt.f32 if d.is_float and d.bits < 32 else d


def _reduction(lw: Lowerer, name: str, x: Tmpl, dims, out_shape, out: dt.DType, op: str, acc: dt.DType | None = None,
               keep_ranks: bool = False, element=None) -> Tmpl:
    """`name[kept dims] = op over dims of x`; reduced dims of size 1 in `out_shape` are kept (keepdim)."""
    dims = sorted({_dim(d, x.ndim) for d in dims})
    acc = acc or out
    keep = len(out_shape) == x.ndim

    def build(rs, rr):
        it = iter(rs)
        idx = []
        for d in range(x.ndim):
            if d in dims:
                idx.append(rr[dims.index(d)])
                if keep:
                    next(it)
            else:
                idx.append(next(it))
        e = lw.at(x, idx)
        if element is not None:
            e = element(e)
        return lw.cast(e, acc)

    return lw.statement(name, out_shape, out, build, reduce_extents=[x.shape[d] for d in dims], reduce_op=op)


def _dims_arg(node, x: Tmpl, i=1):
    dims = _arg(node, i, "dim", None)
    if dims is None or dims == []:
        return list(range(x.ndim))
    return [dims] if isinstance(dims, int) else list(dims)


@rule("aten.sum.dim_IntList", "aten.sum.default")
def _sum(lw, node):
    x = lw.tmpl(node.args[0])
    out = lw.dtype(node)
    return _reduction(lw, node.name, x, _dims_arg(node, x), lw.shape(node), out, "sum", acc=_acc_dtype(out))


@rule("aten.mean.dim", "aten.mean.default")
def _mean(lw, node):
    x = lw.tmpl(node.args[0])
    out = lw.dtype(node)
    dims = _dims_arg(node, x)
    shape = lw.shape(node)
    acc = _acc_dtype(out)
    s = _reduction(lw, f"{node.name}_sum", x, dims, shape, acc, "sum")
    n = sympy.Mul(*[x.shape[_dim(d, x.ndim)] for d in dims])
    count = Const(int(n)) if n.is_Integer else IndexValue(n)
    return lw.statement(node.name, shape, out, lambda rs, _: Call("cast", (Call("div", (lw.at(s, rs), count)),), out)
                        if acc != out else Call("div", (lw.at(s, rs), count)))


@rule("aten.amax.default", "aten.amin.default")
def _amax(lw, node):
    x = lw.tmpl(node.args[0])
    op = "max" if "amax" in str(node.target) else "min"
    return _reduction(lw, node.name, x, _dims_arg(node, x), lw.shape(node), lw.dtype(node), op)


@rule("aten.max.dim", "aten.min.dim")
def _max_dim(lw, node):
    if any(u.target is operator.getitem and u.args[1] == 1 for u in node.users):
        raise Unsupported("arg-max/min indices")
    x = lw.tmpl(node.args[0])
    op = "max" if ".max." in str(node.target) else "min"
    return [_reduction(lw, node.name, x, [node.args[1]], lw.shape(node.meta["val"][0]),
                       dt.from_torch(node.meta["val"][0].dtype), op), None]


@rule("aten.max.default", "aten.min.default")
def _max_all(lw, node):
    x = lw.tmpl(node.args[0])
    op = "max" if ".max." in str(node.target) else "min"
    return _reduction(lw, node.name, x, list(range(x.ndim)), (), lw.dtype(node), op)


@rule("aten.any.dim", "aten.any.dims", "aten.any.default", "aten.all.dim", "aten.all.dims", "aten.all.default")
def _any(lw, node):
    x = lw.tmpl(node.args[0])
    op = "any" if ".any." in str(node.target) else "all"
    return _reduction(lw, node.name, x, _dims_arg(node, x), lw.shape(node), dt.bool_, op)


@rule("aten.prod.dim_int", "aten.prod.default")
def _prod(lw, node):
    x = lw.tmpl(node.args[0])
    return _reduction(lw, node.name, x, _dims_arg(node, x), lw.shape(node), lw.dtype(node), "prod")


@rule("aten.cumsum.default")
def _cumsum(lw, node):
    x = lw.tmpl(node.args[0])
    d = _dim(node.args[1], x.ndim)
    shape, out = lw.shape(node), lw.dtype(node)

    def build(rs, rr):
        idx = list(rs)
        idx[d] = rr[0]
        return Call("where", (Call("le", (IndexValue(rr[0]), IndexValue(rs[d]))),
                              lw.cast(lw.at(x, idx), _acc_dtype(out)), Const(0)))

    return lw.statement(node.name, shape, out, build, reduce_extents=[x.shape[d]])


# ---------------------------------------------------------------- contractions

def _contract(lw, name, a: Tmpl, b: Tmpl, shape, out, batch: bool):
    acc = _acc_dtype(out)

    def build(rs, rr):
        if batch:
            ea, eb = lw.at(a, [rs[0], rs[1], rr[0]]), lw.at(b, [rs[0], rr[0], rs[2]])
        else:
            ea, eb = lw.at(a, [rs[0], rr[0]]), lw.at(b, [rr[0], rs[1]])
        return Call("mul", (lw.cast(ea, acc), lw.cast(eb, acc)))

    return lw.statement(name, shape, out, build, reduce_extents=[a.shape[-1]])


@rule("aten.mm.default")
def _mm(lw, node):
    return _contract(lw, node.name, lw.tmpl(node.args[0]), lw.tmpl(node.args[1]), lw.shape(node), lw.dtype(node), False)


@rule("aten.bmm.default")
def _bmm(lw, node):
    return _contract(lw, node.name, lw.tmpl(node.args[0]), lw.tmpl(node.args[1]), lw.shape(node), lw.dtype(node), True)


@rule("aten.addmm.default", "aten.baddbmm.default")
def _addmm(lw, node):
    bias, a, b = (lw.tmpl(x) for x in node.args[:3])
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    shape, out = lw.shape(node), lw.dtype(node)
    mm = _contract(lw, f"{node.name}_mm", a, b, shape, out, "baddbmm" in str(node.target))

    def build(rs, _):
        eb = lw.cast(lw.broadcast_at(bias, rs, shape), out)
        em = lw.at(mm, rs)
        if beta != 1:
            eb = Call("mul", (eb, Const(beta)))
        if alpha != 1:
            em = Call("mul", (em, Const(alpha)))
        return Call("add", (em, eb)) if beta != 0 else em

    return lw.statement(node.name, shape, out, build)


# ---------------------------------------------------------------- softmax, norms, attention

def _softmax_parts(lw, name, x: Tmpl, d: int, acc: dt.DType, score=None, safe: bool = False):
    """The 3-pass softmax cascade over dim d: max, exp(x - max), sum. Returns (max, exp, sum) templates.
    With `safe`, a row that is all -inf gets exp 0 and sum 0 instead of NaN (see `_attention`)."""
    red_shape = tuple(n for k, n in enumerate(x.shape) if k != d)
    score = score or (lambda idx: lw.cast(lw.at(x, idx), acc))

    def with_r(rs, r):
        return rs[:d] + [r] + rs[d:]

    def row_max(rs):
        m = lw.at(mx, rs[:d] + rs[d + 1:])
        return Call("where", (Call("eq", (m, Const(-math.inf))), Const(0.0), m)) if safe else m

    mx = lw.statement(f"{name}_max", red_shape, acc, lambda rs, rr: score(with_r(rs, rr[0])),
                      reduce_extents=[x.shape[d]], reduce_op="max")
    ex = lw.statement(f"{name}_exp", x.shape, acc,
                      lambda rs, _: Call("exp", (Call("sub", (score(rs), row_max(rs))),)))
    sm = lw.statement(f"{name}_sum", red_shape, acc, lambda rs, rr: lw.at(ex, with_r(rs, rr[0])),
                      reduce_extents=[x.shape[d]])
    return mx, ex, sm


@rule("aten._softmax.default", "aten.softmax.int", "aten._log_softmax.default", "aten.log_softmax.int",
      "aten._safe_softmax.default")
def _softmax(lw, node):
    """(Log-)softmax as the max/exp/sum cascade; `_safe_softmax` (math SDPA) gives 0 on all -inf rows."""
    x = lw.tmpl(node.args[0])
    if x.ndim == 0:  # torch treats a 0-dim tensor as one row of one element
        one = _softmax_over(lw, node, _remap(lw, x, (sympy.Integer(1),), lambda ph: []))
        return _remap(lw, one, (), lambda ph: [sympy.Integer(0)])
    return _softmax_over(lw, node, x)


def _softmax_over(lw, node, x: Tmpl):
    d = _dim(node.args[1], x.ndim)
    out = lw.dtype(node)
    acc = _acc_dtype(out if out.bits >= x.dtype.bits else x.dtype)
    safe = "_safe_softmax" in str(node.target)
    mx, ex, sm = _softmax_parts(lw, node.name, x, d, acc, safe=safe)
    drop = lambda rs: rs[:d] + rs[d + 1:]  # noqa: E731
    if "log" in str(node.target):
        return lw.statement(node.name, x.shape, out, lambda rs, _: Call("sub", (
            Call("sub", (lw.cast(lw.at(x, rs), acc), lw.at(mx, drop(rs)))), Call("log", (lw.at(sm, drop(rs)),)))))
    return lw.statement(node.name, x.shape, out,
                        lambda rs, _: Call("div", (lw.at(ex, rs), _softmax_sum(lw, sm, drop(rs), safe))))


def _softmax_sum(lw, sm: Tmpl, idx, safe: bool) -> Expr:
    """The softmax denominator; when `safe`, max(sum, 1): an all -inf row has sum 0 (so yields 0), and any
    other row a sum >= 1 (its max term is exp(0)), so the clamp changes nothing else."""
    s = lw.at(sm, idx)
    return Call("max", (s, Const(1.0))) if safe else s


@rule("aten.native_layer_norm.default")
def _layer_norm(lw, node):
    x = lw.tmpl(node.args[0])
    nd = len(node.args[1])
    w = lw.tmpl(node.args[2]) if node.args[2] is not None else None
    b = lw.tmpl(node.args[3]) if node.args[3] is not None else None
    eps = float(node.args[4])
    out = dt.from_torch(node.meta["val"][0].dtype)
    acc = _acc_dtype(x.dtype)
    outer = x.shape[:x.ndim - nd]
    n = sympy.Mul(*x.shape[x.ndim - nd:])
    count = Const(int(n)) if n.is_Integer else IndexValue(n)
    dims = list(range(x.ndim - nd, x.ndim))
    s = _reduction(lw, f"{node.name}_sum", x, dims, outer, acc, "sum")
    mean = lw.statement(f"{node.name}_mean", outer, acc, lambda rs, _: Call("div", (lw.at(s, rs), count)))
    k = len(outer)

    def centered(rs):
        return Call("sub", (lw.cast(lw.at(x, rs), acc), lw.at(mean, rs[:k])))

    sq = lw.statement(f"{node.name}_sq", outer, acc, lambda rs, rr: Call("mul", (centered(rs + rr), centered(rs + rr))),
                      reduce_extents=x.shape[k:])
    rstd = lw.statement(f"{node.name}_rstd", outer, acc, lambda rs, _: Call(
        "rsqrt", (Call("add", (Call("div", (lw.at(sq, rs), count)), Const(eps))),)))

    def build(rs, _):
        e = Call("mul", (centered(rs), lw.at(rstd, rs[:k])))
        if w is not None:
            e = Call("mul", (e, lw.cast(lw.at(w, rs[k:]), acc)))
        if b is not None:
            e = Call("add", (e, lw.cast(lw.at(b, rs[k:]), acc)))
        return e

    y = lw.statement(node.name, x.shape, out, build)
    stat_shape = lw.shape(node.meta["val"][1])
    ph_keep = lambda ph: ph[:k]  # noqa: E731
    return [y, _remap(lw, mean, stat_shape, ph_keep), _remap(lw, rstd, stat_shape, ph_keep)]


@rule("aten._scaled_dot_product_flash_attention_for_cpu.default")
def _sdpa_cpu(lw, node):
    """The CPU flash-attention op AOTAutograd leaves behind: SDPA with another argument order."""
    if float(_arg(node, 3, "dropout_p", 0.0) or 0.0) != 0.0:
        raise Unsupported("attention dropout")
    if any(u.target is operator.getitem and u.args[1] != 0 for u in node.users):
        raise Unsupported("the log-sum-exp output of flash attention")
    mask = node.kwargs.get("attn_mask")
    out = _attention(lw, node, mask, bool(_arg(node, 4, "is_causal", False)))
    return [out, None]


@rule("aten.scaled_dot_product_attention.default")
def _sdpa(lw, node):
    if float(_arg(node, 4, "dropout_p", 0.0) or 0.0) != 0.0:
        raise Unsupported("attention dropout")
    return _attention(lw, node, _arg(node, 3, "attn_mask"), bool(_arg(node, 5, "is_causal", False)))


def _attention(lw, node, mask_arg, causal: bool):
    """softmax(q k^T * scale + mask) v as the 3-pass cascade: max, sum of exp, normalized sum with v."""
    q, k, v = (lw.tmpl(a) for a in node.args[:3])
    scale = node.kwargs.get("scale") or 1.0 / math.sqrt(int(q.shape[-1]))
    gqa = bool(node.kwargs.get("enable_gqa", False))
    mask = lw.tmpl(mask_arg) if mask_arg is not None else None
    out = q.dtype
    acc = _acc_dtype(out)
    nb = q.ndim - 2  # leading (batch, head) dims
    S = k.shape[-2]
    group = (q.shape[-3] // k.shape[-3]) if (gqa and q.ndim >= 3 and q.shape[-3] != k.shape[-3]) else 1
    qk_shape = tuple(q.shape[:-1]) + (S,)
    name = node.name

    def kv_lead(t: Tmpl, rs):
        lead = []
        for d in range(nb):
            n, qn = t.shape[d], q.shape[d]
            if d == nb - 1 and group != 1:
                lead.append(ix.FloorDiv(rs[d], group))
            else:
                lead.append(sympy.Integer(0) if (n == 1 and qn != 1) else rs[d])
        return lead

    qk = lw.statement(f"{name}_qk", qk_shape, acc, lambda rs, rr: Call("mul", (Call("mul", (
        lw.cast(lw.at(q, rs[:nb] + [rs[nb], rr[0]]), acc),
        lw.cast(lw.at(k, kv_lead(k, rs) + [rs[nb + 1], rr[0]]), acc))), Const(float(scale)))),
        reduce_extents=[q.shape[-1]])

    def score(rs):
        s = lw.at(qk, rs)
        if mask is not None:
            mval = lw.broadcast_at(mask, rs, qk_shape)
            s = Call("where", (mval, s, Const(-math.inf))) if mask.dtype == dt.bool_ else Call(
                "add", (s, lw.cast(mval, acc)))
        if causal:
            s = Call("where", (Call("le", (IndexValue(rs[nb + 1]), IndexValue(rs[nb]))), s, Const(-math.inf)))
        return s

    qkt = Tmpl(lw.at(qk, [placeholder(d) for d in range(len(qk_shape))]), qk_shape, acc)
    _, ex, sm = _softmax_parts(lw, name, qkt, nb + 1, acc, score=score, safe=True)
    o_shape = lw.shape(node.meta["val"][0] if isinstance(node.meta["val"], (tuple, list)) else node)
    # torch's SDPA gives 0 for a query every key is masked from (left padding under a causal mask): safe softmax.
    return lw.statement(name, o_shape, out, lambda rs, rr: Call("div", (Call("mul", (
        lw.at(ex, rs[:nb + 1] + [rr[0]]), lw.cast(lw.at(v, kv_lead(v, rs) + [rr[0], rs[nb + 1]]), acc))),
        _softmax_sum(lw, sm, rs[:nb + 1], True))), reduce_extents=[S])


@rule("getitem")
def _getitem(lw, node):
    seq = lw.values[node.args[0]]
    if not isinstance(seq, (list, tuple)):
        raise Unsupported("getitem on a non-sequence")
    v = seq[node.args[1]]
    if v is None:
        raise Unsupported("getitem of an output einfuse did not compute")
    return v


# ---------------------------------------------------------------- complex values (rotary embeddings as in Llama 4)

@dataclass(frozen=True)
class Complex:
    """A complex value as two real templates of its shape: the real and the imaginary part (the IR has no
    complex dtype; `view_as_real` turns a pair back into one real tensor)."""

    re: Tmpl
    im: Tmpl


_PART = {torch.complex64: dt.f32, torch.complex128: dt.f64}
# index maps that read a complex value as they read a real one: applied to each part
_PER_PART = ("aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.contiguous.default",
             "aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.permute.default",
             "aten.transpose.int", "aten.t.default", "aten.unsqueeze.default", "aten.squeeze.dim",
             "aten.squeeze.dims", "aten.squeeze.default", "aten.expand.default", "aten.slice.Tensor",
             "aten.narrow.default", "aten.select.int", "aten.split_with_sizes.default", "aten.split.Tensor",
             "aten.unbind.int", "aten.repeat.default")
COMPLEX_RULES: dict = {}


def _part_dtype(node) -> dt.DType:
    tdt = node.meta["val"].dtype
    if tdt not in _PART:
        raise Unsupported(f"{tdt} values")
    return _PART[tdt]


def _parts(lw: Lowerer, a):
    """(real part, imaginary part or None) of an operand, complex or real."""
    v = lw.values.get(a) if hasattr(a, "meta") else None
    return (v.re, v.im) if isinstance(v, Complex) else (lw.tmpl(a), None)


def _per_part(fn):
    def lower(lw: Lowerer, node):
        pairs = {a: lw.values[a] for a in node.all_input_nodes if isinstance(lw.values.get(a), Complex)}
        results = []
        for part in ("re", "im"):
            lw.values.update({a: getattr(c, part) for a, c in pairs.items()})
            try:
                results.append(fn(lw, node))
            finally:
                lw.values.update(pairs)
        re, im = results
        if isinstance(re, list):
            return [None if r is None else Complex(r, i) for r, i in zip(re, im)]
        return Complex(re, im)

    return lower


def _complex_binary(op: str):
    """add/sub/mul with a complex operand (the other complex or real): one statement per part."""
    def lower(lw: Lowerer, node):
        if node.kwargs.get("alpha", 1) != 1:
            raise Unsupported("complex add/sub with alpha")
        shape, part = lw.shape(node), _part_dtype(node)
        (ar, ai), (br, bi) = _parts(lw, node.args[0]), _parts(lw, node.args[1])

        def read(t, rs):
            return None if t is None else lw.cast(lw.broadcast_at(t, rs, shape), part)

        def real(rs, _):
            a, b, c, d = read(ar, rs), read(ai, rs), read(br, rs), read(bi, rs)
            if op != "mul":
                return Call(op, (a, c))
            products = [Call("mul", (a, c))] + ([Call("mul", (b, d))] if b is not None and d is not None else [])
            return products[0] if len(products) == 1 else Call("sub", tuple(products))

        def imag(rs, _):
            a, b, c, d = read(ar, rs), read(ai, rs), read(br, rs), read(bi, rs)
            if op != "mul":
                if d is None:
                    return b
                return d if b is None and op == "add" else (Call("neg", (d,)) if b is None else Call(op, (b, d)))
            terms = ([Call("mul", (a, d))] if d is not None else []) + ([Call("mul", (b, c))] if b is not None else [])
            return terms[0] if len(terms) == 1 else Call("add", tuple(terms))

        return Complex(lw.statement(f"{node.name}_re", shape, part, real),
                       lw.statement(f"{node.name}_im", shape, part, imag))

    return lower


for _op in ("add", "sub", "mul"):
    for _name in (f"aten.{_op}.Tensor", f"aten.{_op}.Scalar"):
        COMPLEX_RULES[_name] = _complex_binary(_op)
for _name in _PER_PART:
    COMPLEX_RULES[_name] = _per_part(RULES[_name])


@rule("aten.polar.default")
def _polar(lw, node):
    """abs * (cos(angle) + i sin(angle))."""
    shape, part = lw.shape(node), _part_dtype(node)
    r, a = lw.tmpl(node.args[0]), lw.tmpl(node.args[1])

    def build(fn):
        return lambda rs, _: Call("mul", (lw.cast(lw.broadcast_at(r, rs, shape), part),
                                          Call(fn, (lw.cast(lw.broadcast_at(a, rs, shape), part),))))

    return Complex(lw.statement(f"{node.name}_re", shape, part, build("cos")),
                   lw.statement(f"{node.name}_im", shape, part, build("sin")))


@rule("aten.view_as_complex.default")
def _view_as_complex(lw, node):
    x = lw.tmpl(node.args[0])
    shape = lw.shape(node)
    return Complex(*(_remap(lw, x, shape, lambda ph, k=k: list(ph) + [sympy.Integer(k)]) for k in (0, 1)))


@rule("aten.view_as_real.default")
def _view_as_real(lw, node):
    z = lw.values[node.args[0]]
    if not isinstance(z, Complex):
        raise Unsupported("view_as_real of a value einfuse did not lower")
    shape = lw.shape(node)
    ph = [placeholder(d) for d in range(len(shape))]
    last = IndexValue(ph[-1])
    return Tmpl(Call("where", (Call("eq", (last, Const(0))), lw.at(z.re, ph[:-1]), lw.at(z.im, ph[:-1]))),
                shape, z.re.dtype)


def _complex_aware(name: str, fn):
    """`fn` for real values; for a node with a complex operand or result, the complex rule of its op."""
    def lower(lw: Lowerer, node):
        val = node.meta.get("val")
        complex_out = isinstance(val, torch.Tensor) and val.is_complex()
        if not complex_out and not any(isinstance(lw.values.get(a), Complex) for a in node.all_input_nodes):
            return fn(lw, node)
        if name in ("aten.polar.default", "aten.view_as_complex.default", "aten.view_as_real.default", "getitem"):
            return fn(lw, node)
        if name not in COMPLEX_RULES:
            raise Unsupported(f"{name} on complex values")
        return COMPLEX_RULES[name](lw, node)

    return lower


RULES.update({_name: _complex_aware(_name, _fn) for _name, _fn in RULES.items()})

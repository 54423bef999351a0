"""The operator tables: map operators (elementwise) and reduce operators, with their torch meaning,
their result-type rule and how the text writes them. Users extend both with `register_*`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import dtypes as dt
from .dtypes import DType
from .expr import Access, Call, Const, Expr, IndexValue


@dataclass(frozen=True)
class MapOp:
    """An elementwise operator. `rule` picks the result dtype: promote | float | bool | where | cast | same."""

    name: str
    arity: int
    torch_fn: Callable
    rule: str = "promote"
    infix: str | None = None  # printed as `a <infix> b` (or prefix for arity 1) when set
    prec: int = 0  # binding strength of the infix form (higher binds tighter)
    triton: str | None = None  # Triton expression template over {0}, {1}, ...


@dataclass(frozen=True)
class ReduceOp:
    """A reduction: its identity (the value of an empty reduction) and torch meaning over dims."""

    name: str
    identity: float | bool
    torch_fn: Callable  # (tensor, dims) -> tensor
    combine: Callable  # (a, b) -> elementwise combination, for iterative/looped evaluation
    triton: str | None = None


MAP_OPS: dict[str, MapOp] = {}
REDUCE_OPS: dict[str, ReduceOp] = {}


def register_map_op(op: MapOp) -> MapOp:
    """Make a new elementwise operator known to the printer, parser, verifier and evaluator."""
    MAP_OPS[op.name] = op
    return op


def register_reduce_op(op: ReduceOp) -> ReduceOp:
    """Make a new reduction operator known everywhere."""
    REDUCE_OPS[op.name] = op
    return op


# Precedence of infix forms: comparison 1 < additive 2 < multiplicative 3 < unary 4 < atoms 5.
PREC_CMP, PREC_ADD, PREC_MUL, PREC_UNARY, PREC_ATOM = 1, 2, 3, 4, 5

for _name, _fn, _sym, _prec, _rule, _tt in [
    ("add", torch.add, "+", PREC_ADD, "promote", "{0} + {1}"),
    ("sub", torch.sub, "-", PREC_ADD, "promote", "{0} - {1}"),
    ("mul", torch.mul, "*", PREC_MUL, "promote", "{0} * {1}"),
    ("div", torch.true_divide, "/", PREC_MUL, "float", "{0} / {1}"),
    ("floordiv", torch.floor_divide, "//", PREC_MUL, "promote", "{0} // {1}"),
    ("mod", torch.remainder, "%", PREC_MUL, "promote", "{0} % {1}"),
    ("lt", torch.lt, "<", PREC_CMP, "bool", "{0} < {1}"),
    ("le", torch.le, "<=", PREC_CMP, "bool", "{0} <= {1}"),
    ("gt", torch.gt, ">", PREC_CMP, "bool", "{0} > {1}"),
    ("ge", torch.ge, ">=", PREC_CMP, "bool", "{0} >= {1}"),
    ("eq", torch.eq, "==", PREC_CMP, "bool", "{0} == {1}"),
    ("ne", torch.ne, "!=", PREC_CMP, "bool", "{0} != {1}"),
]:
    register_map_op(MapOp(_name, 2, _fn, _rule, _sym, _prec, _tt))

register_map_op(MapOp("neg", 1, torch.neg, "same", "-", PREC_UNARY, "-{0}"))

for _name, _fn, _rule, _tt in [
    ("exp", torch.exp, "float", "tl.exp({0})"),
    ("exp2", torch.exp2, "float", "tl.exp2({0})"),
    ("log", torch.log, "float", "tl.log({0})"),
    ("log2", torch.log2, "float", "tl.log2({0})"),
    ("log1p", torch.log1p, "float", "libdevice.log1p({0})"),
    ("expm1", torch.expm1, "float", "libdevice.expm1({0})"),
    ("sqrt", torch.sqrt, "float", "tl.sqrt({0})"),
    ("rsqrt", torch.rsqrt, "float", "libdevice.rsqrt({0})"),
    ("sin", torch.sin, "float", "tl.sin({0})"),
    ("cos", torch.cos, "float", "tl.cos({0})"),
    ("tan", torch.tan, "float", "libdevice.tan({0})"),
    ("tanh", torch.tanh, "float", "libdevice.tanh({0})"),
    ("erf", torch.erf, "float", "libdevice.erf({0})"),
    ("sigmoid", torch.sigmoid, "float", "tl.sigmoid({0})"),
    ("silu", F.silu, "float", "{0} * tl.sigmoid({0})"),
    ("gelu", F.gelu, "float", "0.5 * {0} * (1.0 + libdevice.erf({0} * 0.7071067811865476))"),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), "float",
     "0.5 * {0} * (1.0 + libdevice.tanh(0.7978845608028654 * ({0} + 0.044715 * {0} * {0} * {0})))"),
    ("reciprocal", torch.reciprocal, "float", "1.0 / {0}"),
    ("abs", torch.abs, "same", "tl.abs({0})"),
    ("relu", torch.relu, "same", "tl.maximum({0}, 0)"),
    ("floor", torch.floor, "same", "tl.floor({0})"),
    ("ceil", torch.ceil, "same", "tl.ceil({0})"),
    ("round", torch.round, "same", "libdevice.nearbyint({0})"),
    ("trunc", torch.trunc, "same", "libdevice.trunc({0})"),
    ("sign", torch.sign, "same", "tl.where({0} > 0, 1, tl.where({0} < 0, -1, 0))"),
    ("not", torch.logical_not, "bool", "{0} == 0"),
    ("isnan", torch.isnan, "bool", "{0} != {0}"),
    ("isinf", torch.isinf, "bool", "tl.abs({0}) == float('inf')"),
    ("bitnot", torch.bitwise_not, "same", "~{0}"),
]:
    register_map_op(MapOp(_name, 1, _fn, _rule, triton=_tt))

for _name, _fn, _rule, _tt in [
    ("max", torch.maximum, "promote", "tl.maximum({0}, {1})"),
    ("min", torch.minimum, "promote", "tl.minimum({0}, {1})"),
    ("pow", torch.pow, "promote", "libdevice.pow({0}, {1})"),
    ("atan2", torch.atan2, "float", "libdevice.atan2({0}, {1})"),
    ("and", torch.logical_and, "bool", "({0} != 0) & ({1} != 0)"),
    ("or", torch.logical_or, "bool", "({0} != 0) | ({1} != 0)"),
    ("xor", torch.logical_xor, "bool", "({0} != 0) ^ ({1} != 0)"),
    ("bitand", torch.bitwise_and, "promote", "{0} & {1}"),
    ("bitor", torch.bitwise_or, "promote", "{0} | {1}"),
    ("bitxor", torch.bitwise_xor, "promote", "{0} ^ {1}"),
    ("shl", torch.bitwise_left_shift, "promote", "{0} << {1}"),
    ("shr", torch.bitwise_right_shift, "promote", "{0} >> {1}"),
]:
    register_map_op(MapOp(_name, 2, _fn, _rule, triton=_tt))

register_map_op(MapOp("where", 3, torch.where, "where", triton="tl.where({0}, {1}, {2})"))
# `cast` prints as the target dtype's name: `f16(x)`; its torch meaning needs the dtype (see evaluator).
register_map_op(MapOp("cast", 1, lambda x: x, "cast", triton="{0}.to({dtype})"))


def _amax(x, dims):
    return torch.amax(x, dim=dims) if dims else x


def _amin(x, dims):
    return torch.amin(x, dim=dims) if dims else x


def _prod(x, dims):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d)
    return x


for _r in [
    ReduceOp("sum", 0, lambda x, d: torch.sum(x, dim=d) if d else x, torch.add, "tl.sum({0}, axis={1})"),
    ReduceOp("max", -math.inf, _amax, torch.maximum, "tl.max({0}, axis={1})"),
    ReduceOp("min", math.inf, _amin, torch.minimum, "tl.min({0}, axis={1})"),
    ReduceOp("prod", 1, _prod, torch.mul, None),
    ReduceOp("any", False, lambda x, d: torch.any(x, dim=d) if d else x, torch.logical_or, "tl.max({0}, axis={1})"),
    ReduceOp("all", True, lambda x, d: torch.all(x, dim=d) if d else x, torch.logical_and, "tl.min({0}, axis={1})"),
]:
    register_reduce_op(_r)


# ---------------------------------------------------------------- result types

class TypeRuleError(TypeError):
    """An expression whose operand types the rule cannot combine."""


def _promote_all(infos: list[tuple[DType, bool]]) -> tuple[DType, bool]:
    """Torch's promotion with weak (Python-scalar-like) operands: they only lift the category."""
    strong = [d for d, weak in infos if not weak]
    if not strong:
        best = max((d for d, _ in infos), key=lambda d: dt.category_rank(d.category))
        return best, True
    out = strong[0]
    for d in strong[1:]:
        out = dt.promote(out, d)
    for d, weak in infos:
        if weak and dt.category_rank(d.category) > dt.category_rank(out.category):
            out = dt.DEFAULT_FOR_CATEGORY[d.category]
    return out, False


def infer(e: Expr, tensor_dtype: Callable[[str], DType]) -> tuple[DType, bool]:
    """The dtype of `e` and whether it is weak (made only of literals), given the dtypes of tensors."""
    if isinstance(e, Const):
        return dt.DEFAULT_FOR_CATEGORY[e.category], True
    if isinstance(e, IndexValue):
        return dt.i64, False
    if isinstance(e, Access):
        d = tensor_dtype(e.tensor)
        return _logical(d), False
    if isinstance(e, Call):
        op = MAP_OPS.get(e.op)
        if op is None:
            raise TypeRuleError(f"unknown map operator {e.op!r}")
        if e.op == "cast":
            return e.attr, False
        infos = [infer(a, tensor_dtype) for a in e.args]
        if op.rule == "bool":
            return dt.bool_, all(w for _, w in infos)
        if op.rule == "where":
            return _promote_all(infos[1:])
        d, weak = _promote_all(infos)
        if op.rule == "float" and not d.is_float:
            return dt.f32, weak
        return d, weak
    raise TypeRuleError(f"not an expression: {e!r}")


def _logical(d: DType) -> DType:
    """Values read from a packed tensor are its unpacked integer type."""
    if d.packed:
        return dt.i8 if d.signed else dt.u8
    return d


def dtype_of(e: Expr, tensor_dtype: Callable[[str], DType]) -> DType:
    return infer(e, tensor_dtype)[0]

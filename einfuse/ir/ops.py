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


@dataclass(frozen=True)
class ReduceOp:
    """A reduction: its identity (the value of an empty reduction) and torch meaning over dims."""

    name: str
    identity: float | bool
    torch_fn: Callable  # (tensor, dims) -> tensor
    combine: Callable  # (a, b) -> elementwise combination, for iterative/looped evaluation


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

for _name, _fn, _sym, _prec, _rule in [
    ("add", torch.add, "+", PREC_ADD, "promote"),
    ("sub", torch.sub, "-", PREC_ADD, "promote"),
    ("mul", torch.mul, "*", PREC_MUL, "promote"),
    ("div", torch.true_divide, "/", PREC_MUL, "float"),
    ("floordiv", torch.floor_divide, "//", PREC_MUL, "promote"),
    ("mod", torch.remainder, "%", PREC_MUL, "promote"),
    ("lt", torch.lt, "<", PREC_CMP, "bool"),
    ("le", torch.le, "<=", PREC_CMP, "bool"),
    ("gt", torch.gt, ">", PREC_CMP, "bool"),
    ("ge", torch.ge, ">=", PREC_CMP, "bool"),
    ("eq", torch.eq, "==", PREC_CMP, "bool"),
    ("ne", torch.ne, "!=", PREC_CMP, "bool"),
]:
    register_map_op(MapOp(_name, 2, _fn, _rule, _sym, _prec))

register_map_op(MapOp("neg", 1, torch.neg, "same", "-", PREC_UNARY))

for _name, _fn, _rule in [
    ("exp", torch.exp, "float"),
    ("exp2", torch.exp2, "float"),
    ("log", torch.log, "float"),
    ("log2", torch.log2, "float"),
    ("log1p", torch.log1p, "float"),
    ("expm1", torch.expm1, "float"),
    ("sqrt", torch.sqrt, "float"),
    ("rsqrt", torch.rsqrt, "float"),
    ("sin", torch.sin, "float"),
    ("cos", torch.cos, "float"),
    ("tan", torch.tan, "float"),
    ("tanh", torch.tanh, "float"),
    ("erf", torch.erf, "float"),
    ("sigmoid", torch.sigmoid, "float"),
    ("silu", F.silu, "float"),
    ("gelu", F.gelu, "float"),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), "float"),
    ("reciprocal", torch.reciprocal, "float"),
    ("abs", torch.abs, "same"),
    ("relu", torch.relu, "same"),
    ("floor", torch.floor, "same"),
    ("ceil", torch.ceil, "same"),
    ("round", torch.round, "same"),
    ("trunc", torch.trunc, "same"),
    ("sign", torch.sign, "same"),
    ("not", torch.logical_not, "bool"),
    ("isnan", torch.isnan, "bool"),
    ("isinf", torch.isinf, "bool"),
    ("bitnot", torch.bitwise_not, "same"),
]:
    register_map_op(MapOp(_name, 1, _fn, _rule))

for _name, _fn, _rule in [
    ("max", torch.maximum, "promote"),
    ("min", torch.minimum, "promote"),
    ("pow", torch.pow, "promote"),
    ("atan2", torch.atan2, "float"),
    ("and", torch.logical_and, "bool"),
    ("or", torch.logical_or, "bool"),
    ("xor", torch.logical_xor, "bool"),
    ("bitand", torch.bitwise_and, "promote"),
    ("bitor", torch.bitwise_or, "promote"),
    ("bitxor", torch.bitwise_xor, "promote"),
    ("shl", torch.bitwise_left_shift, "promote"),
    ("shr", torch.bitwise_right_shift, "promote"),
]:
    register_map_op(MapOp(_name, 2, _fn, _rule))

register_map_op(MapOp("where", 3, torch.where, "where"))
# `cast` prints as the target dtype's name: `f16(x)`; its torch meaning needs the dtype (see evaluator).
register_map_op(MapOp("cast", 1, lambda x: x, "cast"))


def _amax(x, dims):
    return torch.amax(x, dim=dims) if dims else x


def _amin(x, dims):
    return torch.amin(x, dim=dims) if dims else x


def _prod(x, dims):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d)
    return x


for _r in [
    ReduceOp("sum", 0, lambda x, d: torch.sum(x, dim=d) if d else x, torch.add),
    ReduceOp("max", -math.inf, _amax, torch.maximum),
    ReduceOp("min", math.inf, _amin, torch.minimum),
    ReduceOp("prod", 1, _prod, torch.mul),
    ReduceOp("any", False, lambda x, d: torch.any(x, dim=d) if d else x, torch.logical_or),
    ReduceOp("all", True, lambda x, d: torch.all(x, dim=d) if d else x, torch.logical_and),
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

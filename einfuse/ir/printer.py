"""Module -> text: one statement per line, every tensor's type at its definition (see docs/ir.md)."""
from __future__ import annotations

import math
import re

import sympy
import torch

from . import index as ix
from .expr import Access, Call, Const, Expr, IndexValue
from .module import Input, Iterate, Kernel, Module, Opaque, Reduce, Statement, TensorRef, TensorType, Update
from .ops import MAP_OPS, PREC_ADD, PREC_ATOM, PREC_MUL, PREC_UNARY

_INDEX_PREC = {1: PREC_ADD, 2: PREC_MUL, 3: PREC_UNARY, 4: PREC_ATOM}


def nonfinite(v) -> str | None:
    """"nan", "inf" or "-inf" for a non-finite float (each target spells them its own way), else None."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
    return None


def fmt_const(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return nonfinite(v) or (repr(v) if isinstance(v, float) else str(v))


def _prec(e: Expr) -> int:
    if isinstance(e, Const):
        return PREC_UNARY if (not isinstance(e.value, bool) and (e.value < 0 or fmt_const(e.value).startswith("-"))) else PREC_ATOM
    if isinstance(e, IndexValue):
        return _INDEX_PREC[ix.precedence(e.expr)]
    if isinstance(e, Call):
        op = MAP_OPS.get(e.op)
        if op is not None and op.infix:
            return PREC_UNARY if op.arity == 1 else op.prec
    return PREC_ATOM


def _same(name: str) -> str:
    return name


def fmt_expr(e: Expr, rename=_same) -> str:
    """An expression as text, with the fewest parentheses that parse back to the same tree; tensor names
    written as `rename(name)`."""
    if isinstance(e, Const):
        return fmt_const(e.value)
    if isinstance(e, IndexValue):
        return ix.to_str(e.expr)
    if isinstance(e, Access):
        return f"{rename(e.tensor)}[{', '.join(fmt_pos(p, rename) for p in e.indices)}]"
    if isinstance(e, Call):
        op = MAP_OPS.get(e.op)
        if e.op == "cast":
            return f"{e.attr.name}({fmt_expr(e.args[0], rename)})"
        if op is not None and op.infix and op.arity == 2:
            left, right = e.args
            ls = fmt_expr(left, rename)
            rs = fmt_expr(right, rename)
            if _prec(left) < op.prec:
                ls = f"({ls})"
            if _prec(right) <= op.prec:
                rs = f"({rs})"
            return f"{ls} {op.infix} {rs}"
        if op is not None and op.infix and op.arity == 1:
            s = fmt_expr(e.args[0], rename)
            return f"{op.infix}({s})" if _prec(e.args[0]) < PREC_UNARY or s.startswith("-") else f"{op.infix}{s}"
        return f"{e.op}({', '.join(fmt_expr(a, rename) for a in e.args)})"
    raise TypeError(f"cannot print {e!r}")


def fmt_pos(p, rename=_same) -> str:
    return fmt_expr(p, rename) if isinstance(p, Expr) else ix.to_str(p)


def fmt_type(t: TensorType) -> str:
    return f"{t.dtype.name}[{', '.join(ix.to_str(s) for s in t.shape)}]"


def fmt_reduce(r: Reduce) -> str:
    return f"{r.op}[{', '.join(f'{s}:{ix.to_str(n)}' for s, n in r.ranks)}] "


def fmt_iterate(it: Iterate) -> str:
    return f"iterate[{it.rank}:{ix.to_str(it.extent)}, init={fmt_const(it.init.value)}] "


def fmt_statement(s: Statement, rename=_same) -> str:
    head = f"{rename(s.name)}[{', '.join(ix.to_str(p) for p in s.index)}]: {fmt_type(s.type)} = "
    prefix = (fmt_reduce(s.reduce) if s.reduce else "") + (fmt_iterate(s.iterate) if s.iterate else "")
    return head + prefix + fmt_expr(s.expr, rename) + _fmt_loc(s.loc)


def _fmt_loc(loc: str | None) -> str:
    return f"  # {loc}" if loc else ""


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if c.isprintable():
        return c
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def fmt_string(v: str) -> str:
    """A quoted string; line breaks and other unprintables are escaped so a statement stays on one line."""
    return '"' + "".join(_escape(c) for c in v) + '"'


_PLAIN_TARGET = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def fmt_target(target: str) -> str:
    """`aten.topk.default` bare; anything else (`"module:function"`) quoted so it parses back."""
    return target if _PLAIN_TARGET.fullmatch(target) else fmt_string(target)


def fmt_arg(v, rename=_same) -> str:
    """Opaque-call arguments: literals, tensor names, lists, and torch enum values by qualified name."""
    if isinstance(v, TensorRef):
        return rename(v.name)
    if v is None:
        return "none"
    if isinstance(v, (bool, int, float)):
        return fmt_const(v)
    if isinstance(v, str):
        return fmt_string(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(fmt_arg(x, rename) for x in v) + "]"
    if isinstance(v, torch.device):
        return f'device("{v}")'
    if isinstance(v, (torch.dtype, torch.layout, torch.memory_format)):
        return str(v) if str(v).startswith("torch.") else f"torch.{v}"
    if isinstance(v, sympy.Expr):
        return "{" + ix.to_str(v) + "}"
    raise TypeError(f"opaque argument {v!r} of type {type(v).__name__} has no text form")


def fmt_opaque(o: Opaque, rename=_same) -> str:
    """`outs = opaque target(args)`; a collective is written by its kind: `x: T = all_reduce(y, ...)`."""
    from .collective import is_collective_target

    outs = ", ".join(f"{rename(n)}: {fmt_type(t)}" for n, t in o.outputs_typed)
    args = [fmt_arg(a, rename) for a in o.args] + [f"{k}={fmt_arg(v, rename)}" for k, v in o.kwargs]
    callee = o.target.rsplit(":", 1)[1] if is_collective_target(o.target) else f"opaque {fmt_target(o.target)}"
    return f"{outs} = {callee}({', '.join(args)})" + _fmt_loc(o.loc)


def fmt_update(u: Update, rename=_same) -> str:
    """`name = target[index] <- expr for r:n, ...`"""
    ranks = ", ".join(f"{r}:{ix.to_str(n)}" for r, n in u.ranks)
    return (f"{rename(u.name)} = {rename(u.target)}[{', '.join(fmt_pos(p, rename) for p in u.index)}] <- "
            f"{fmt_expr(u.expr, rename)} for {ranks}" + _fmt_loc(u.loc))


def fmt_op(op, rename=_same) -> str:
    """A body entry (statement, update or opaque call) as its line, without indentation."""
    if isinstance(op, Statement):
        return fmt_statement(op, rename)
    return fmt_update(op, rename) if isinstance(op, Update) else fmt_opaque(op, rename)


def fmt_kernel(k: Kernel, rename=_same) -> str:
    attrs = "".join(f" {key}={fmt_arg(v)}" for key, v in k.attrs)
    members = [f"{r}={rename(n)}" if r else rename(n) for n, r in zip(k.members, k.roles or ("",) * len(k.members))]
    return f"kernel {rename(k.name)} {k.kind} {{{', '.join(members)}}}{attrs}"


def fmt_input(i: Input) -> str:
    return f"{i.kind} {i.name}: {fmt_type(i.type)}"


def header_lines(m: Module) -> list:
    """The module line, sizes and inputs."""
    lines = [f"module {m.name}"]
    hints = dict(m.size_hints)
    for s in m.sizes:
        lines.append(f"  size {s}" + (f" hint {hints[s]}" if s in hints else ""))
    return lines + [f"  {fmt_input(i)}" for i in m.inputs]


def print_module(m: Module) -> str:
    lines = header_lines(m)
    lines += ["  " + fmt_op(op) for op in m.body]
    lines += [f"  {fmt_kernel(k)}" for k in m.kernels]
    lines.append(f"  out {', '.join(m.outputs)}")
    return "\n".join(lines) + "\n"

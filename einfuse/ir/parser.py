"""Text -> Module, the inverse of the printer. A hand-written recursive-descent parser: it never evals."""
from __future__ import annotations

import re
from dataclasses import dataclass

import sympy
import torch

from . import dtypes as dt
from . import index as ix
from .collective import KINDS as COLLECTIVES
from .collective import as_collective
from .expr import Access, Call, Const, Expr, IndexValue, canonical
from .module import INPUT_KINDS, Input, Iterate, Kernel, Module, Opaque, Reduce, Statement, TensorRef, TensorType, Update
from .ops import MAP_OPS, PREC_ADD, PREC_CMP, PREC_MUL, PREC_UNARY, REDUCE_OPS, TypeRuleError, infer



class ParseError(ValueError):
    """A malformed IR text; the message names the line and column and shows the line."""

    def __init__(self, msg: str, line: int, col: int, text: str):
        caret = " " * (col - 1) + "^"
        super().__init__(f"line {line}, column {col}: {msg}\n    {text}\n    {caret}")
        self.line, self.col = line, col


@dataclass
class Tok:
    kind: str  # NAME NUMBER STRING OP COMMENT END
    value: str
    col: int


_TOKEN = re.compile(
    r"(?P<ws>[ \t]+)"
    r"|(?P<COMMENT>#.*)"
    r"|(?P<NUMBER>\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)"
    r"|(?P<NAME>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)"
    r'|(?P<STRING>"(?:[^"\\]|\\.)*")'
    r"|(?P<OP>//|<=|>=|==|!=|[-+*/%<>()\[\]{},:=~])"
)

_BINARY = {
    "+": ("add", PREC_ADD), "-": ("sub", PREC_ADD), "*": ("mul", PREC_MUL), "/": ("div", PREC_MUL),
    "//": ("floordiv", PREC_MUL), "%": ("mod", PREC_MUL),
    "<": ("lt", PREC_CMP), "<=": ("le", PREC_CMP), ">": ("gt", PREC_CMP), ">=": ("ge", PREC_CMP),
    "==": ("eq", PREC_CMP), "!=": ("ne", PREC_CMP),
}
_KEYWORD_CONSTS = {"inf": float("inf"), "nan": float("nan"), "true": True, "false": False}


class _Line:
    """Tokens of one line with a cursor; every error it raises points into the line."""

    def __init__(self, text: str, lineno: int):
        self.text, self.lineno = text, lineno
        self.toks: list[Tok] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise ParseError(f"unexpected character {text[pos]!r}", lineno, pos + 1, text)
            if m.lastgroup != "ws":
                self.toks.append(Tok(m.lastgroup, m.group(), pos + 1))
            pos = m.end()
        self.toks.append(Tok("END", "", len(text) + 1))
        self.i = 0

    def peek(self, k: int = 0) -> Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> Tok:
        t = self.peek()
        self.i += 1
        return t

    def error(self, msg: str, tok: Tok | None = None):
        tok = tok or self.peek()
        raise ParseError(msg, self.lineno, tok.col, self.text)

    def expect(self, value: str) -> Tok:
        t = self.peek()
        if t.value != value or t.kind in ("STRING", "COMMENT"):
            self.error(f"expected {value!r} but found {_describe(t)}")
        return self.next()

    def accept(self, value: str) -> bool:
        t = self.peek()
        if t.value == value and t.kind in ("OP", "NAME"):
            self.i += 1
            return True
        return False

    def name(self, what: str = "a name") -> str:
        t = self.peek()
        if t.kind != "NAME":
            self.error(f"expected {what} but found {_describe(t)}")
        return self.next().value

    def end(self) -> str | None:
        """Finish the line, returning a trailing comment's text (a statement's source location)."""
        t = self.peek()
        loc = None
        if t.kind == "COMMENT":
            loc = t.value[1:].strip() or None
            self.i += 1
        if self.peek().kind != "END":
            self.error(f"unexpected {_describe(self.peek())} at the end of the line")
        return loc


def _describe(t: Tok) -> str:
    return "the end of the line" if t.kind == "END" else repr(t.value)


class _ExprParser:
    """Pratt parser for value expressions; `resolve(name)` gives the sympy symbol of a rank or size."""

    def __init__(self, line: _Line, resolve, dtype_of=None):
        self.l, self.resolve = line, resolve
        self.dtype_of = dtype_of or (lambda name: None)  # tensor name -> DType, None when not yet known

    def parse(self, min_prec: int = 0) -> Expr:
        left = self.prefix()
        while True:
            t = self.l.peek()
            if t.kind != "OP" or t.value not in _BINARY:
                return left
            op, prec = _BINARY[t.value]
            if prec < min_prec:
                return left
            self.l.next()
            right = self.parse(prec + 1)
            left = canonical(Call(op, (left, right)))

    def prefix(self) -> Expr:
        t = self.l.next()
        if t.kind == "NUMBER":
            return Const(_number(t.value))
        if t.kind == "OP" and t.value == "-":
            return canonical(Call("neg", (self.parse(PREC_UNARY),)))
        if t.kind == "OP" and t.value == "(":
            e = self.parse()
            self.l.expect(")")
            return e
        if t.kind != "NAME":
            self.l.error(f"expected an expression but found {_describe(t)}", t)
        name = t.value
        nxt = self.l.peek()
        if nxt.value == "[" and nxt.kind == "OP":
            return self.access(name)
        if nxt.value == "(" and nxt.kind == "OP":
            return self.call(name, t)
        if name in _KEYWORD_CONSTS:
            return Const(_KEYWORD_CONSTS[name])
        sym = self.resolve(name)
        if sym is None:
            self.l.error(f"unknown name {name!r}: not a rank or size of this statement (a tensor needs [...])", t)
        return IndexValue(sym)

    def access(self, name: str) -> Access:
        self.l.expect("[")
        pos = []
        if not self.l.accept("]"):
            while True:
                tok = self.l.peek()
                e = self.parse()
                pos.append(self.position(e, tok))
                if self.l.accept("]"):
                    break
                self.l.expect(",")
        return Access(name, tuple(pos))

    def position(self, e: Expr, tok: Tok):
        """An access position: index arithmetic, or a gather whose values must be integers."""
        if isinstance(e, IndexValue):
            return e.expr
        if isinstance(e, Const) and type(e.value) is int:
            return sympy.Integer(e.value)

        def dtype(name):
            d = self.dtype_of(name)
            if d is None:
                raise KeyError(name)
            return d

        try:
            d = infer(e, dtype)[0]
        except (KeyError, TypeRuleError):  # a tensor defined later: the verifier reports it
            return e
        if d.category != "int":
            self.l.error(f"an index must be an integer, got a {d} expression", tok)
        return e

    def call(self, name: str, tok: Tok) -> Expr:
        self.l.expect("(")
        args = []
        if not self.l.accept(")"):
            while True:
                args.append(self.parse())
                if self.l.accept(")"):
                    break
                self.l.expect(",")
        if dt.is_dtype_name(name):
            if len(args) != 1:
                self.l.error(f"a cast to {name} takes one argument, got {len(args)}", tok)
            return Call("cast", (args[0],), dt.by_name(name))
        op = MAP_OPS.get(name)
        if op is None:
            self.l.error(f"unknown operator {name!r}", tok)
        if len(args) != op.arity:
            self.l.error(f"{name} takes {op.arity} argument(s), got {len(args)}", tok)
        return canonical(Call(name, tuple(args)))


def _number(s: str):
    return float(s) if any(c in s for c in ".eE") else int(s)


def _index(line: _Line, resolve) -> sympy.Expr:
    tok = line.peek()
    e = _ExprParser(line, resolve).parse()
    if isinstance(e, Const) and type(e.value) is int:
        return sympy.Integer(e.value)
    if not isinstance(e, IndexValue):
        line.error("expected index arithmetic (ranks, sizes, integers, + - * // %)", tok)
    return e.expr


class _ModuleParser:
    def __init__(self, text: str):
        self.text = text
        self.sizes: dict[str, sympy.Symbol] = {}
        self.hints: list = []
        self.inputs: list[Input] = []
        self.body: list = []
        self.outputs: tuple = ()
        self.kernels: list = []
        self.name: str | None = None

    def dtypes(self) -> dict:
        """Element types of the tensors defined so far."""
        out = {i.name: i.type.dtype for i in self.inputs}
        for op in self.body:
            if isinstance(op, Update):
                out[op.name] = out.get(op.target)
            else:
                out.update({n: t.dtype for n, t in (op.outputs_typed if isinstance(op, Opaque)
                                                    else [(op.name, op.type)])})
        return out

    def size_only(self, name):
        return self.sizes.get(name)

    def parse(self) -> Module:
        for lineno, raw in enumerate(self.text.splitlines(), 1):
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                continue
            line = _Line(raw, lineno)
            if self.name is None:
                if line.peek().value != "module":
                    line.error("a module starts with `module <name>`")
                line.next()
                self.name = line.name("the module's name")
                line.end()
                continue
            self.line(line)
        if self.name is None:
            raise ParseError("empty text: a module starts with `module <name>`", 1, 1, "")
        return Module(self.name, self.inputs, self.body, self.outputs, tuple(self.sizes.values()), self.hints,
                      tuple(self.kernels))

    def line(self, line: _Line):
        first, second = line.peek(), line.peek(1)
        word = first.value if first.kind == "NAME" else None
        if word == "size" and second.kind == "NAME":
            line.next()
            name = line.name("a size name")
            self.sizes[name] = ix.size(name)
            if line.accept("hint"):
                t = line.next()
                if t.kind != "NUMBER" or not t.value.isdigit():
                    line.error("a size hint is an integer", t)
                self.hints.append((self.sizes[name], int(t.value)))
            line.end()
        elif word in INPUT_KINDS and second.kind == "NAME":
            line.next()
            name = line.name()
            line.expect(":")
            self.inputs.append(Input(name, self.type(line), word))
            line.end()
        elif word == "kernel" and second.kind == "NAME" and line.peek(2).kind == "NAME":
            self.kernels.append(self.kernel(line))
        elif word == "out" and second.kind == "NAME":
            line.next()
            names = [line.name("an output name")]
            while line.accept(","):
                names.append(line.name("an output name"))
            self.outputs = tuple(names)
            line.end()
        elif first.kind == "NAME" and second.value == "=" and line.peek(2).kind == "NAME" and line.peek(3).value == "[":
            self.body.append(self.update(line))
        elif first.kind == "NAME" and second.value == "[":
            self.body.append(self.statement(line))
        elif first.kind == "NAME" and second.value == ":":
            self.body.append(self.opaque(line))
        else:
            line.error("expected a declaration (size/in/param/buffer/const/out), a statement or an opaque call")

    def kernel(self, line: _Line) -> Kernel:
        """`kernel NAME KIND {member, ...} key=value ...`"""
        line.next()
        name = line.name("the kernel's name")
        kind = line.name("the kernel's kind")
        line.expect("{")
        members, roles = [], []
        while True:
            first = line.name("a statement name (or role=statement)")
            if line.accept("="):
                roles.append(first)
                members.append(line.name("a statement name"))
            else:
                roles.append("")
                members.append(first)
            if not line.accept(","):
                break
        line.expect("}")
        attrs = []
        while line.peek().kind == "NAME":
            key = line.name()
            line.expect("=")
            attrs.append((key, self.literal(line)))
        line.end()
        return Kernel(name, kind, tuple(members), tuple(attrs), tuple(roles) if any(roles) else ())

    def type(self, line: _Line) -> TensorType:
        tok = line.peek()
        name = line.name("a dtype")
        if not dt.is_dtype_name(name):
            line.error(f"unknown dtype {name!r}", tok)
        line.expect("[")
        shape = []
        if not line.accept("]"):
            while True:
                shape.append(_index(line, self.size_only))
                if line.accept("]"):
                    break
                line.expect(",")
        return TensorType(dt.by_name(name), tuple(shape))

    def statement(self, line: _Line) -> Statement:
        name = line.name()
        line.expect("[")
        ranks: dict[str, sympy.Symbol] = {}

        def bind(n):
            return self.sizes.get(n) or ranks.setdefault(n, ix.rank(n))

        index = []
        if not line.accept("]"):
            while True:
                index.append(_index(line, bind))
                if line.accept("]"):
                    break
                line.expect(",")
        line.expect(":")
        typ = self.type(line)
        line.expect("=")
        reduce = iterate = None
        head, nxt = line.peek(), line.peek(2)
        if head.kind == "NAME" and line.peek(1).value == "[" and nxt.kind == "NAME" and line.peek(3).value == ":":
            if head.value == "iterate":
                iterate = self.iterate(line, ranks)
            else:
                reduce = self.reduce(line, ranks)
        known = self.dtypes()
        known[name] = typ.dtype  # an iterative statement reads itself
        expr = _ExprParser(line, lambda n: self.sizes.get(n) or ranks.get(n), known.get).parse()
        loc = line.end()
        return Statement(name, typ, tuple(index), expr, reduce, iterate, loc)

    def update(self, line: _Line) -> Update:
        """`name = target[index] <- expr for r:n, ...`: index positions may be gathers; every name there
        that is no size is a rank, declared with its extent after `for`."""
        name = line.name()
        line.expect("=")
        target = line.name("the state to write into")
        ranks: dict[str, sympy.Symbol] = {}

        def bind(n):
            return self.sizes.get(n) or ranks.setdefault(n, ix.rank(n))

        known = self.dtypes()
        line.expect("[")
        index = []
        while True:
            tok = line.peek()
            e = _ExprParser(line, bind, known.get).parse()
            index.append(_ExprParser(line, bind, known.get).position(e, tok))
            if line.accept("]"):
                break
            line.expect(",")
        line.expect("<")
        line.expect("-")
        expr = _ExprParser(line, bind, known.get).parse()
        line.expect("for")
        extents = []
        while True:
            rtok = line.peek()
            r = line.name("a rank name")
            line.expect(":")
            extents.append((bind(r), _index(line, self.size_only)))
            if r in self.sizes:
                line.error(f"{r!r} is a size; it cannot name a rank", rtok)
            if not line.accept(","):
                break
        declared = {str(r) for r, _ in extents}
        missing = sorted(set(ranks) - declared)
        if missing:
            line.error(f"rank(s) {', '.join(missing)} of the update have no extent (add `{missing[0]}:N` after `for`)")
        loc = line.end()
        return Update(name, target, tuple(index), tuple(extents), expr, loc)

    def reduce(self, line: _Line, ranks: dict) -> Reduce:
        tok = line.peek()
        op = line.name()
        if op not in REDUCE_OPS:
            line.error(f"unknown reduce operator {op!r}; known: {', '.join(REDUCE_OPS)}", tok)
        line.expect("[")
        rs = []
        while True:
            rtok = line.peek()
            r = line.name("a rank name")
            if r in ranks:
                line.error(f"rank {r!r} is already an output rank of this statement", rtok)
            line.expect(":")
            ext = _index(line, self.size_only)
            ranks[r] = ix.rank(r)
            rs.append((ranks[r], ext))
            if line.accept("]"):
                break
            line.expect(",")
        return Reduce(op, tuple(rs))

    def iterate(self, line: _Line, ranks: dict) -> Iterate:
        line.name()
        line.expect("[")
        r = line.name("the iterated rank")
        line.expect(":")
        ext = _index(line, self.size_only)
        line.expect(",")
        line.expect("init")
        line.expect("=")
        tok = line.peek()
        init = _ExprParser(line, lambda n: None).parse()
        if not isinstance(init, Const):
            line.error("init must be a literal", tok)
        line.expect("]")
        ranks.setdefault(r, ix.rank(r))
        return Iterate(ranks[r], ext, init)

    def opaque(self, line: _Line) -> Opaque:
        outs = []
        while True:
            n = line.name("an output name")
            line.expect(":")
            outs.append((n, self.type(line)))
            if not line.accept(","):
                break
        line.expect("=")
        if line.peek().value in COLLECTIVES and line.peek(1).value == "(":  # `x: T = all_reduce(y, ...)`
            target = f"einfuse.ir.collective:{line.next().value}"
        else:
            line.expect("opaque")
            t = line.next()
            if t.kind not in ("NAME", "STRING"):
                line.error("expected the callee (`aten.op.overload` or \"module:function\")", t)
            target = t.value if t.kind == "NAME" else _unquote(t.value)
        line.expect("(")
        args, kwargs = [], []
        if not line.accept(")"):
            while True:
                if line.peek().kind == "NAME" and line.peek(1).value == "=":
                    k = line.name()
                    line.expect("=")
                    kwargs.append((k, self.literal(line)))
                else:
                    args.append(self.literal(line))
                if line.accept(")"):
                    break
                line.expect(",")
        loc = line.end()
        return as_collective(Opaque(tuple(outs), target, tuple(args), tuple(kwargs), loc))

    def literal(self, line: _Line):
        t = line.next()
        if t.kind == "NUMBER":
            return _number(t.value)
        if t.kind == "OP" and t.value == "-":
            v = self.literal(line)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                line.error("`-` must be followed by a number", t)
            return -v
        if t.kind == "STRING":
            return _unquote(t.value)
        if t.kind == "OP" and t.value == "[":
            items = []
            if not line.accept("]"):
                while True:
                    items.append(self.literal(line))
                    if line.accept("]"):
                        break
                    line.expect(",")
            return tuple(items)
        if t.kind == "OP" and t.value == "{":
            e = _index(line, self.size_only)
            line.expect("}")
            return e
        if t.kind == "NAME":
            if t.value in _KEYWORD_CONSTS:
                return _KEYWORD_CONSTS[t.value]
            if t.value == "none":
                return None
            if t.value == "device":
                line.expect("(")
                s = line.next()
                if s.kind != "STRING":
                    line.error("device(...) takes a string", s)
                line.expect(")")
                try:
                    return torch.device(_unquote(s.value))
                except RuntimeError as exc:
                    line.error(f"bad device: {exc}", s)
            if t.value.startswith("torch."):
                return _torch_enum(t.value, line, t)
            return TensorRef(t.value)
        line.error(f"expected an argument but found {_describe(t)}", t)


_UNESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _unescape(m: re.Match) -> str:
    code = m.group(1)
    if code[0] in "uU" and len(code) > 1:
        return chr(int(code[1:], 16))
    return _UNESCAPES.get(code, code)


def _unquote(s: str) -> str:
    """The inverse of the printer's `fmt_string`."""
    return re.sub(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", _unescape, s[1:-1])


def _torch_enum(path: str, line: _Line, tok: Tok):
    obj = torch
    for part in path.split(".")[1:]:
        obj = getattr(obj, part, None)
    if not isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
        line.error(f"{path} is not a torch dtype, layout or memory format", tok)
    return obj


def parse_index(text: str) -> sympy.Expr:
    """Index arithmetic over size symbols, e.g. a kernel grid `(S*64 + 63) // 64`."""
    line = _Line(text, 1)
    e = _index(line, ix.size)
    line.end()
    return e


def parse(text: str) -> Module:
    """Parse IR text (as printed by `str(module)`) back into a Module."""
    return _ModuleParser(text).parse()

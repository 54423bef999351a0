"""Expressions to Triton code inside a tile: the one place IR operators, dtypes and index arithmetic get
their Triton form. Every kind emits its statements' expressions through a `Tile`.

A Tile binds ranks to Triton variables (`i`, `rows`, ...) and ragged ranks to masks; `value(expr)` emits
the code computing `expr` over the tile into the tile's block and returns (name, IR dtype). Loads are
masked where an index may leave its tensor; whatever does not depend on a loop's ranks is computed once
by the tile before the loop (`hoist`); values a kernel keeps in registers are passed in as `held`.
16-bit floats are loaded, computed in f32 and rounded on store (the interpreter cannot compute on them,
and a GPU computes their transcendental functions in f32 anyway); a `bf16(x)` cast rounds explicitly.
"""
from __future__ import annotations

import math
from typing import Callable

import sympy
from sympy.printing.str import StrPrinter

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.expr import Access, Call, Const, Expr, IndexValue, accesses, index_symbols
from ..ir.ops import MAP_OPS, infer
from ..ir.printer import nonfinite

TL = {"f64": "tl.float64", "f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16",
      "f8e4m3": "tl.float8e4nv", "f8e5m2": "tl.float8e5", "i64": "tl.int64", "i32": "tl.int32",
      "i16": "tl.int16", "i8": "tl.int8", "u8": "tl.uint8", "bool": "tl.int1", "i4": "tl.int8", "u4": "tl.uint8"}

# Triton forms of map operators; `{0}`, `{1}` are operand names. `register_triton_op` adds one.
TRITON_OPS = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "{0} / {1}",
    "lt": "{0} < {1}", "le": "{0} <= {1}", "gt": "{0} > {1}", "ge": "{0} >= {1}", "eq": "{0} == {1}",
    "ne": "{0} != {1}", "neg": "-{0}",
    "exp": "tl.exp({0})", "exp2": "tl.exp2({0})", "log": "tl.log({0})", "log2": "tl.log2({0})",
    "sqrt": "tl.sqrt({0})", "rsqrt": "tl.math.rsqrt({0})", "sin": "tl.sin({0})", "cos": "tl.cos({0})",
    "erf": "tl.math.erf({0})", "sigmoid": "tl.sigmoid({0})", "silu": "{0} * tl.sigmoid({0})",
    "gelu": "0.5 * {0} * (1.0 + tl.math.erf({0} * 0.7071067811865476))",
    "gelu_tanh": "0.5 * {0} * (1.0 + libm.tanh(0.7978845608028654 * ({0} + 0.044715 * {0} * {0} * {0})))",
    "tanh": "libm.tanh({0})", "log1p": "libm.log1p({0})", "expm1": "libm.expm1({0})", "tan": "libm.tan({0})",
    "atan2": "libm.atan2({0}, {1})", "reciprocal": "1.0 / {0}", "abs": "tl.abs({0})",
    "relu": "tl.maximum({0}, 0)", "floor": "tl.floor({0})", "ceil": "tl.ceil({0})",
    "round": "libm.nearbyint({0})", "trunc": "libm.trunc({0})",
    "sign": "tl.where({0} > 0, 1, tl.where({0} < 0, -1, 0)).to({0}.dtype)",
    "max": "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
    "min": "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
    "and": "{0} & {1}", "or": "{0} | {1}", "xor": "{0} ^ {1}", "not": "{0} == 0",
    "bitand": "{0} & {1}", "bitor": "{0} | {1}", "bitxor": "{0} ^ {1}", "bitnot": "~{0}",
    "shl": "{0} << {1}", "shr": "{0} >> {1}",
    "isnan": "{0} != {0}", "isinf": "tl.abs({0}) == float('inf')",
    "where": "tl.where({0}, {1}, {2})",
    # floor semantics of torch on signed values (Triton's // and % truncate like C)
    "floordiv": "tl.where((({0} % {1}) != 0) & (({0} < 0) != ({1} < 0)), {0} // {1} - 1, {0} // {1})",
    "mod": "tl.where((({0} % {1}) != 0) & (({0} < 0) != ({1} < 0)), {0} % {1} + {1}, {0} % {1})",
}
_BOOL_ARGS = {"and", "or", "xor"}


def register_triton_op(name: str, template: str) -> None:
    """The Triton form of a map operator registered with `einfuse.ir.ops.register_map_op`: a format string
    over its operands, e.g. `register_triton_op("softplus", "tl.log(1 + tl.exp({0}))")`."""
    TRITON_OPS[name] = template


def compute_dtype(d: dt.DType) -> dt.DType:
    """The type a kernel computes a value in: 16- and 8-bit floats widen to f32."""
    return dt.f32 if d.is_float and d.bits < 32 else (dt.i8 if d.name == "i4" else dt.u8 if d.name == "u4" else d)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def literal(v) -> str:
    """A Python literal in kernel code (inf and NaN spelled so Triton reads them)."""
    special = nonfinite(v)
    return f"float('{special}')" if special else repr(v)


class IndexCode(StrPrinter):
    """Index arithmetic as Triton code over rank variables and size arguments."""

    def __init__(self, names: dict):
        super().__init__({"order": "none"})
        self.names = names

    def _print_Symbol(self, s):
        return self.names.get(s, str(s))

    def _print_FloorDiv(self, e):
        return f"(({self._print(e.args[0])}) // ({self._print(e.args[1])}))"

    def _print_Mod(self, e):
        return f"(({self._print(e.args[0])}) % ({self._print(e.args[1])}))"

    def _print_Pow(self, e):
        """`S**2` of a symbolic size: Triton tensors have no `**`, so a product."""
        base, exp = e.args
        if not (exp.is_Integer and exp > 0):
            raise NotImplementedError(f"index power {e} has no Triton form")
        return "(" + " * ".join([self.parenthesize(base, 100)] * int(exp)) + ")"

    def _print_Min(self, e):
        a, *rest = e.args
        return f"tl.minimum({self._print(a)}, {self._print(sympy.Min(*rest)) if len(rest) > 1 else self._print(rest[0])})"

    def _print_Max(self, e):
        a, *rest = e.args
        return f"tl.maximum({self._print(a)}, {self._print(sympy.Max(*rest)) if len(rest) > 1 else self._print(rest[0])})"


def reduce_parts(op: str, d: dt.DType, helper: Callable[[str], str] | None = None):
    """(accumulator type, identity, combine template, final reduction template over axis 1) of a reduce
    operator on values of dtype `d`; `helper` declares a helper function the final reduction calls."""
    if op in ("any", "all"):
        ident = "0" if op == "any" else "1"
        comb = "tl.maximum({0}, {1})" if op == "any" else "tl.minimum({0}, {1})"
        fin = "tl.max({0}, axis=1, keep_dims=True)" if op == "any" else "tl.min({0}, axis=1, keep_dims=True)"
        return "tl.int32", ident, comb, fin
    acc = compute_dtype(d)
    if acc.is_int and op == "sum":
        acc = dt.i64
    acc_t = TL[acc.name]
    if op == "sum":
        return acc_t, "0", "{0} + {1}", "tl.sum({0}, axis=1, keep_dims=True)"
    if op == "prod":
        mul = helper("mul") if helper else "_mul"
        return acc_t, "1", "{0} * {1}", f"tl.reduce({{0}}, 1, {mul}, keep_dims=True)"
    if acc.is_float:
        big, small = "float('inf')", "float('-inf')"
    elif acc.signed:
        big, small = str(2 ** (acc.bits - 1) - 1), str(-(2 ** (acc.bits - 1)))
    else:  # unsigned: a signed bound (-128 for u8) does not fit the accumulator
        big, small = str(2 ** acc.bits - 1), "0"
    if op == "max":
        return acc_t, small, "tl.maximum({0}, {1})", "tl.max({0}, axis=1, keep_dims=True)"
    if op == "min":
        return acc_t, big, "tl.minimum({0}, {1})", "tl.min({0}, axis=1, keep_dims=True)"
    raise NotImplementedError(f"einfuse: reduce operator {op!r} has no Triton form")


def cast_code(x: str, src: dt.DType, to: dt.DType) -> str:
    """Code converting value `x` (held in compute_dtype(src)) to `to` (held in compute_dtype(to))."""
    if to == dt.bool_:
        return f"({x}) != 0"
    if to.is_float and to.bits < 32:  # round to the narrow type, keep computing in f32
        # integers go through f32 first: Triton's interpreter casts an integer to bf16/f16 by
        # reinterpreting its bits (-1 -> NaN); on a GPU int -> f32 -> bf16 is the same value
        x = x if src.is_float else f"tl.cast({x}, tl.float32)"
        return f"tl.cast(tl.cast({x}, {TL[to.name]}), tl.float32)"
    return f"tl.cast({x}, {TL[compute_dtype(to).name]})"


class Tile:
    """Emits the code computing expressions inside one tile scope (ranks bound to Triton variables).

    em: the kernel's Emitter (pointers, sizes, the builder); ranks: rank -> variable; masks: rank ->
    mask variable of a ragged rank; hoist: the scope before the loop over the ranks `variant` (what
    does not depend on them is computed there once); flats: linear forms the ranks were delinearized
    from (see reuse_flat); held: Access -> code of a value in registers, or None; carry: (tensor, code)
    of an iterative statement's running value."""

    def __init__(self, em, ranks: dict, masks: dict | None = None, *, hoist: "Tile | None" = None, variant=(),
                 flats=(), held: Callable[[Access], str | None] | None = None, carry: tuple | None = None):
        self.em, self.ranks, self.masks = em, ranks, masks or {}
        self.rng = em.ranges()
        self.block = em.kb.block()
        self.hoist, self.variant = hoist, frozenset(variant)
        self.flats = list(flats)
        self.held, self.carry = held, carry
        self.memo: dict = {}
        self.zero_where: dict = {}  # value code -> masks under which it is 0 (a masked load, other=0)

    def emit(self, code: str, hint: str = "v") -> str:
        return self.em.kb.let(hint, code, to=self.block)

    def index(self, e) -> str:
        e = sympy.sympify(e)
        self.em.used_sizes |= e.free_symbols  # a size named in the code is a kernel argument
        return IndexCode({**self.ranks, **self.em.size_names}).doprint(e)

    def value(self, e: Expr, name: str | None = None) -> tuple[str, dt.DType]:
        """(code, IR dtype); the code holds the value in compute_dtype. `name` names the value (the IR
        tensor or role it is), when computing it takes a new variable."""
        if e in self.memo:
            return self.memo[e]
        if (self.hoist is not None and not (index_symbols(e) & self.variant) and self.carry is None
                and not (self.held is not None and any(self.held(a) for a in accesses(e)))):
            out = self.memo[e] = self.hoist.value(e, name)
            return out
        out = self.memo[e] = self._value(e, name)
        return out

    def _value(self, e: Expr, name: str | None = None):
        if isinstance(e, Const):
            return literal(e.value), dt.DEFAULT_FOR_CATEGORY[e.category]
        if isinstance(e, IndexValue):
            return f"({self.index(e.expr)})", dt.i64
        if isinstance(e, Access):
            if self.carry is not None and e.tensor == self.carry[0]:
                return self.carry[1], self.em.types[e.tensor].dtype
            held = self.held(e) if self.held is not None else None
            if held is not None:
                return held, self.em.types[e.tensor].dtype
            return self.load(e, name)
        if isinstance(e, Call):
            return self.call(e, name)
        raise TypeError(f"einfuse: cannot generate Triton code for {e!r}")

    def call(self, e: Call, name: str | None = None):
        out = infer(e, self.em.dtype_of)[0]
        args = [self.value(a) for a in e.args]
        if e.op == "cast":
            (x, src), = args
            hint = name or (f"{x}_{e.attr.name}" if x.isidentifier() else e.attr.name)
            return self.emit(cast_code(x, src, e.attr), hint), e.attr
        op = MAP_OPS[e.op]
        codes = [c for c, _ in args]
        if op.rule == "float":  # integer operands of float-valued operators become f32 first
            codes = [c if d.is_float else f"tl.cast({c}, tl.float32)" for c, d in args]
        if e.op in _BOOL_ARGS or e.op == "where":
            pos = range(len(args)) if e.op in _BOOL_ARGS else [0]
            codes = [f"({codes[i]} != 0)" if i in pos and args[i][1] != dt.bool_ else codes[i] for i in range(len(codes))]
        if e.op == "pow" and isinstance(e.args[1], Const) and e.args[1].value in (2, 2.0, 3, 3.0, 0.5):
            b = codes[0]
            code = {2: f"{b} * {b}", 3: f"{b} * {b} * {b}", 0.5: f"tl.sqrt({b})"}[e.args[1].value]
        elif e.op == "pow":  # libdevice's pow takes two tensors of one shape: a literal takes the other's
            base, exp = codes
            if isinstance(e.args[0], Const):
                base = f"tl.zeros_like({exp}) + {base}"
            else:
                exp = f"({exp}) + tl.zeros_like({base})"
            code = f"libm.pow({base}, {exp})"
        else:
            template = TRITON_OPS.get(e.op)
            if template is None:
                raise NotImplementedError(f"einfuse: map operator {e.op!r} has no Triton form; give it one with "
                                          f"einfuse.kinds.tile.register_triton_op({e.op!r}, '...')")
            code = template.format(*[f"({c})" if not c.isidentifier() else c for c in codes])
        return self.emit(code, name or e.op), out

    def position_code(self, p) -> str:
        if isinstance(p, Expr):
            code, _ = self.value(p)
            return code
        return self.index(p)

    def load(self, a: Access, name: str | None = None) -> tuple[str, dt.DType]:
        em = self.em
        t = em.types[a.tensor]
        ptr = em.pointer(a.tensor)
        d = t.dtype
        pos = list(a.indices)
        shape = list(t.shape)
        nibble = None
        if d.packed:
            last = pos[-1]
            nibble = self.position_code(ix.Mod(last, 2) if not isinstance(last, Expr) else last)
            pos[-1] = ix.FloorDiv(last, 2) if not isinstance(last, Expr) else last
            shape[-1] = (shape[-1] + 1) // 2
        syms, conds, gathers = set(), [], []
        for p, n in zip(pos, shape):
            if isinstance(p, Expr):
                code, _ = self.value(p)
                gathers.append((code, self.index(n)))  # a gather never reads out of bounds (conditions below)
                syms |= index_symbols(p)
                continue
            syms |= sympy.sympify(p).free_symbols
            if not ix.within(p, 0, n - 1, self.rng):
                c = self.index(p)
                conds.append(f"({c} >= 0) & ({c} < {self.index(n)})")
        if all(not isinstance(p, Expr) for p in pos):
            flat = ix.flat_offset(pos, shape).xreplace(em.unit_ranks)  # a rank of extent 1 is always 0
            ptr, flat = self.hoisted_base(a.tensor, ptr, flat)
            offset = self.index(self.reuse_flat(flat))
        else:
            offset = " + ".join(f"({self.position_code(p)}) * ({self.index(s)})"
                                for p, s in zip(pos, ix.strides(shape))) or "0"
        # a rank of extent 1 is 0 in the offset: its tile's mask (lanes past it) would not match the pointer's
        # shape, and the load never leaves the tensor along it, so that mask is not needed
        masks = sorted({self.masks[s] for s in syms if s in self.masks and s not in em.unit_ranks})
        if gathers:  # the index values take the offset's shape first: a mask made from a scalar alone
            off = self.emit(offset, f"{a.tensor}_offset")  # does not broadcast under Triton's interpreter
            offset = off
            for code, n in gathers:
                g = self.emit(f"{code} + {off} * 0", f"{a.tensor}_at")
                conds.append(f"({g} >= 0) & ({g} < {n})")
        mask = " & ".join(masks + conds) or None
        code = f"tl.load({ptr} + ({offset})" + (f", mask={mask}, other=0)" if mask else ")")
        cd = compute_dtype(d)
        if nibble is not None:
            code = f"(({code}) >> (4 * ({nibble}))) & 15"
            if d.signed:
                name = self.emit(f"({code}).to(tl.int8)", a.tensor)
                out = self.emit(f"tl.where({name} >= 8, {name} - 16, {name})", a.tensor), dt.i8
            else:
                out = self.emit(f"({code}).to(tl.uint8)", a.tensor), dt.u8
        else:
            out = self.emit(f"{code}.to({TL[cd.name]})" if cd != d else code, name or a.tensor), d
        self.zero_where[out[0]] = set(masks)  # every step above maps the masked-off 0 to 0
        return out

    def hoisted_base(self, tensor: str, ptr: str, flat) -> tuple[str, sympy.Expr]:
        """Split a flat offset into loop-invariant terms, added to the pointer once before the loop,
        and the rest: (pointer code, remaining offset)."""
        if self.hoist is None:
            return ptr, flat
        terms = sympy.Add.make_args(flat)
        fixed = [t for t in terms if not (t.free_symbols & self.variant)]
        if not fixed or len(fixed) == len(terms):
            return ptr, flat
        key = ("base", tensor, sympy.Add(*fixed))
        if key not in self.hoist.memo:
            offset = self.hoist.index(self.hoist.reuse_flat(key[2]))
            self.hoist.memo[key] = self.hoist.emit(f"{ptr} + ({offset})", f"{tensor}_base")
        return self.hoist.memo[key], sympy.Add(*[t for t in terms if t.free_symbols & self.variant])

    def reuse_flat(self, off):
        """`c * flat + rest` for an offset that contains a multiple of a flat index the ranks were
        delinearized from (an access in the output's own layout, or broadcast along its fastest ranks):
        the flat variable itself instead of re-linearizing the ranks."""
        for form, var, fastest in self.flats:
            c = off.coeff(fastest)
            ranks = form.free_symbols & set(self.em.extents)
            if c == 0 or c.free_symbols & ranks:
                continue
            rest = sympy.expand(off - c * form)
            if not (rest.free_symbols & ranks):
                return c * sympy.Symbol(var) + rest
        return off

"""IR statement + mapping -> a readable @triton.jit kernel.

The code keeps the IR's names: ranks are Triton variables of the same name, tensors are `<name>_ptr`,
and every kernel starts with the IR line and the user's source line it computes. 16-bit floats are
loaded, computed in f32 and rounded on store (the interpreter cannot compute on them, and a GPU
computes their transcendental functions in f32 anyway); a `bf16(x)` cast in the IR rounds explicitly.
"""
from __future__ import annotations

import math
import re
from collections import Counter

import sympy
from sympy.printing.str import StrPrinter

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.contraction import contraction
from ..ir.expr import Access, Call, Const, Expr, IndexValue, accesses, index_symbols
from ..ir.module import Module, Statement
from ..ir.ops import MAP_OPS, REDUCE_OPS, infer
from ..ir.printer import fmt_statement
from .kernel import Arg, KernelSpec, Mapping

TL = {"f64": "tl.float64", "f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16",
      "f8e4m3": "tl.float8e4nv", "f8e5m2": "tl.float8e5", "i64": "tl.int64", "i32": "tl.int32",
      "i16": "tl.int16", "i8": "tl.int8", "u8": "tl.uint8", "bool": "tl.int1", "i4": "tl.int8", "u4": "tl.uint8"}
RESERVED = {"pid", "pid_b", "pid_m", "pid_n", "offs", "rows", "cols", "rem", "acc", "carry", "valid", "tl", "triton",
            "libm", "rmask", "cmask", "mmask", "nmask", "num_n", "k0", "r0", "res", "x", "a", "b", "rm", "rn", "rc",
            "ka", "kb", "rka", "rkb", "kmask_a", "kmask_b"}

# Triton forms of map operators; `{0}`, `{1}` are operand names. Operators not here use MapOp.triton.
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


def compute_dtype(d: dt.DType) -> dt.DType:
    """The type a kernel computes a value in: 16- and 8-bit floats widen to f32."""
    return dt.f32 if d.is_float and d.bits < 32 else (dt.i8 if d.name == "i4" else dt.u8 if d.name == "u4" else d)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class _TritonIndex(StrPrinter):
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


def _literal(v) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, float):
        if math.isnan(v):
            return "float('nan')"
        if math.isinf(v):
            return "float('inf')" if v > 0 else "float('-inf')"
    return repr(v)


class Body:
    """Emits the code computing one expression inside a tile scope (ranks bound to Triton variables)."""

    def __init__(self, gen: "KernelGen", ranks: dict, masks: dict, rng: dict, indent: str,
                 hoist: "Body | None" = None, variant=(), flats=()):
        self.gen, self.ranks, self.masks, self.rng, self.indent = gen, ranks, masks, rng, indent
        self.flats = list(flats)  # (linear form over ranks, its variable, fastest rank): see reuse_flat
        self.lines: list[str] = []
        self.memo: dict = {}
        self.self_value: tuple | None = None  # (name, value code) of an iterative statement's carry
        self.reg = None  # Access -> code of a value a kernel group keeps in registers, or None
        # Loop-invariant code motion: inside a loop over the ranks `variant`, whatever does not depend
        # on them is computed once by `hoist`, the scope before the loop (fewer operations per
        # iteration; the interpreter runs every one of them in Python).
        self.hoist, self.variant = hoist, frozenset(variant)
        self.zero_where: dict = {}  # value code -> masks under which it is 0 (a masked load, other=0)

    def emit(self, code: str, hint: str = "v") -> str:
        name = self.gen.fresh(hint)
        self.lines.append(f"{self.indent}{name} = {code}")
        return name

    def index(self, e) -> str:
        e = sympy.sympify(e)
        self.gen.used_sizes |= e.free_symbols  # a size named in the code is a kernel argument
        return _TritonIndex({**self.ranks, **self.gen.size_names}).doprint(e)

    def value(self, e: Expr) -> tuple[str, dt.DType]:
        """(code, IR dtype); the code holds the value in compute_dtype."""
        key = e
        if key in self.memo:
            return self.memo[key]
        if (self.hoist is not None and not (index_symbols(e) & self.variant) and self.self_value is None
                and not (self.reg is not None and any(self.reg(a) for a in accesses(e)))):
            out = self.memo[key] = self.hoist.value(e)
            return out
        out = self._value(e)
        self.memo[key] = out
        return out

    def _value(self, e: Expr):
        if isinstance(e, Const):
            return _literal(e.value), dt.DEFAULT_FOR_CATEGORY[e.category]
        if isinstance(e, IndexValue):
            return f"({self.index(e.expr)})", dt.i64
        if isinstance(e, Access):
            if self.self_value is not None and e.tensor == self.self_value[0]:
                return self.self_value[1], self.gen.types[e.tensor].dtype
            held = self.reg(e) if self.reg is not None else None
            if held is not None:
                return held, self.gen.types[e.tensor].dtype
            return self.load(e)
        if isinstance(e, Call):
            return self.call(e)
        raise TypeError(f"cannot generate code for {e!r}")

    def call(self, e: Call):
        out = infer(e, self.gen.dtype_of)[0]
        args = [self.value(a) for a in e.args]
        if e.op == "cast":
            (x, src), = args
            return self.emit(self.cast(x, src, e.attr)), e.attr
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
        elif e.op == "pow":
            code = f"libm.pow({codes[0]}, ({codes[1]}) + tl.zeros_like({codes[0]}))"
        else:
            template = TRITON_OPS.get(e.op) or op.triton
            if template is None:
                raise NotImplementedError(f"map operator {e.op!r} has no Triton form")
            code = template.format(*[f"({c})" if not c.isidentifier() else c for c in codes])
        return self.emit(code), out

    @staticmethod
    def cast(x: str, src: dt.DType, to: dt.DType) -> str:
        if to == dt.bool_:
            return f"({x}) != 0"
        if to.is_float and to.bits < 32:  # round to the narrow type, keep computing in f32
            # integers go through f32 first: Triton's interpreter casts an integer to bf16/f16 by
            # reinterpreting its bits (-1 -> NaN); on a GPU int -> f32 -> bf16 is the same value
            x = x if src.is_float else f"tl.cast({x}, tl.float32)"
            return f"tl.cast(tl.cast({x}, {TL[to.name]}), tl.float32)"
        return f"tl.cast({x}, {TL[compute_dtype(to).name]})"

    def position_code(self, p) -> str:
        if isinstance(p, Expr):
            code, _ = self.value(p)
            return code
        return self.index(p)

    def load(self, a: Access) -> tuple[str, dt.DType]:
        t = self.gen.types[a.tensor]
        ptr = self.gen.pointer(a.tensor)
        d = t.dtype
        pos = list(a.indices)
        shape = list(t.shape)
        nibble = None
        if d.packed:
            last = pos[-1]
            nibble = self.position_code(ix.Mod(last, 2) if not isinstance(last, Expr) else last)
            pos[-1] = ix.FloorDiv(last, 2) if not isinstance(last, Expr) else last
            shape[-1] = (shape[-1] + 1) // 2
        syms, conds = set(), []
        for p, n in zip(pos, shape):
            if isinstance(p, Expr):
                code, _ = self.value(p)
                conds.append(f"({code} >= 0) & ({code} < {self.index(n)})")  # a gather never reads out of bounds
                syms |= index_symbols(p)
                continue
            syms |= sympy.sympify(p).free_symbols
            lo, hi = ix.bounds(p, self.rng)
            if not (ix._truth(lo >= 0) and ix._truth(hi <= n - 1)):
                c = self.index(p)
                conds.append(f"({c} >= 0) & ({c} < {self.index(n)})")
        if all(not isinstance(p, Expr) for p in pos):
            flat = ix.flat_offset(pos, shape)
            flat = flat.xreplace(self.gen.unit_ranks)  # a rank of extent 1 is always 0
            ptr, flat = self.hoisted_base(a.tensor, ptr, flat)
            offset = self.index(self.reuse_flat(flat))
        else:
            offset = " + ".join(f"({self.position_code(p)}) * ({self.index(s)})" for p, s in zip(pos, ix.strides(shape))) or "0"
        masks = sorted({self.masks[s] for s in syms if s in self.masks})
        mask = " & ".join(masks + conds) or None
        code = f"tl.load({ptr} + ({offset})" + (f", mask={mask}, other=0)" if mask else ")")
        cd = compute_dtype(d)
        if nibble is not None:
            code = f"(({code}) >> (4 * ({nibble}))) & 15"
            if d.signed:
                name = self.emit(f"({code}).to(tl.int8)", hint=a.tensor)
                out = self.emit(f"tl.where({name} >= 8, {name} - 16, {name})", hint=a.tensor), dt.i8
            else:
                out = self.emit(f"({code}).to(tl.uint8)", hint=a.tensor), dt.u8
        else:
            out = self.emit(f"{code}.to({TL[cd.name]})" if cd != d else code, hint=a.tensor), d
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
            ranks = form.free_symbols & set(self.gen.extents)
            if c == 0 or c.free_symbols & ranks:
                continue
            rest = sympy.expand(off - c * form)
            if not (rest.free_symbols & ranks):
                return c * sympy.Symbol(var) + rest
        return off


class KernelGen:
    """Generates the kernel for one statement of a module."""

    def __init__(self, module: Module, stmt: Statement, kname: str, line: int, precision: str = "ieee"):
        self.m, self.s, self.kname, self.line = module, stmt, kname, line
        self.extents = dict(stmt.ranks())  # rank -> extent of every rank the kernel binds
        self.types = module.types()
        self.dtype_of = lambda n: self.types[n].dtype
        self.size_names = {s: str(s) for s in module.sizes}
        self.hints = {s: int(v) for s, v in module.size_hints}
        self.ptrs: dict[str, str] = {}
        self.used_sizes: set = set()
        self.unit_ranks = {r: sympy.Integer(0) for r, n in stmt.ranks().items() if n == 1}
        self.stored = {stmt.name}  # statements whose values leave the kernel
        self.counter = 0
        self.precision = precision

    def fresh(self, hint: str) -> str:
        self.counter += 1
        base = "".join(ch if ch.isalnum() else "_" for ch in hint)[:24] or "v"
        return f"{base}_{self.counter}"

    def pointer(self, tensor: str) -> str:
        if tensor not in self.ptrs:
            self.ptrs[tensor] = f"{tensor}_ptr"
        return self.ptrs[tensor]

    def rank_names(self, ranks, suffix: str = "") -> dict:
        return {r: (f"{r}_" if str(r) in RESERVED else str(r)) + suffix for r in ranks}

    def ext(self, e) -> str:
        e = sympy.sympify(e)
        self.used_sizes |= e.free_symbols
        return _TritonIndex(self.size_names).doprint(e)

    def hint(self, e) -> int:
        e = sympy.sympify(e).xreplace({k: sympy.Integer(v) for k, v in self.hints.items()})
        return int(e) if e.is_Integer else 1024

    def delinearize(self, flat: str, ranks: list, names: dict, indent: str) -> list[str]:
        """Lines binding each rank variable from a flat index (last rank fastest)."""
        extents = self.extents
        lines = []
        live = [r for r in ranks if extents[r] != 1]
        for r in ranks:
            if extents[r] == 1:
                lines.append(f"{indent}{names[r]} = 0")
        if not live:
            return lines
        rem = flat
        for n, r in enumerate(reversed(live)):
            if n == len(live) - 1:
                lines.append(f"{indent}{names[r]} = {rem}")
            else:
                lines.append(f"{indent}{names[r]} = {rem} % {self.ext(extents[r])}")
                nxt = f"rem_{names[r]}"
                lines.append(f"{indent}{nxt} = {rem} // {self.ext(extents[r])}")
                rem = nxt
        return lines

    def flats(self, flat: str, ranks: list, names: dict) -> list:
        """The linear forms `delinearize` splits: `flat` over all its ranks, then each `rem_` variable
        over the ranks left of it; for Body.reuse_flat. Longest first."""
        extents = self.extents
        live = [r for r in ranks if extents[r] != 1]
        out, var = [], flat
        for n in range(len(live), 1, -1):
            part = live[:n]
            form = ix.flat_offset(part, [extents[r] for r in part])
            out.append((form, var, part[-1]))
            var = f"rem_{names[part[-1]]}"
        return out

    def ragged(self, ranks, block: int) -> bool:
        """Whether the last tile over `ranks` runs past their extent and so needs a mask."""
        return sympy.Mod(self.numel(ranks), block) != 0

    def numel(self, ranks) -> sympy.Expr:
        return sympy.Mul(*[self.extents[r] for r in ranks]) if ranks else sympy.Integer(1)

    def ranges(self) -> dict:
        return {r: (sympy.Integer(0), sympy.sympify(n) - 1) for r, n in self.extents.items()}

    def store_offset(self, names: dict, at_iter: str | None = None, stmt: Statement | None = None) -> str:
        stmt = stmt or self.s
        pos = []
        for p in stmt.index:
            if isinstance(p, sympy.Symbol):
                pos.append(p)
            else:
                pos.append(sympy.Symbol("__iter__"))
        off = ix.flat_offset(pos, stmt.type.shape)
        code = _TritonIndex({**names, **self.size_names}).doprint(off)
        return code.replace("__iter__", f"({at_iter})") if at_iter is not None else code

    # ------------------------------------------------------------------ kinds
    def generate(self, mapping: Mapping) -> KernelSpec:
        body, grid = {"map": self.gen_map, "reduce": self.gen_reduce, "dot": self.gen_dot,
                      "iterate": self.gen_iterate}[mapping.kind](mapping)
        self.pointer(self.s.name)
        comment = [f"    # IR line {self.line}: {fmt_statement(self.s.replace(loc=None))}",
                   f"    # source: {self.s.loc or 'unknown'}"]
        return self.finish(body, grid, mapping, (self.s.name,), (self.s.name,), comment,
                           f"statement {self.s.name!r}")

    def finish(self, body, grid, mapping: Mapping, statements, outputs, comment, what: str) -> KernelSpec:
        """The kernel module around `body`: docstring, imports, signature, provenance comments."""
        args = [Arg(p, "ptr", t, self.types[t].dtype.name) for t, p in self.ptrs.items()]
        for s in self.m.sizes:
            if s in self.used_sizes or any(s in sympy.sympify(g).free_symbols for g in grid):
                args.append(Arg(str(s), "size", str(s)))
        params = ", ".join([a.name for a in args] + [f"{k}: tl.constexpr" for k, _ in mapping.tiles])
        header = [
            f'"""einfuse kernel {self.kname}: {what} of module {self.m.name!r}.',
            "",
            f"Mapping: {mapping.text()}",
            '"""',
            "import triton",
            "import triton.language as tl",
            "",
            "from einfuse.codegen import libm",
            "",
            "",
            "@triton.jit",
            f"def {self.kname}({params}):",
        ] + list(comment)
        if ", _mul," in "\n".join(body):
            header[-2 - len(comment):-2 - len(comment)] = ["@triton.jit", "def _mul(a, b):", "    return a * b", "", ""]
        src = "\n".join(header + _drop_unused(body)) + "\n"
        return KernelSpec(self.kname, tuple(statements), tuple(outputs), src, args, dict(mapping.tiles), grid, mapping)

    def gen_map(self, mp: Mapping):
        ranks = list(mp.rows)
        names = self.rank_names(ranks)
        total = self.numel(ranks)
        ragged = self.ragged(ranks, mp.tiles[0][1])
        lines = ["    pid = tl.program_id(0)",
                 "    offs = pid * BLOCK + tl.arange(0, BLOCK)"] + [f"    valid = offs < {self.ext(total)}"] * ragged
        lines += self.delinearize("offs", ranks, names, "    ")
        b = Body(self, names, {r: "valid" for r in ranks if ragged}, self.ranges(), "    ",
                 flats=self.flats("offs", ranks, names))
        code, d = b.value(self.s.expr)
        lines += b.lines
        lines.append(f"    tl.store({self.pointer(self.s.name)} + offs, {self.store_cast(code, d)}"
                     f"{', mask=valid' if ragged else ''})")
        return lines, [ix.FloorDiv(total + mp.tiles[0][1] - 1, mp.tiles[0][1])]

    def store_cast(self, code: str, d: dt.DType, stmt: Statement | None = None) -> str:
        out = (stmt or self.s).type.dtype
        if out.is_float and out.bits < 32 and not d.is_float:  # through f32, as in Body.cast
            code = f"tl.cast({code}, tl.float32)"
        return f"tl.cast({code}, {TL[out.name]})" if (out != d or compute_dtype(out) != out or out.is_int) else code

    def gen_reduce(self, mp: Mapping):
        rows, red = list(mp.rows), list(mp.red)
        names = {**self.rank_names(rows), **self.rank_names(red)}
        op = REDUCE_OPS[self.s.reduce.op]
        expr_dtype = infer(self.s.expr, self.dtype_of)[0]
        acc_t, ident, combine, final = _reduce_parts(op.name, expr_dtype)
        tiles = dict(mp.tiles)
        r_ragged, c_ragged = self.ragged(rows, tiles["BLOCK_M"]), self.ragged(red, tiles["BLOCK_R"])
        lines = ["    pid = tl.program_id(0)",
                 "    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]"]
        lines += [f"    rmask = rows < {self.ext(self.numel(rows))}"] * r_ragged
        lines += self.delinearize("rows", rows, names, "    ")
        lines += [f"    acc = tl.full([BLOCK_M, BLOCK_R], {ident}, {acc_t})",
                  "    rc = tl.arange(0, BLOCK_R)[None, :]"]
        loop = [f"    for r0 in range(0, {self.ext(self.numel(red))}, BLOCK_R):",
                "        cols = r0 + rc"] + [f"        cmask = cols < {self.ext(self.numel(red))}"] * c_ragged
        loop += self.delinearize("cols", red, names, "        ")
        outer = {r: "rmask" for r in rows if r_ragged}
        row_flats = self.flats("rows", rows, names)
        pre = Body(self, names, outer, self.ranges(), "    ", flats=row_flats)
        b = Body(self, names, {**outer, **{r: "cmask" for r in red if c_ragged}}, self.ranges(), "        ", pre, red,
                 self.flats("cols", red, names) + row_flats)
        code, d = b.value(self.s.expr)
        lines += pre.lines + loop + b.lines
        if op.name in ("any", "all"):
            conv = f"tl.cast({code} != 0, {acc_t})"
        else:
            conv = code if TL[compute_dtype(d).name] == acc_t else f"tl.cast({code}, {acc_t})"
        # columns past the end hold the identity; rows past the end are never stored
        lines.append(f"        x = tl.where(cmask, {conv}, {ident})" if c_ragged else f"        x = {conv}")
        lines.append(f"        acc = {combine.format('acc', 'x')}")
        lines.append(f"    res = {final.format('acc')}")
        res_d = dt.bool_ if op.name in ("any", "all") else expr_dtype
        if op.name in ("any", "all"):
            lines.append("    res = res != 0")
        lines.append(f"    tl.store({self.pointer(self.s.name)} + rows, {self.store_cast('res', res_d)}"
                     f"{', mask=rmask' if r_ragged else ''})")
        return lines, [ix.FloorDiv(self.numel(rows) + dict(mp.tiles)["BLOCK_M"] - 1, dict(mp.tiles)["BLOCK_M"])]

    def gen_dot(self, mp: Mapping):
        """Tiles of M x N on tensor cores with a K loop; every contraction of the group keeps its own
        accumulator (operand tiles they share are loaded once), then the epilogue maps run on the
        accumulators in registers and only tensors read outside the kernel are stored."""
        dots = self.group_dots()
        M, N, K, B = list(mp.rows), list(mp.cols), list(mp.red), list(mp.batch)
        names = {**self.rank_names(M), **self.rank_names(N), **self.rank_names(B)}
        ka, kb = self.rank_names(K, "_a"), self.rank_names(K, "_b")
        tiles = dict(mp.tiles)
        numM, numN, numK = (self.ext(self.numel(x)) for x in (M, N, K))
        m_ragged, n_ragged, k_ragged = (self.ragged(x, tiles[t]) for x, t in
                                        ((M, "BLOCK_M"), (N, "BLOCK_N"), (K, "BLOCK_K")))
        lines = ["    pid = tl.program_id(0)",
                 "    pid_b = tl.program_id(1)",
                 f"    num_n = ({numN} + BLOCK_N - 1) // BLOCK_N",  # not tl.cdiv: a jit call, slow to interpret
                 "    pid_m = pid // num_n",
                 "    pid_n = pid % num_n"]
        lines += self.delinearize("pid_b", B, names, "    ")
        lines += ["    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]"] + [f"    mmask = rm < {numM}"] * m_ragged
        lines += self.delinearize("rm", M, names, "    ")
        lines += ["    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]"] + [f"    nmask = rn < {numN}"] * n_ragged
        lines += self.delinearize("rn", N, names, "    ")
        accs = [f"acc{n}" if len(dots) > 1 else "acc" for n in range(len(dots))]
        for acc, (_, parts) in zip(accs, dots):
            lines.append(f"    {acc} = tl.zeros([BLOCK_M, BLOCK_N], dtype={'tl.int32' if parts.int8 else 'tl.float32'})")
        lines += ["    ka = tl.arange(0, BLOCK_K)[None, :]", "    kb = tl.arange(0, BLOCK_K)[:, None]"]
        loop = [f"    for k0 in range(0, {numK}, BLOCK_K):"]
        loop += ["        rka = k0 + ka"] + [f"        kmask_a = rka < {numK}"] * k_ragged
        loop += self.delinearize("rka", K, ka, "        ")
        loop += ["        rkb = k0 + kb"] + [f"        kmask_b = rkb < {numK}"] * k_ragged
        loop += self.delinearize("rkb", K, kb, "        ")
        rng = self.ranges()
        outer = {**{r: "mmask" for r in M if m_ragged}, **{r: "nmask" for r in N if n_ragged}}
        fl = self.flats("rm", M, names) + self.flats("rn", N, names) + self.flats("pid_b", B, names)
        pre = Body(self, names, outer, rng, "    ", flats=fl)
        ba = Body(self, {**names, **ka}, {**outer, **{r: "kmask_a" for r in K if k_ragged}}, rng, "        ", pre, K,
                  self.flats("rka", K, ka) + fl)
        bb = Body(self, {**names, **kb}, {**outer, **{r: "kmask_b" for r in K if k_ragged}}, rng, "        ", pre, K,
                  self.flats("rkb", K, kb) + fl)
        operands = [(ba.value(parts.a)[0], bb.value(parts.b)[0]) for _, parts in dots]
        # row statistics (an RMSNorm's sum of squares) accumulate over the same K loop as the operands
        stats = []
        for st, expr in self.group_stats():
            op = REDUCE_OPS[st.reduce.op]
            acc_t, ident, combine, final = _reduce_parts(op.name, infer(expr, self.dtype_of)[0])
            code, _ = ba.value(expr)
            var = self.fresh(f"{st.name}_acc")
            stats.append((st, var, acc_t, ident, combine, final, code))
        lines += pre.lines
        lines += [f"    {var} = tl.full([BLOCK_M, BLOCK_K], {ident}, {acc_t})" for _, var, acc_t, ident, *_ in stats]
        lines += loop + ba.lines + bb.lines
        for st, var, acc_t, ident, combine, final, code in stats:
            x = f"tl.where(kmask_a, tl.cast({code}, {acc_t}), {ident})" if k_ragged else f"tl.cast({code}, {acc_t})"
            lines.append(f"        {var} = {combine.format(var, x)}")
        # Past the end of K both operands must be 0 (a masked load gives 0; a computed operand, e.g.
        # exp(0), may not). Rows past M and columns past N are never stored, so need no zeroing.
        ready: dict = {}
        for acc, (_, parts), (ca, cb) in zip(accs, dots, operands):
            op_t = TL[parts.operand.name]
            tiles_ab = []
            for side, value, body, kmask in (("a", ca, ba, "kmask_a"), ("b", cb, bb, "kmask_b")):
                key = (value, op_t)
                if key not in ready:
                    zeroed = k_ragged and kmask not in body.zero_where.get(value, ())
                    code = f"tl.where({kmask}, {value}, 0)" if zeroed else value
                    if zeroed or op_t != TL[compute_dtype(parts.operand).name]:
                        code = f"({code}).to({op_t})" if zeroed else f"{code}.to({op_t})"
                    if code == value:
                        ready[key] = value
                    else:
                        ready[key] = f"{side}{len(ready)}" if len(dots) > 1 else side
                        lines.append(f"        {ready[key]} = {code}")
                tiles_ab.append(ready[key])
            a, b = tiles_ab
            if parts.int8:
                lines.append(f"        {acc} = libm.dot({a}, {b}, {acc}, out_dtype=tl.int32)")
            elif parts.operand == dt.f32:
                lines.append(f'        {acc} = libm.dot({a}, {b}, {acc}, input_precision="{mp.input_precision or "ieee"}")')
            else:
                lines.append(f"        {acc} = libm.dot({a}, {b}, {acc})")
        be = Body(self, names, outer, rng, "    ", flats=fl)
        values: dict = {}
        for st, var, acc_t, ident, combine, final, code in stats:
            values[st.name] = (be.emit(final.format(var), st.name), infer(st.expr, self.dtype_of)[0])
        be.reg = lambda a: values[a.tensor][0] if a.tensor in values else None
        for acc, (d, parts) in zip(accs, dots):
            res = acc
            for op, y in parts.post:
                cy, _ = be.value(y)
                res = be.emit(f"{res} {'*' if op == 'mul' else '/'} {cy if cy.isidentifier() else f'({cy})'}", "res")
            values[d.name] = (res, dt.i32 if parts.int8 else dt.f32)
        lines += be.lines
        mask = " & ".join(["mmask"] * m_ragged + ["nmask"] * n_ragged)
        store_mask = f", mask={mask}" if mask else ""
        for st, *_ in stats:  # every column tile computed the same statistic: the first one stores it
            if st.name in self.stored:
                off = ix.flat_offset(self.stat_index[st.name], st.type.shape)
                smask = f"(rm < {numM}) & (tl.zeros_like(rm) + pid_n == 0)"  # a tensor mask, as the interpreter needs
                lines.append(f"    tl.store({self.pointer(st.name)} + {be.index(off)}, "
                             f"{self.store_cast(values[st.name][0], values[st.name][1], st)}, mask={smask})")
        for d, _ in dots:
            if d.name in self.stored:
                code, vd = values[d.name]
                lines.append(f"    tl.store({self.pointer(d.name)} + {self.store_offset(names, stmt=d)}, "
                             f"{self.store_cast(code, vd, d)}{store_mask})")
        lines += self.epilogue(names, values, mask, "    ")
        bm, bn = tiles["BLOCK_M"], tiles["BLOCK_N"]
        grid = [ix.FloorDiv(self.numel(M) + bm - 1, bm) * ix.FloorDiv(self.numel(N) + bn - 1, bn), self.numel(B)]
        return lines, grid

    def group_dots(self) -> list:
        """(statement, Contraction) of each contraction, ranks renamed to the first one's by role."""
        return [(self.s, contraction(self.s, self.dtype_of))]

    def group_stats(self) -> list:
        """(statement, its expression in the anchor's ranks) of each row statistic computed in the K loop."""
        return []

    def epilogue(self, names: dict, values: dict, mask: str, indent: str) -> list:
        """Maps of the group over the same flat index as the anchor, computed from registers."""
        return []

    def gen_iterate(self, mp: Mapping):
        rows = list(mp.rows)
        it = self.s.iterate
        names = {**self.rank_names(rows), **self.rank_names([it.rank])}
        lines = ["    pid = tl.program_id(0)",
                 "    rows = pid * BLOCK + tl.arange(0, BLOCK)",
                 f"    valid = rows < {self.ext(self.numel(rows))}"]
        lines += self.delinearize("rows", rows, names, "    ")
        d = self.s.type.dtype
        out = self.pointer(self.s.name)
        lines.append(f"    carry = tl.full([BLOCK], {_literal(it.init.value)}, {TL[compute_dtype(d).name]})")
        lines.append(f"    tl.store({out} + {self.store_offset(names, '0')}, {self.store_cast('carry', compute_dtype(d))}, mask=valid)")
        lines.append(f"    for {names[it.rank]} in range(0, {self.ext(it.extent)}):")
        b = Body(self, names, {r: "valid" for r in rows}, self.ranges(), "        ",
                 flats=self.flats("rows", rows, names))
        b.self_value = (self.s.name, "carry")
        code, vd = b.value(self.s.expr)
        lines += b.lines
        lines.append(f"        carry = tl.cast({code}, {TL[compute_dtype(d).name]})")
        lines.append(f"        tl.store({out} + {self.store_offset(names, names[it.rank] + ' + 1')}, "
                     f"{self.store_cast('carry', compute_dtype(d))}, mask=valid)")
        bl = dict(mp.tiles)["BLOCK"]
        return lines, [ix.FloorDiv(self.numel(rows) + bl - 1, bl)]


_ASSIGN = re.compile(r"\s*([A-Za-z_]\w*) = ")


def _drop_unused(lines: list) -> list:
    """Without assignments to names nothing reads (ranks no access needs once flat indices are reused):
    the interpreter would run them all."""
    while True:
        words = Counter(w for ln in lines for w in re.findall(r"[A-Za-z_]\w*", ln.split("#")[0]))
        keep = [ln for ln in lines if not ((m := _ASSIGN.match(ln)) and words[m[1]] == 1)]
        if len(keep) == len(lines):
            return lines
        lines = keep


def _reduce_parts(op: str, d: dt.DType):
    """(accumulator type, identity, combine template, final reduction template) of a reduce operator."""
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
        return acc_t, "1", "{0} * {1}", "tl.reduce({0}, 1, _mul, keep_dims=True)"
    big = "float('inf')" if acc.is_float else str(2 ** (acc.bits - 1) - 1)
    small = "float('-inf')" if acc.is_float else str(-(2 ** (acc.bits - 1)))
    if op == "max":
        return acc_t, small, "tl.maximum({0}, {1})", "tl.max({0}, axis=1, keep_dims=True)"
    if op == "min":
        return acc_t, big, "tl.minimum({0}, {1})", "tl.min({0}, axis=1, keep_dims=True)"
    raise NotImplementedError(f"reduce operator {op!r} has no Triton form")

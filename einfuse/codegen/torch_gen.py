"""IR -> straight-line Python with torch ops: the program the CPU backend (`backend="torch"`) runs.

One function `run(inputs, rt)` per module, one line (or a few) per IR statement, each preceded by
`# IR: <the statement>` and the user's source line. How statements become torch ops:

* an access whose positions are affine in the ranks (views, transposes, reshapes, broadcasts, slices,
  `i // 13, i % 13` pairs) is a view of the tensor (`view`, `permute`, `as_strided`); a gather
  (`w[ids[i, j], k]`) is indexing; anything else is indexing with clamped index tensors, as the evaluator
  does. `where(r < 64, a, b)` on one rank evaluates `a` and `b` on their halves of the rank (`cat`), so
  RoPE's rotate-half reads no element outside its tensor;
* a sum over a product whose factors split into two operands (`sum[k] A(m, k) * B(k, n)`) is a matmul of
  views; other reductions are torch reductions over the materialized expression; maps are elementwise torch
  expressions broadcasting over the statement's ranks;
* an iterative statement is a Python loop (a running max is `cummax`);
* an `attention` kernel group is ONE `scaled_dot_product_attention` call when the cascade's scores are a
  scaled Q K product with an optional mask/bias (causal masks become `is_causal`, multi-query/grouped
  heads `enable_gqa`), else plain 3-pass softmax attention; split-KV groups run statement by statement;
* opaque calls go through `rt.opaque`; a statement this generator cannot emit runs through the reference
  evaluator (`rt.statement`), and the generated source says so in a comment.

Types follow the reference evaluator (`einfuse.ir.evaluator`): each map operator's result is converted to
the type `infer` gives it, 16-bit sums accumulate in f32, literals are Python scalars (weak).

Every tensor the program binds has a layout known here (shape, strides and storage offset): inputs are
bound dense (`rt.bind`), results are fresh contiguous tensors, and a statement that only moves data is a
view whose strides this module computes. The runtime object `rt` provides: `bind(inputs)`,
`bad_inputs(inputs)`, `unpack(t, signed)`, `ar(n, dim, ndim, device)`, `cat(dim, parts, shape, dtype)`,
`imin/imax`, `statement(name, tensors, sizes)`, `opaque(index, tensors, sizes)`, and `consts(device)`: the
tuple the program's `consts(device)` returns (aranges and constant tensors), made once per device.
"""
from __future__ import annotations

import builtins
import keyword
import logging
import math
import re
from dataclasses import dataclass, field

import sympy
import torch

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.collective import Collective
from ..ir.contraction import peel_invariant
from ..ir.evaluator import apply_call, literal_tensor
from ..ir.expr import (Access, Call, Const, Expr, IndexValue, accesses, canonical, index_difference, index_symbols,
                       map_indices, rewrite, substitute, walk)
from ..ir.module import Kernel, Module, Opaque, Statement, TensorType, Update
from ..ir.ops import MAP_OPS, REDUCE_OPS, infer
from ..ir.printer import fmt_op
from .torch_moe import COMPRESSED_NOTE, CompressedOperand, MoEPlan, moe_plans

NEG_INF = Const(-math.inf)
log = logging.getLogger("einfuse")
WEAK_DTYPE = {"bool": dt.bool_, "int": dt.i64, "float": dt.f64}  # what a literal-only value computes in
STEP_ROLES = ("qk", "lm", "rm", "sln", "prm", "sld", "rd", "slnv", "rnv")


class Unsupported(Exception):
    """What this generator does not emit; the statement runs through the reference evaluator instead."""


def _reason(exc: Exception) -> str:
    """Why a statement was not generated: the Unsupported message, or the unexpected error (a generator
    bug: logged, and the statement still runs, through the evaluator)."""
    if isinstance(exc, Unsupported):
        return str(exc)
    log.warning("einfuse: torch program generator error (the evaluator runs the statement): %r", exc)
    return f"generator error: {type(exc).__name__}: {exc}"


@dataclass
class TorchProgram:
    """The generated source, its module name, and each statement left to the evaluator with the reason."""

    name: str
    source: str
    fallbacks: list = field(default_factory=list)  # [(statement, reason)]
    attention: list = field(default_factory=list)  # [(group, "sdpa" | "3-pass" | "statements: why")]
    moe: list = field(default_factory=list)  # [(chain's down group, "routed" | "routed, compressed ..." | ...)]


# ---------------------------------------------------------------- small sympy helpers

def _proven(rel) -> bool:
    r = sympy.sympify(rel)
    return r is sympy.true or r == True  # noqa: E712 (sympy booleans)


def _within(e, lo, hi, ranges) -> bool:
    elo, ehi = ix.bounds(e, ranges)
    return _proven(sympy.expand(elo - lo) >= 0) and _proven(sympy.expand(hi - ehi) >= 0)


def _same(a, b) -> bool:
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def _affine(e: sympy.Expr, syms) -> tuple | None:
    """e == const + sum(coeff[r] * r) with coefficients free of `syms`; None when e is not affine in them."""
    syms = set(syms)
    const, coeff = sympy.Integer(0), {}
    for term in sympy.Add.make_args(sympy.expand(e)):
        used = term.free_symbols & syms
        if not used:
            const += term
            continue
        if len(used) != 1:
            return None
        (r,) = used
        c = sympy.simplify(term / r)
        if c.free_symbols & syms or c.has(ix.FloorDiv, ix.Mod):
            return None
        coeff[r] = coeff.get(r, sympy.Integer(0)) + c
    return const, {r: c for r, c in coeff.items() if c != 0}


def _arith_code(e, code) -> str | None:
    """Python for an index expression's arithmetic node (+, *, //, %, ** k), `code` giving its operands'; None
    for any other node (the callers differ in leaves and min/max)."""
    if isinstance(e, (sympy.Add, sympy.Mul)):
        return "(" + (" + " if isinstance(e, sympy.Add) else " * ").join(code(a) for a in e.args) + ")"
    if isinstance(e, (ix.FloorDiv, ix.Mod)):
        return f"({code(e.args[0])} {'//' if isinstance(e, ix.FloorDiv) else '%'} {code(e.args[1])})"
    if isinstance(e, sympy.Pow) and e.args[1].is_Integer and e.args[1] > 0:
        return f"({code(e.args[0])} ** {int(e.args[1])})"
    return None


def _divisor(c, ranks) -> bool:
    """A divisor a rank can be split by: an integer above 1, or a size (a positive symbol expression)."""
    if c.is_Integer:
        return int(c) > 1
    return not (c.free_symbols & set(ranks)) and _proven(c >= 1)


def _index_exprs(p) -> list:
    """The sympy index expressions of a position: itself, or every access position and index value inside
    a tensor-valued one."""
    if not isinstance(p, Expr):
        return [p]
    out = []
    for n in walk(p):
        if isinstance(n, Access):
            out += [q for q in n.indices if not isinstance(q, Expr)]
        elif isinstance(n, IndexValue):
            out.append(n.expr)
    return out


def _index_symbols_deep(p) -> set:
    return set().union(*[sympy.sympify(e).free_symbols for e in _index_exprs(p)])


def _radix(p, ranks: set, dom: dict, size) -> list | None:
    """[(rank, coefficient, extent)], outermost first, when position `p` of a dim of `size` is a mixed-radix
    sum of two or more ranks (`64*h + f` over h < 3, f < 64 in a dim of 192): the dim can be viewed as one
    dim per rank. None otherwise."""
    aff = _affine(p, ranks)
    if aff is None or aff[0] != 0 or len(aff[1]) < 2:
        return None
    terms = list(aff[1].items())
    if not all(c.is_Integer and c > 0 for _, c in terms) or any(dom[r][0] != 0 for r, _ in terms):
        return None
    terms.sort(key=lambda rc: int(rc[1]))
    step = sympy.Integer(1)
    for r, c in terms:
        if sympy.simplify(c - step) != 0:
            return None
        step = step * dom[r][1]
    if sympy.simplify(step - size) != 0:
        return None
    return [(r, c, dom[r][1]) for r, c in reversed(terms)]


def _contiguous_strides(shape) -> tuple:
    return tuple(ix.strides(shape))


@dataclass
class Layout:
    """Where a tensor's elements sit in its storage: element (p0, p1, ..) at offset + sum(p_d * strides_d)."""

    shape: tuple
    strides: tuple
    offset: sympy.Expr = sympy.Integer(0)

    @staticmethod
    def dense(shape) -> "Layout":
        shape = tuple(sympy.sympify(s) for s in shape)
        return Layout(shape, _contiguous_strides(shape), sympy.Integer(0))


@dataclass
class Val:
    """A compiled (sub)expression: Python code for a tensor with one dim per rank of the context (size
    1 where it does not vary: `ranks` are the dims of full extent), or a Python scalar when weak."""

    code: str
    ranks: frozenset
    dtype: dt.DType
    weak: bool = False
    scalar: object = None  # the literal, when weak and folded
    fresh: bool = False  # the code allocates a new tensor (not a view of a bound one)
    atom: bool = True  # needs no parentheses as an operand
    layout: "Layout | None" = None  # a plain strided view of a bound tensor: where its elements are

    @property
    def is_scalar(self) -> bool:
        return self.weak and self.scalar is not None

    def op(self) -> str:
        return self.code if self.atom else f"({self.code})"


def _pyliteral(v) -> str:
    if isinstance(v, bool):
        return repr(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "math.nan"
        if math.isinf(v):
            return "math.inf" if v > 0 else "-math.inf"
    return repr(v)


def _torch_dtype(d: dt.DType) -> str:
    return "torch." + str(d.torch).split(".")[-1]


# Map operators as Python source: (template, callable computing the same thing, for result types)
_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "floordiv": "//", "mod": "%", "lt": "<", "le": "<=",
          "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "bitand": "&", "bitor": "|", "bitxor": "^", "shl": "<<",
          "shr": ">>"}
_PYOP = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
         "//": lambda a, b: a // b, "%": lambda a, b: a % b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
         ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
         "&": lambda a, b: a & b, "|": lambda a, b: a | b, "^": lambda a, b: a ^ b, "<<": lambda a, b: a << b,
         ">>": lambda a, b: a >> b}
_FUNC = {
    "exp": "torch.exp", "exp2": "torch.exp2", "log": "torch.log", "log2": "torch.log2", "log1p": "torch.log1p",
    "expm1": "torch.expm1", "sqrt": "torch.sqrt", "rsqrt": "torch.rsqrt", "sin": "torch.sin", "cos": "torch.cos",
    "tan": "torch.tan", "tanh": "torch.tanh", "erf": "torch.erf", "sigmoid": "torch.sigmoid", "silu": "F.silu",
    "gelu": "F.gelu", "reciprocal": "torch.reciprocal", "abs": "torch.abs", "relu": "torch.relu",
    "floor": "torch.floor", "ceil": "torch.ceil", "round": "torch.round", "trunc": "torch.trunc",
    "sign": "torch.sign", "not": "torch.logical_not", "isnan": "torch.isnan", "isinf": "torch.isinf",
    "bitnot": "torch.bitwise_not", "max": "torch.maximum", "min": "torch.minimum", "pow": "torch.pow",
    "atan2": "torch.atan2", "and": "torch.logical_and", "or": "torch.logical_or", "xor": "torch.logical_xor",
}
_SCALAR_OK = {"pow"}  # functions that take a Python scalar operand as is


def _func_callable(name: str):
    import torch.nn.functional as F  # noqa: F401 (used by eval of the table's names)

    path = _FUNC[name]
    mod, attr = path.split(".")
    return getattr({"torch": torch, "F": F}[mod], attr)


def _dummy(v: Val, nd: int):
    if v.is_scalar:
        return v.scalar
    return torch.ones((1,) * nd, dtype=v.dtype.torch)


def _result_dtype(fn, vals: list, nd: int) -> dt.DType:
    try:
        out = fn(*[_dummy(v, nd) for v in vals])
    except Exception as exc:  # an operator torch does not run on these types
        raise Unsupported(f"torch cannot run this operator on {[str(v.dtype) for v in vals]}: {exc}") from None
    return dt.from_torch(out.dtype)


# ---------------------------------------------------------------- statement context

class Ctx:
    """Compiles expressions of one statement over `dims` (rank symbols, one tensor dim each), where rank
    r runs over [offset, offset + extent) of its range (`dom`); positions see r + offset."""

    def __init__(self, gen: "TorchGen", dims, dom: dict, extra_ranges: dict | None = None):
        self.gen = gen
        self.dims = tuple(dims)
        self.dom = {r: (sympy.sympify(o), sympy.sympify(n)) for r, (o, n) in dom.items()}
        self.extra = dict(extra_ranges or {})
        self.nd = len(self.dims)
        self.ranges = {r: (sympy.Integer(0), n - 1) for r, (_, n) in self.dom.items()}
        self.ranges.update(self.extra)

    def sub(self, dims=None, dom: dict | None = None) -> "Ctx":
        d = dict(self.dom)
        d.update(dom or {})
        return Ctx(self.gen, self.dims if dims is None else dims, d, self.extra)

    def ext(self, r) -> sympy.Expr:
        return self.dom[r][1]

    def key(self) -> tuple:
        return (self.dims, tuple(sorted(((str(r), v) for r, v in self.dom.items()), key=lambda x: x[0])))

    def shape(self, ranks) -> list:
        return [self.ext(r) if r in ranks else sympy.Integer(1) for r in self.dims]

    def shape_code(self, ranks) -> str:
        return self.gen.tuple_code(self.shape(ranks))

    def offsets(self, e):
        """Position expression seen from this context (ranks shifted by their offsets)."""
        subs = {r: r + o for r, (o, _) in self.dom.items() if o != 0}
        return sympy.sympify(e).xreplace(subs) if subs else sympy.sympify(e)

    # ---- values
    def value(self, e: Expr, hint: dt.DType | None = None) -> Val:
        key = (e, self.key(), hint)
        memo = self.gen.memo
        if key in memo:
            return memo[key]
        v = self._value(e, hint)
        if self.gen.shared.get(e, 0) > 1 and not v.atom and not v.is_scalar:
            name = self.gen.temp("t")
            self.gen.emit(f"{name} = {v.code}")
            v = Val(name, v.ranks, v.dtype, v.weak, None, v.fresh, True)
        memo[key] = v
        return v

    def dtype_of(self, name: str) -> dt.DType:
        return self.gen.types[name].dtype

    def _value(self, e: Expr, hint) -> Val:
        want, weak = infer(e, self.dtype_of)
        if weak and self._foldable(e):
            return self._fold(e)
        if isinstance(e, Const):
            return self._fold(e)
        if isinstance(e, IndexValue):
            return self.index_value(e.expr)
        if isinstance(e, Access):
            return self.access(e)
        if isinstance(e, Call):
            if weak:  # literal-only but for a tensor condition (`where(m <= p, 0.0, -inf)`)
                want = hint if hint is not None and dt.category_rank(hint.category) >= dt.category_rank(
                    want.category) else WEAK_DTYPE[want.category]
            return self.call(e, want)
        raise Unsupported(f"cannot compile {e!r}")

    @staticmethod
    def _foldable(e: Expr) -> bool:
        return all(isinstance(n, (Const, Call)) for n in walk(e))

    def _fold(self, e: Expr) -> Val:
        """A literal-only expression, computed now as the evaluator computes it (Python precision)."""

        def ev(n):
            if isinstance(n, Const):
                return literal_tensor(n.value)
            return apply_call(n, [ev(a) for a in n.args], *infer(n, self.dtype_of))

        t = ev(e)
        v = t.item()
        d = WEAK_DTYPE[{torch.bool: "bool"}.get(t.dtype, "float" if t.is_floating_point() else "int")]
        return Val(_pyliteral(v), frozenset(), dt.DEFAULT_FOR_CATEGORY[d.category], True, v,
                   atom=not (isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0))

    # ---- index arithmetic as tensors
    def arange(self, r) -> str:
        d = self.dims.index(r)
        return self.gen.arange(self.ext(r), d, self.nd)

    def index_code(self, e) -> tuple[str, frozenset]:
        """Code for an index expression (already offset) as an i64 tensor over its ranks, or an int."""
        e = sympy.sympify(e)
        ranks = frozenset(e.free_symbols & set(self.dims))
        return self._icode(e), ranks

    def _icode(self, e) -> str:
        if e.is_Integer:
            return str(int(e))
        if isinstance(e, sympy.Symbol):
            if e in self.dom and e in self.dims:
                return self.arange(e)
            return self.gen.sym_code(e)
        if not (e.free_symbols & set(self.dims)):
            return self.gen.int_code(e)
        code = _arith_code(e, self._icode)
        if code is not None:
            return code
        if isinstance(e, (sympy.Min, sympy.Max)):
            fn = "rt.imin" if isinstance(e, sympy.Min) else "rt.imax"
            out = self._icode(e.args[0])
            for a in e.args[1:]:
                out = f"{fn}({out}, {self._icode(a)})"
            return out
        raise Unsupported(f"index expression {e} has no torch form")

    def index_value(self, e) -> Val:
        code, ranks = self.index_code(self.offsets(e))
        if not ranks:
            return Val(f"torch.full({self.gen.tuple_code([1] * self.nd)}, {code}, dtype=torch.int64, device=device)",
                       frozenset(),
                       dt.i64, fresh=True)
        return Val(code, ranks, dt.i64)

    # ---- accesses
    def access(self, a: Access) -> Val:
        gen = self.gen
        src = gen.pyname(a.tensor)
        lay = gen.layout.get(a.tensor)
        if lay is None:
            raise Unsupported(f"{a.tensor} has no known layout")
        gen.reads.add(a.tensor)
        d = gen.types[a.tensor].dtype
        dtype = (dt.i8 if d.signed else dt.u8) if d.packed else d
        if len(a.indices) != len(lay.shape):
            raise Unsupported(f"{a.tensor} is accessed with {len(a.indices)} positions")
        if not any(isinstance(p, Expr) for p in a.indices):
            pos = [ix.simplify(sympy.expand(self.offsets(p)), self.ranges) for p in a.indices]
            if all(_within(p, 0, n - 1, self.ranges) for p, n in zip(pos, lay.shape)):
                v = self._view(src, lay, pos, dtype)
                if v is not None:
                    return v
        return self._gather(a, src, lay, dtype)

    def _cut(self, r, c, subs: dict, ranges: dict) -> tuple | None:
        """Rank r as c*hi + lo (0 <= lo < c): (hi, lo, r's extent / c), recorded in `subs` and `ranges`;
        None when c does not divide the extent."""
        q = ix.exact_quotient(self.ext(r), c)
        if q is None:
            return None
        hi, lo = (sympy.Symbol(f"{r}_{x}", integer=True, nonnegative=True) for x in ("hi", "lo"))
        subs[r] = c * hi + lo
        ranges[hi], ranges[lo] = (sympy.Integer(0), q - 1), (sympy.Integer(0), c - 1)
        return hi, lo, q

    def _view(self, src: str, lay: Layout, pos: list, dtype) -> Val | None:
        flat = ix.simplify(sympy.expand(lay.offset + sum((p * s for p, s in zip(pos, lay.strides)), sympy.Integer(0))),
                           self.ranges)
        dims = [r for r in self.dims]
        aff = _affine(flat, dims)
        split = {}
        if aff is None:
            # rank r read as (r // c, r % c): split it into (r // c, r % c) dims and merge them after
            for atom in flat.atoms(ix.FloorDiv, ix.Mod):
                r, c = atom.args
                if not (r in dims and _divisor(c, dims)):
                    return None
                if split.setdefault(r, c) != c:
                    return None
            subs, ranges = {}, dict(self.ranges)
            for r, c in split.items():
                cut = self._cut(r, c, subs, ranges)
                if cut is None:
                    return None
                split[r] = (c, cut[2], cut[0], cut[1])
            flat = ix.simplify(sympy.expand(flat.xreplace(subs)), ranges)
            syms = [s for r in dims for s in ((split[r][2], split[r][3]) if r in split else (r,))]
            aff = _affine(flat, syms)
            if aff is None:
                return None
        const, coeff = aff
        if not _proven(ix.bounds(const, self.ranges)[0] >= 0) or not all(
                _proven(ix.bounds(c, self.ranges)[0] >= 0) for c in coeff.values()):
            return None
        sizes, strides, final, ranks = [], [], [], set()
        for r in dims:
            if r in split:
                c, q, hi, lo = split[r]
                if hi in coeff or lo in coeff:
                    sizes += [q, c]
                    strides += [coeff.get(hi, 0), coeff.get(lo, 0)]
                    final.append(self.ext(r))
                    ranks.add(r)
                else:
                    sizes += [sympy.Integer(1), sympy.Integer(1)]
                    strides += [0, 0]
                    final.append(sympy.Integer(1))
            elif r in coeff:
                sizes.append(self.ext(r))
                strides.append(coeff[r])
                final.append(self.ext(r))
                ranks.add(r)
            else:
                sizes.append(sympy.Integer(1))
                strides.append(sympy.Integer(0))
                final.append(sympy.Integer(1))
        if split:
            code = f"{self.gen.view_code(src, lay, sizes, strides, const)}.reshape({self.gen.tuple_code(final)})"
            return Val(code, frozenset(ranks), dtype, fresh=False)
        code = self.gen.view_code(src, lay, sizes, strides, const)
        return Val(code, frozenset(ranks), dtype, fresh=False, atom=True,
                   layout=Layout(tuple(sizes), tuple(sympy.sympify(x) for x in strides), const))

    def _gather(self, a: Access, src: str, lay: Layout, dtype) -> Val:
        """Indexing with index tensors: gathers, and affine positions the view path cannot take (clamped
        as the evaluator clamps them: lanes a where() discards may stray)."""
        split = self._split_gather(a, src, lay, dtype)
        return split if split is not None else self._indexed(a, src, lay, dtype)

    def _split_gather(self, a: Access, src: str, lay: Layout, dtype) -> Val | None:
        """A gather that reads a rank as (r // c, r % c) — a paged cache through its block table,
        `K[table[b, m // 16], m % 16, ...]` — or a dim as a mixed-radix sum of ranks (`V[..., 64*h + f]`):
        with such ranks split into (r_hi, r_lo) and such dims into one dim per rank, the pieces become plain
        dims (whole rows copied, not one element per index); the result merges the pieces back."""
        ranks_used = set()
        for p in a.indices:
            ranks_used |= _index_symbols_deep(p) & set(self.dims)
        if any(self.dom[r][0] != 0 for r in ranks_used):
            return None
        cuts = {}
        for p in a.indices:
            for e in _index_exprs(p):
                for atom in sympy.sympify(e).atoms(ix.FloorDiv, ix.Mod):
                    r, c = atom.args
                    if r in self.dims and _divisor(c, self.dims) and ix.exact_quotient(self.ext(r), c) is not None:
                        if cuts.setdefault(r, c) != c:
                            return None
        dims, dom, subs, ranges = [], {}, {}, dict(self.ranges)
        for r in self.dims:
            if r not in cuts:
                dims.append(r)
                continue
            hi, lo, q = self._cut(r, cuts[r], subs, ranges)
            dom[hi], dom[lo] = (0, q), (0, cuts[r])
            dims += [hi, lo]

        def fix(e):
            return ix.simplify(sympy.expand(sympy.sympify(e).xreplace(subs)), ranges) if subs else sympy.sympify(e)

        pos = [map_indices(p, fix) if isinstance(p, Expr) else fix(p) for p in a.indices]
        halves = {x for r in cuts for x in subs[r].free_symbols}
        if any(atom.args[0].free_symbols & halves
               for p in pos for e in _index_exprs(p) for atom in sympy.sympify(e).atoms(ix.FloorDiv, ix.Mod)):
            return None  # a cut the simplifier could not resolve: nothing gained
        # dims read at a mixed-radix sum of ranks: one dim per rank, outermost first
        shape, strides, where, pieces = [], [], [], False
        all_ranks = set(dims)
        for d, p in enumerate(pos):
            parts = None if isinstance(p, Expr) else _radix(p, all_ranks, {**self.dom, **dom}, lay.shape[d])
            if parts is None:
                shape.append(lay.shape[d])
                strides.append(lay.strides[d])
                where.append(p)
                continue
            pieces = True
            for r, c, n in parts:
                shape.append(n)
                strides.append(lay.strides[d] * c)
                where.append(r)
        if not subs and not pieces:
            return None
        sub = Ctx(self.gen, dims, {**{r: v for r, v in self.dom.items() if r not in cuts}, **dom}, self.extra)
        if pieces:
            src = self.gen.view_code(src, lay, shape, strides, lay.offset)
        split_lay = Layout(tuple(shape), tuple(strides), lay.offset)
        v = None
        if not any(isinstance(p, Expr) for p in where) and all(
                _within(p, 0, n - 1, sub.ranges) for p, n in zip(where, shape)):
            v = sub._view(src, split_lay, list(where), dtype)  # the pieces in place: a view, no copy
        if v is None:
            v = sub._indexed(Access(a.tensor, tuple(where)), src, split_lay, dtype)
        spread = {x for r in cuts if subs[r].free_symbols & v.ranks for x in subs[r].free_symbols}
        v = sub.full(v, v.ranks | spread) if spread - v.ranks else v
        ranks = frozenset(r for r in self.dims if r in v.ranks or (r in cuts and subs[r].free_symbols & v.ranks))
        return Val(f"{v.op()}.reshape({self.shape_code(ranks)})", ranks, dtype, fresh=v.fresh)

    def _indexed(self, a: Access, src: str, lay: Layout, dtype) -> Val:
        pos = [p if isinstance(p, Expr) else ix.simplify(sympy.expand(self.offsets(p)), self.ranges) for p in a.indices]
        used_elsewhere = {}
        for d, p in enumerate(pos):
            syms = index_symbols(p) if isinstance(p, Expr) else sympy.sympify(p).free_symbols
            for s in syms:
                used_elsewhere.setdefault(s, set()).add(d)
        plain = []  # dims read whole by a rank used nowhere else: sliced, not indexed
        for d, p in enumerate(pos):
            if (isinstance(p, sympy.Symbol) and p in self.dims and used_elsewhere.get(p) == {d}
                    and _same(self.ext(p), lay.shape[d]) and any(isinstance(q, Expr) for q in pos)):
                plain.append(d)
        others = [d for d in range(len(pos)) if d not in plain]
        prank = [pos[d] for d in plain]
        sub = self.sub(dims=[r for r in self.dims if r not in prank]) if plain else self
        idx, ranks, any_tensor = [], set(prank), False
        for d in others:
            p = pos[d]
            if isinstance(p, Expr):
                v = sub.value(p)
                if v.is_scalar:
                    idx.append(str(int(v.scalar)))
                    continue
                code = v.code if v.dtype == dt.i64 else f"{v.op()}.long()"
                ranks |= v.ranks
            else:
                code, rk = sub.index_code(p)
                ranks |= rk
                if not rk:
                    idx.append(code)
                    continue
                if not _within(p, 0, lay.shape[d] - 1, sub.ranges):
                    code = f"{code}.clamp(0, {self.gen.int_code(lay.shape[d] - 1)})"
            any_tensor = True
            idx.append(code)
        if not any_tensor:  # positions known only at run time (a loop variable): one element
            idx = [f"min(max({i}, 0), {self.gen.int_code(lay.shape[d] - 1)})" if not _within(
                pos[d], 0, lay.shape[d] - 1, sub.ranges) else i for d, i in zip(others, idx)]
        # the tensor viewed with its dims in (others, plain) order, dense in its own layout
        base = self.gen.view_code(src, lay, [lay.shape[d] for d in others + plain],
                                  [lay.strides[d] for d in others + plain], lay.offset)
        if any_tensor and len(idx) == 1 and plain:  # whole rows: index_select copies each at once
            code = f"rt.take({base}, {idx[0]})"
        else:
            code = f"{base}[{', '.join(idx)}]"
        if not any_tensor:  # basic indexing: the sliced dims remain, a size-1 dim for each other rank
            code += f".reshape({self.gen.tuple_code([1] * len(sub.dims) + [lay.shape[d] for d in plain])})"
        if plain:
            order = list(sub.dims) + prank
            perm = [order.index(r) for r in self.dims]
            if perm != list(range(len(perm))):
                code += f".permute({', '.join(map(str, perm))})"
        return Val(code, frozenset(ranks), dtype, fresh=any_tensor)

    # ---- map operators
    def call(self, e: Call, want: dt.DType) -> Val:
        if e.op == "where":
            return self.where(e, want)
        if e.op == "cast":
            x = self.value(e.args[0], None)
            return self.convert(x, want)
        if e.op not in MAP_OPS:
            raise Unsupported(f"unknown map operator {e.op!r}")
        args = [self.value(a, want) for a in e.args]
        return self.apply(e.op, args, want)

    def apply(self, op: str, args: list, want: dt.DType) -> Val:
        nd = self.nd
        ranks = frozenset().union(*[a.ranks for a in args])
        if op in _INFIX and len(args) == 2:
            sym = _INFIX[op]
            code, fn = f"{args[0].op()} {sym} {args[1].op()}", _PYOP[sym]
            atom = False
        elif op == "neg":
            code, fn, atom = f"-{args[0].op()}", (lambda x: -x), False
        elif op == "gelu_tanh":
            code, fn, atom = f"F.gelu({args[0].code}, approximate='tanh')", MAP_OPS["gelu_tanh"].torch_fn, True
        elif (op in ("max", "min") and sum(a.is_scalar for a in args) == 1 and want.category != "bool"
              and not (want.is_int and any(isinstance(a.scalar, float) for a in args))):
            t, c = (args[0], args[1]) if args[1].is_scalar else (args[1], args[0])
            t = self.convert(t, want)
            fname = "clamp_min" if op == "max" else "clamp_max"
            code, fn, atom = f"torch.{fname}({t.code}, {c.code})", getattr(torch, fname), True
            args = [t, c]
        elif op in _FUNC:
            args = [a if not a.is_scalar or op in _SCALAR_OK else self.const_tensor(a.scalar, want) for a in args]
            code, fn, atom = f"{_FUNC[op]}({', '.join(a.code for a in args)})", _func_callable(op), True
        else:  # an operator registered by a user: its table entry
            args = [a if not a.is_scalar else self.const_tensor(a.scalar, want) for a in args]
            code = f"{self.gen.user_op(op)}({', '.join(a.code for a in args)})"
            fn, atom = MAP_OPS[op].torch_fn, True
        got = _result_dtype(fn, args, nd)
        v = Val(code, ranks, got, fresh=True, atom=atom)
        return self.convert(v, want)

    def convert(self, v: Val, want: dt.DType) -> Val:
        if v.dtype == want and not v.is_scalar:
            return v
        if v.is_scalar:
            return self.const_tensor(v.scalar, want)
        return Val(f"{v.op()}.to({_torch_dtype(want)})", v.ranks, want, fresh=True)

    def const_tensor(self, value, want: dt.DType) -> Val:
        """A literal as a strong tensor (shape all 1s), converted as the evaluator converts literals."""
        return Val(self.gen.constant(value, want, self.nd), frozenset(), want, fresh=False)

    def where(self, e: Call, want: dt.DType) -> Val:
        cond, a, b = e.args
        split = self._split_point(cond)
        if split is not None:
            kind, r, k = split
            if kind == "const":  # the condition is the same over the whole range
                v = self.value(a if k else b, want)
                return self.convert(v, want) if not v.is_scalar else self.const_tensor(v.scalar, want)
            first, second = (a, b) if kind == "true_first" else (b, a)
            off, n = self.dom[r]
            va = self.sub(dom={r: (off, k)}).value(first, want)
            vb = self.sub(dom={r: (off + k, n - k)}).value(second, want)
            if not (va.is_scalar and vb.is_scalar):
                parts = ", ".join(f"({v.code}, {self.gen.int_code(length)})" for v, length in ((va, k), (vb, n - k)))
                d = self.dims.index(r)
                ranks = va.ranks | vb.ranks | {r}
                if all(not v.is_scalar and v.dtype == want and v.ranks | {r} == ranks for v in (va, vb)):
                    # both halves tensors of the result's type and shape: torch.cat as is (rotary halves)
                    return Val(f"torch.cat(({va.code}, {vb.code}), {d})", frozenset(ranks), want, fresh=True)
                code = f"rt.cat({d}, ({parts}), {self.gen.tuple_code(self.shape(ranks))}, {_torch_dtype(want)})"
                return Val(code, frozenset(ranks), want, fresh=True)
        c = self.value(cond)
        if c.is_scalar:
            v = self.value(a if c.scalar else b, want)
            return self.convert(v, want) if not v.is_scalar else self.const_tensor(v.scalar, want)
        va, vb = self.value(a, want), self.value(b, want)
        if va.is_scalar and vb.is_scalar:
            va = self.const_tensor(va.scalar, want)
        got = _result_dtype(torch.where, [c, va, vb], self.nd)
        v = Val(f"torch.where({c.code}, {va.code}, {vb.code})", c.ranks | va.ranks | vb.ranks, got, fresh=True)
        return self.convert(v, want)

    def _split_point(self, cond: Expr):
        """For a condition on one rank against a threshold (`r < 64`): ("true_first"|"false_first", r, k)
        with the condition changing at local position k (0 < k < extent), ("const", None, truth) when it
        does not change over this context, or None."""
        diff = index_difference(cond)
        if diff is None:
            return None
        diff = self.offsets(diff)
        ranks = diff.free_symbols & set(self.dims)
        op = cond.op
        if not ranks:
            return None if diff.free_symbols - set(self.gen.size_syms) - set(self.extra) else self._const_cond(diff, op)
        if len(ranks) != 1 or op in ("eq", "ne"):
            lo, hi = ix.bounds(diff, self.ranges)
            truth = self._decided(lo, hi, op)
            return ("const", None, truth) if truth is not None else None
        (r,) = ranks
        aff = _affine(diff, [r])
        if aff is None or aff[1].get(r) not in (1, -1):
            return None
        const, coeff = aff
        if coeff[r] == -1:  # -r + c OP 0  <=>  r OP' c
            op = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}[op]
            t = const
        else:
            t = -const
        # r OP t: true for r < k (lt/le) or false for r < k (gt/ge)
        k = t if op in ("lt", "ge") else t + 1
        n = self.dom[r][1]
        k = sympy.expand(k)  # already local: `diff` was shifted by the context's offsets above
        lo, hi = ix.bounds(k, self.ranges)
        kind = "true_first" if op in ("lt", "le") else "false_first"
        if _proven(hi <= 0):
            return ("const", None, kind == "false_first")
        if _proven(lo >= n):
            return ("const", None, kind == "true_first")
        if _proven(lo >= 1) and _proven(hi <= n - 1):
            return (kind, r, k)
        return None

    def _const_cond(self, diff, op):
        lo, hi = ix.bounds(diff, self.ranges)
        truth = self._decided(lo, hi, op)
        return ("const", None, truth) if truth is not None else None

    @staticmethod
    def _decided(lo, hi, op):
        checks = {"lt": (hi < 0, lo >= 0), "le": (hi <= 0, lo > 0), "gt": (lo > 0, hi <= 0), "ge": (lo >= 0, hi < 0),
                  "eq": (sympy.And(sympy.Eq(lo, 0), sympy.Eq(hi, 0)), sympy.Or(lo > 0, hi < 0)),
                  "ne": (sympy.Or(lo > 0, hi < 0), sympy.And(sympy.Eq(lo, 0), sympy.Eq(hi, 0)))}
        yes, no = checks[op]
        if _proven(yes):
            return True
        if _proven(no):
            return False
        return None

    def full(self, v: Val, ranks=None) -> Val:
        """`v` expanded to full extent along `ranks` (default: every dim)."""
        ranks = set(self.dims if ranks is None else ranks)
        if ranks <= v.ranks:
            return v
        if v.is_scalar:
            raise Unsupported("a literal where a tensor is needed")
        shape = self.shape(v.ranks | ranks)
        return Val(f"{v.op()}.expand({self.gen.tuple_code(shape)})", v.ranks | ranks, v.dtype, fresh=False)


# ---------------------------------------------------------------- attention groups

@dataclass
class AttnPlan:
    """An attention group read back as softmax attention: scores S over (lead, p, m), values V over
    (lead, m, f), the group's output statement reading O[lead, p, f] (the normalized result)."""

    group: Kernel
    members: list
    lead: list
    p: sympy.Symbol
    m: sympy.Symbol
    f: sympy.Symbol
    ext: dict
    S: Expr
    V: Expr
    qk: Statement
    out: Statement
    out_expr: Expr  # out's expression reading "__O"
    safe: bool
    acc: dt.DType
    sdpa: dict | None = None  # Q, K, E, scale, causal, mask, gqa when the scores are a scaled Q K product
    why_not_sdpa: str = ""
    skipped: set = field(default_factory=set)  # members the attention step computes (not run one by one)


def _mul_factors(e: Expr) -> list:
    if isinstance(e, Call) and e.op == "mul":
        return _mul_factors(e.args[0]) + _mul_factors(e.args[1])
    return [e]


def _product(fs: list) -> Expr:
    out = fs[0]
    for f in fs[1:]:
        out = Call("mul", (out, f))
    return out


def _fresh_rank(taken: set, base: str) -> sympy.Symbol:
    name, n = base, 1
    names = {str(s) for s in taken}
    while name in names:
        name, n = f"{base}{n}", n + 1
    return ix.rank(name)


def _canon(e: Expr) -> Expr:
    return rewrite(e, canonical)


def _valid(kk, n, e, other, ragged):
    return Call("where", (Call("lt", (IndexValue(kk), IndexValue(n))), e, other)) if ragged else e


def plan_attention(m: Module, g: Kernel) -> AttnPlan:
    """Read an attention group's 1-pass cascade back as (scores, values, normalization); Unsupported
    when its statements are not exactly the cascade the attention kind defines."""
    if g.with_role("out") == [] or any(len(g.with_role(r)) != 1 for r in STEP_ROLES):
        raise Unsupported("not a single-output attention group (split-KV decode runs statement by statement)")
    prod = m.producers()
    st = {r: prod[g.member(r)] for r in STEP_ROLES + ("out",)}
    if not all(isinstance(s, Statement) for s in st.values()):
        raise Unsupported("a member is not a statement")
    types = m.types()
    lm, qk, out = st["lm"], st["qk"], st["out"]
    if not (lm.reduce and lm.reduce.op == "max" and len(lm.reduce.ranks) == 1 and lm.iterate is None):
        raise Unsupported("lm is not a max over one rank")
    if not all(isinstance(p, sympy.Symbol) for p in lm.index):
        raise Unsupported("lm's index is not plain ranks")
    m0, tile = lm.reduce.ranks[0]
    tile = int(tile)
    lead_p, m1 = list(lm.index[:-1]), lm.index[-1]
    M1 = lm.type.shape[-1]
    ext = dict(zip(lm.index, lm.type.shape))
    taken = set(lm.ranks()) | set(qk.ranks()) | set(st["slnv"].ranks()) | set(out.ranks())
    key = _fresh_rank(taken, "key")
    kk = tile * m1 + m0
    # the scores, in lm's ranks with the key rank m = kk
    s_kk = lm.expr
    ragged = False
    if (isinstance(s_kk, Call) and s_kk.op == "where" and s_kk.args[2] == NEG_INF
            and index_difference(s_kk.args[0]) is not None and s_kk.args[0].op == "lt"):
        n_guard = sympy.expand(kk - index_difference(s_kk.args[0]))
        if not (n_guard.free_symbols & {m0, m1}):
            ragged, N, s_kk = True, n_guard, s_kk.args[1]
    S = substitute(s_kk, {m0: key - tile * m1})
    if index_symbols(S) & {m0, m1}:
        raise Unsupported("the scores do not read the key rank as m1*tile + m0")
    qk_reads = [a for a in accesses(S) if a.tensor == qk.name]
    if not ragged:
        N = tile * M1
        if len(qk_reads) == 1 and key in qk_reads[0].indices:
            N = qk.type.shape[qk_reads[0].indices.index(key)]
            ragged = not _same(N, tile * M1)
            if ragged:
                raise Unsupported("unguarded ragged key tiles")
    N = sympy.sympify(N)
    if not _proven(N >= 1):  # no keys: SDPA gives 0 where an unsafe cascade gives NaN, softmax cannot run
        raise Unsupported("the key axis may be empty")
    p = lead_p[-1]
    lead = lead_p[:-1]
    ext[key] = N
    # the cascade's other statements, exactly as the attention kind writes them
    name = {r: s.name for r, s in st.items()}

    def at(role, *extra):
        return Access(name[role], tuple(lead_p) + tuple(extra))

    zero = Const(0.0)
    rm_prev, rm_next = at("rm", m1), at("rm", m1 + 1)
    rd_it = st["rd"].iterate
    want = {
        "lm": _valid(kk, N, s_kk, NEG_INF, ragged),
        "rm": Call("max", (rm_prev, at("lm", m1))),
        "sln": Call("where", (Call("eq", (rm_next, NEG_INF)), zero,
                              _valid(kk, N, Call("exp", (Call("sub", (s_kk, rm_next)),)), zero, ragged))),
        "prm": Call("where", (Call("eq", (rm_prev, NEG_INF)), zero, Call("exp", (Call("sub", (rm_prev, rm_next)),)))),
        "sld": at("sln", m1, m0),
        "rd": Call("add", (Call("mul", (at("prm", m1), at("rd", m1))), at("sld", m1))),
    }
    for role, expr in want.items():
        if _canon(expr) != st[role].expr:
            raise Unsupported(f"the group's {role} statement is not the 1-pass cascade's")
    if not (st["rm"].iterate and st["rm"].iterate.init == NEG_INF and rd_it and rd_it.init == zero
            and st["rnv"].iterate and st["rnv"].iterate.init == zero and st["sld"].reduce
            and st["sld"].reduce.op == "sum" and st["sld"].reduce.ranks == ((m0, tile),)):
        raise Unsupported("the group's running statements are not the 1-pass cascade's")
    slnv, rnv = st["slnv"], st["rnv"]
    if not (slnv.reduce and slnv.reduce.op == "sum" and slnv.reduce.ranks == ((m0, tile),)
            and tuple(slnv.index[:-1]) == tuple(lead_p) + (m1,)):
        raise Unsupported("slnv is not a sum over the key tile")
    f = slnv.index[-1]
    factors = _mul_factors(slnv.expr)
    if factors[0] != at("sln", m1, m0) or len(factors) < 2:
        raise Unsupported("slnv does not weigh the values by sln")
    v_kk = _product(factors[1:])
    if ragged:
        if not (isinstance(v_kk, Call) and v_kk.op == "where" and v_kk.args[2] == zero
                and v_kk.args[0] == _canon(Call("lt", (IndexValue(kk), IndexValue(N))))):
            raise Unsupported("ragged values are not guarded")
        v_kk = v_kk.args[1]
    V = substitute(v_kk, {m0: key - tile * m1})
    if index_symbols(V) & {m0, m1, p}:
        raise Unsupported("the values depend on the query or the tile ranks")
    ext[f] = slnv.type.shape[-1]
    rnv_want = Call("add", (Call("mul", (at("prm", m1), Access(name["rnv"], tuple(lead_p) + (f, m1)))),
                            Access(name["slnv"], tuple(lead_p) + (m1, f))))
    if _canon(rnv_want) != rnv.expr or \
            tuple(rnv.index) != tuple(lead_p) + (f, m1 + 1):
        raise Unsupported("rnv is not the running numerator")
    # the output: [cast](rnv[.., M1] / [max](rd[.., M1], 1.0))
    e = out.expr
    cast = None
    if isinstance(e, Call) and e.op == "cast":
        cast, e = e.attr, e.args[0]
    if not (isinstance(e, Call) and e.op == "div"):
        raise Unsupported("the output is not numerator / denominator")
    num, den = e.args
    safe = False
    if isinstance(den, Call) and den.op == "max" and den.args[1] == Const(1.0):
        den, safe = den.args[0], True
    if not (isinstance(num, Access) and num.tensor == name["rnv"] and isinstance(den, Access)
            and den.tensor == name["rd"] and _same(num.indices[-1], M1) and _same(den.indices[-1], M1)
            and tuple(den.indices[:-1]) == tuple(num.indices[:-2])):
        raise Unsupported("the output does not read the final numerator and denominator")
    acc = infer(s_kk, lambda t: types[t].dtype)[0]
    o_read = Access("__O", tuple(num.indices[:-1]))
    out_expr = Call("cast", (o_read,), cast) if cast is not None else o_read
    plan = AttnPlan(g, list(g.members), lead, p, key, f, ext, S, V, qk, out, out_expr, safe, acc)
    try:
        plan.sdpa = _sdpa_parts(plan, types)
    except Exception as why:  # noqa: BLE001
        plan.why_not_sdpa = _reason(why)
    return plan


def _sdpa_parts(plan: AttnPlan, types: dict) -> dict:
    """Q, K, scale and mask of scores S = scale * sum_e Q K [+ bias] [masked]; Unsupported otherwise."""
    qk, S = plan.qk, plan.S
    dtype_of = lambda t: types[t].dtype  # noqa: E731
    reads = [a for a in accesses(S) if a.tensor == qk.name]
    if len(reads) != 1 or qk.reduce is None or qk.reduce.op != "sum" or qk.iterate is not None:
        raise Unsupported("the scores are not one read of a sum of products")
    pos = reads[0].indices
    qk_ranks = [r for r in qk.index]
    if not all(isinstance(x, sympy.Symbol) for x in qk_ranks) or any(isinstance(x, Expr) for x in pos):
        raise Unsupported("qk's index is not plain ranks, or the scores gather from it")
    if plan.p not in pos or plan.m not in pos or \
            any((plan.p in sympy.sympify(x).free_symbols or plan.m in sympy.sympify(x).free_symbols)
                for x in pos if x not in (plan.p, plan.m)):
        raise Unsupported("the scores read qk at other than (lead, query, key)")
    taken = set(plan.ext) | set(qk.ranks())
    E = []
    ren = dict(zip(qk_ranks, pos))
    for r, n in qk.reduce.ranks:
        e = _fresh_rank(taken | set(E), "e")
        E.append(e)
        ren[r] = e
    ext = dict(plan.ext)
    ext.update({e: n for e, (_, n) in zip(E, qk.reduce.ranks)})
    ranges = {r: (sympy.Integer(0), sympy.sympify(n) - 1) for r, n in ext.items()}
    renamed = map_indices(substitute(qk.expr, ren), lambda q: ix.simplify(q, ranges))
    body, post = peel_invariant(renamed, set(E))
    scale = 1.0
    for op, y in post:
        if not (isinstance(y, Const) and isinstance(y.value, (int, float)) and not isinstance(y.value, bool)):
            raise Unsupported("the scores are scaled by a tensor")
        scale = scale * y.value if op == "mul" else scale / y.value
    qf, kf = [], []
    for fct in _mul_factors(body):
        syms = index_symbols(fct)
        if plan.m in syms and plan.p in syms:
            raise Unsupported("a score factor reads both query and key")
        if not syms & set(E):
            raise Unsupported("a score factor is outside the sum")
        (kf if plan.m in syms else qf).append(fct)
    if not qf or not kf:
        raise Unsupported("the scores are not a product of a query side and a key side")
    # peel masks and biases off the scores
    conds, biases = [], []
    e = S
    mult = 1.0  # biases inside `c * (qk + b)` are scaled by c

    def reads_qk(x):
        return any(a.tensor == qk.name for a in accesses(x))

    def number(x):
        return isinstance(x, Const) and isinstance(x.value, (int, float)) and not isinstance(x.value, bool)

    def bias(b):
        return b if mult == 1.0 else Call("mul", (b, Const(mult)))

    while not (isinstance(e, Access) and e.tensor == qk.name):
        if isinstance(e, Call) and e.op == "where" and e.args[2] == NEG_INF and not reads_qk(e.args[0]):
            diff = index_difference(e.args[0])
            if not (diff is not None and Ctx._decided(*ix.bounds(diff, ranges), e.args[0].op) is True):
                conds.append(e.args[0])
            e = e.args[1]
        elif isinstance(e, Call) and e.op == "where" and e.args[1] == NEG_INF and not reads_qk(e.args[0]):
            c = e.args[0]
            flip = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}
            c = _canon(Call(flip[c.op], c.args)) if index_difference(c) is not None else Call("not", (c,))
            diff = index_difference(c)
            if not (diff is not None and Ctx._decided(*ix.bounds(diff, ranges), c.op) is True):
                conds.append(c)
            e = e.args[2]
        elif isinstance(e, Call) and e.op in ("add", "sub") and reads_qk(e.args[0]) and not reads_qk(e.args[1]):
            biases.append(bias(e.args[1] if e.op == "add" else Call("neg", (e.args[1],))))
            e = e.args[0]
        elif isinstance(e, Call) and e.op == "add" and reads_qk(e.args[1]) and not reads_qk(e.args[0]):
            biases.append(bias(e.args[0]))
            e = e.args[1]
        elif isinstance(e, Call) and e.op in ("mul", "div") and reads_qk(e.args[0]) and number(e.args[1]) \
                and e.args[1].value > 0:
            c = e.args[1].value if e.op == "mul" else 1.0 / e.args[1].value
            scale, mult = scale * c, mult * c
            e = e.args[0]
        elif isinstance(e, Call) and e.op == "mul" and reads_qk(e.args[1]) and number(e.args[0]) and e.args[0].value > 0:
            scale, mult = scale * e.args[0].value, mult * e.args[0].value
            e = e.args[1]
        elif isinstance(e, Call) and e.op == "cast" and e.attr.is_float:
            e = e.args[0]
        else:
            raise Unsupported("the scores are not QK^T with masks and additive biases")
    finite = all(not isinstance(n, Access) and not (isinstance(n, Const) and isinstance(n.value, float)
                                                    and not math.isfinite(n.value)) for b in biases for n in walk(b))
    if not plan.safe and (conds or not finite):
        # the cascade gives NaN where every score of a row is -inf, SDPA gives 0
        raise Unsupported("a masked cascade that yields NaN for fully masked rows")
    causal = False
    if len(conds) == 1 and not biases:
        diff = index_difference(conds[0])
        if diff is not None:
            op = conds[0].op
            if op in ("le", "lt", "ge", "gt"):
                d = sympy.expand(diff if op in ("le", "lt") else -diff)
                if op in ("lt", "gt"):
                    d = d + 1  # m - p < 1  <=>  m - p <= 0
                causal = _same(d, plan.m - plan.p)
    mask = None
    if not causal and (conds or biases):
        if biases:
            mask = biases[0]
            for b in biases[1:]:
                mask = Call("add", (mask, b))
            for c in conds:
                mask = Call("where", (c, mask, NEG_INF))
        else:
            mask = conds[0]
            for c in conds[1:]:
                mask = Call("and", (mask, c))
    return {"Q": _product(qf), "K": _product(kf), "E": E, "ext": ext, "scale": scale, "causal": causal,
            "mask": mask, "bool_mask": bool(conds) and not biases}


def _narrow(e: Expr, dtype_of):
    """`f32(x)` of a 16-bit x -> (x, its type); else (e, e's type)."""
    if isinstance(e, Call) and e.op == "cast" and e.attr == dt.f32:
        inner = infer(e.args[0], dtype_of)[0]
        if inner in (dt.bf16, dt.f16):
            return e.args[0], inner
    return e, infer(e, dtype_of)[0]


def _coarse(exprs: list, r, ext_r):
    """How `exprs` (keys, values) read the head rank r: ("none", exprs) when they do not;
    ("group", (g, r'), exprs in r' = r // g) when only as r // g with g dividing the extent (GQA);
    ("direct", exprs) otherwise."""
    if not any(r in index_symbols(e) for e in exprs):
        return "none", None, exprs
    gs = set()
    for e in exprs:
        for n in walk(e):
            ps = [q for q in n.indices if not isinstance(q, Expr)] if isinstance(n, Access) else (
                [n.expr] if isinstance(n, IndexValue) else [])
            for q in ps:
                gs |= {int(a.args[1]) for a in sympy.sympify(q).atoms(ix.FloorDiv)
                       if a.args[0] == r and a.args[1].is_Integer}
    if len(gs) != 1:
        return "direct", None, exprs
    (g,) = gs
    q = ix.exact_quotient(sympy.sympify(ext_r), sympy.Integer(g))
    if q is None:
        return "direct", None, exprs
    rc = ix.rank(f"{r}_kv")
    rng = {rc: (sympy.Integer(0), q - 1)}
    out = [map_indices(substitute(e, {r: g * rc}), lambda p: ix.simplify(p, rng)) for e in exprs]
    if any(r in index_symbols(e) for e in out):
        return "direct", None, exprs
    return "group", (g, rc, q), out


# ---------------------------------------------------------------- the generator

RESERVED = {"torch", "F", "math", "rt", "inputs", "run", "consts", "device", "MAP_OPS", "REDUCE_OPS"} | set(
    dir(builtins))  # the program calls min, max, range


class TorchGen:
    """Generates the program of one module."""

    def __init__(self, m: Module):
        self.m = m
        self.types = dict(m.types())
        self.layout: dict = {}
        self.py: dict = {}
        self.used_names = set(RESERVED)
        self.consts: list = []  # (name, code) made once per device
        self.const_key: dict = {}
        self.size_syms: dict = {}  # size symbol -> python name
        self.steps: list = []  # [(lines, defines, reads, temps)]
        self.lines: list | None = None
        self.reads: set = set()
        self.temps: list = []
        self.memo: dict = {}
        self.shared: dict = {}
        self.fallbacks: list = []
        self.attention: list = []
        self.moe: list = []
        self.views: set = set()  # names bound as views of other tensors
        self.plain_mm = None
        self.kept: dict = {}  # code -> (IR-like name, python name) of a value steps share (see `reuse`)
        self.pending: dict = {}  # ... made by the step being generated
        self.reusing = True
        self._mutable = None  # a regex of the names whose value changes during a run (states, collectives)
        self._n = 0
        for s in m.sizes:
            self.size_syms[s] = self._unique(f"n_{s}")

    # ---- names
    def _unique(self, base: str) -> str:
        name = base if base.isidentifier() and not keyword.iskeyword(base) else "v_" + "".join(
            c if c.isalnum() else "_" for c in base)
        if name.startswith("_"):
            name = "v" + name
        out, n = name, 1
        while out in self.used_names:
            out, n = f"{name}_{n}", n + 1
        self.used_names.add(out)
        return out

    def pyname(self, tensor: str) -> str:
        if tensor not in self.py:
            self.py[tensor] = self._unique(tensor)
        return self.py[tensor]

    def temp(self, base: str) -> str:
        """A step-local name: `_<base><n>` (constants are `_c<n>`, `_ar<n>`: the bases never meet)."""
        assert base not in ("c", "ar", "op", "red")
        self._n += 1
        name = f"_{base}{self._n}"
        self.temps.append(name)
        return name

    def emit(self, line: str) -> None:
        self.lines.append(line)

    # ---- code for integers, shapes, constants
    def sym_code(self, s) -> str:
        if s in self.size_syms:
            return self.size_syms[s]
        if str(s).startswith("_it_"):
            return str(s)
        raise Unsupported(f"symbol {s} has no value here")

    def int_code(self, e) -> str:
        e = sympy.sympify(e)
        if e.is_Integer:
            return str(int(e))
        if isinstance(e, sympy.Symbol):
            return self.sym_code(e)
        code = _arith_code(e, self.int_code)
        if code is not None:
            return code
        if isinstance(e, sympy.Min):
            return f"min({', '.join(self.int_code(a) for a in e.args)})"
        if isinstance(e, sympy.Max):
            return f"max({', '.join(self.int_code(a) for a in e.args)})"
        raise Unsupported(f"size expression {e} has no Python form")

    def tuple_code(self, xs) -> str:
        items = [self.int_code(x) for x in xs]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"

    def _const(self, key, code: str, base: str) -> str:
        name = self.const_key.get(key)
        if name is None:
            name = self.const_key[key] = f"_{base}{len(self.consts)}"
            self.consts.append((name, code))
        return name

    def arange(self, n, d: int, nd: int) -> str:
        n = sympy.sympify(n)
        shape = ["1"] * nd
        if n.is_Integer:
            shape[d] = str(int(n))
            return self._const(("ar", int(n), d, nd), f"torch.arange({int(n)}, device=device).view({', '.join(shape)}"
                                                      f"{',' if nd == 1 else ''})", "ar")
        return f"rt.ar({self.int_code(n)}, {d}, {nd}, device)"

    def constant(self, value, want: dt.DType, nd: int) -> str:
        lit = _pyliteral(value)
        src = f"torch.tensor({lit}, dtype=torch.float64)" if isinstance(value, float) else f"torch.tensor({lit})"
        shape = ", ".join(["1"] * nd) + ("," if nd == 1 else "")
        code = f"{src}.to({_torch_dtype(want)}).to(device)" + (f".reshape({shape})" if nd else "")
        return self._const(("k", type(value).__name__, repr(value), str(want), nd), code, "c")

    def user_op(self, op: str) -> str:
        return self._const(("op", op), f"MAP_OPS[{op!r}].torch_fn", "op")

    def view_code(self, src: str, lay: Layout, sizes, strides, off) -> str:
        """`src` seen with (sizes, strides, storage offset): the tensor itself, a view, a permute, or as_strided."""
        sizes = [sympy.sympify(x) for x in sizes]
        strides = [sympy.sympify(x) for x in strides]
        if _same(off, lay.offset):
            tgt = [(n, st) for n, st in zip(sizes, strides) if n != 1]
            have = [(n, st, i) for i, (n, st) in enumerate(zip(lay.shape, lay.strides)) if n != 1]
            perm, used = [], set()
            for n, st in tgt:
                hit = next((i for hn, hs, i in have if i not in used and _same(hn, n) and _same(hs, st)), None)
                if hit is None:
                    break
                perm.append(hit)
                used.add(hit)
            if self._dense_pairs(lay.shape, lay.strides) and self._dense_pairs(sizes, strides) and \
                    _same(sympy.Mul(*lay.shape), sympy.Mul(*sizes)) and len(perm) != len(tgt):
                return f"{src}.view({self.tuple_code(sizes)})"  # a reshape of a contiguous tensor
            if len(perm) == len(tgt) == len(have):
                code, cur = src, list(lay.shape)
                if perm != sorted(perm):
                    full = perm + [i for i, n in enumerate(lay.shape) if n == 1]
                    code = f"{src}.permute({', '.join(map(str, full))})"
                    cur = [lay.shape[i] for i in full]
                if not (len(cur) == len(sizes) and all(_same(a, b) for a, b in zip(cur, sizes))):
                    code += f".view({self.tuple_code(sizes)})"
                return code
            # a permuted reshape of a contiguous tensor: view as the dims in stride order, then permute
            nz = [d for d, n in enumerate(sizes) if n != 1]
            numeric = all(self._number(strides[d]) is not None for d in nz)
            order = sorted(nz, key=lambda d: -self._number(strides[d])) if numeric else nz
            if numeric and self._dense_pairs(lay.shape, lay.strides) and _same(lay.offset, 0) and _same(
                    sympy.Mul(*[sizes[d] for d in nz]), sympy.Mul(*lay.shape)) and self._dense_pairs(
                    [sizes[d] for d in order], [strides[d] for d in order]):
                perm = [order.index(d) for d in nz]
                code = f"{src}.view({self.tuple_code([sizes[d] for d in order])}).permute({', '.join(map(str, perm))})"
                if len(nz) != len(sizes):
                    code += f".view({self.tuple_code(sizes)})"
                return code
        return f"{src}.as_strided({self.tuple_code(sizes)}, {self.tuple_code(strides)}, {self.int_code(off)})"

    @staticmethod
    def _number(x):
        x = sympy.sympify(x)
        return int(x) if x.is_Integer else None

    @staticmethod
    def _dense_pairs(shape, strides) -> bool:
        """Are these the strides of a contiguous tensor of `shape` (size-1 dims aside)?"""
        want = _contiguous_strides(shape)
        return all(n == 1 or _same(a, b) for n, a, b in zip(shape, strides, want))

    # ---- steps
    def begin(self, header: list) -> None:
        self.lines = list(header)
        self.reads = set()
        self.temps = []
        self.memo = {}
        self.pending = {}
        self.reusing = True

    def end(self, defines: list) -> None:
        shared = [name for name, _ in self.pending.values()]
        self.steps.append((self.lines, list(defines) + shared, set(self.reads), list(self.temps)))
        self.kept.update(self.pending)
        self.pending = {}
        self.lines = None

    def reuse(self, code: str) -> str:
        """`code` under a name later steps may read: the first step computing it keeps it (freed after its
        last reader, as intermediates are); a later step with the same code reads the name — a layer's
        normalized input feeding its q, k and v products once, the cache slots every layer's K/V write
        uses. Code reading a value that changes during a run (a state an update writes, a collective in
        flight) and code inside a loop are never shared."""
        if not self.reusing or self._mutable_names().search(code):
            return code
        hit = self.kept.get(code) or self.pending.get(code)
        if hit is None:
            self._n += 1
            hit = self.pending[code] = (f"__keep{self._n}", f"_keep{self._n}")
            self.py[hit[0]] = hit[1]
            self.emit(f"{hit[1]} = {code}")
        self.reads.add(hit[0])
        return hit[1]

    def _mutable_names(self):
        if self._mutable is None:
            names = {i.name for i in self.m.inputs if i.kind == "state"}
            for op in self.m.body:
                if isinstance(op, Update):
                    names |= {op.target, op.name}
                elif isinstance(op, Collective):
                    names.add(op.name)
            alts = "|".join(re.escape(self.pyname(n)) for n in sorted(names))
            self._mutable = re.compile(rf"\b({alts})\b" if alts else r"(?!)")
        return self._mutable

    @staticmethod
    def _comment(s: Statement | Opaque | Update) -> list:
        text = fmt_op(s.replace(loc=None))
        out = [f"# IR: {text}"]
        if s.loc:
            out.append(f"# {s.loc}")
        return out

    # ---- the program
    def generate(self) -> TorchProgram:
        m = self.m
        for i in m.inputs:
            self.layout[i.name] = Layout.dense(i.type.shape)
        groups = {}
        plans = {}
        for g in m.kernels:
            if g.kind != "attention":
                continue
            try:
                plans[g.name] = plan = plan_attention(m, g)
                self.attention.append((g.name, "sdpa" if plan.sdpa else f"3-pass ({plan.why_not_sdpa})"))
            except Exception as why:  # noqa: BLE001 (anything unexpected: the statements run one by one)
                self.attention.append((g.name, f"statements ({_reason(why)})"))
        skip, at_end = set(), {}
        users = m.users()
        for gname, plan in plans.items():
            members = set(plan.members)
            needed = {n for n in members if n != plan.out.name and (
                n in m.outputs or any(o.outputs[0] not in members for o in users.get(n, [])))}
            if plan.sdpa is None and plan.qk.name in members:
                needed.add(plan.qk.name)
            prod = m.producers()
            frontier = list(needed)
            while frontier:
                for r in prod[frontier.pop()].reads():
                    if r in members and r not in needed:
                        needed.add(r)
                        frontier.append(r)
            plan.skipped = members - needed - {plan.out.name}
            skip |= plan.skipped
            at_end[plan.out.name] = plan
        routed = {}  # combine statement -> MoE plan: the experts run routed at the combine
        dead = set()  # outputs of decode_experts calls only routed compressed chains read: never run
        for plan in moe_plans(m):
            inner = plan.members - {plan.chain.comb.name}
            if not plan.self_contained(m):
                self.moe.append((plan.name, "statements (an intermediate is read outside the chain)"))
                continue  # an intermediate value someone else reads: the statements run one by one
            plan.skipped = inner
            skip |= inner
            routed[plan.chain.comb.name] = plan
            if plan.compressed:
                dead |= {c.decode for c in plan.compressed}
                self.moe.append((plan.name, f"routed, compressed experts: {COMPRESSED_NOTE}"))
            else:
                self.moe.append((plan.name, "routed"))
        epilogues = self._addmm_candidates(skip | set(at_end) | set(routed))
        deferred = {acc.name for acc in epilogues.values()}
        marks = any(isinstance(op, Collective) for op in m.body)  # a distributed program records a timeline
        pending: dict = {}  # collectives in flight (async_op=True): waited for where first read
        for n, op in enumerate(m.body):
            for name in sorted(op.reads() & set(pending)):
                self.wait_step(pending.pop(name))
            if marks:
                self.begin([])
                self.emit(f"rt.mark({n})")
                self.end([])
            if isinstance(op, Collective):
                self.collective(n, op)
                pending[op.name] = op
            elif isinstance(op, Opaque):
                if not set(op.outputs) <= dead:
                    self.opaque(n, op)
            elif isinstance(op, Update):
                self.update(n, op)
            elif op.name in at_end:
                self.attention_step(at_end[op.name])
            elif op.name in routed:
                self.moe_step(routed[op.name])
            elif op.name in epilogues:
                self.addmm_step(epilogues[op.name], op)
            elif op.name not in skip and op.name not in deferred:
                self.statement_step(op)
        for op in pending.values():
            self.wait_step(op)
        if marks:
            self.begin([])
            self.emit(f"rt.mark({len(m.body)})")
            self.end([])
        return TorchProgram(m.name, self.source(), self.fallbacks, self.attention, self.moe)

    def collective(self, n: int, op: Collective) -> None:
        """Issue a collective asynchronously: the name holds the call in flight until `wait_step`."""
        self.begin(self._comment(op))
        self.reads.add(op.src)
        self.emit(f"{self.pyname(op.name)} = rt.collective({n}, {self.pyname(op.src)})")
        self.layout[op.name] = Layout.dense(op.type.shape)
        self.end([op.name])

    def wait_step(self, op: Collective) -> None:
        """Wait for a collective where its result is first read."""
        self.begin([f"# wait for {op.kind} {op.name}"])
        self.reads.add(op.name)
        self.emit(f"{self.pyname(op.name)} = rt.wait({self.pyname(op.name)})")
        self.end([op.name])

    def statement_step(self, s: Statement) -> None:
        self.begin(self._comment(s))
        try:
            self.statement(s)
        except Exception as why:  # noqa: BLE001 (never a wrong or missing result: the evaluator runs it)
            self.begin(self._comment(s))
            self.fallback(s, _reason(why))
        self.end([s.name])

    # ---- matmul + add: one addmm, as eager's nn.Linear
    def _addmm_candidates(self, taken: set) -> dict:
        """epilogue name -> contraction: a 2-D float sum (f32/f64) read by nothing but one map
        `acc[..] + x` (either order) reading it in place (same flat offsets), of the same type."""
        m = self.m
        users, prod = m.users(), m.producers()
        out = {}
        for s in m.statements:
            if not (s.reduce and s.reduce.op == "sum" and s.iterate is None and len(s.index) == 2
                    and s.type.dtype in (dt.f32, dt.f64) and s.name not in m.outputs and s.name not in taken):
                continue
            readers = users.get(s.name, [])
            if len(readers) != 1 or not isinstance(readers[0], Statement):
                continue
            e = readers[0]
            if not (e.reduce is None and e.iterate is None and e.type.dtype == s.type.dtype and e.name not in taken
                    and isinstance(e.expr, Call) and e.expr.op == "add"
                    and all(isinstance(p, sympy.Symbol) for p in e.index)):
                continue
            reads = [a for a in e.expr.args if isinstance(a, Access) and a.tensor == s.name]
            if len(reads) != 1 or s.name in tensors_read_of(other(e.expr.args, reads[0])):
                continue
            out[e.name] = s
        del prod
        return out

    def addmm_step(self, acc: Statement, e: Statement) -> None:
        """`e = acc + x` with acc = A @ B: `torch.addmm(x, A, B)`, x read in acc's ranks; else both statements."""
        self.begin(self._comment(acc) + self._comment(e))
        self.plain_mm = None
        try:
            read = next(a for a in e.expr.args if isinstance(a, Access) and a.tensor == acc.name)
            x = other(e.expr.args, read)
            ext = dict(zip(acc.index, acc.type.shape))
            rng = {r: (sympy.Integer(0), sympy.sympify(n) - 1) for r, n in ext.items()}
            flat = ix.flat_offset(acc.index, acc.type.shape)
            shape = [sympy.sympify(n) for n in e.type.shape]
            sub = {r: ix.Mod(ix.FloorDiv(flat, st), n) if n != 1 else sympy.Integer(0)
                   for r, st, n in zip(e.index, ix.strides(shape), shape)}
            # acc is read in place when its positions, seen from acc's own ranks, are acc's index
            back = [ix.simplify(sympy.sympify(p).xreplace(sub), rng) for p in read.indices]
            if not all(_same(a, b) for a, b in zip(back, acc.index)) or not _same(sympy.Mul(*shape), sympy.Mul(
                    *acc.type.shape)):
                raise Unsupported("the epilogue does not read the product in place")
            x2 = map_indices(substitute(x, sub), lambda p: ix.simplify(p, rng))
            if infer(x2, lambda t: self.types[t].dtype)[0] != acc.type.dtype:
                raise Unsupported("the added term has another type")
            self.statement(acc)  # binds acc's name to torch.mm(A, B) ...
            if self.plain_mm is None or self.lines[-1] != f"{self.pyname(acc.name)} = torch.mm({', '.join(self.plain_mm)}).contiguous()":
                raise Unsupported("the product is not a plain matmul")
            self.lines.pop()  # ... which becomes addmm with x
            octx = Ctx(self, list(acc.index), {r: (0, n) for r, n in ext.items()})
            self._count_shared(x2)
            xv = octx.value(x2, acc.type.dtype)
            if xv.is_scalar:
                raise Unsupported("a literal term")
            xv = octx.convert(xv, acc.type.dtype)
            code = f"torch.addmm({xv.code}, {', '.join(self.plain_mm)})"
            if not all(_same(a, b) for a, b in zip(shape, acc.type.shape)) or len(shape) != 2:
                code += f".view({self.tuple_code(shape)})"
            self.emit(f"{self.pyname(e.name)} = {code}")
            self.layout[e.name] = Layout.dense(shape)
            self.views.discard(e.name)
            self.reads.discard(acc.name)
            self.end([e.name])
        except Exception as why:  # noqa: BLE001 (the two statements, one after the other)
            if not isinstance(why, Unsupported):
                _reason(why)
            self.lines = None
            self.statement_step(acc)
            self.statement_step(e)

    def fallback(self, s: Statement, why: str) -> None:
        self.fallbacks.append((s.name, why))
        names = sorted(s.reads() - {s.name})  # an iterative statement reads its own, evaluator-made, buffer
        for r in names:
            self.reads.add(r)
        args = ", ".join(f"{r!r}: {self.pyname(r)}" for r in names)
        self.emit(f"# not generated ({why}): the reference evaluator runs this statement")
        self.emit(f"{self.pyname(s.name)} = rt.statement({s.name!r}, {{{args}}}, {self.sizes_dict()})")
        self.layout[s.name] = Layout.dense(s.type.shape)

    def sizes_dict(self) -> str:
        return "{" + ", ".join(f"{str(s)!r}: {n}" for s, n in self.size_syms.items()) + "}"

    def opaque(self, n: int, op: Opaque) -> None:
        self.begin(self._comment(op))
        names = sorted(op.reads())
        self.reads |= set(names)
        args = ", ".join(f"{r!r}: {self.pyname(r)}" for r in names)
        outs = ", ".join(self.pyname(o) for o in op.outputs)
        self.emit(f"{outs}{',' if len(op.outputs) == 1 else ''} = rt.opaque({n}, {{{args}}}, {self.sizes_dict()})")
        for name, typ in op.outputs_typed:
            self.layout[name] = Layout.dense(typ.shape)
        self.end(list(op.outputs))

    def update(self, n: int, op: Update) -> None:
        """A write into a state (a KV cache): in place, the new version is the state's own buffer — one
        `index_put_` of the values at their positions (computed over the update's ranks like a statement's
        operands), points outside the state dropped; what has no torch form runs through the evaluator."""
        self.begin(self._comment(op))
        target = self.pyname(op.target)
        self.reads |= set(op.reads())
        try:
            ctx = Ctx(self, [r for r, _ in op.ranks], {r: (0, e) for r, e in op.ranks})
            want = self.types[op.target].dtype
            value = ctx.value(op.expr, want)
            value = ctx.full(ctx.convert(ctx.const_tensor(value.scalar, want) if value.is_scalar else value, want))
            # trailing positions that are the update's last ranks, in order and whole, are slices: each
            # index_put_ point writes a row (a head's K/V), not one element
            ranks, shape = [r for r, _ in op.ranks], self.types[op.target].shape
            k = 0
            while (k < min(len(ranks), len(op.index)) - 1 and op.index[-1 - k] == ranks[-1 - k]
                   and _same(ctx.ext(ranks[-1 - k]), shape[-1 - k])
                   and not any(ranks[-1 - k] in _index_symbols_deep(p) for p in op.index[:len(op.index) - 1 - k])):
                k += 1
            lead = ctx.sub(dims=ranks[:len(ranks) - k]) if k else ctx
            positions = [self.reuse(lead.full(lead.value(p) if isinstance(p, Expr) else lead.index_value(p)).op())
                         for p in op.index[:len(op.index) - k]]
            self.emit(f"rt.put({target}, ({', '.join(positions)},), {value.op()})")
        except Unsupported as why:
            self.fallbacks.append((op.name, _reason(why)))
            names = sorted(op.reads())
            args = ", ".join(f"{r!r}: {self.pyname(r)}" for r in names)
            self.emit(f"rt.update({n}, {{{args}}}, {self.sizes_dict()})")
        self.emit(f"{self.pyname(op.name)} = {target}")
        self.layout[op.name] = self.layout[op.target]
        self.end([op.name])

    # ---- one statement
    def _count_shared(self, e: Expr) -> None:
        self.shared = {}
        for n in walk(e):
            if isinstance(n, Call):
                self.shared[n] = self.shared.get(n, 0) + 1

    def statement(self, s: Statement) -> None:
        if not all(isinstance(p, sympy.Symbol) for i, p in enumerate(s.index)) and s.iterate is None:
            raise Unsupported("an output position that is not a rank")
        self._count_shared(s.expr)
        self.reusing = s.iterate is None  # a loop body's values are the last iteration's after it
        if s.iterate is not None:
            return self.iterate(s)
        out = list(s.index)
        ext = dict(zip(s.index, s.type.shape))
        if s.reduce is None:
            ctx = Ctx(self, out, {r: (0, ext[r]) for r in out})
            v = ctx.value(s.expr, s.type.dtype)
            return self.assign(s, ctx, v)
        red = [r for r, _ in s.reduce.ranks]
        dom = {r: (0, ext[r]) for r in out}
        dom.update({r: (0, n) for r, n in s.reduce.ranks})
        ctx = Ctx(self, out + red, dom)
        octx = Ctx(self, out, {r: dom[r] for r in out})
        dtype_of = lambda t: self.types[t].dtype  # noqa: E731
        expr_dtype = infer(s.expr, dtype_of)[0]
        if s.reduce.op == "sum" and expr_dtype.is_float and any(not (sympy.sympify(n).is_Integer and int(n) <= 1)
                                                                 for _, n in s.reduce.ranks):
            acc = dt.f32 if expr_dtype.bits < 32 else expr_dtype
            v = self.float_sum(s, ctx, octx, acc)
        elif s.reduce.op == "sum" and _narrow_int_product(s, dtype_of):
            v = self.float_sum(s, ctx, octx, dt.f64)  # an int8 GEMM: exact in f64 (see _narrow_int_product)
        else:
            v = self.reduction(s, ctx, octx)
        self.assign(s, octx, v)

    def assign(self, s: Statement, ctx: Ctx, v: Val) -> None:
        """Bind the statement's result, converted to its type: a fresh dense tensor, or (a statement that
        only moves data) a view whose strides are known here."""
        name = self.pyname(s.name)
        shape = [sympy.sympify(x) for x in s.type.shape]
        want = s.type.dtype
        if v.is_scalar:
            v = ctx.const_tensor(v.scalar, want)
        v = ctx.convert(v, want)
        full = set(ctx.dims)
        self.views.discard(s.name)
        if v.layout is not None:
            lay = v.layout
            code = v.code
            if not v.ranks >= full:
                code += f".expand({self.tuple_code(shape)})"
                lay = Layout(tuple(shape), tuple(st if r in v.ranks else sympy.Integer(0)
                                                 for r, st in zip(ctx.dims, lay.strides)), lay.offset)
            self.emit(f"{name} = {code}")
            self.layout[s.name] = lay
            self.views.add(s.name)
            return
        code = v.op() + (".contiguous()" if v.fresh else ".clone(memory_format=torch.contiguous_format)")
        if v.ranks >= full:
            self.emit(f"{name} = {code}")
            self.layout[s.name] = Layout.dense(shape)
            return
        # does not vary along some ranks: store what varies, broadcast the rest (stride 0)
        small = ctx.shape(v.ranks)
        self.emit(f"{name} = {code}.expand({self.tuple_code(shape)})")
        st = list(_contiguous_strides(small))
        self.layout[s.name] = Layout(tuple(shape), tuple(st[d] if ctx.dims[d] in v.ranks else sympy.Integer(0)
                                                          for d in range(len(shape))), sympy.Integer(0))

    def float_sum(self, s: Statement, ctx: Ctx, octx: Ctx, acc: dt.DType) -> Val:
        """A float sum: matmul when the product splits into two operands, else a reduction; in `acc` like
        the evaluator's einsum (each factor converted to acc), then scalars, extents, outer factors."""
        out = list(s.index)
        red = [r for r, _ in s.reduce.ranks]
        body, post = peel_invariant(s.expr, set(red))
        mask = None
        if (isinstance(body, Call) and body.op == "where" and isinstance(body.args[2], Const)
                and body.args[2].value == 0 and not index_symbols(body.args[0]) & set(red)):
            # sum_r where(c, x, 0) with c free of r is where(c, sum_r x, 0): a product the mask selects
            # whole (MoE's routed pairs) is one matmul, not the product broadcast over every rank; where()
            # picks, so an unselected sum's inf or NaN does not reach the result either way
            mask, body = body.args[0], body.args[1]
        factors = _mul_factors(body)
        dims = set(ctx.dims)
        scal = [f for f in factors if not (index_symbols(f) & dims)]
        inner = [f for f in factors if index_symbols(f) & dims]
        rs = [frozenset(index_symbols(f) & dims) for f in inner]
        v = None
        if inner:
            seed = max(range(len(inner)), key=lambda i: len(rs[i]))
            a_side = [i for i in range(len(inner)) if rs[i] <= rs[seed]]
            b_side = [i for i in range(len(inner)) if i not in a_side]
            if b_side:
                v = self.matmul(ctx, octx, [inner[i] for i in a_side], [inner[i] for i in b_side], out, red, acc)
            else:
                prodv = None
                for f in inner:
                    fv = ctx.convert(ctx.value(f), acc)
                    prodv = fv if prodv is None else ctx.apply("mul", [prodv, fv], acc)
                idx = tuple(ctx.dims.index(r) for r in red)
                v = Val(f"torch.sum({prodv.code}, {idx if len(idx) > 1 else idx[0]})",
                        frozenset(prodv.ranks & set(out)), acc, fresh=True)
                for r in red:
                    if r not in prodv.ranks:  # the evaluator's einsum: a rank no factor reads multiplies
                        v = Val(f"{v.op()} * {self.int_code(ctx.ext(r))}", v.ranks, acc, fresh=True, atom=False)
        else:
            v = octx.const_tensor(1.0, acc)
            for r in red:
                v = Val(f"{v.op()} * {self.int_code(ctx.ext(r))}", v.ranks, acc, fresh=True, atom=False)
        for f in scal:
            sv = octx.value(f)
            v = octx.apply("mul", [v, sv if sv.is_scalar else octx.convert(sv, acc)], acc)
        if mask is not None:
            c = octx.value(mask)
            if c.is_scalar:
                v = v if c.scalar else octx.const_tensor(0.0, acc)
            else:
                v = Val(f"torch.where({c.code}, {v.op()}, 0.0)", c.ranks | v.ranks, acc, fresh=True)
        for op, y in post:
            yv = octx.value(y)
            got = _result_dtype(_PYOP["*" if op == "mul" else "/"], [v, yv], octx.nd)
            v = octx.apply(op, [v, yv], got)
        return v

    def matmul(self, ctx: Ctx, octx: Ctx, af: list, bf: list, out: list, red: list, acc: dt.DType) -> Val:
        dims = set(ctx.dims)
        ra = set().union(*[index_symbols(f) & dims for f in af])
        rb = set().union(*[index_symbols(f) & dims for f in bf])
        order = list(ctx.dims)
        batch = [r for r in out if r in ra and r in rb]
        M = [r for r in out if r in ra and r not in rb]
        N = [r for r in out if r in rb and r not in ra]
        K = [r for r in red if r in ra and r in rb]
        KA = [r for r in red if r in ra and r not in rb]
        KB = [r for r in red if r in rb and r not in ra]
        Kn = [r for r in red if r not in ra and r not in rb]

        def operand(fs, first, second, extra):
            sub = ctx.sub(dims=batch + first + second + extra)
            v = None
            for f in fs:
                fv = sub.convert(sub.value(f), acc)
                v = fv if v is None else sub.apply("mul", [v, fv], acc)
            v = sub.full(v)
            code = v.code
            if extra:
                nb = len(batch) + len(first) + len(second)
                idx = tuple(range(nb, nb + len(extra)))
                code = f"torch.sum({code}, {idx if len(idx) > 1 else idx[0]})"
            lead = [ctx.ext(r) for r in batch]
            p1 = sympy.Mul(*[ctx.ext(r) for r in first]) if first else sympy.Integer(1)
            p2 = sympy.Mul(*[ctx.ext(r) for r in second]) if second else sympy.Integer(1)
            if len(first) != 1 or len(second) != 1:
                code = f"{'(' + code + ')' if not v.atom and not extra else code}.reshape({self.tuple_code(lead + [p1, p2])})"
            return self.reuse(code) if (v.fresh or not v.atom or extra) else code

        a = operand(af, M, K, KA)
        b = operand(bf, K, N, KB)
        fn = "torch.mm" if not batch else ("torch.bmm" if len(batch) == 1 else "torch.matmul")
        code = f"{fn}({a}, {b})"
        self.plain_mm = (a, b) if fn == "torch.mm" else None  # for addmm: operands of a bare 2-D product
        res_dims = batch + M + N
        if len(M) != 1 or len(N) != 1:
            code += f".view({self.tuple_code([ctx.ext(r) for r in res_dims])})"
        present = [r for r in out if r in res_dims]
        perm = [res_dims.index(r) for r in present]
        if perm != list(range(len(perm))):
            code += f".permute({', '.join(map(str, perm))})"
        ranks = frozenset(res_dims)
        if len(present) != len(out):
            code += f".view({octx.shape_code(ranks)})"
        v = Val(code, ranks, acc, fresh=True)
        for r in Kn:
            v = Val(f"{v.op()} * {self.int_code(ctx.ext(r))}", v.ranks, acc, fresh=True, atom=False)
        return v

    def reduction(self, s: Statement, ctx: Ctx, octx: Ctx) -> Val:
        """Any other reduction: the expression materialized over (out, reduced) ranks, then torch's reduce."""
        red = [r for r, _ in s.reduce.ranks]
        op = s.reduce.op
        v = ctx.value(s.expr)
        if v.is_scalar:
            v = ctx.const_tensor(v.scalar, v.dtype)
        if op in ("sum", "prod"):
            v = ctx.full(v, red)
        code = v.code
        dtype = v.dtype
        if op == "sum" and dtype in (dt.f16, dt.bf16):
            code, dtype = f"{v.op()}.float()", dt.f32
        dims = tuple(ctx.dims.index(r) for r in red)
        dl = dims if len(dims) > 1 else dims[0]
        if op == "sum":
            code = f"torch.sum({code}, {dl})"
        elif op == "max":
            code = f"torch.amax({code}, {dl})"
        elif op == "min":
            code = f"torch.amin({code}, {dl})"
        elif op == "any":
            code = f"torch.any({code}, {dl})"
        elif op == "all":
            code = f"torch.all({code}, {dl})"
        elif op == "prod":
            for d in sorted(dims, reverse=True):
                code = f"torch.prod({code}, {d})"
        elif op in REDUCE_OPS:
            code = f"{self._const(('red', op), f'REDUCE_OPS[{op!r}].torch_fn', 'red')}({code}, {list(dims)})"
        else:
            raise Unsupported(f"unknown reduce operator {op!r}")
        fake = torch.zeros((1,) * ctx.nd, dtype=dtype.torch)
        got = REDUCE_OPS[op].torch_fn(fake, list(dims)).dtype if op in REDUCE_OPS else fake.dtype
        return Val(code, frozenset(v.ranks & set(octx.dims)), dt.from_torch(got), fresh=True)

    def iterate(self, s: Statement) -> None:
        it = s.iterate
        name = self.pyname(s.name)
        pos = next(d for d, p in enumerate(s.index) if not isinstance(p, sympy.Symbol))
        if not _same(s.index[pos], it.rank + 1) or s.reduce is not None:
            raise Unsupported("an iterated position other than rank + 1")
        shape = [sympy.sympify(x) for x in s.type.shape]
        want = s.type.dtype
        self.emit(f"{name} = torch.full({self.tuple_code(shape)}, {_pyliteral(it.init.value)}, "
                  f"dtype={_torch_dtype(want)}, device=device)")
        self.layout[s.name] = Layout.dense(shape)
        outs = [p for p in s.index if isinstance(p, sympy.Symbol)]
        dom = {r: (0, n) for r, n in zip(s.index, shape) if isinstance(r, sympy.Symbol)}
        self_read = Access(s.name, tuple(it.rank if d == pos else p for d, p in enumerate(s.index)))
        e = s.expr
        if (isinstance(e, Call) and e.op == "max" and it.init == NEG_INF and self_read in e.args
                and not any(a.tensor == s.name for x in e.args if x != self_read for a in accesses(x))):
            x = e.args[1] if e.args[0] == self_read else e.args[0]
            dims = [it.rank if d == pos else p for d, p in enumerate(s.index)]
            cdom = dict(dom)
            cdom[it.rank] = (0, it.extent)
            ctx = Ctx(self, dims, cdom)
            xv = ctx.value(x)
            if not xv.is_scalar and xv.dtype == want:
                xv = ctx.full(xv)
                sel = ", ".join([":"] * pos + ["1:"])
                self.emit(f"{name}[{sel}] = torch.cummax({xv.code}, {pos}).values")
                return
        loop = sympy.Symbol(f"_it_{it.rank}", integer=True, nonnegative=True)  # never an IR name (those get no _)
        ctx = Ctx(self, outs, dom, {loop: (sympy.Integer(0), sympy.sympify(it.extent) - 1)})
        body = substitute(e, {it.rank: loop})
        outer = self.lines
        self.lines = []
        v = ctx.value(body, want)
        code = v.code if not v.is_scalar else _pyliteral(v.scalar)
        sel = ", ".join([":"] * pos + [f"{loop} + 1"])
        self.emit(f"{name}[{sel}] = {code}")
        outer.append(f"for {loop} in range({self.int_code(it.extent)}):")
        outer += ["    " + ln for ln in self.lines]
        self.lines = outer

    # ---- attention
    def attention_step(self, plan: AttnPlan) -> None:
        out = plan.out
        self.begin([f"# attention group {plan.group.name}: "
                    + ("one scaled_dot_product_attention" if plan.sdpa else "3-pass softmax attention")]
                   + self._comment(out))
        try:
            if plan.sdpa is not None:
                o = self.sdpa(plan)
            else:
                o = self.three_pass(plan)
            self.types["__O"] = TensorType(plan.acc, tuple(plan.ext[r] for r in plan.lead + [plan.p, plan.f]))
            self.layout["__O"] = Layout.dense(self.types["__O"].shape)
            self.py["__O"] = o
            self._count_shared(plan.out_expr)
            ext = dict(zip(out.index, out.type.shape))
            ctx = Ctx(self, list(out.index), {r: (0, ext[r]) for r in out.index})
            v = ctx.value(plan.out_expr, out.type.dtype)
            self.reads.discard("__O")
            self.assign(out, ctx, v)
        except Exception as why:  # noqa: BLE001 (run the members it would have replaced one by one)
            self.attention[:] = [(g, f"statements ({_reason(why)})" if g == plan.group.name else how)
                                 for g, how in self.attention]
            return self.one_by_one(plan.skipped, out)
        self.end([out.name])

    def one_by_one(self, skipped: set, last: Statement) -> None:
        """A group step that could not be emitted: its skipped members, then `last`, as plain statements."""
        self.lines = None
        for op in self.m.body:
            if isinstance(op, Statement) and op.name in skipped:
                self.statement_step(op)
        self.statement_step(last)

    # ---- MoE experts (einfuse.codegen.torch_moe)
    def moe_step(self, plan: MoEPlan) -> None:
        """The chain at its combine: each expert's routed rows through its two GEMMs (`rt.moe`)."""
        comb, f, d = plan.chain.comb, plan.chain.up, plan.chain.down
        how = (" through the fused decode-and-multiply kernel on their stored codes (compressed experts)"
               if plan.compressed else "")
        self.begin([f"# MoE experts {plan.name}: each expert on the tokens routed to it (gate != 0){how}"]
                   + self._comment(comb))
        try:
            T, E, N2 = f.stmt.type.shape
            H, I = f.stmt.reduce.ranks[0][1], d.stmt.reduce.ranks[0][1]
            H2 = d.stmt.type.shape[2]

            def operand(e: Expr, ext: dict) -> str:
                ctx = Ctx(self, list(ext), {r: (0, n) for r, n in ext.items()})
                v = ctx.full(ctx.convert(ctx.value(e, dt.f32), dt.f32))
                return self.reuse(v.code) if (v.fresh or not v.atom) else v.code

            x = operand(f.a, {f.t: T, f.h: H})
            gate = operand(plan.chain.gate, {f.t: T, f.e: E})
            if plan.compressed:
                self.emit(f"{self.pyname(comb.name)} = rt.moe_compressed({x}, {gate}, "
                          + ", ".join(self.stored_operand(c) for c in plan.compressed) + ")")
            else:
                w_up = operand(f.b, {f.e: E, f.n: N2, f.h: H})
                w_down = operand(d.b, {d.e: E, d.h: H2, d.i: I})
                self.emit(f"{self.pyname(comb.name)} = rt.moe({x}, {gate}, {w_up}, {w_down})")
            self.layout[comb.name] = Layout.dense(comb.type.shape)
        except Exception as why:  # noqa: BLE001 (run the chain's statements one by one)
            log.debug("einfuse: MoE chain %s runs statement by statement: %s", plan.name, _reason(why))
            self.moe[:] = [(g, f"statements ({_reason(why)})" if g == plan.name else how) for g, how in self.moe]
            if plan.compressed:  # the statements read the dense weights: their decodes run here after all
                self.lines = None
                decodes = {c.decode for c in plan.compressed}
                for n, op in enumerate(self.m.body):
                    if isinstance(op, Opaque) and set(op.outputs) & decodes:
                        self.opaque(n, op)
            return self.one_by_one(plan.skipped, comb)
        self.end([comb.name])

    def stored_operand(self, c: CompressedOperand) -> str:
        """`rt.moe_compressed`'s arguments for one compressed weight: its stored arrays, checksums, sizes."""
        self.reads |= c.reads
        arrays = ", ".join(self.pyname(a) for a in c.arrays)
        check = self.pyname(c.checksums) if c.checksums else "None"
        return f"({arrays}), {check}, {dict(c.meta)!r}"

    def _attn_ctx(self, plan: AttnPlan, dims, ext) -> Ctx:
        return Ctx(self, dims, {r: (0, ext[r]) for r in dims})

    def sdpa(self, plan: AttnPlan) -> str:
        sd = plan.sdpa
        ext = sd["ext"]
        dtype_of = lambda t: self.types[t].dtype  # noqa: E731
        qn, dq = _narrow(sd["Q"], dtype_of)
        kn, dk = _narrow(sd["K"], dtype_of)
        vn, dv = _narrow(plan.V, dtype_of)
        if dq == dk == dv and dq.is_float and (dq.bits < 32 or dq == plan.acc):
            D, q_e, k_e, v_e = dq, qn, kn, vn
        else:  # no narrower than the cascade's own scores
            D = dt.f64 if dt.f64 in (dq, dk, dv, plan.acc) else dt.f32
            q_e, k_e, v_e = sd["Q"], sd["K"], plan.V
        lead, p, m, f, E = plan.lead, plan.p, plan.m, plan.f, sd["E"]
        gqa = False
        kv_lead = list(lead)
        if lead:
            h = lead[-1]
            how, grp, (k2, v2) = _coarse([k_e, v_e], h, ext[h])
            if how != "direct":
                hk = grp[1] if grp else ix.rank(f"{h}_kv")
                kv_lead[-1] = hk
                ext = dict(ext)
                ext[hk] = grp[2] if grp else sympy.Integer(1)  # one K/V head for every query head when "none"
                k_e, v_e, gqa = k2, v2, True

        def operand(e, dims, tname):
            ctx = self._attn_ctx(plan, dims, ext)
            self._count_shared(e)
            v = ctx.convert(ctx.value(e, D), D)
            v = ctx.full(v)
            code = v.code
            if len(E) > 1 and tname in ("q", "k"):
                code = f"{v.op()}.reshape({self.tuple_code([ext[r] for r in dims[:-len(E)]] + [sympy.Mul(*[ext[r] for r in E])])})"
            t = self.temp(tname)
            self.emit(f"{t} = {code}")
            return t

        q = operand(q_e, lead + [p] + E, "q")
        k = operand(k_e, kv_lead + [m] + E, "k")
        v = operand(v_e, kv_lead + [m, f], "v")
        args = [q, k, v]
        mask_ranks = frozenset()
        if sd["mask"] is not None:
            ctx = self._attn_ctx(plan, lead + [p, m], ext)
            self._count_shared(sd["mask"])
            mv = ctx.value(sd["mask"], D)
            mv = ctx.convert(mv, dt.bool_ if sd["bool_mask"] else D)
            if mv.is_scalar:
                raise Unsupported("a constant mask")
            mask_ranks = mv.ranks
            args.append(f"attn_mask={self.reuse(mv.code)}")
        # one query row per head (a decode step) with grouped K/V heads: the group's query heads become the
        # rows of one head (q viewed [.., kv heads, group, d]), a plain attention instead of enable_gqa
        group = ix.exact_quotient(ext[lead[-1]], ext[kv_lead[-1]]) if gqa else None
        rows = (group is not None and _same(ext[p], 1) and not sd["causal"] and lead[-1] not in mask_ranks)
        if rows:
            outer = [ext[r] for r in lead[:-1]]
            width = sympy.Mul(*[ext[r] for r in E])
            args[0] = f"{q}.reshape({self.tuple_code(outer + [ext[kv_lead[-1]], group, width])})"
        if sd["causal"]:
            args.append("is_causal=True")
        args.append(f"scale={sd['scale']!r}")
        if gqa and not rows:
            args.append("enable_gqa=True")
        o = self.temp("o")
        if not lead:
            call_args = ", ".join(f"{a}.unsqueeze(0)" if a in (q, k, v) else a for a in args)
            self.emit(f"{o} = F.scaled_dot_product_attention({call_args})[0]")
        elif rows:
            shape = self.tuple_code([ext[r] for r in lead + [p, f]])
            self.emit(f"{o} = F.scaled_dot_product_attention({', '.join(args)}).view({shape})")
        else:
            self.emit(f"{o} = F.scaled_dot_product_attention({', '.join(args)})")
        conv = f".to({_torch_dtype(plan.acc)})" if D != plan.acc else ""
        self.emit(f"{o} = {o}{conv}.contiguous()")
        return o

    def three_pass(self, plan: AttnPlan) -> str:
        """softmax(S) V with S materialized: max, exp, sum, matmul, normalize (0 for fully masked rows
        when the cascade is safe, NaN otherwise, as the 1-pass cascade gives)."""
        lead, p, m, f = plan.lead, plan.p, plan.m, plan.f
        ext = plan.ext
        acc = plan.acc
        work = dt.f32 if acc.bits < 32 else acc
        ctx = self._attn_ctx(plan, lead + [p, m], ext)
        self._count_shared(plan.S)
        sv = ctx.convert(ctx.value(plan.S, acc), acc)
        sv = ctx.full(sv, [m])
        s_, mx, ex, den = self.temp("s"), self.temp("mx"), self.temp("e"), self.temp("den")
        self.emit(f"{s_} = {sv.code}")
        self.emit(f"{mx} = {s_}.amax(-1, keepdim=True)")
        self.emit(f"{mx} = {mx}.masked_fill({mx} == -math.inf, 0)")
        self.emit(f"{ex} = torch.exp({s_} - {mx})" + (f".to({_torch_dtype(work)})" if work != acc else ""))
        self.emit(f"{den} = {ex}.sum(-1, keepdim=True)")
        vctx = self._attn_ctx(plan, lead + [m, f], ext)
        self._count_shared(plan.V)
        vv = vctx.convert(vctx.value(plan.V, work), work)
        vv = vctx.full(vv, [m, f])
        o = self.temp("o")
        norm = f"{den}.clamp_min(1.0)" if plan.safe else den
        shape = [ext[r] for r in lead + [p, f]]
        conv = f".to({_torch_dtype(acc)})" if work != acc else ""
        self.emit(f"{o} = (torch.matmul({ex}, {vv.code}) / {norm}){conv}.expand({self.tuple_code(shape)}).contiguous()")
        return o

    # ---- source
    def source(self) -> str:
        m = self.m
        head = [f'"""einfuse torch program for module {m.name!r} (fingerprint {m.fingerprint()}).',
                "", "Generated from the module's final IR by einfuse.codegen.torch_gen: one step per IR statement,",
                'each under its `# IR:` line and the user\'s source line."""',
                "import math", "", "import torch", "import torch.nn.functional as F", "",
                "from einfuse.ir.ops import MAP_OPS, REDUCE_OPS  # noqa: F401 (operators registered by users)", "", ""]
        # liveness: delete each intermediate after its last reader
        last = {}
        for n, (_, defines, reads, _) in enumerate(self.steps):
            for r in reads:
                last[r] = n
            for d in defines:
                last.setdefault(d, n)
        keep = set(m.outputs) | {i.name for i in m.inputs}
        frees: dict = {}
        for name, n in last.items():
            if name not in keep and name in self.py:
                frees.setdefault(n, []).append(self.pyname(name))
        body = []
        ins = [self.pyname(i.name) for i in m.inputs]
        body.append(f"({', '.join(ins)}{',' if len(ins) == 1 else ''}) = rt.bind(inputs)" if ins else "rt.bind(inputs)")
        bound = set()
        for i in m.inputs:
            for d, s in enumerate(i.type.shape):
                if isinstance(s, sympy.Symbol) and s in self.size_syms and s not in bound:
                    mult = f" * {i.type.dtype.per_byte}" if i.type.dtype.packed and d == len(i.type.shape) - 1 else ""
                    body.append(f"{self.size_syms[s]} = {self.pyname(i.name)}.shape[{d}]{mult}")
                    bound.add(s)
        for s in self.size_syms:
            if s not in bound:
                body.append(f"{self.size_syms[s]} = rt.missing_size({str(s)!r})")
        if m.inputs:
            shapes = ", ".join(self.tuple_code(_storage_shape(i.type)) for i in m.inputs)
            dtypes = ", ".join(_torch_dtype_storage(i.type.dtype) for i in m.inputs)
            got_s = ", ".join(f"{n}.shape" for n in ins)
            got_d = ", ".join(f"{n}.dtype" for n in ins)
            c = "," if len(ins) == 1 else ""
            body.append(f"if ({got_s}{c}) != ({shapes}{c}) or ({got_d}{c}) != ({dtypes}{c}):")
            body.append("    rt.bad_inputs(inputs)")
        for i in m.inputs:
            if i.type.dtype.packed:
                body.append(f"{self.pyname(i.name)} = rt.unpack({self.pyname(i.name)}, {i.type.dtype.signed})")
        body.append("device = " + (f"{ins[0]}.device" if ins else "torch.device('cpu')"))
        if self.consts:
            body.append(f"({', '.join(n for n, _ in self.consts)}{',' if len(self.consts) == 1 else ''}) = "
                        "rt.consts(device)")
        for n, (lines, defines, _, temps) in enumerate(self.steps):
            body.append("")
            body += lines
            dels = frees.get(n, []) + temps
            if dels:
                body.append(f"del {', '.join(dels)}")
        outs = ", ".join(f"{o!r}: {self._out(o)}" for o in m.outputs)
        body.append("")
        body.append(f"return {{{outs}}}")
        consts = ["def consts(device):", '    """Aranges and constant tensors, made once per device."""']
        consts.append(f"    return ({', '.join(c for _, c in self.consts)}{',' if len(self.consts) == 1 else ''})")
        fn = ["def run(inputs, rt):"] + ["    " + ln if ln else "" for ln in body]
        return "\n".join(head + consts + ["", ""] + fn) + "\n"

    def _out(self, name: str) -> str:
        py = self.pyname(name)
        if name in {i.name for i in self.m.inputs}:
            return py
        if name in self.views or not self._dense(name):
            return f"{py}.clone(memory_format=torch.contiguous_format)"
        return py

    def _dense(self, name: str) -> bool:
        lay = self.layout[name]
        dense = Layout.dense(self.types[name].shape)
        return _same(lay.offset, 0) and all(_same(a, b) or n == 1 for a, b, n in zip(lay.strides, dense.strides,
                                                                                      lay.shape))


def other(args: tuple, one) -> Expr:
    """The argument of a binary call that is not `one`."""
    return args[1] if args[0] is one else args[0]


def tensors_read_of(e: Expr) -> set:
    return {a.tensor for a in accesses(e)}


def _narrow_int_product(s: Statement, dtype_of) -> bool:
    """`sum[K] i32(a) * i32(b)` of two integers of at most 16 bits over at most 2^20 points: every partial
    sum is an integer below 2^52, so a matmul in f64 computes it exactly (torch has no integer BLAS)."""
    body, post = peel_invariant(s.expr, {r for r, _ in s.reduce.ranks})
    factors = _mul_factors(body)
    if post or len(factors) != 2:
        return False
    points = sympy.Mul(*[sympy.sympify(n) for _, n in s.reduce.ranks])
    if not (points.is_Integer and int(points) <= 2 ** 20):
        return False
    for f in factors:
        inner = f.args[0] if isinstance(f, Call) and f.op == "cast" and f.attr.is_int and f.attr.bits >= 32 else f
        d = infer(inner, dtype_of)[0]
        if not (d.is_int and d.bits <= 16):
            return False
    return True


def _storage_shape(t: TensorType) -> tuple:
    shape = list(t.shape)
    if t.dtype.packed and shape:
        shape[-1] = ix.FloorDiv(shape[-1] + t.dtype.per_byte - 1, t.dtype.per_byte)
    return tuple(shape)


def _torch_dtype_storage(d: dt.DType) -> str:
    return "torch." + str(d.storage).split(".")[-1]


def generate(m: Module) -> TorchProgram:
    """The torch program of `m` (its final IR, kernel groups included)."""
    return TorchGen(m).generate()


__all__ = ["TorchProgram", "Unsupported", "generate", "plan_attention"]

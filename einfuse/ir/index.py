"""Index arithmetic: sympy symbols for ranks and sizes, floor-division and modulo, bounds and simplification.

Index expressions are how views, transposes, reshapes, group-wise scales (`k // 128`) and rank splits
(`m1*64 + m0`) are written without copying data. Everything here works on non-negative integers.
"""
from __future__ import annotations

import functools

import sympy
from sympy.printing.str import StrPrinter


@functools.lru_cache(maxsize=None)
def rank(name: str) -> sympy.Symbol:
    """The symbol of an index variable (a rank): a non-negative integer."""
    return sympy.Symbol(name, integer=True, nonnegative=True)


@functools.lru_cache(maxsize=None)
def size(name: str) -> sympy.Symbol:
    """The symbol of a symbolic size (e.g. a dynamic sequence length): a positive integer."""
    return sympy.Symbol(name, integer=True, positive=True)


def is_size_symbol(s: sympy.Symbol) -> bool:
    return bool(s.is_positive)


class FloorDiv(sympy.Function):
    """`a // b` for a non-negative numerator and positive divisor."""

    nargs = 2
    is_integer = True

    @classmethod
    def eval(cls, a, b):
        if b == 1:
            return a
        if a == 0:
            return sympy.Integer(0)
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(int(a) // int(b))
        return None


class Mod(sympy.Function):
    """`a % b` for a non-negative numerator and positive divisor (written `%` in the text)."""

    nargs = 2
    is_integer = True

    @classmethod
    def eval(cls, a, b):
        if b == 1 or a == 0:
            return sympy.Integer(0)
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(int(a) % int(b))
        return None


class IndexPrinter(StrPrinter):
    """Prints index expressions as the IR text writes them: `i*64 + j`, `k // 128`, `p % 4`."""

    def _print_FloorDiv(self, e):
        return f"{self._operand(e.args[0])} // {self._operand(e.args[1])}"

    def _print_Mod(self, e):
        return f"{self._operand(e.args[0])} % {self._operand(e.args[1])}"

    def _print_Min(self, e):
        return self._nested("min", e.args)

    def _print_Max(self, e):
        return self._nested("max", e.args)

    def _nested(self, name, args):
        """`min` and `max` take two arguments in the text: Min(a, b, c) prints as min(a, min(b, c))."""
        first = self._print(args[0])
        rest = self._print(args[1]) if len(args) == 2 else self._nested(name, args[1:])
        return f"{name}({first}, {rest})"

    def _print_Pow(self, e):
        """`i**2` as `i*i`: the text has no power operator, and the parser folds the product back."""
        base, exp = e.args
        if not (exp.is_Integer and exp > 1):
            raise ValueError(f"index expression {e} has no text form")
        return "*".join([self._operand(base) if not isinstance(base, sympy.Symbol) else self._print(base)] * int(exp))

    def _operand(self, a):
        s = self._print(a)
        return s if (a.is_Atom or isinstance(a, (sympy.Min, sympy.Max))) and not s.startswith("-") else f"({s})"

    def _print_Mul(self, e):
        # `a*(b // c)`: keep floordiv/mod factors parenthesized so `*` and `//` never mix ambiguously.
        coeff, factors = e.as_coeff_mul()
        parts = [self._operand(f) if isinstance(f, (FloorDiv, Mod, sympy.Add)) else self._print(f) for f in factors]
        body = "*".join(parts)
        if coeff == 1:
            return body
        first = factors[0] if factors else None
        if isinstance(first, sympy.Add) or isinstance(first, sympy.Pow) and isinstance(first.base, sympy.Add):
            body = f"({body})"  # `-2*(a + 1)*b` would parse as (-2*a - 2)*b: sympy spreads a number over a sum
        if coeff == -1:
            return "-" + body
        return f"{self._print(coeff)}*{body}"


_printer = IndexPrinter({"order": "lex"})


@functools.lru_cache(maxsize=65536)
def to_str(e: sympy.Expr) -> str:
    """Deterministic text for an index expression (evaluated, as the parser will build it); the same
    expression prints once (a dump prints every layer's positions after every pass)."""
    return _printer.doprint(evaluated(sympy.sympify(e)))


def precedence(e: sympy.Expr) -> int:
    """Binding strength of the printed form: 1 additive, 2 multiplicative, 3 unary minus, 4 atom."""
    e = sympy.sympify(e)
    if isinstance(e, sympy.Add):
        return 1
    if isinstance(e, (sympy.Mul, sympy.Pow, FloorDiv, Mod)):
        coeff, _ = e.as_coeff_mul() if isinstance(e, sympy.Mul) else (1, None)
        unary = coeff == -1 and isinstance(e, sympy.Mul) and len(e.args) == 2 and not isinstance(e.args[1], sympy.Pow)
        return 3 if unary else 2  # `-i` and `-(i // 2)` print as a negation, `-i*i` as a product
    if e.is_Integer and e < 0:
        return 3
    return 4


# ---------------------------------------------------------------- bounds and simplification

Ranges = dict  # sympy.Symbol -> (lo, hi) inclusive bounds, sympy expressions


def proven(rel) -> bool:
    """True only when sympy can prove the relation."""
    r = sympy.sympify(rel)
    return r is sympy.true or r == True  # noqa: E712 (sympy booleans)


def within(e: sympy.Expr, lo, hi, ranges: Ranges) -> bool:
    """Is `lo <= e <= hi` provable from the ranges of e's symbols?"""
    elo, ehi = bounds(e, ranges)
    return proven(elo >= lo) and proven(ehi <= hi)


def evaluated(v: sympy.Expr) -> sympy.Expr:
    """sympy's Min/Max can leave parts unevaluated (`Max(i - 1, Min(0, 1))`); the text always evaluates them."""
    if not v.has(sympy.Min, sympy.Max):
        return v
    done = v.doit()
    return v if done == v else done


def bounds(e: sympy.Expr, ranges: Ranges) -> tuple[sympy.Expr, sympy.Expr]:
    """Inclusive lower/upper bounds of `e` given bounds of its symbols (sizes default to [1, oo))."""
    e = sympy.sympify(e)
    if e.is_number:
        e = evaluated(e)
        return e, e
    if isinstance(e, sympy.Symbol):
        if e in ranges:
            return ranges[e]
        return (e, e) if is_size_symbol(e) else (sympy.Integer(0), sympy.oo)  # a size is one unknown value
    if isinstance(e, sympy.Add):
        lo, hi = sympy.Integer(0), sympy.Integer(0)
        for a in e.args:
            alo, ahi = bounds(a, ranges)
            lo, hi = lo + alo, hi + ahi
        return lo, hi
    if isinstance(e, sympy.Mul):
        lo, hi = bounds(e.args[0], ranges)
        for a in e.args[1:]:
            alo, ahi = bounds(a, ranges)
            cands = [lo * alo, lo * ahi, hi * alo, hi * ahi]
            cands = [c if c is not sympy.nan else sympy.Integer(0) for c in cands]
            lo, hi = sympy.Min(*cands), sympy.Max(*cands)
        return lo, hi
    if isinstance(e, FloorDiv):
        alo, ahi = bounds(e.args[0], ranges)
        b = e.args[1]
        if b.is_Integer:
            return sympy.floor(alo / b), sympy.floor(ahi / b)
        return sympy.Integer(0), ahi
    if isinstance(e, Mod):
        alo, ahi = bounds(e.args[0], ranges)
        b = e.args[1]
        if proven(alo >= 0) and proven(ahi < b):
            return alo, ahi
        return sympy.Integer(0), b - 1
    if isinstance(e, sympy.Pow) and e.args[1].is_Integer and e.args[1] > 1:
        lo, hi = bounds(e.args[0], ranges)
        n = int(e.args[1])
        if proven(lo >= 0):
            return lo ** n, hi ** n
        if n % 2 == 0:
            return sympy.Integer(0), sympy.Max(lo ** n, hi ** n)
        return lo ** n, hi ** n
    if isinstance(e, sympy.Min):
        bs = [bounds(a, ranges) for a in e.args]
        return sympy.Min(*[b[0] for b in bs]), sympy.Min(*[b[1] for b in bs])
    if isinstance(e, sympy.Max):
        bs = [bounds(a, ranges) for a in e.args]
        return sympy.Max(*[b[0] for b in bs]), sympy.Max(*[b[1] for b in bs])
    return -sympy.oo, sympy.oo


def exact_quotient(t: sympy.Expr, c: sympy.Expr) -> sympy.Expr | None:
    """`t / c` if it has integer coefficients, else None (sympy's is_integer calls `(j + 1)*(2*j + 2)/10` one)."""
    q = sympy.expand(t / c)
    for term in sympy.Add.make_args(q):
        coeff, rest = term.as_coeff_Mul()
        if not coeff.is_Integer:
            return None
        for f in sympy.Mul.make_args(rest):
            if f.is_Pow and not (f.exp.is_Integer and f.exp > 0) or not (f.is_Pow or f.is_integer):
                return None
    return q


def _split_multiple(a: sympy.Expr, c: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    """Split `a` into (q, r) with a = q*c + r, pulling out every term that c divides."""
    q, r = sympy.Integer(0), sympy.Integer(0)
    for t in sympy.Add.make_args(a):
        ratio = exact_quotient(t, c)
        if ratio is not None:
            q += ratio
        else:
            r += t
    return q, r


def _split_small(a: sympy.Expr, c: sympy.Expr, ranges: Ranges):
    """Find g dividing c with a = g*q + r and 0 <= r < g: then a // c == q // (c/g), a % c == g*(q % (c/g)) + r."""
    terms = sympy.Add.make_args(a)
    for t in terms:
        # g: the constant part of a term, integers and symbolic sizes (j*S*64 -> S*64)
        g = sympy.Mul(*[f for f in sympy.Mul.make_args(t) if f.is_Integer or (f.is_Symbol and is_size_symbol(f))])
        if g == 1 or not (proven(g >= 1) and exact_quotient(c, g) is not None):
            continue
        big = [u for u in terms if exact_quotient(u, g) is not None]
        rest = sympy.Add(*[u for u in terms if exact_quotient(u, g) is None])
        if rest == 0:
            continue
        lo, hi = bounds(rest, ranges)
        if proven(lo >= 0) and proven(hi < g):
            return g, sympy.Add(*[exact_quotient(u, g) for u in big]), rest
    return None


def _simplify_node(e: sympy.Expr, ranges: Ranges) -> sympy.Expr:
    if isinstance(e, FloorDiv):
        a, c = e.args
        if isinstance(a, FloorDiv) and proven(a.args[1] > 0):
            return _simplify_node(FloorDiv(a.args[0], a.args[1] * c), ranges)
        q, r = _split_multiple(a, c)
        if q != 0:
            return q + _simplify_node(FloorDiv(r, c), ranges)
        lo, hi = bounds(a, ranges)
        if proven(lo >= 0) and proven(hi < c):
            return sympy.Integer(0)
        split = _split_small(a, c, ranges)
        if split is not None:
            g, q, _ = split
            return _simplify_node(FloorDiv(q, c / g), ranges)
        return e
    if isinstance(e, Mod):
        a, c = e.args
        q, r = _split_multiple(a, c)
        if q != 0:
            return _simplify_node(Mod(r, c), ranges)
        lo, hi = bounds(a, ranges)
        if proven(lo >= 0) and proven(hi < c):
            return a
        split = _split_small(a, c, ranges)
        if split is not None:
            g, q, rest = split
            return g * _simplify_node(Mod(q, c / g), ranges) + rest
        if isinstance(a, FloorDiv):
            # (x // b) % c == x // b when 0 <= x < b*c
            xlo, xhi = bounds(a.args[0], ranges)
            if proven(xlo >= 0) and proven(xhi < a.args[1] * c):
                return a
        return e
    if isinstance(e, sympy.Add):
        return _merge_divmod(e)
    return e


def _merge_divmod(e: sympy.Add) -> sympy.Expr:
    """k*c*(a // c) + k*(a % c) == k*a: the pattern a view followed by its inverse view leaves behind."""
    terms = list(sympy.Add.make_args(e))
    for i, t in enumerate(terms):
        k, m = t.as_coeff_Mul()
        if not isinstance(m, Mod):
            continue
        a, c = m.args
        partner = k * c * FloorDiv(a, c)
        for j, u in enumerate(terms):
            if j != i and u == partner:
                rest = sympy.Add(*[x for n, x in enumerate(terms) if n not in (i, j)], k * a)
                return _merge_divmod(rest) if isinstance(rest, sympy.Add) else rest
    return e


def simplify(e: sympy.Expr, ranges: Ranges) -> sympy.Expr:
    """Range-aware rewrite of floor-division and modulo terms, bottom-up, to a fixed point."""
    e = sympy.sympify(e)
    for _ in range(8):
        new = _bottom_up(e, ranges)
        if new == e:
            return new
        e = new
    return e


def _bottom_up(e: sympy.Expr, ranges: Ranges) -> sympy.Expr:
    if e.is_Atom:
        return e
    args = [_bottom_up(a, ranges) for a in e.args]
    node = e.func(*args) if any(x is not y for x, y in zip(args, e.args)) else e
    return _simplify_node(node, ranges) if not node.is_Atom else node


def strides(shape) -> list:
    """Element strides of a contiguous (row-major) tensor of `shape`."""
    out, acc = [], sympy.Integer(1)
    for n in reversed(shape):
        out.append(acc)
        acc = acc * n
    return out[::-1]


def flat_offset(positions, shape) -> sympy.Expr:
    """The element offset of `positions` in a contiguous tensor of `shape`."""
    return sympy.expand(sum((sympy.sympify(p) * s for p, s in zip(positions, strides(shape))), sympy.Integer(0)))


def evaluate_int(e: sympy.Expr, env: dict) -> int:
    """Evaluate an index expression with concrete integers for its symbols."""
    return int(sympy.sympify(e).xreplace({k: sympy.Integer(v) for k, v in env.items()}))

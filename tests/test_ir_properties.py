"""Properties of random small cascades: they verify, round-trip through text, and every cleanup pass (and the
default pipeline) keeps them valid and computing the same outputs; index simplification keeps values."""
import itertools
import math

import pytest
import sympy
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from einfuse.ir import (Access, Call, Const, IndexValue, Input, Iterate, Module, Reduce, Statement, TensorType,
                        dtypes, parse, print_module, rank)
from einfuse.ir import index as ix
from einfuse.ir.evaluator import evaluate, random_inputs
from einfuse.ir.expr import canonical, rewrite
from einfuse.ir.ops import infer
from einfuse.ir.verify import verify
from einfuse.passes import (CSE, DCE, FoldConstants, InlineCopies, SimplifyIndices, Verify, default_pipeline,
                            run_pipeline)

F64, F32 = dtypes.f64, dtypes.f32
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- the strategy

def positions(ranks: dict, dim: int) -> list:
    """Index expressions over `ranks` (symbol -> extent) that stay inside [0, dim)."""
    out = [sympy.Integer(c) for c in {0, dim - 1}]
    for r, e in ranks.items():
        out.append(ix.Mod(r, dim) if e > dim else r)  # plain, or wrapped around
        if e <= dim:
            out += [dim - 1 - r, r + (dim - e)]  # reversed, offset
        k = -(-e // dim)  # smallest divisor that keeps r // k in range
        out.append(ix.FloorDiv(r, max(k, 2)))
        for r2, e2 in ranks.items():
            if r2 != r and e * e2 <= dim:
                out.append(r * e2 + r2)  # two ranks merged into one dimension (a reshape)
    return out


class Builder:
    """Draws one statement's expression over its ranks from the tensors defined so far."""

    def __init__(self, draw, tensors: dict, ranks: dict, tables: dict | None = None):
        self.draw, self.tensors, self.ranks = draw, tensors, ranks
        self.tables = tables or {}  # i64 tensors whose values lie in [0, bound): name -> bound

    def dtype(self, e):
        return infer(e, lambda n: self.tensors[n].dtype)[0]

    def access(self) -> Access:
        name = self.draw(st.sampled_from(sorted(self.tensors)))
        t = self.tensors[name]
        return Access(name, tuple(self.position(int(d)) for d in t.shape))

    def position(self, dim: int):
        """Index arithmetic, or now and then a gather through an index table (`x[g[i], j]`)."""
        usable = sorted(n for n, bound in self.tables.items() if bound <= dim)
        if usable and self.draw(st.integers(0, 3)) == 0:
            table = self.draw(st.sampled_from(usable))
            (extent,) = self.tensors[table].shape
            return Access(table, (self.draw(st.sampled_from(positions(self.ranks, int(extent)))),))
        return self.draw(st.sampled_from(positions(self.ranks, dim)))

    def index_value(self) -> IndexValue:
        syms = list(self.ranks) or [sympy.Integer(1)]  # a scalar statement has no ranks
        a = self.draw(st.sampled_from(syms))
        b = self.draw(st.sampled_from(syms))
        k = self.draw(st.integers(-2, 3))
        return IndexValue(a * k + b + self.draw(st.integers(-2, 2)))  # e.g. i*2 + j

    def condition(self):
        kind = self.draw(st.sampled_from(["ranks", "ranks", "values", "literal"]))
        op = self.draw(st.sampled_from(["lt", "le", "gt", "ge", "eq", "ne"]))
        if kind == "ranks" and self.ranks:
            return Call(op, (self.index_value(), IndexValue(self.draw(st.sampled_from(list(self.ranks))))))
        if kind == "values":
            return Call(op, (self.expr(1), self.expr(1)))
        return Const(self.draw(st.booleans()))

    def leaf(self):
        kind = self.draw(st.sampled_from(["access", "access", "access", "const", "index"]))
        if kind == "access":
            return self.access()
        if kind == "const":
            return Const(self.draw(st.sampled_from([0.5, -1.5, 2.0, 1.0, 0.0, 0.1, 1 / 3, 1, 0, 3, -2])))
        iv = self.index_value()
        return iv if self.draw(st.booleans()) else Call("cast", (iv,), F64)

    def expr(self, depth: int):
        if depth <= 0:
            return self.leaf()
        kind = self.draw(st.sampled_from(["leaf", "binary", "binary", "binary", "neg", "exp", "where", "cast",
                                          "identity", "literals"]))
        sub = lambda: self.expr(depth - 1)  # noqa: E731
        if kind == "leaf":
            return self.leaf()
        if kind == "binary":
            op = self.draw(st.sampled_from(["add", "sub", "mul", "max", "min"]))
            return Call(op, (sub(), sub()))
        if kind == "neg":
            return Call("neg", (sub(),))
        if kind == "exp":  # of a small value: bounded above so nothing overflows
            return Call("exp", (Call("min", (sub(), Const(2.0))),))
        if kind == "where":
            return Call("where", (self.condition(), sub(), sub()))
        if kind == "cast":
            return Call("cast", (sub(),), self.draw(st.sampled_from([F32, F64])))
        if kind == "identity":  # x*1, x+0, x-0: work for FoldConstants
            op, lit = self.draw(st.sampled_from([("mul", 1), ("mul", 1.0), ("add", 0), ("sub", 0.0)]))
            e = sub()
            return Call(op, (Const(lit), e) if op != "sub" and self.draw(st.booleans()) else (e, Const(lit)))
        a, b, c = (Const(self.draw(st.sampled_from([0.5, 2.0, -1.0, 0.1, 3]))) for _ in range(3))
        op = self.draw(st.sampled_from(["add", "mul", "sub"]))
        return Call(op, (Call(op, (a, b)), Call("mul", (c, sub()))))  # literal arithmetic to fold


def _shape_of(ranks):
    return tuple(sympy.Integer(e) for e in ranks.values())


@st.composite
def iterative(draw, name: str, tensors: dict, tables: dict):
    """`t[o.., m + 1] = iterate[m:E, init] op(t[o.., m], expr)`: a running max/min/sum."""
    out = {rank(f"o{d}"): draw(st.integers(1, 4)) for d in range(draw(st.integers(0, 2)))}
    m, extent = rank("m"), draw(st.integers(1, 5))
    op, init = draw(st.sampled_from([("max", -math.inf), ("min", math.inf), ("add", 0.0)]))
    step = Builder(draw, tensors, {**out, m: extent}, tables).expr(draw(st.integers(0, 2)))
    expr = Call("cast", (Call(op, (Access(name, (*out, m)), step)),), F64)
    return Statement(name, TensorType(F64, (*_shape_of(out), extent + 1)), (*out, m + 1), expr,
                     iterate=Iterate(m, extent, Const(init)), loc="iter.py:1")


@st.composite
def cascades(draw):
    tensors: dict = {}
    tables: dict = {}
    inputs = []
    for n in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
        inputs.append(Input(f"x{n}", TensorType(F64, shape)))
        tensors[f"x{n}"] = inputs[-1].type
    body: list = []
    for n in range(draw(st.integers(2, 6))):
        name = f"t{n}"
        kind = draw(st.sampled_from(["compute"] * 4 + ["copy", "iota", "iterate"] + ["table", "duplicate"] * 2))
        if kind == "duplicate" and body:
            s = draw(st.sampled_from(body)).replace(name=name, loc=f"dup.py:{n}")
        elif kind == "iterate":
            s = draw(iterative(name, tensors, tables))
        elif kind == "table":  # g[o0] = (k*o0 + c) % bound: an index table for gathers
            o0, bound = rank("o0"), draw(st.integers(1, 6))
            value = ix.Mod(o0 * draw(st.integers(0, 3)) + draw(st.integers(-3, 5)), bound)
            s = Statement(name, TensorType(dtypes.i64, (draw(st.integers(1, 6)),)), (o0,),
                          rewrite(IndexValue(value), canonical), loc=f"table.py:{n}")
            tables[name] = bound
        else:
            out = {rank(f"o{d}"): draw(st.integers(1, 6)) for d in range(draw(st.integers(0, 3)))}
            if kind == "compute" and draw(st.booleans()):
                red = {rank(f"r{d}"): draw(st.integers(1, 6)) for d in range(draw(st.integers(1, 2)))}
                reduce = Reduce(draw(st.sampled_from(["sum", "max", "min"])), tuple(red.items()))
            else:
                red, reduce = {}, None
            b = Builder(draw, tensors, {**out, **red}, tables)
            if kind == "copy":
                expr = b.access()
            elif kind == "iota" and out:
                expr = Call("cast", (b.index_value(),), F64)
            else:
                expr = b.expr(draw(st.integers(0, 3)))
            expr = rewrite(expr, canonical)  # the form the statement holds, whose type it declares
            d = b.dtype(expr)
            if d.category == "bool":
                expr, d = Call("cast", (expr,), F64), F64
            s = Statement(name, TensorType(d, _shape_of(out)), tuple(out), expr, reduce, loc=f"gen.py:{n}")
        body.append(s)
        tensors[name] = s.type
    outputs = [body[-1].name] + [s.name for s in body[:-1] if draw(st.booleans())]
    if draw(st.integers(0, 9)) == 0:
        outputs.append(inputs[0].name)
    return Module("random", tuple(inputs), tuple(body), tuple(outputs))


# ---------------------------------------------------------------- comparing results

def assert_same_outputs(got: dict, want: dict, names):
    assert list(got) == list(want) == list(names)
    for name in names:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if not w.dtype.is_floating_point:
            assert torch.equal(g, w), name
            continue
        finite = w[torch.isfinite(w)]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * max(scale, 1e-6), equal_nan=True, msg=name)


def run(m: Module, seed: int) -> dict:
    return evaluate(m, random_inputs(m, seed=seed))


# ---------------------------------------------------------------- properties

@settings(max_examples=300, **SETTINGS)
@given(cascades())
def test_random_cascades_verify(m):
    note(print_module(m))
    assert verify(m) is m


@settings(max_examples=300, **SETTINGS)
@given(cascades())
def test_random_cascades_round_trip(m):
    text = print_module(m)
    again = parse(text)
    assert again == m
    assert print_module(again) == text


PASSES = [SimplifyIndices, FoldConstants, InlineCopies, CSE, DCE]


@pytest.mark.parametrize("make", PASSES + [default_pipeline], ids=lambda p: getattr(p, "__name__", str(p)))
@settings(max_examples=150, **SETTINGS)
@given(m=cascades(), seed=st.integers(0, 2**31 - 1))
def test_passes_keep_outputs(make, m, seed):
    note(print_module(m))
    passes = make() if make is default_pipeline else [make()]
    out = run_pipeline(m, passes, [Verify()])
    note(print_module(out))
    assert out.outputs == m.outputs
    assert parse(print_module(out)) == out  # a pass's result is in the canonical form its text parses to
    with torch.no_grad():
        want = run(m, seed)
        got = run(out, seed)
    assert_same_outputs(got, want, m.outputs)


def test_cascade_strategy_gives_the_passes_work():
    """The generated cascades do exercise every pass (a strategy that never triggers a pass proves nothing)."""
    changed = {p.__name__: 0 for p in PASSES}

    @settings(max_examples=80, database=None, derandomize=True, **SETTINGS)
    @given(cascades())
    def count(m):
        for p in PASSES:
            changed[p.__name__] += p().run(m) != m

    count()
    assert all(n > 0 for n in changed.values()), changed


# ---------------------------------------------------------------- index simplification

SYMS = [rank("i"), rank("j"), rank("k")]


@st.composite
def affine(draw):
    """k0*i + k1*j + k2*k + c, the shape views and slices give index arithmetic, offsets may be negative."""
    e = sympy.Integer(draw(st.integers(-8, 8)))
    for s in SYMS:
        if draw(st.booleans()):
            e += draw(st.integers(-3, 6)) * s
    return e


@st.composite
def index_exprs(draw, depth=3):
    if depth == 0 or draw(st.integers(0, 4)) == 0:
        return draw(affine())
    op = draw(st.sampled_from(["add", "mul", "floordiv", "mod", "floordiv", "mod", "scale", "neg", "min", "max"]))
    a = draw(index_exprs(depth - 1))
    if op == "add":
        return a + draw(index_exprs(depth - 1))
    if op == "neg":
        return -a
    if op in ("min", "max"):
        return (sympy.Min if op == "min" else sympy.Max)(a, draw(index_exprs(depth - 1)))
    if op == "mul":
        return a * draw(index_exprs(depth - 1))
    if op == "scale":
        return a * draw(st.integers(-3, 8)) + draw(affine())
    c = draw(st.integers(1, 12))
    return ix.FloorDiv(a, c) if op == "floordiv" else ix.Mod(a, c)


def int_value(e, env: dict) -> int:
    """Exact integer value of an index expression (Python ints, floor semantics, as the evaluator computes)."""
    if e.is_Integer:
        return int(e)
    if e.is_Symbol:
        return env[e]
    vals = [int_value(a, env) for a in e.args]
    if isinstance(e, sympy.Add):
        return sum(vals)
    if isinstance(e, sympy.Mul):
        return math.prod(vals)
    if isinstance(e, sympy.Pow):
        return vals[0] ** vals[1]
    if isinstance(e, ix.FloorDiv):
        return vals[0] // vals[1]
    if isinstance(e, ix.Mod):
        return vals[0] % vals[1]
    if isinstance(e, sympy.Min):
        return min(vals)
    if isinstance(e, sympy.Max):
        return max(vals)
    raise TypeError(f"unexpected {type(e).__name__} in {e}")


@settings(max_examples=800, **SETTINGS)
@given(e=index_exprs(), ranges=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6)), min_size=3, max_size=3))
def test_simplify_preserves_value(e, ranges):
    rng = {s: (sympy.Integer(lo), sympy.Integer(lo + span)) for s, (lo, span) in zip(SYMS, ranges)}
    simple = ix.simplify(e, rng)
    grid = [range(lo, hi + 1) for lo, hi in ((int(a), int(b)) for a, b in rng.values())]
    for point in itertools.product(*grid):
        env = dict(zip(SYMS, point))
        assert int_value(simple, env) == int_value(e, env), (e, simple, env)


@settings(max_examples=200, **SETTINGS)
@given(index_exprs())
def test_index_expressions_print_and_parse_back(e):
    """Index arithmetic as a value and as a position prints to text that parses to the same sympy tree."""
    ranks = ", ".join(map(str, SYMS))
    text = (f"module m\n  in x: f32[1000]\n  v[{ranks}]: i64[2, 2, 2] = {ix.to_str(e)}\n"
            f"  w[{ranks}]: f32[2, 2, 2] = x[{ix.to_str(e)}]\n  out v, w\n")
    note(text)
    m = parse(text)
    value, position = m.body[0].expr, m.body[1].expr.indices[0]
    want = canonical(IndexValue(e))  # sympy may leave parts of `e` unevaluated; the text never does
    want_index = want.expr if isinstance(want, IndexValue) else sympy.Integer(want.value)
    assert value == want and position == want_index
    if want_index == e:
        assert print_module(m) == text
    assert print_module(parse(print_module(m))) == print_module(m)


@settings(max_examples=500, **SETTINGS)
@given(e=index_exprs(), ranges=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6)), min_size=3, max_size=3))
def test_bounds_contain_every_value(e, ranges):
    """The verifier's range check relies on `bounds` never being too narrow."""
    rng = {s: (sympy.Integer(lo), sympy.Integer(lo + span)) for s, (lo, span) in zip(SYMS, ranges)}
    lo, hi = ix.bounds(e, rng)
    grid = [range(int(a), int(b) + 1) for a, b in rng.values()]
    for point in itertools.product(*grid):
        v = int_value(e, dict(zip(SYMS, point)))
        assert lo <= v <= hi, (e, lo, hi, point, v)

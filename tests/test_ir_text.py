"""The IR text: every construct prints and parses back to an equal module with identical text, and
malformed texts raise ParseError pointing at the offending line and column."""
import math
import pathlib
import re

import pytest
import sympy
import torch

from einfuse.ir import (Access, Call, Const, FloorDiv, IndexValue, Input, Mod, Module, Opaque, ParseError, Statement,
                        TensorRef, TensorType, dtypes, parse, print_module, rank, size)
from einfuse.ir.expr import walk
from einfuse.ir.verify import verify

# ---------------------------------------------------------------- hand-written modules, in printed form

EVERYTHING = """\
module everything
  size S hint 6
  size T
  in x: f32[2, S]
  param w: f16[S, 4]
  buffer cnt: i64[3]
  const table: bf16[8]
  in ids: i32[4]
  in q4: i4[4, 8]
  in u: u4[2, 6]
  in e4: f8e4m3[4]
  in e5: f8e5m2[4]
  in d: f64[4]
  in h: i16[4]
  in c8: i8[4]
  in b8: u8[4]
  in flag: bool[4]
  in z: f32[T, 2*S]
  r1[i]: f32[2] = sum[j:S] x[i, j]  # model.py:10
  r2[k]: f32[4] = max[a:2, b:S] f32(w[b, k]) * x[a, b]
  r3[]: f32[] = sum[a:2, b:S, c:4] x[a, b] * f32(w[b, c]) * 0.125
  r4[i]: f64[4] = prod[j:3] d[i] + f64(cnt[j])
  r5[i]: bool[4] = any[j:4] flag[j] != flag[i]
  r6[i]: bool[4] = all[j:2, k:8] q4[i, k] < c8[j]
  r7[i]: i64[2] = min[j:6] i64(u[i, j])
  run[p, m1 + 1]: f32[S, 5] = iterate[m1:4, init=-inf] max(run[p, m1], x[1, p])
  acc[k + 1]: f64[S + 1] = iterate[k:S, init=0.0] acc[k] + f64(x[0, k])
  cnt2[k + 1]: i64[4] = iterate[k:3, init=0] cnt2[k] + cnt[k]
  all2[k + 1]: bool[3] = iterate[k:2, init=true] and(all2[k], flag[k])
  g[i, j]: f16[4, 4] = w[ids[i], j]
  gg[i]: bf16[4] = table[cnt[ids[i] % 3] + 5]
  v[i, j]: f32[2, 6] = x[((3*i + j) // 3) % 2, min(5, j)]
  v2[i, j]: f32[4, 3] = x[i // 2, 2*(i % 2) + max(0, j - 1)]
  v3[p]: i64[6] = 2*p - (p // 3) + p % 4
  v4[p, m]: i64[6, 6] = m*p + 3*p*p
  casts[i]: f16[4] = f16(d[i]) + f16(e4[i]) * f16(e5[i])
  casts2[i]: i32[4] = i32(bf16(h[i])) + i32(b8[i])
  prec[i]: f32[4] = x[0, i] - -1.5 + -(x[0, i] + x[1, i]) * (x[0, i] - (x[1, i] - 2.0))
  prec3[i]: bool[4] = x[0, i] < x[1, i] == flag[i]
  cmp[i]: bool[4] = or(x[0, i] > x[1, i], x[0, i] >= 0.5) != (x[0, i] <= -1.0)
  prec4[i]: f32[4] = -x[0, i] * -x[1, i] / (x[0, i] * 3.0) // 2.0 % 5.0
  prec5[i]: f32[4] = -(-x[0, i]) + -0.0 + (i + 1) * x[1, i] - i // 2 * 1.5
  lits[i]: f32[4] = where(flag[i], inf, nan) + where(true, -inf, 1e-07) + where(false, 1e+16, 2.5)
  lits2[i]: bool[4] = or(and(not(false), isnan(lits[i])), i < 2)
  fns[i]: f32[4] = pow(exp2(x[0, i]), 2.0) + atan2(sigmoid(x[1, i]), gelu_tanh(x[0, i]))
  big[t, j]: f32[T, 4] = z[t, 2*j + 1]
  vals: f32[2, 2], idx: i64[2, 2] = opaque aten.topk.default(x, 2, -1, largest=true, sorted=false)  # model.py:20
  o1: f32[3, S] = opaque aten.new_zeros.default(x, [3, {S}], dtype=torch.float32, layout=torch.strided, \
device=device("cpu"), pin_memory=none)
  o2: f32[2, 2*S] = opaque "mypkg.ops:pad"(x, "say \\"hi\\" \\\\ there", [[1, 2], [], [-3, 4.5, nan]], \
{2*S}, mode="a#b", fmt=torch.channels_last, neg=-inf, flag=false)
  o3: f32[2, S] = opaque einfuse_custom.scale(vals, x, 0.5, [vals, idx], none)
  out r1, run, o2, vals
"""

SMALL = """\
module small
  in x: f32[4]
  y[i]: f32[4] = x[-i + 3] * 2.0
  out y
"""


@pytest.mark.parametrize("text", [EVERYTHING, SMALL], ids=["everything", "small"])
def test_round_trip_prints_identically(text):
    m = parse(text)
    assert print_module(m) == text
    again = parse(print_module(m))
    assert again == m
    assert again.fingerprint() == m.fingerprint()


def test_everything_covers_every_construct():
    """The round-trip module really contains what the test claims to cover."""
    m = parse(EVERYTHING)
    assert {i.kind for i in m.inputs} == {"in", "param", "buffer", "const"}
    used = {i.type.dtype.name for i in m.inputs} | {t.dtype.name for t in m.types().values()}
    assert used == set(dtypes.BUILTIN)  # every built-in dtype (encodings registered by other packages aside)
    assert dict(m.size_hints) == {size("S"): 6} and m.sizes == (size("S"), size("T"))
    reductions = {s.reduce.op for s in m.statements if s.reduce}
    assert reductions == {"sum", "max", "min", "prod", "any", "all"}
    assert {len(s.reduce.ranks) for s in m.statements if s.reduce} == {1, 2, 3}
    assert sum(1 for s in m.statements if s.iterate) == 4
    infix = {"add", "sub", "mul", "div", "floordiv", "mod", "lt", "le", "gt", "ge", "eq", "ne", "neg"}
    assert infix <= {n.op for s in m.statements for n in walk(s.expr) if isinstance(n, Call)}
    o2 = next(op for op in m.body if isinstance(op, Opaque) and op.outputs == ("o2",))
    assert o2.target == "mypkg.ops:pad"
    assert o2.args[1] == 'say "hi" \\ there'
    assert o2.args[3] == 2 * size("S")
    assert dict(o2.kwargs)["mode"] == "a#b" and dict(o2.kwargs)["neg"] == -math.inf
    assert dict(o2.kwargs)["fmt"] is torch.channels_last
    o1 = next(op for op in m.body if isinstance(op, Opaque) and op.outputs == ("o1",))
    kw = dict(o1.kwargs)
    assert kw["dtype"] is torch.float32 and kw["device"] == torch.device("cpu") and kw["pin_memory"] is None
    assert o1.args[1] == (3, size("S"))
    assert m.body[0].loc == "model.py:10"



S_, T_ = size("S"), size("T")
i, j, k = rank("i"), rank("j"), rank("k")
A = Access("a", (i,))
B = Access("b", (i,))
C = Access("c", (i,))
FLAG = Access("flag", (i,))
INF, NAN = Const(math.inf), Const(math.nan)

# (expression, the text it must print as)
TREES = [
    (Call("sub", (A, Const(-1.5))), "a[i] - -1.5"),
    (Call("neg", (Call("add", (A, B)),)), "-(a[i] + b[i])"),
    (Call("eq", (Call("lt", (A, B)), FLAG)), "a[i] < b[i] == flag[i]"),
    (Call("lt", (A, Call("lt", (B, C)))), "a[i] < (b[i] < c[i])"),
    (Call("sub", (A, Call("sub", (B, C)))), "a[i] - (b[i] - c[i])"),
    (Call("sub", (Call("sub", (A, B)), C)), "a[i] - b[i] - c[i]"),
    (Call("mul", (Call("add", (A, B)), C)), "(a[i] + b[i]) * c[i]"),
    (Call("mul", (A, Call("neg", (B,)))), "a[i] * -b[i]"),
    (Call("neg", (Call("neg", (A,)),)), "-(-a[i])"),
    (Call("mul", (Const(-2.0), A)), "-2.0 * a[i]"),
    (Call("pow", (Const(-2.0), Call("neg", (A,)))), "pow(-2.0, -a[i])"),
    (Call("div", (A, Call("mul", (B, C)))), "a[i] / (b[i] * c[i])"),
    (Call("floordiv", (Call("mod", (A, B)), C)), "a[i] % b[i] // c[i]"),
    (Call("mod", (A, Call("floordiv", (B, C)))), "a[i] % (b[i] // c[i])"),
    (Call("add", (IndexValue(i + 1), A)), "i + 1 + a[i]"),
    (Call("add", (A, IndexValue(i + 1))), "a[i] + (i + 1)"),
    (Call("mul", (A, IndexValue(-2 * i))), "a[i] * (-2*i)"),
    (Call("sub", (A, IndexValue(-i))), "a[i] - -i"),
    (Call("mul", (IndexValue(-i), A)), "-i * a[i]"),
    (Call("mul", (IndexValue(FloorDiv(i, 2)), A)), "i // 2 * a[i]"),
    (Call("mul", (A, IndexValue(Mod(i, 3)))), "a[i] * (i % 3)"),
    (Call("mul", (A, Const(-0.0))), "a[i] * -0.0"),
    (Call("add", (A, INF)), "a[i] + inf"),
    (Call("sub", (A, Const(-math.inf))), "a[i] - -inf"),
    (Call("where", (FLAG, NAN, Const(-math.inf))), "where(flag[i], nan, -inf)"),
    (Call("cast", (Call("add", (A, B)),), dtypes.f16), "f16(a[i] + b[i])"),
    (Call("neg", (Call("cast", (A,), dtypes.f64),)), "-f64(a[i])"),
    (Call("where", (Call("le", (IndexValue(i), Const(2))), A, Const(True))), "where(i <= 2, a[i], true)"),
    (Call("and", (Call("not", (FLAG,)), Const(False))), "and(not(flag[i]), false)"),
    (Call("min", (IndexValue(i), Const(2))), "min(2, i)"),
    (Call("max", (IndexValue(i - 1), Const(0))), "max(0, i - 1)"),
    (Call("mul", (IndexValue(i * i), A)), "i*i * a[i]"),
]


def _one_statement(expr, dtype=dtypes.f32) -> Module:
    vec = TensorType(dtypes.f32, (4,))
    inputs = [Input(n, vec) for n in "abc"] + [Input("flag", TensorType(dtypes.bool_, (4,)))]
    s = Statement("y", TensorType(dtype, (4,)), (i,), expr)
    return Module("m", inputs, (s,), ("y",))


@pytest.mark.parametrize("expr,text", TREES, ids=[t for _, t in TREES])
def test_expression_trees_print_and_parse_back(expr, text):
    m = _one_statement(expr)
    printed = print_module(m)
    assert printed.splitlines()[5].split(" = ", 1)[1] == text
    assert parse(printed) == m
    assert print_module(parse(printed)) == printed


SPELLINGS = [  # (text, a different spelling of the same tree, a similar-looking different tree)
    ("(a[i] < b[i]) == flag[i]", "a[i] < b[i] == flag[i]", "a[i] < (b[i] == flag[i])"),
    ("a[i] - -1.5", "a[i] - (-1.5)", "a[i] - 1.5"),
    ("-(a[i] + b[i])", "-((a[i]) + (b[i]))", "-a[i] + b[i]"),
    ("a[i] - b[i] - c[i]", "(a[i] - b[i]) - c[i]", "a[i] - (b[i] - c[i])"),
    ("-a[i] * b[i]", "(-a[i]) * b[i]", "-(a[i] * b[i])"),
    ("a[i] * 2 + 1", "(a[i] * 2) + 1", "a[i] * (2 + 1)"),
    ("a[i] + (i + 1)", "a[i] + (1 + i)", "a[i] + i + 1"),
    ("a[i // 2 * 2]", "a[2*(i // 2)]", "a[i // (2 * 2)]"),
]


@pytest.mark.parametrize("text,same,other", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_equivalent_spellings(text, same, other):
    def m(expr):
        return parse(f"module m\n  in a: f32[4]\n  in b: f32[4]\n  in c: f32[4]\n  in flag: bool[4]\n"
                     f"  y[i]: f32[4] = f32({expr})\n  out y\n")

    assert m(text) == m(same)
    assert m(text) != m(other)


def test_min_max_of_ranks_is_index_arithmetic():
    """`x[min(i, 3)]` is an affine-style index, not a gather, however it was built."""
    m = parse("module m\n  in x: f32[4]\n  y[i, j]: f32[6, 2] = x[min(i, 3)] + x[max(j - 1, 0)]\n  out y\n")
    pos = [a.indices[0] for a in (m.body[0].expr.args)]
    assert pos == [sympy.Min(i, 3), sympy.Max(j - 1, 0)]
    verify(m)


def test_hand_built_opaque_literals_round_trip():
    """Opaque-call literals built in Python (not parsed) survive print -> parse, NaN and bools included."""
    vec = TensorType(dtypes.f32, (4,))
    op = Opaque((("o", vec),), "pkg.mod:fn",
                (TensorRef("x"), math.nan, True, 1, -0.0, "line\nbreak\ttab \\ \"q\"", (1, (2.5, None)),
                 torch.device("cpu"), torch.bfloat16, torch.contiguous_format, 3 * S_ - 1),
                (("k", False), ("n", -7)), loc="f.py:3")
    m = Module("m", (Input("x", vec),), (op,), ("o",), (S_,), ((S_, 4),))
    text = print_module(m)
    assert len(text.splitlines()) == 5  # the newline inside the string is escaped
    assert parse(text) == m
    assert print_module(parse(text)) == text


def test_equal_modules_print_identically():
    """Structural equality means identical text: True and 1 are different opaque literals."""
    vec = TensorType(dtypes.f32, (4,))

    def mod(arg):
        return Module("m", (Input("x", vec),), (Opaque((("o", vec),), "aten.foo.default", (arg,)),), ("o",))

    assert mod(True) != mod(1)
    assert mod(1) != mod(1.0)
    assert mod(math.nan) == mod(float("nan"))


def test_comments_and_blank_lines_are_ignored():
    text = "# header\n\nmodule small\n  # a comment\n\n  in x: f32[4]\n  y[i]: f32[4] = x[-i + 3] * 2.0\n  out y\n"
    assert parse(text) == parse(SMALL)
    assert print_module(parse(text)) == SMALL


def test_statement_location_comment():
    m = parse("module m\n  in x: f32[4]\n  y[i]: f32[4] = x[i]   #   a/b.py:7 (forward)  \n  out y\n")
    assert m.body[0].loc == "a/b.py:7 (forward)"
    assert "  # a/b.py:7 (forward)\n" in print_module(m)


# ---------------------------------------------------------------- errors

def _err_at(text: str, token: str | None, line: int, msg: str, nth: int = 0):
    """Parsing `text` fails at `token` (its nth occurrence; None: the end) of `line` with `msg` in the message."""
    with pytest.raises(ParseError) as info:
        parse(text)
    src = text.splitlines()[line - 1] if text else ""
    if token is None:
        col = len(src) + 1
    else:
        col = [m.start() for m in re.finditer(re.escape(token), src)][nth] + 1
    e = info.value
    assert (e.line, e.col) == (line, col), str(e)
    assert f"line {line}, column {col}" in str(e)
    assert msg in str(e)
    return e


def _stmt(s: str) -> str:
    return f"module m\n  size S hint 4\n  in x: f32[4]\n  in ids: i64[4]\n  {s}\n  out y\n"


ERRORS = [
    ("unknown operator", _stmt("y[i]: f32[4] = frob(x[i])"), "frob", 5, "unknown operator 'frob'"),
    ("unknown dtype", "module m\n  in x: f33[4]\n  out x\n", "f33", 2, "unknown dtype 'f33'"),
    ("unknown dtype in cast", _stmt("y[i]: f32[4] = f31(x[i])"), "f31", 5, "unknown operator 'f31'"),
    ("missing bracket", _stmt("y[i]: f32[4] = x[i"), None, 5, "found the end of the line"),
    ("missing paren", _stmt("y[i]: f32[4] = (x[i] + 1.0"), None, 5, "expected ')'"),
    ("unknown rank", _stmt("y[i]: f32[4] = x[k]"), "k", 5, "unknown name 'k'"),
    ("rank in a shape", "module m\n  in x: f32[n]\n  out x\n", "n]", 2, "unknown name 'n'"),
    ("bad number", _stmt("y[i]: f32[4] = x[i] * 1.5.2"), ".2", 5, "unexpected character '.'"),
    ("unterminated string", _stmt('y: f32[4] = opaque aten.foo.default(x, "abc)'), '"', 5, "unexpected character"),
    ("bad enum literal", _stmt("y: f32[4] = opaque aten.foo.default(x, torch.nonsense)"), "torch.nonsense", 5,
     "not a torch dtype"),
    ("bad device literal", _stmt('y: f32[4] = opaque aten.foo.default(x, device("nope"))'), '"nope"', 5,
     "device"),
    ("minus before a string", _stmt('y: f32[4] = opaque aten.foo.default(x, -"a")'), "-", 5,
     "must be followed by a number"),
    ("size hint not an integer", "module m\n  size S hint 1.5\n  in x: f32[S]\n  out x\n", "1.5", 2,
     "a size hint is an integer"),
    ("wrong arity", _stmt("y[i]: f32[4] = exp(x[i], x[i])"), "exp", 5, "exp takes 1 argument(s), got 2"),
    ("wrong arity where", _stmt("y[i]: f32[4] = where(x[i] < 0.0, x[i])"), "where", 5, "takes 3"),
    ("wrong arity cast", _stmt("y[i]: f32[4] = f32(x[i], 1)"), "f32(", 5, "takes one argument"),
    ("stray token", _stmt("y[i]: f32[4] = x[i] x[i]"), "x[i]", 5, "at the end of the line", 1),
    ("stray token after out", "module m\n  in x: f32[4]\n  out x x\n", "x", 3, "at the end of the line", 1),
    ("empty text", "", "", 1, "empty text"),
    ("only comments", "# nothing\n\n", "", 1, "empty text"),
    ("missing module header", "  in x: f32[4]\n  out x\n", "in", 1, "module <name>"),
    ("float index", _stmt("y[i]: f32[4] = x[1.5]"), "1.5", 5, "an index must be an integer"),
    ("float index arithmetic", _stmt("y[i]: f32[4] = x[i * 0.5]"), "i * 0.5", 5, "an index must be an integer"),
    ("float gather", _stmt("y[i]: f32[4] = x[x[i]]"), "x[i]]", 5, "an index must be an integer"),
    ("unknown reduce", _stmt("y[i]: f32[4] = avg[j:4] x[j]"), "avg", 5, "unknown reduce operator 'avg'"),
    ("reduce reuses an output rank", _stmt("y[i]: f32[4] = sum[i:4] x[i]"), "i:4", 5, "already an output rank"),
    ("iterate init not a literal", _stmt("y[k + 1]: f32[5] = iterate[k:4, init=exp(1.0)] y[k]"), "exp", 5,
     "init must be a literal"),
    ("index is not index arithmetic", _stmt("y[exp(i)]: f32[4] = x[i]"), "exp", 5, "expected index arithmetic"),
    ("not a statement", _stmt("y = x"), "y", 5, "expected a declaration"),
    ("unknown character", _stmt("y[i]: f32[4] = x[i] @ x[i]"), "@", 5, "unexpected character '@'"),
]


@pytest.mark.parametrize("text,token,line,msg,nth", [e[1:] + (0,) if len(e) == 5 else e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_parse_errors_point_at_the_mistake(text, token, line, msg, nth):
    e = _err_at(text, token, line, msg, nth)
    shown = str(e).splitlines()
    if "empty text" not in msg:
        assert shown[1].strip() == text.splitlines()[line - 1].strip()  # the offending line is shown
        assert shown[2].index("^") - 4 == e.col - 1  # with a caret under the column


def test_parse_error_is_a_value_error():
    assert issubclass(ParseError, ValueError)


def test_parser_never_evaluates_code():
    src = (pathlib.Path(__file__).parent.parent / "einfuse" / "ir" / "parser.py").read_text()
    for banned in (r"\beval\(", r"\bexec\(", r"sympify\(", r"(?<!re\.)\bcompile\(", r"__import__", r"importlib"):
        assert not re.search(banned, src), banned

"""The verifier accepts valid modules and rejects each kind of broken one with a message naming the statement."""
import re

import pytest
import sympy

from einfuse.ir import (Access, Call, Const, Input, Module, Opaque, Reduce, Statement, TensorRef, TensorType,
                        dtypes, parse, print_module, rank, size)
from einfuse.ir.verify import VerifyError, verify

HEADER = """\
module m
  size S hint 5
  in x: f32[4]
  in a: f32[8]
  in b: f32[8]
  in ids: i64[4]
  in flag: bool[16]
"""


def mod(*lines: str, out: str = "y") -> Module:
    return parse(HEADER + "".join(f"  {ln}\n" for ln in lines) + f"  out {out}\n")


def rejects(m: Module, name: str | None, *fragments: str) -> str:
    """verify(m) fails; the message names statement `name` with its line and text, and says `fragments`."""
    with pytest.raises(VerifyError) as info:
        verify(m)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, (f, msg)
    if name is not None:
        found = re.match(r"'([^']*)' \(line (\d+)\): ", msg)
        assert found and found.group(1) == name, msg
        printed = print_module(m).splitlines()[int(found.group(2)) - 1].strip()
        assert msg.splitlines()[-1].strip() == printed, "the message shows the statement's line"
        assert printed.startswith(name.split(",")[0])
    return msg


def test_valid_module_passes_and_is_returned():
    m = mod("t[i]: f32[4] = x[i] * 2.0", "y[j]: f32[16] = where(j < 8, a[j], b[j - 8]) + t[j % 4]")
    assert verify(m) is m


# ---------------------------------------------------------------- index ranges

def test_out_of_range_index():
    rejects(mod("y[i]: f32[5] = x[i]"), "y", "index 0 of x", "outside [0, 3]")
    rejects(mod("y[i]: f32[4] = x[i + 1]"), "y", "index 0 of x")
    rejects(mod("y[i]: f32[4] = x[-i + 2]"), "y", "index 0 of x")
    rejects(mod("y[i]: f32[4] = sum[r:3] x[r + i]"), "y", "index 0 of x")


def test_index_range_uses_the_reduced_rank_extent():
    verify(mod("y[i]: f32[2] = sum[r:3] x[r + i // 2]"))
    rejects(mod("y[i]: f32[2] = sum[r:4] x[r + i]"), "y", "index 0 of x")


@pytest.mark.parametrize("expr", [
    "where(j < 8, a[j], b[j - 8])",
    "where(j >= 8, b[j - 8], a[j])",
    "where(8 > j, a[j], b[j - 8])",
    "where(7 < j, b[j - 8], a[j])",
    "where(j <= 7, a[j], b[j - 8])",
    "where(and(j >= 4, j < 12), a[j - 4], 0.0)",
    "where(j < 8, where(j < 4, a[j + 4], a[j]), b[j - 8])",
])
def test_guarded_concatenation_is_accepted(expr):
    verify(mod(f"y[j]: f32[16] = {expr}"))


def test_branch_a_guard_rules_out_is_not_range_checked():
    """`where(2*j < j, ...)` never takes its first branch: what it reads there cannot go out of range."""
    verify(mod("y[j]: f32[16] = where(2*j < j, a[j - 100], b[j % 8])"))
    verify(mod("y[j]: f32[16] = where(j >= 16, a[j], b[j % 8])"))
    rejects(mod("y[j]: f32[16] = where(j >= 15, a[j], b[j % 8])"), "y", "index 0 of a")


@pytest.mark.parametrize("expr,bad", [
    ("where(j < 8, a[j], b[j - 7])", "b"),
    ("where(j < 9, a[j], b[j - 9])", "a"),
    ("where(j >= 8, a[j], b[j - 8])", "a"),
    ("where(j < 8, b[j - 8], a[j])", "b"),
    ("where(and(j >= 4, j < 13), a[j - 4], 0.0)", "a"),
    ("where(or(j >= 4, j < 13), a[j - 4], 0.0)", "a"),  # `or` does not narrow
    ("where(not(j >= 8), a[j], 0.0)", "a"),  # nor does `not` (the verifier may be conservative, never unsound)
    ("a[j] + b[j - 8]", "a"),
])
def test_wrong_guard_or_offset_is_rejected(expr, bad):
    rejects(mod(f"y[j]: f32[16] = {expr}"), "y", f"of {bad},")


def test_symbolic_sizes_in_ranges():
    verify(parse("module m\n  size S\n  in x: f32[S, 2*S]\n  y[i, j]: f32[S, S] = x[i, 2*j + 1]\n  out y\n"))
    rejects(parse("module m\n  size S\n  in x: f32[S, 2*S]\n  y[i, j]: f32[S, S] = x[i, 2*j + 2]\n  out y\n"),
            "y", "index 1 of x")


def test_zero_divisor_in_an_index():
    rejects(mod("y[i]: f32[4] = x[i // 0]"), "y", "divisor")
    rejects(mod("y[i]: f32[4] = x[i % 0]"), "y", "divisor")
    rejects(mod("y[i]: i64[4] = i // (i - i)"), "y", "divisor")


# ---------------------------------------------------------------- types and names

def test_dtype_mismatch():
    rejects(mod("y[i]: f16[4] = x[i]"), "y", "the expression is f32 but the statement declares f16")
    rejects(mod("y[i]: f32[4] = ids[i] + 1"), "y", "is i64")
    rejects(mod("y[i]: f32[4] = x[i] < 1.0"), "y", "is bool")


def test_reduction_may_convert_its_accumulator():
    verify(mod("y[i]: f16[4] = sum[r:8] x[i] * a[r]"))


def test_unknown_tensor():
    rejects(mod("y[i]: f32[4] = nope[i]"), "y", "reads 'nope' before it is defined")
    rejects(mod("y[i]: f32[4] = later[i]", "later[i]: f32[4] = x[i]"), "y", "reads 'later' before it is defined")
    rejects(mod("y[i]: f32[4] = x[nope[i]]"), "y", "'nope'")
    rejects(mod("y: f32[4] = opaque aten.abs.default(nope)"), "y", "reads 'nope' before it is defined")


def test_wrong_number_of_indices():
    rejects(mod("y[i]: f32[4] = x[i, 0]"), "y", "x has rank 1 but is accessed with 2 indices")


def test_gather_index_must_be_integer():
    m = mod("y[i]: f32[4] = x[ids[i]]")
    verify(m)
    s = m.body[0]
    bad = s.replace(expr=Access("x", (Access("a", (rank("i"),)),)))
    rejects(m.replace(body=(bad,)), "y", "gather index 0 of x is not an integer")


def test_unknown_operator_and_arity():
    m = mod("y[i]: f32[4] = exp(x[i])")
    s = m.body[0]
    rejects(m.replace(body=(s.replace(expr=Call("frob", (Access("x", (rank("i"),)),))),)), "y", "frob")
    rejects(m.replace(body=(s.replace(expr=Call("exp", (Access("x", (rank("i"),)),) * 2)),)), "y", "exp takes 1")


def test_rank_used_as_output_and_reduced():
    i = rank("i")
    s = Statement("y", TensorType(dtypes.f32, (4,)), (i,), Access("x", (i,)), reduce=Reduce("sum", ((i, 4),)))
    rejects(mod().replace(body=(s,)), "y", "rank i is both an output and a reduced rank")


def test_output_rank_twice():
    i = rank("i")
    s = Statement("y", TensorType(dtypes.f32, (4, 4)), (i, i), Access("x", (i,)))
    rejects(mod().replace(body=(s,)), "y", "an output rank appears twice")


def test_unknown_rank_symbol():
    i, k = rank("i"), rank("k")
    s = Statement("y", TensorType(dtypes.f32, (4,)), (i,), Access("x", (k,)))
    rejects(mod().replace(body=(s,)), "y", "uses k, not a rank or size")


def test_duplicate_definition():
    rejects(mod("y[i]: f32[4] = x[i]", "y[i]: f32[4] = x[i] * 2.0"), "y", "'y' is already defined")
    rejects(mod("x[i]: f32[4] = a[i]", "y[i]: f32[4] = x[i]"), "x", "'x' is already defined")
    rejects(mod("v: f32[4], y: f32[4] = opaque aten.foo.default(x)", "y[i]: f32[4] = x[i]"), "y", "already defined")
    rejects(mod("y: f32[4], y: f32[4] = opaque aten.foo.default(x)"), "y, y", "'y' is already defined")
    dup = parse("module m\n  in x: f32[4]\n  in x: f32[4]\n  out x\n")
    with pytest.raises(VerifyError, match="'x' is declared twice"):
        verify(dup)


def test_packed_statement_is_rejected():
    rejects(mod("y[i]: i4[4] = i8(ids[i])"), "y", "packed")


# ---------------------------------------------------------------- iterate

def test_valid_iterate():
    verify(mod("y[p, m1 + 1]: f32[4, 9] = iterate[m1:8, init=-inf] max(y[p, m1], x[p] * a[m1])"))


def test_iterate_reads_itself_at_the_wrong_step():
    rejects(mod("y[p, m1 + 1]: f32[4, 9] = iterate[m1:8, init=0.0] y[p, m1 + 1] + a[m1]"), "y",
            "reads itself at [p, m1 + 1]")
    rejects(mod("y[p, m1 + 1]: f32[4, 9] = iterate[m1:8, init=0.0] y[0, m1] + a[m1]"), "y", "reads itself at [0, m1]")


def test_iterate_wrong_extent():
    rejects(mod("y[p, m1 + 1]: f32[4, 8] = iterate[m1:8, init=0.0] y[p, m1] + a[m1]"), "y",
            "the iterated dimension must have extent 9")
    rejects(mod("y[p, m1 + 1]: f32[4, 10] = iterate[m1:8, init=0.0] y[p, m1] + a[m1]"), "y", "extent 9")


def test_iterate_position_and_reduce():
    good = mod("y[p, m1 + 1]: f32[4, 9] = iterate[m1:8, init=0.0] y[p, m1] + a[m1]")
    s = good.body[0]
    p, m1 = rank("p"), rank("m1")
    rejects(good.replace(body=(s.replace(index=(p, m1 + 2)),)), "y", "exactly one position `m1 + 1`")
    rejects(good.replace(body=(s.replace(reduce=Reduce("sum", ((rank("r"), 2),))),)), "y", "cannot also reduce")
    rejects(good.replace(body=(s.replace(iterate=None),)), "y", "must be a rank")


# ---------------------------------------------------------------- module level

def test_undefined_output():
    with pytest.raises(VerifyError, match="output 'nope' is never defined"):
        verify(mod("y[i]: f32[4] = x[i]", out="y, nope"))
    with pytest.raises(VerifyError, match="no outputs"):
        verify(mod("y[i]: f32[4] = x[i]").replace(outputs=()))


def test_shape_with_undeclared_size():
    T = size("T")
    m = mod("y[i]: f32[4] = x[i]")
    with pytest.raises(VerifyError, match="input 'z': shape uses T, which is not a declared size"):
        verify(m.replace(inputs=m.inputs + (Input("z", TensorType(dtypes.f32, (2 * T,))),)))
    s = m.body[0]
    rejects(m.replace(body=(s.replace(type=TensorType(dtypes.f32, (T,))),)), "y", "T, which is not a declared size")
    o = Opaque((("y", TensorType(dtypes.f32, (T + 1,))),), "aten.foo.default", (TensorRef("x"),))
    rejects(m.replace(body=(o,)), "y", "T, which is not a declared size")


def test_size_is_not_a_rank():
    S = size("S")
    s = Statement("y", TensorType(dtypes.f32, (4,)), (S,), Const(1.0))
    rejects(mod().replace(body=(s,)), "y", "S is a size")


def test_error_line_numbers_follow_the_printed_text():
    m = mod("t[i]: f32[4] = x[i]", "u[i]: f32[4] = t[i]", "y[i]: f32[4] = u[i + 1]")
    msg = rejects(m, "y", "index 0 of u")
    assert "(line 10)" in msg and print_module(m).splitlines()[9].strip().startswith("y[i]")


def test_numbers_compare_exactly():
    """Extents written as different sympy forms of the same number are still the same extent."""
    m = mod("y[p, m1 + 1]: f32[4, 9] = iterate[m1:8, init=0.0] y[p, m1] + a[m1]")
    s = m.body[0]
    verify(m.replace(body=(s.replace(type=TensorType(dtypes.f32, (4, sympy.Integer(3) * 3))),)))

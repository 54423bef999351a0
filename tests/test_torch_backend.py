"""The torch backend (`backend="torch"`, the CPU default): the final IR as straight-line Python with torch
ops, checked against the reference evaluator (the oracle) and against eager PyTorch.

Every comparison runs on fresh random inputs (normal floats, integers in range, never all zeros), not the
ones a module was compiled for. Tolerances: `max_rel_error` (max |got - want| / max |want|) within the
evaluator's TOLERANCE for the dtype (f64 1e-9, f32 1e-5, f16 1e-2, bf16 2e-2); integers and bools equal;
dtypes and shapes identical. Against eager: 1e-5 for f32 models (MiniLM: its real tokens, the pooled
sentence embedding and the pooler; padding positions are ill-conditioned even for eager vs f64), 2e-2 for
bf16 attention. Each module also states which attention path it takes (one SDPA call, 3-pass softmax, or
statement by statement) and that no statement fell back to the evaluator unless the test forces one.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import einfuse
from einfuse import models
from einfuse.codegen import torch_gen
from einfuse.ir import parse
from einfuse.ir.evaluator import evaluate, random_inputs
from einfuse.passes.instruments import max_rel_error
from einfuse.runtime.torch_backend import TorchRunner, torch_backend

sys.path.insert(0, os.path.dirname(__file__))
import test_attention as ta  # noqa: E402  (the ways models write attention)
import test_ir_properties as ir_props  # noqa: E402  (random cascades)
from hypothesis import HealthCheck, assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_einfuse_cache")

TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def check(text: str, seed: int = 1, inputs: dict | None = None, fallbacks: int = 0, sizes=None):
    """Run a module (IR text) with the torch backend and the evaluator on the same fresh inputs; every
    output has the evaluator's dtype and shape and its values within tolerance. Returns the runner."""
    m = parse(text)
    runner = torch_backend(m)
    assert isinstance(runner, TorchRunner)
    assert len(runner.fallbacks) == fallbacks, runner.fallbacks
    inputs = inputs if inputs is not None else random_inputs(m, seed=seed, sizes=sizes)
    got, want = runner(inputs), evaluate(m, inputs)
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape, w.shape)
        err = max_rel_error(g, w)
        assert err <= TOL.get(w.dtype, 0.0), f"{name}: {err:.3g} ({w.dtype})\n{runner.source}"
    return runner


def body(runner) -> str:
    return runner.source.split("def run(", 1)[1]


# ---------------------------------------------------------------- maps, types, literals

FLOAT_MAP = """module maps
  in x: {t}[3, 5]
  in y: {t}[5]
  in n: i32[3, 5]
  a[i, j]: {t}[3, 5] = exp(x[i, j]) * y[j] + sqrt(abs(x[i, j])) - where(x[i, j] > y[j], x[i, j], 0.5) / (abs(y[j]) + 1)
  b[i, j]: {t}[3, 5] = max(x[i, j], 0.25) + min(y[j], -0.5) * sigmoid(x[i, j]) + tanh(x[i, j]) * 2
  c[i, j]: f32[3, 5] = f32(x[i, j]) * 0.1 + f32(n[i, j]) / 3
  d[i, j]: bool[3, 5] = and(x[i, j] < 0.5, not(isnan(y[j])))
  e[i, j]: {t}[3, 5] = silu(x[i, j]) + gelu(y[j]) + gelu_tanh(x[i, j]) - relu(-x[i, j]) + floor(x[i, j] * 4)
  f[i, j]: i64[3, 5] = i64(x[i, j] * 10) + n[i, j] * 2 + i
  g[i, j]: {t}[3, 5] = x[i, j] + n[i, j]
  out a, b, c, d, e, f, g
"""

INT_MAP = """module ints
  in x: {t}[4, 6]
  in y: {t}[6]
  a[i, j]: {t}[4, 6] = x[i, j] * y[j] + x[i, j] // (abs(y[j]) + 1) - x[i, j] % 3
  b[i, j]: {t}[4, 6] = max(x[i, j], 1) + min(y[j], x[i, j]) + bitand(x[i, j], 6) + bitxor(x[i, j], y[j])
  c[i, j]: bool[4, 6] = or(x[i, j] >= y[j], x[i, j] == 1)
  d[i, j]: f32[4, 6] = x[i, j] / 2 + f32(y[j]) * 0.5 + exp(f32(x[i, j] - y[j]))
  e[i, j]: {t}[4, 6] = where(x[i, j] > 0, x[i, j], y[j]) + i * j
  out a, b, c, d, e
"""


@pytest.mark.parametrize("t", ["f64", "f32", "bf16", "f16"])
def test_float_maps_every_dtype(t):
    check(FLOAT_MAP.format(t=t))


@pytest.mark.parametrize("t", ["i64", "i32", "i16", "i8", "u8"])
def test_integer_maps_every_dtype(t):
    m = parse(INT_MAP.format(t=t))
    g = torch.Generator().manual_seed(3)
    lo = 0 if t == "u8" else -5
    inputs = {i.name: torch.randint(lo, 6, tuple(int(s) for s in i.type.shape), generator=g).to(i.type.dtype.torch)
              for i in m.inputs}
    check(INT_MAP.format(t=t), inputs=inputs)


def test_bool_maps():
    check("""module b
  in p: bool[3, 4]
  in q: bool[4]
  a[i, j]: bool[3, 4] = xor(p[i, j], q[j]) or not(p[i, j])
  b[i, j]: i64[3, 4] = i64(p[i, j]) + i64(q[j])
  c[i, j]: f32[3, 4] = where(and(p[i, j], q[j]), 1.0, -2.5)
  d[i]: i64[3] = sum[r:4] p[i, r]
  e[i]: bool[3] = any[r:4] and(p[i, r], q[r])
  f[i]: bool[3] = all[r:4] or(p[i, r], q[r])
  out a, b, c, d, e, f
""".replace("xor(p[i, j], q[j]) or not(p[i, j])", "or(xor(p[i, j], q[j]), not(p[i, j]))"))


def test_every_map_operator():
    """Each registered map operator, on operands where it is defined, against the evaluator."""
    from einfuse.ir.ops import MAP_OPS, infer

    head = ["module ops", "  in x: f32[7]", "  in y: f32[7]", "  in n: i32[7]", "  in k: i32[7]"]
    types = {"x": "f32", "y": "f32", "n": "i32", "k": "i32"}
    lines, outs = [], []
    for name, op in sorted(MAP_OPS.items()):
        if name in ("cast", "where") or op.infix:
            continue
        if name in ("bitand", "bitor", "bitxor", "bitnot"):
            args = ["n[i]", "k[i]"]
        elif name in ("shl", "shr"):
            args = ["n[i]", "2"]
        elif name in ("and", "or", "xor", "not"):
            args = ["x[i] > 0", "y[i] > 0"]
        elif name in ("log", "log2", "sqrt", "rsqrt", "log1p", "pow"):
            args = ["abs(x[i]) + 0.5", "y[i]"]
        else:
            args = ["x[i]", "y[i]"]
        expr = f"{name}({', '.join(args[:op.arity])})"
        draft = parse("\n".join(head + [f"  z[i]: f32[7] = {expr}", "  out z"]))
        from einfuse.ir import dtypes

        got = infer(draft.statements[0].expr, lambda t: dtypes.by_name(types[t]))[0]
        lines.append(f"  z_{name}[i]: {got}[7] = {expr}")
        outs.append(f"z_{name}")
    check("\n".join(head + lines + ["  out " + ", ".join(outs)]) + "\n")


def test_literals_are_weak_and_folded():
    r = check("""module lit
  in x: bf16[8]
  in n: i32[8]
  a[i]: bf16[8] = x[i] * 0.1 + 2.5 * 4
  b[i]: f32[8] = n[i] * 0.5
  c[i]: i32[8] = n[i] * 3 + 1
  d[i]: f32[8] = where(i < 3, 0.0, -inf) + f32(x[i])
  e[i]: f64[8] = f64(x[i]) + where(i > 4, 0.1, 0.2)
  out a, b, c, d, e
""")
    assert "10.0" in body(r)  # 2.5 * 4 folded at generation time


# ---------------------------------------------------------------- views and gathers

VIEWS = """module views
  in x: f32[4, 26]
  in y: f32[26, 4]
  a[i, j]: f32[26, 4] = x[j, i] * y[i, j] + 0.5
  b[i, j, k]: f32[2, 13, 4] = a[13*i + j, k]
  c[i, j]: f32[26, 4] = b[i // 13, i % 13, j]
  e[i, j]: f32[4, 26] = x[i, 25 - j]
  f[i, j]: f32[4, 30] = where(j < 26, x[i, j], 0.0)
  g[i, j]: f32[4, 26] = where(j < 13, -x[i, j + 13], x[i, j - 13])
  h[i, j]: f32[4, 26] = x[0, j]
  k[i, j]: f32[4, 26] = h[i, j] * 2 + b[i // 2, (i % 2)*6 + j // 13, j % 4]
  s[i, j]: f32[2, 10] = x[2*i + 1, j + 3]
  out a, b, c, e, f, g, h, k, s
"""


def test_views_reshapes_slices_and_rank_splits():
    r = check(VIEWS)
    src = body(r)
    assert "a.view((2, 13, 4))" in src  # a reshape is a view
    assert "x.permute(1, 0)" in src  # a transpose is a view
    assert "rt.cat(1" in src  # where(j < 13, ...) evaluates each half on its own rows: no clamped reads
    # an output that is a view of something else is handed out as its own tensor
    m = parse(VIEWS)
    out = r(random_inputs(m, seed=2))
    assert out["b"].data_ptr() != out["a"].data_ptr() and out["b"].is_contiguous()


def test_gathers_embedding_and_nested():
    r = check("""module gather
  in ids: i64[2, 5]
  in pos: i64[1, 5]
  in table: f32[11, 6]
  in w: f32[9, 6]
  in idx: i32[3]
  a[i, j, k]: f32[2, 5, 6] = table[ids[i, j], k] + w[pos[0, j], k]
  b[i, j]: f32[2, 5] = sum[r:6] table[ids[i, j], r] * w[pos[0, ids[i, j] // 3], r]
  c[i, j]: f32[3, 6] = w[idx[i], 5 - j]
  out a, b, c
""", inputs={"ids": torch.randint(0, 11, (2, 5)), "pos": torch.randint(0, 5, (1, 5)), "table": torch.randn(11, 6),
             "w": torch.randn(9, 6), "idx": torch.randint(0, 9, (3,), dtype=torch.int32)})
    assert "rt.take(table, ids)" in body(r)  # an embedding lookup copies whole rows of the table by the ids


def test_nested_conditions_on_one_rank():
    """A concatenation of three parts: the inner where() is split in the outer one's second half, whose
    positions are offset by 13 (the split point is local to that half)."""
    r = check("""module nested
  in x: f32[4, 13]
  in y: f32[4, 7]
  in z: f32[4, 10]
  a[i, j]: f32[4, 30] = where(j < 13, x[i, j], where(j < 20, y[i, j - 13], z[i, j - 20]))
  b[i, j]: f32[4, 30] = where(j >= 13, where(j >= 20, z[i, j - 20], -y[i, j - 13]), x[i, j] * 2)
  out a, b
""")
    assert "torch.cat((y, z), 1)" in body(r)  # the halves are whole tensors of the type: a plain cat


def test_where_guarded_reads_outside_the_tensor():
    """Lanes a where() discards may read past the tensor's end: the two-rank condition cannot be split,
    so those reads are clamped like the evaluator clamps them."""
    check("""module pad
  in x: f32[6, 8]
  a[i, j]: f32[6, 8] = where(j <= i, x[i, j + 2*i], -1.0)
  b[i, j]: f32[6, 10] = where(j >= 2, x[i, j - 2], 0.0)
  out a, b
""")


# ---------------------------------------------------------------- reductions and contractions

@pytest.mark.parametrize("t", ["f64", "f32", "bf16", "f16"])
def test_reductions_every_float_dtype(t):
    check(f"""module red
  in x: {t}[3, 4, 5]
  s[i]: {t}[3] = sum[r:4, q:5] x[i, r, q]
  m[i, j]: {t}[3, 5] = max[r:4] x[i, r, j]
  n[i]: {t}[3] = min[r:5] x[i, 1, r] * 2
  p[i]: {t}[3] = prod[r:5] x[i, 0, r]
  e[i]: {t}[3] = sum[r:7] x[i, 0, 0]
  v[i, j]: f32[3, 4] = sum[r:5] (f32(x[i, j, r]) - 0.5) * (f32(x[i, j, r]) - 0.5)
  out s, m, n, p, e, v
""")


@pytest.mark.parametrize("t", ["i64", "i32", "i8", "u8"])
def test_reductions_every_int_dtype(t):
    text = f"""module ired
  in x: {t}[3, 5]
  s[i]: i64[3] = sum[r:5] x[i, r]
  m[i]: {t}[3] = max[r:5] x[i, r]
  n[i]: {t}[3] = min[r:5] x[i, r]
  out s, m, n
"""
    m = parse(text)
    check(text, inputs={"x": torch.randint(0, 9, (3, 5), generator=torch.Generator().manual_seed(4)).to(
        m.inputs[0].type.dtype.torch)})


CONTRACTIONS = """module mm
  in a: {t}[6, 8]
  in b: {t}[8, 5]
  in c: {t}[2, 3, 8, 4]
  in d: {t}[2, 4, 8]
  in s: {t}[6]
  mm[i, j]: {t}[6, 5] = sum[r:8] {ca} * {cb}
  bmm[i, h, p, q]: {t}[2, 3, 8, 8] = sum[r:4] {cc1} * {cc2} * 0.5
  scaled[i, j]: {t}[6, 5] = sum[r:8] {ca} * {cb} / s[i]
  multi[i, j, k]: {t}[2, 3, 4] = sum[r:8, q:2] {cd} * {cc3}
  dot[i]: {t}[6] = sum[r:8] {ca} * {ca}
  vec[i]: {t}[6] = sum[r:8] {ca} * {cbv}
  out mm, bmm, scaled, multi, dot, vec
"""


@pytest.mark.parametrize("t", ["f64", "f32", "bf16", "f16"])
def test_contractions_are_matmuls(t):
    wide = t in ("bf16", "f16")

    def f(x):
        return f"f32({x})" if wide else x

    acc = "f32" if wide else t
    text = CONTRACTIONS.format(t=t, ca=f("a[i, r]"), cb=f("b[r, j]"), cc1=f("c[i, h, p, r]"), cc2=f("c[i, h, q, r]"),
                               cd=f("d[q, k, r]"), cc3=f("c[q, i, r, k]"), cbv=f("b[r, 0]"))
    text = text.replace(f"bmm[i, h, p, q]: {t}", f"bmm[i, h, p, q]: {t}")
    r = check(text)
    src = body(r)
    assert "torch.mm(" in src and ("torch.matmul(" in src or "torch.bmm(" in src)
    del acc


MASKED_CONTRACTION = """module routed
  in g: f32[6, 4]
  in x: f32[6, 8]
  in w: f32[4, 5, 8]
  up[t, e, n]: f32[6, 4, 5] = sum[h:8] where(g[t, e] != 0.0, x[t, h] * w[e, n, h], 0.0)
  out up
"""


def test_a_mask_free_of_the_reduced_rank_leaves_a_matmul():
    """MoE's gate/up projection: `sum[h] where(g[t, e] != 0, x * w, 0)` is where(mask, a batched matmul, 0),
    not the product broadcast over (t, e, n, h) (a Mixtral decoder took 25 s per call instead of 0.3 s); an
    inf in an expert the mask drops does not reach the result, as in the evaluator."""
    g = torch.randn(6, 4)
    g[g < 0.3] = 0.0
    x, w = torch.randn(6, 8), torch.randn(4, 5, 8)
    r = check(MASKED_CONTRACTION, inputs={"g": g, "x": x, "w": w})
    src = body(r)
    assert "torch.where(" in src and ("torch.mm(" in src or "torch.bmm(" in src) and "torch.sum(" not in src, src
    dead = int((g[:, 2] == 0).nonzero()[0, 0])
    w2 = w.clone()
    w2[2] = float("inf")  # expert 2 overflows; token `dead` does not route to it
    x2 = x.clone()
    x2[dead] = 0.0  # and inf * 0 would be NaN for that token, were it computed into the result
    got = r({"g": g, "x": x2, "w": w2})["up"]
    want = evaluate(parse(MASKED_CONTRACTION), {"g": g, "x": x2, "w": w2})["up"]
    assert torch.equal(got[dead, 2], want[dead, 2]) and not got[dead, 2].isnan().any()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())

def test_int_contraction_sums_products():
    text = """module imm
  in a: i32[4, 6]
  in b: i32[6, 3]
  c[i, j]: i64[4, 3] = sum[r:6] a[i, r] * b[r, j]
  out c
"""
    g = torch.Generator().manual_seed(5)
    check(text, inputs={"a": torch.randint(-9, 9, (4, 6), generator=g, dtype=torch.int32),
                        "b": torch.randint(-9, 9, (6, 3), generator=g, dtype=torch.int32)})


# ---------------------------------------------------------------- iterate, opaque, sizes, inputs

def test_iterative_ranks():
    r = check("""module it
  in x: f32[3, 4]
  in a: f32[3, 4]
  run[i, m + 1]: f32[3, 5] = iterate[m:4, init=-inf] max(run[i, m], x[i, m])
  lin[i, m + 1]: f32[3, 5] = iterate[m:4, init=1.0] a[i, m] * lin[i, m] + x[i, m]
  out run, lin
""")
    assert "torch.cummax" in body(r) and "for _it_m in range(4)" in body(r)


def test_opaque_calls():
    check("""module op
  in x: f32[6, 5]
  y[i, j]: f32[6, 5] = x[i, j] * 2
  vals: f32[6, 2], idx: i64[6, 2] = opaque aten.topk.default(y, 2, -1)
  z[i, j]: f32[6, 2] = vals[i, j] + f32(idx[i, j])
  out z, idx
""")


@pytest.mark.parametrize("n", [0, 1])
def test_sizes_zero_and_one(n):
    check(f"""module edge
  in x: f32[{n}, 4]
  in w: f32[4, 3]
  a[i, j]: f32[{n}, 3] = sum[r:4] x[i, r] * w[r, j]
  b[i]: f32[{n}] = sum[r:4] exp(x[i, r])
  c[j]: f32[3] = sum[r:{n}] x[r, 0] * w[0, j]
  d[j]: f32[4] = sum[r:{n}] x[r, j]
  out a, b, c, d
""")


def test_symbolic_sizes():
    text = """module dyn
  size S hint 5
  in x: f32[2, S, 4]
  in w: f32[4, 4]
  a[i, j, k]: f32[2, S, 4] = sum[r:4] x[i, j, r] * w[k, r]
  b[i, j]: f32[2*S, 4] = a[i // S, i % S, j] + f32(i)
  c[i]: f32[2] = sum[r:S] a[i, r, 0]
  out a, b, c
"""
    m = parse(text)
    runner = torch_backend(m)
    for s in (5, 1, 9):
        check(text, inputs=random_inputs(m, seed=s, sizes={sorted(m.sizes, key=str)[0]: s}))
    assert "n_S = x.shape[1]" in runner.source


def test_noncontiguous_and_aliased_inputs():
    text = """module alias
  in x: f32[4, 6]
  in y: f32[4, 6]
  a[i, j]: f32[4, 6] = x[i, j] * y[i, j] + x[i, j]
  out a, x
"""
    base = torch.randn(6, 9)
    x = base[:4, 1:7] if False else base.t()[1:5, :6]  # a strided, offset view
    check(text, inputs={"x": x, "y": x})  # the same tensor bound to two inputs


def test_packed_int4_input():
    check("""module packed
  in q: i4[3, 8]
  in s: f32[3]
  a[i, j]: f32[3, 8] = f32(q[i, j]) * s[i]
  out a
""")


def test_bad_inputs_are_named():
    m = parse("module bad\n  in x: f32[2, 3]\n  y[i, j]: f32[2, 3] = x[i, j]\n  out y\n")
    runner = torch_backend(m)
    with pytest.raises(Exception, match="x"):
        runner({"x": torch.randn(3, 2)})
    with pytest.raises(Exception, match="was not given"):
        runner({})


def test_unsupported_statement_runs_through_the_evaluator(monkeypatch):
    real = torch_gen.TorchGen.statement

    def refuse(self, s):
        if s.name == "b":
            raise torch_gen.Unsupported("refused by this test")
        return real(self, s)

    monkeypatch.setattr(torch_gen.TorchGen, "statement", refuse)
    r = check("""module fb
  size S hint 3
  in x: f32[S, 4]
  a[i, j]: f32[S, 4] = x[i, j] * 2
  b[i]: f32[S] = sum[r:4] a[i, r] * x[i, r]
  c[i]: f32[S] = b[i] + 1
  out c
""", fallbacks=1)
    assert r.fallbacks == [("b", "refused by this test")]
    assert "not generated (refused by this test): the reference evaluator runs this statement" in r.source


def test_source_is_readable_and_cached(tmp_path):
    text = VIEWS.replace("module views", "module cached")
    r1 = torch_backend(parse(text))
    r2 = torch_backend(parse(text))
    assert not r1.cache_hit and r2.cache_hit and r1.path == r2.path
    src = r1.source
    assert src.count("# IR: ") == len(parse(text).body)
    assert "def run(inputs, rt):" in src and "exec(" not in src


@settings(max_examples=60, **ir_props.SETTINGS)
@given(m=ir_props.cascades(), seed=st.integers(0, 2**31 - 1))
def test_random_cascades(m, seed):
    """Random cascades (wrapped, reversed, merged and gathered positions, running max/min/sum, reductions,
    index conditions; tests/test_ir_properties.py's strategy) compute what the evaluator computes."""
    note(str(m))
    runner = torch_backend(m)
    note(runner.source)
    assert runner.fallbacks == []
    inputs = random_inputs(m, seed=seed)
    ir_props.assert_same_outputs(runner(inputs), evaluate(m, inputs), m.outputs)


@st.composite
def split_conditions(draw, depth: int = 4, n: int = 12):
    """Nested where() on one rank (every comparison, shifted and mirrored thresholds) over reads shifted
    along that rank, which stray outside the tensor in the lanes a condition discards."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        off = draw(st.integers(-3, 3))
        pos = f"j + {off}" if off >= 0 else f"j - {-off}"
        return f"x[{draw(st.sampled_from(['i', '0', '2 - i']))}, {pos}]"
    op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
    lhs = draw(st.sampled_from(["j", "j + 1", f"{n} - j", "2*j"]))
    a, b = draw(split_conditions(depth - 1, n)), draw(split_conditions(depth - 1, n))
    return f"where({lhs} {op} {draw(st.integers(-2, n + 2))}, {a}, {b})"


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(e=split_conditions(), seed=st.integers(0, 1000))
def test_random_conditions_on_one_rank(e, seed):
    from einfuse.ir.verify import verify

    text = f"module w\n  in x: f32[3, 12]\n  a[i, j]: f32[3, 12] = {e}\n  out a\n"
    note(text)
    try:
        m = parse(text)
        verify(m)  # only reads each kept lane inside the tensor
    except Exception:
        assume(False)
    runner = torch_backend(m)
    note(runner.source)
    assert runner.fallbacks == []
    inputs = random_inputs(m, seed=seed)
    ir_props.assert_same_outputs(runner(inputs), evaluate(m, inputs), m.outputs)


# ---------------------------------------------------------------- attention

EXPECT = {"alibi_softcap": "3-pass"}  # soft-capping (tanh of the scores) is not what SDPA computes


def _compile(model, args, kwargs=None, **kw):
    return einfuse.compile(model, args, kwargs, backend="torch", **kw)


@pytest.mark.parametrize("dt", ["f32", "bf16"])
@pytest.mark.parametrize("name", list(ta.CASES))
def test_attention_matches_eager(name, dt):
    make, heads, kv = ta.CASES[name]
    dtype = ta.DTYPES[dt]
    model = make()
    cm = _compile(model, ta.qkv(64, 16, heads, kv, dtype, seed=0))
    q, k, v = ta.qkv(64, 16, heads, kv, dtype, seed=1)
    with torch.no_grad():
        got, want = cm(q, k, v), model(q, k, v)
    assert got.dtype == want.dtype
    assert max_rel_error(got, want) <= TOL[dtype]
    paths = [how.split(" ")[0] for _, how in cm.variant.run.attention]
    if cm.variant.run.attention:  # the fusion pass made an attention group
        assert paths == [EXPECT.get(name, "sdpa")], cm.variant.run.attention
    assert cm.variant.run.fallbacks == []


def test_attention_one_query_and_split_kv_decode():
    model = ta.SDPA(gqa=True)
    for keys in (40, 1024):  # one query row; a long key axis splits into chunks (statement by statement)
        cm = _compile(model, ta.qkv(keys, 16, 8, 2, torch.float32, seed=0, queries=1))
        q, k, v = ta.qkv(keys, 16, 8, 2, torch.float32, seed=2, queries=1)
        with torch.no_grad():
            assert max_rel_error(cm(q, k, v), model(q, k, v)) <= TOL[torch.float32]
        assert cm.variant.run.fallbacks == []


class PaddedAttention(torch.nn.Module):
    """Boolean key mask from a tensor, with one row that masks every key (SDPA gives 0 there)."""

    def forward(self, q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


def test_attention_padding_mask_and_fully_masked_rows():
    model = PaddedAttention()
    q, k, v = ta.qkv(13, 8, 2, 2, torch.float32, seed=0)
    q, k, v = (x.expand(3, -1, -1, -1).contiguous() for x in (q, k, v))
    keep = torch.rand(3, 13, generator=torch.Generator().manual_seed(1)) < 0.6
    keep[2] = False
    cm = _compile(model, (q, k, v, keep))
    with torch.no_grad():
        got, want = cm(q, k, v, keep), model(q, k, v, keep)
    assert max_rel_error(got, want) <= TOL[torch.float32]
    assert torch.equal(got[2], torch.zeros_like(got[2]))


FIXED_ATTENTION = """module fixed
  in q: f32[2, 4, 5, 8]
  in k: f32[2, 2, 13, 8]
  in v: f32[2, 2, 13, 8]
  qk[i, j, k, l]: f32[2, 4, 5, 13] = sum[r:8] q[i, j, k, r] * k[i, j // 2, l, r] * 0.35355339059327373
  a_lm[i, j, k, m1]: f32[2, 4, 5, 2] = max[m0:8] where(m0 + 8*m1 < 13, where(m0 + 8*m1 <= k + 8, qk[i, j, k, m0 + 8*m1], -inf), -inf)
  a_rm[i, j, k, m1 + 1]: f32[2, 4, 5, 3] = iterate[m1:2, init=-inf] max(a_rm[i, j, k, m1], a_lm[i, j, k, m1])
  a_sln[i, j, k, m1, m0]: f32[2, 4, 5, 2, 8] = where(a_rm[i, j, k, m1 + 1] == -inf, 0.0, where(m0 + 8*m1 < 13, exp(where(m0 + 8*m1 <= k + 8, qk[i, j, k, m0 + 8*m1], -inf) - a_rm[i, j, k, m1 + 1]), 0.0))
  a_prm[i, j, k, m1]: f32[2, 4, 5, 2] = where(a_rm[i, j, k, m1] == -inf, 0.0, exp(a_rm[i, j, k, m1] - a_rm[i, j, k, m1 + 1]))
  a_sld[i, j, k, m1]: f32[2, 4, 5, 2] = sum[m0:8] a_sln[i, j, k, m1, m0]
  a_rd[i, j, k, m1 + 1]: f32[2, 4, 5, 3] = iterate[m1:2, init=0.0] a_prm[i, j, k, m1] * a_rd[i, j, k, m1] + a_sld[i, j, k, m1]
  a_slnv[i, j, k, m1, l]: f32[2, 4, 5, 2, 8] = sum[m0:8] a_sln[i, j, k, m1, m0] * where(m0 + 8*m1 < 13, v[i, j // 2, m0 + 8*m1, l], 0.0)
  a_rnv[i, j, k, l, m1 + 1]: f32[2, 4, 5, 8, 3] = iterate[m1:2, init=0.0] a_prm[i, j, k, m1] * a_rnv[i, j, k, l, m1] + a_slnv[i, j, k, m1, l]
  a[i, j, k, l]: f32[2, 5, 4, 8] = a_rnv[i, k, j, l, 2] / max(a_rd[i, k, j, 2], 1.0)
  kernel attn_a attention {qk=qk, lm=a_lm, rm=a_rm, sln=a_sln, prm=a_prm, sld=a_sld, rd=a_rd, slnv=a_slnv, rnv=a_rnv, out=a} tile=8
  out a
"""


def test_fixed_attention_group_is_one_sdpa_call():
    """An attention group as the fusion pass writes it (ragged key tiles, GQA, a causal mask shifted by 8,
    output transposed): one SDPA call with a boolean mask and enable_gqa, the output a permuted copy."""
    r = check(FIXED_ATTENTION)
    assert r.attention == [("attn_a", "sdpa")]
    src = body(r)
    assert src.count("F.scaled_dot_product_attention(") == 1 and "enable_gqa=True" in src and "attn_mask=" in src
    assert "a_rm" not in src.split("return")[0].replace("# IR", "")  # no cascade statement runs
    # the same cascade with its output statement changed is not attention any more: statement by statement
    changed = FIXED_ATTENTION.replace("/ max(a_rd[i, k, j, 2], 1.0)", "/ max(a_rd[i, k, j, 2], 2.0)")
    r2 = check(changed.replace("module fixed", "module changed"))
    assert r2.attention[0][1].startswith("statements")


def test_attention_group_variants():
    """Without batch or head ranks, in f64 (SDPA runs in f64: no narrower than the cascade), and with no
    keys (SDPA would give 0 where this unsafe cascade gives NaN: statement by statement)."""
    nolead = """module nolead
  in q: f32[5, 8]
  in k: f32[13, 8]
  in v: f32[13, 8]
  qk[k, l]: f32[5, 13] = sum[r:8] q[k, r] * k[l, r] * 0.35355339059327373
  a_lm[k, m1]: f32[5, 2] = max[m0:8] where(m0 + 8*m1 < 13, qk[k, m0 + 8*m1], -inf)
  a_rm[k, m1 + 1]: f32[5, 3] = iterate[m1:2, init=-inf] max(a_rm[k, m1], a_lm[k, m1])
  a_sln[k, m1, m0]: f32[5, 2, 8] = where(a_rm[k, m1 + 1] == -inf, 0.0, where(m0 + 8*m1 < 13, exp(qk[k, m0 + 8*m1] - a_rm[k, m1 + 1]), 0.0))
  a_prm[k, m1]: f32[5, 2] = where(a_rm[k, m1] == -inf, 0.0, exp(a_rm[k, m1] - a_rm[k, m1 + 1]))
  a_sld[k, m1]: f32[5, 2] = sum[m0:8] a_sln[k, m1, m0]
  a_rd[k, m1 + 1]: f32[5, 3] = iterate[m1:2, init=0.0] a_prm[k, m1] * a_rd[k, m1] + a_sld[k, m1]
  a_slnv[k, m1, l]: f32[5, 2, 8] = sum[m0:8] a_sln[k, m1, m0] * where(m0 + 8*m1 < 13, v[m0 + 8*m1, l], 0.0)
  a_rnv[k, l, m1 + 1]: f32[5, 8, 3] = iterate[m1:2, init=0.0] a_prm[k, m1] * a_rnv[k, l, m1] + a_slnv[k, m1, l]
  a[k, l]: f32[5, 8] = a_rnv[k, l, 2] / a_rd[k, 2]
  kernel attn_a attention {qk=qk, lm=a_lm, rm=a_rm, sln=a_sln, prm=a_prm, sld=a_sld, rd=a_rd, slnv=a_slnv, rnv=a_rnv, out=a} tile=8
  out a
"""
    assert check(nolead.replace("module fixed", "module nolead")).attention == [("attn_a", "sdpa")]
    r = check(FIXED_ATTENTION.replace("f32", "f64").replace("module fixed", "module fixed64"))
    assert r.attention == [("attn_a", "sdpa")] and "torch.float64" in body(r)
    nokeys = FIXED_ATTENTION.replace("13", "0").replace(", 2]", ", 0]").replace(", 3]", ", 1]").replace(
        "m1:2", "m1:0").replace("2, 8]", "0, 8]").replace("module fixed", "module nokeys").replace(
        "a_rnv[i, k, j, l, 2] / max(a_rd[i, k, j, 2], 1.0)", "a_rnv[i, k, j, l, 0] / a_rd[i, k, j, 0]")
    assert check(nokeys).attention == [("attn_a", "statements (the key axis may be empty)")]


def test_names_that_shadow_python():
    check("""module names
  size S hint 3
  in max: f32[S, 4]
  in range: f32[4]
  min[i, j]: f32[S, 4] = max[i, j] * range[j]
  torch[i, m + 1]: f32[S, 5] = iterate[m:4, init=0.0] torch[i, m] * 0.5 + min[i, m]
  rt[i]: f32[S] = sum[r:4] min[i, r] * max[i, r]
  inputs[i, j]: f32[2*S, 4] = where(i < S, min[i, j], max[i - S, j])
  out torch, rt, inputs
""")


# ---------------------------------------------------------------- models

def _token_batch(seed: int, batch: int = 2, seq: int = 9, vocab: int = 256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=g)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_tiny_decoders_match_eager(which):
    net = models.tiny_llama() if which == "llama" else models.tiny_gpt2()
    cm = _compile(net, (_token_batch(0),))
    ids = _token_batch(1)
    with torch.no_grad():
        err = max_rel_error(cm(ids).logits, net(ids).logits)
    assert err <= 1e-5, err
    assert cm.variant.backend == "torch" and cm.variant.run.fallbacks == []


def test_minilm_real_weights_match_eager():
    net, tok = models.minilm()
    example = ["The cat sat on the mat.", "Compilers turn programs into other programs, hopefully faster ones.",
               "Rain again."]
    fresh = ["Paris is in France.", "A matrix product is a sum over products of pairs of numbers.", "Where?"]
    length = max(len(tok(s)["input_ids"]) for s in example + fresh)
    enc = [dict(tok(s, padding="max_length", max_length=length, return_tensors="pt")) for s in (example, fresh)]
    cm = _compile(net, (), enc[0])
    with torch.no_grad():
        got, want = cm(**enc[1]), net(**enc[1])
    mask = enc[1]["attention_mask"].bool()
    w = mask.unsqueeze(-1).float()
    pooled = lambda h: (h * w).sum(1) / w.sum(1)  # noqa: E731 (how all-MiniLM-L6-v2 embeds a sentence)
    for label, g, e in [("tokens", got.last_hidden_state[mask], want.last_hidden_state[mask]),
                        ("embedding", pooled(got.last_hidden_state), pooled(want.last_hidden_state)),
                        ("pooler", got.pooler_output, want.pooler_output)]:
        assert max_rel_error(g, e) <= 1e-5, label
    run = cm.variant.run
    assert run.fallbacks == [] and all(how == "sdpa" for _, how in run.attention), run.attention


def test_dump_dir_holds_the_program(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    cm = _compile(net, (torch.randn(3, 8),), dump_dir=str(tmp_path))
    path = tmp_path / "torch" / f"{cm.ir.name}.py"
    assert path.exists() and path.read_text() == cm.variant.run.source
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert max_rel_error(cm(x), net(x)) <= 1e-5

"""Passes and pipelines: custom passes plug into run_pipeline and einfuse.compile, dumps and timings name them,
NumericCheck and Verify catch broken passes, fingerprints are stable, and the cleanup passes do their job."""
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import einfuse
from einfuse.ir import Call, Const, parse, print_module
from einfuse.ir.evaluator import evaluate, random_inputs
from einfuse.ir.expr import rewrite, walk
from einfuse.ir.module import Statement
from einfuse.passes import (CSE, DCE, FOLD_RULES, Dump, FoldConstants, InlineCopies, NumericCheck, Pass, PassError,
                            PassNumericsError, PrintAfter, SimplifyIndices, Timing, Verify, default_pipeline,
                            module_pass, run_pipeline)

LOG2E = 1 / math.log(2)
HEADER = re.compile(r"^# einfuse IR after pass '(?P<name>[^']+)' · (?P<ms>\d+\.\d+) ms · (?P<n>\d+) statements$")


def map_exprs(module, fn):
    """Rewrite every statement's expression bottom-up with `fn` (node -> replacement or None)."""
    return module.replace(body=tuple(op.replace(expr=rewrite(op.expr, fn)) if isinstance(op, Statement) else op
                                     for op in module.body))


def ops_used(module) -> set:
    return {n.op for s in module.statements for n in walk(s.expr) if isinstance(n, Call)}


class Exp2(Pass):
    """exp(x) -> exp2(x * log2(e)), the form GPUs evaluate natively; `scale` is a setting."""

    name = "exp_to_exp2"

    def __init__(self, scale: float = LOG2E):
        self.scale = scale

    def run(self, module):
        def visit(e):
            if isinstance(e, Call) and e.op == "exp":
                return Call("exp2", (Call("mul", (e.args[0], Const(self.scale))),))
            return None

        return map_exprs(module, visit)


class BadExp2(Exp2):
    """The same rewrite without the scale: exp(x) -> exp2(x), numerically wrong."""

    name = "bad_exp2"

    def __init__(self):
        super().__init__(scale=1.0)


class Net(torch.nn.Module):
    """softmax(linear(x)) * 2: a Linear, and an exp for the custom pass to rewrite."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 6)

    def forward(self, x):
        return torch.softmax(self.lin(x), dim=-1) * 2.0


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Compiles run on the reference backend with a private cache, so no test sees another's results."""
    monkeypatch.setenv("EINFUSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EINFUSE_BACKEND", "reference")
    for var in ("EINFUSE_DUMP_DIR", "EINFUSE_CHECK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


def fresh(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SOFTMAX = """\
module softmax
  in x: f32[4, 6]
  mx[i]: f32[4] = max[r:6] x[i, r]
  e[i, j]: f32[4, 6] = exp(x[i, j] - mx[i])
  den[i]: f32[4] = sum[r:6] e[i, r]
  y[i, j]: f32[4, 6] = e[i, j] / den[i]
  out y
"""


def assert_same_results(a, b, seed=7, **tol):
    ins = random_inputs(a, seed=seed)
    want, got = evaluate(a, ins), evaluate(b, ins)
    for name in a.outputs:
        torch.testing.assert_close(got[name], want[name], **tol)


# ---------------------------------------------------------------- custom passes in pipelines

def test_custom_pass_in_run_pipeline():
    m = parse(SOFTMAX)
    out = run_pipeline(m, default_pipeline() + [Exp2()], [Verify(), NumericCheck()])
    assert "exp" in ops_used(m) and "exp" not in ops_used(out) and "exp2" in ops_used(out)
    assert_same_results(m, out, rtol=1e-6, atol=1e-7)


def test_custom_pass_in_compile_dumps_and_timings(net, tmp_path):
    pipeline = default_pipeline() + [Exp2()]
    cm = einfuse.compile(net, (fresh(3, 8, seed=1),), passes=pipeline, dump_dir=str(tmp_path), check=True)
    names = ["lower"] + [p.pass_name for p in pipeline]
    dumps = sorted(f for f in os.listdir(tmp_path) if f.endswith(".ir"))
    assert dumps == [f"{n:02d}_{name}.ir" for n, name in enumerate(names)]

    mine = tmp_path / f"{len(pipeline):02d}_exp_to_exp2.ir"
    header, _, body = mine.read_text().partition("\n")
    found = HEADER.match(header)
    assert found and found["name"] == "exp_to_exp2", header
    dumped = parse(body)
    assert int(found["n"]) == len(dumped.body)
    assert dumped == cm.ir and "exp2" in ops_used(dumped) and "exp" not in ops_used(dumped)

    timings = json.loads((tmp_path / "timings.json").read_text())
    assert [t["pass"] for t in timings] == names
    entry = timings[-1]
    assert entry["index"] == len(pipeline) and entry["statements"] == len(dumped.body)
    assert abs(entry["ms"] - float(found["ms"])) < 0.01

    x = fresh(3, 8, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), net(x), rtol=1e-5, atol=1e-6)


def test_env_dump_dir(net, tmp_path, monkeypatch):
    target = tmp_path / "from_env"
    monkeypatch.setenv("EINFUSE_DUMP_DIR", str(target))
    cm = einfuse.compile(net, (fresh(2, 8, seed=3),))
    dumps = sorted(f for f in os.listdir(target) if f.endswith(".ir"))
    assert dumps[0] == "00_lower.ir" and len(dumps) == len(default_pipeline()) + 1
    assert parse((target / dumps[-1]).read_text()) == cm.ir
    assert (target / "timings.json").exists()


def test_wrong_pass_is_caught_by_numeric_check(net):
    with pytest.raises(PassNumericsError) as info:
        einfuse.compile(net, (fresh(3, 8, seed=4),), passes=default_pipeline() + [BadExp2()], check=True)
    assert info.value.pass_name == "bad_exp2"
    assert "'bad_exp2'" in str(info.value) and "changed output" in str(info.value)


def test_numeric_check_names_the_first_wrong_pass():
    m = parse(SOFTMAX)
    check = NumericCheck(seed=11)
    with pytest.raises(PassNumericsError) as info:
        run_pipeline(m, [CSE(), DCE(), BadExp2(), Exp2()], [check])
    assert info.value.pass_name == "bad_exp2"
    assert [e["pass"] for e in check.errors] == ["cse", "dce"]
    assert all(e["max_rel_error"] < 1e-5 for e in check.errors)


def test_numeric_check_accepts_the_correct_pass(net):
    cm = einfuse.compile(net, (fresh(3, 8, seed=5),), passes=default_pipeline() + [Exp2()], check=True)
    assert "exp2" in ops_used(cm.ir)


# ---------------------------------------------------------------- broken passes

@module_pass("returns_none")
def returns_none(m):
    return None


@module_pass("reads_nothing")
def reads_nothing(m):
    """Points the last statement at a tensor that does not exist: an invalid module."""
    *rest, last = m.body
    return m.replace(body=(*rest, last.rename_reads({r: "nowhere" for r in last.reads()})))


@module_pass("explodes")
def explodes(m):
    raise ZeroDivisionError("boom")


def test_pass_returning_a_non_module():
    with pytest.raises(PassError) as info:
        run_pipeline(parse(SOFTMAX), [CSE(), returns_none])
    assert info.value.pass_name == "returns_none"
    assert "'returns_none'" in str(info.value) and "NoneType" in str(info.value)


def test_pass_producing_an_invalid_module():
    with pytest.raises(PassError) as info:
        run_pipeline(parse(SOFTMAX), [CSE(), reads_nothing, DCE()], [Verify()])
    assert info.value.pass_name == "reads_nothing"
    msg = str(info.value)
    assert "'reads_nothing'" in msg and "invalid module" in msg and "'y'" in msg and "nowhere" in msg


def test_invalid_pass_in_compile(net):
    with pytest.raises(PassError) as info:
        einfuse.compile(net, (fresh(3, 8, seed=6),), passes=[reads_nothing])
    assert info.value.pass_name == "reads_nothing"


def test_pass_raising():
    with pytest.raises(PassError) as info:
        run_pipeline(parse(SOFTMAX), [explodes])
    assert info.value.pass_name == "explodes"
    assert "ZeroDivisionError: boom" in str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_pipeline_entry_must_be_a_pass():
    with pytest.raises(TypeError, match="pipeline entry 2"):
        run_pipeline(parse(SOFTMAX), [CSE(), lambda m: m])


# ---------------------------------------------------------------- fingerprints and module_pass

def test_fingerprint_stable_and_sensitive_to_settings():
    assert Exp2().fingerprint() == Exp2().fingerprint()
    assert Exp2(scale=2.0).fingerprint() == Exp2(scale=2.0).fingerprint()
    assert Exp2(scale=2.0).fingerprint() != Exp2().fingerprint()
    assert BadExp2().fingerprint() != Exp2(scale=1.0).fingerprint()  # another pass with equal settings
    assert FoldConstants().fingerprint() == FoldConstants().fingerprint()
    extra = FoldConstants(rules=FOLD_RULES + [("never", lambda e, ctx: None)])
    assert extra.fingerprint() != FoldConstants().fingerprint()
    assert len({p.fingerprint() for p in default_pipeline()}) == len(set(map(type, default_pipeline())))


_FINGERPRINT_SCRIPT = textwrap.dedent("""
    import math
    from einfuse.passes import Pass

    def weight(x):
        return x * 2

    class Tuned(Pass):
        def __init__(self):
            self.ops = {"exp", "log", "tanh", "sigmoid", "erf", "gelu"}
            self.table = {"b": 2, "a": 1}
            self.score = weight
            self.scale = 1 / math.log(2)

    print(Tuned().fingerprint())
""")


def test_fingerprint_is_stable_across_processes():
    """Cache keys outlive the process: sets, dicts and functions in settings must not leak hash order or ids."""
    prints = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-c", _FINGERPRINT_SCRIPT], env=env, capture_output=True, text=True,
                             check=True)
        prints.add(res.stdout.strip())
    assert len(prints) == 1, prints


def test_module_pass_decorator():
    @module_pass("drop_dead")
    def drop_dead(m):
        return DCE().run(m)

    @module_pass()
    def keep(m):
        return m

    @module_pass
    def bare(m):
        return m

    assert isinstance(drop_dead, Pass) and drop_dead.pass_name == "drop_dead"
    assert keep.pass_name == "keep" and isinstance(bare, Pass) and bare.pass_name == "bare"
    m = parse(SOFTMAX.replace("  out y", "  dead[i]: f32[4] = mx[i] * 2.0\n  out y"))
    timing = Timing()
    out = run_pipeline(m, [keep, drop_dead, bare], [timing, Verify()])
    assert [r["pass"] for r in timing.records] == ["keep", "drop_dead", "bare"]
    assert [r["statements"] for r in timing.records] == [5, 4, 4]
    assert "dead" in m.types() and "dead" not in out.types()
    assert drop_dead.fingerprint() != keep.fingerprint()

    @module_pass("keep")
    def keep_again(m):
        return m

    assert keep_again.fingerprint() == keep.fingerprint()  # same name, same code

    @module_pass("opt")
    def opt_a(m):
        return DCE().run(m)

    @module_pass("opt")
    def opt_b(m):
        return CSE().run(m)

    assert opt_a.fingerprint() != opt_b.fingerprint()  # same bytecode, but it calls another pass


# ---------------------------------------------------------------- instruments

def test_print_after_and_stale_dumps(tmp_path):
    stale = tmp_path / "09_old_pass.ir"
    stale.write_text("stale")
    lines = []

    class Sink:
        def write(self, s):
            lines.append(s)

    instruments = [Dump(str(tmp_path)), PrintAfter("exp_to_exp2", stream=Sink())]
    run_pipeline(parse(SOFTMAX), [CSE(), Exp2(), DCE()], instruments)
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == ["00_lower.ir", "01_cse.ir", "02_exp_to_exp2.ir", "03_dce.ir",
                                            "timings.json"]
    assert len(lines) == 1 and HEADER.match(lines[0].splitlines()[0])["name"] == "exp_to_exp2"
    assert "exp2(" in lines[0]


# ---------------------------------------------------------------- what the cleanup passes do

MODULE = "module m\n  in x: f32[4, 6]\n  in h: f16[4]\n  in n: i32[4]\n{}  out y\n"


@pytest.mark.parametrize("make,body,before,after", [
    (SimplifyIndices, "  y[i, j]: f32[4, 6] = x[(6*i + j) // 6, (6*i + j) % 6]\n", "//", "x[i, j]"),
    (FoldConstants, "  y[i, j]: f32[4, 6] = x[i, j] * 1.0 + (0.5 - 0.5) * x[i, j]\n", "1.0", "x[i, j] + 0.0 * x[i, j]"),
    (FoldConstants, "  y[i, j]: f32[4, 6] = where(i < 7, x[i, j], -x[i, j])\n", "where", "= x[i, j]"),
    (InlineCopies, "  t[j, i]: f32[6, 4] = x[i, j]\n  y[i, j]: f32[4, 6] = exp(t[j, i])\n", "t[", "exp(x[i, j])"),
    (CSE, "  a[i]: f32[4] = sum[r:6] x[i, r]\n  b[i]: f32[4] = sum[r:6] x[i, r]\n  y[i, j]: f32[4, 6] = a[i] - b[i]\n",
     "b[i]: f32[4]", "a[i] - a[i]"),
    (DCE, "  a[i]: f32[4] = sum[r:6] x[i, r]\n  y[i, j]: f32[4, 6] = x[i, j]\n", "a[i]", "= x[i, j]"),
], ids=["simplify", "fold-identity", "fold-index-compare", "inline", "cse", "dce"])
def test_cleanup_pass_does_its_job(make, body, before, after):
    m = parse(MODULE.format(body))
    out = run_pipeline(m, [make()], [Verify()])
    assert before in print_module(m) and before not in print_module(out)
    assert after in print_module(out)
    assert_same_results(m, out, rtol=0, atol=0)


@pytest.mark.parametrize("stmt", [
    "y[i]: f32[4] = h[i] + f32(0.5)",  # f16 + f32 is f32; f16 + 0.5 would be f16
    "y[i]: i64[4] = n[i] + i64(1)",
    "y[i]: f32[4] = h[i] * where(i < 10, f32(1.0), 2.0)",
    "y[i]: f32[4] = h[i] * f32(0.25 + 0.5)",
    "y[i]: f32[4] = h[i] * where(n[i] > 0, f32(1.5), f32(1.5))",
    "y[i]: f32[4] = h[i] * f32(i < 10)",
])
def test_fold_constants_keeps_typed_literals_typed(stmt):
    """A literal cast to f32/i64 is a typed value: folding must not turn it into a weak one that h/n absorb."""
    m = parse(MODULE.format(f"  {stmt}\n"))
    out = run_pipeline(m, [FoldConstants()], [Verify()])
    assert out.body[0].type == m.body[0].type
    assert_same_results(m, out, rtol=0, atol=0)


def test_fold_constants_float64_precision():
    """Folded literal arithmetic is Python arithmetic: x * (0.1 + 0.2) on f64 equals torch's result exactly."""
    m = parse("module m\n  in x: f64[5]\n  y[i]: f64[5] = x[i] * (0.1 + 0.2) + exp(1) * 0.1\n  out y\n")
    out = run_pipeline(m, [FoldConstants()], [Verify()])
    assert ops_used(out) == {"mul", "add"}
    x = fresh(5, seed=8).double()
    want = x * (0.1 + 0.2) + math.exp(1) * 0.1
    for mod in (m, out):
        assert torch.equal(evaluate(mod, {"x": x})["y"], want), print_module(mod)


def test_fold_rule_that_changes_a_type_is_reported():
    def to_half(e, ctx):
        return Call("cast", (e,), einfuse.ir.dtypes.f16) if e.op == "exp" else None

    m = parse(SOFTMAX)
    with pytest.raises(PassError, match="fold rule 'bad' rewrote a f32 expression into a f16 one"):
        run_pipeline(m, [FoldConstants(rules=FOLD_RULES + [("bad", to_half)])])


def test_layered_dumps_print_the_stitched_module_after_every_pass(tmp_path):
    """A repeated-layer model's per-pass dumps are assembled from per-layer templates (each statement printed
    once, filled in per instance, dead statements dropped per template): each must be exactly the whole
    module stitched after that pass, printed from scratch, and the pass-made names stay put across passes."""
    from einfuse.frontend.capture import export
    from einfuse.frontend.lower import lower_graph
    from einfuse.passes import regions

    from einfuse.models import tiny_llama

    model = tiny_llama(layers=3)
    cap = export(model, (torch.randint(0, 256, (1, 8)),), {})
    low = lower_graph(cap.gm, cap.kinds, "llama")
    snaps = []
    real = regions._dump

    def spy(part, snapshots, passes, timings, directory, cache):
        snaps.append((part, snapshots))
        return real(part, snapshots, passes, timings, directory, cache)

    regions._dump = spy
    try:
        final, _ = regions.run_regional(low.module, low.instances, default_pipeline(), str(tmp_path))
    finally:
        regions._dump = real
    (part, snapshots), = snaps
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".ir"))
    assert len(files) == len(default_pipeline()) + 1
    for n, f in enumerate(files):
        whole = part.stitch([s.modules[n] for s in snapshots])
        text = (tmp_path / f).read_text()
        assert text.split("\n", text.count("\n") - print_module(whole).count("\n"))[-1] == print_module(whole), f
        verify_names = {o for op in whole.body for o in op.outputs}
        assert len(verify_names) == sum(len(op.outputs) for op in whole.body), f  # every name defined once
    assert print_module(final) == str(final)  # the final text assembled the same way is exact
    assert parse(str(final)) == final

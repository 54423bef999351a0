"""The Triton backend end to end: generated kernels, run on CPU under Triton's interpreter, compute what
the reference evaluator and eager PyTorch compute; buffers are reused; symbolic sizes reach the kernels;
and every model's kernels compile for sm_80 and sm_90a without spills, contractions on tensor cores.

Tolerance: max |got - want| / max |want| (`max_rel_error`) <= 1e-4 for f32 models, 2e-2 for bf16.
Models come from test_models.py's builders (small Llama, Mixtral and GPT-2 configs; MiniLM with its
real weights) and are called on fresh inputs, not the ones they were compiled for.
"""
from __future__ import annotations


import pytest
from conftest import float32_matmul_precision
import test_models as tm
import torch

import einfuse
from einfuse.ir.module import Statement
from einfuse.frontend.dynamo import COMPILED
from einfuse.ir import parse
from einfuse.ir.verify import verify
from einfuse.passes.instruments import max_rel_error
from einfuse.runtime import backends
from einfuse.runtime.triton_backend import TritonRunner

pytestmark = pytest.mark.usefixtures("fresh_einfuse_cache")

F32_TOL, BF16_TOL = 1e-4, 2e-2
SWEEP_TOKENS = 64  # long enough for every contraction tile (M, N, K) to reach 64


@pytest.fixture(scope="module")
def zoo() -> tm.Lazy:
    def make(name):
        if name == "llama_bf16":
            case = tm.llama()
            case.model.to(torch.bfloat16)
            return case
        return tm.CASES[name]()

    return tm.Lazy(make)


@pytest.fixture(scope="module")
def on_triton(zoo, fresh_einfuse_cache) -> tm.Lazy:
    """Each model compiled once for the module by einfuse.compile with backend="triton"."""
    def make(name):
        case = zoo[name]
        return einfuse.compile(case.model, (), case.inputs(0), backend="triton")

    return tm.Lazy(make)


def errors_against_eager(case: tm.Case, cm, kwargs: dict) -> dict:
    want = case.views(tm.eager(case, kwargs), kwargs)
    got = case.views(cm(**kwargs), kwargs)
    return {label: max_rel_error(got[label].float(), want[label].float()) for label in want}


# ------------------------------------------------------------------ every kernel kind against the oracle

KINDS = """\
module kinds
{size}
  in x: f32[{S}, {D}]
  in y: f32[{N}, {D}]
  in m: f32[{S}]
  in h: bf16[{S}, {D}]
  in g: bf16[24, {D}]
  in q: i8[{S}, 32]
  in w: i8[24, 32]
  in ids: i64[{S}]
  in p: i4[24, 32]
  e[i, j]: f32[{S}, {D}] = exp(x[i, j]) * 0.5
  s[i]: f32[{S}] = sum[j:{D}] (x[i, j] - m[i]) * (x[i, j] - m[i])
  mx[i]: f32[{S}] = max[j:{D}] x[i, j]
  mn[j]: f32[{D}] = min[i:{S}] x[i, j]
  an[i]: bool[{S}] = any[j:{D}] x[i, j] > 1.0
  pr[i]: f32[{S}] = prod[j:4] x[i, j]
  c[i, j]: f32[{S}, {N}] = sum[r:{D}] x[i, r] * y[j, r]
  cx[i, j]: f32[{S}, {N}] = sum[r:{D}] exp(x[i, r] - m[i]) * y[j, r] / m[i]
  ce[i, j]: f32[{S}, {N}] = sum[r:{D}] exp(x[i, r]) * (y[j, r] + 1.0)
  ss[b, i, j]: f32[2, {S}, {S}] = sum[r:{D}] x[i, r] * x[j, r] * f32(b + 1)
  c16[i, j]: bf16[{S}, 24] = sum[r:{D}] f32(h[i, r]) * f32(g[j, r])
  c8[i, j]: i32[{S}, 24] = sum[r:32] i32(q[i, r]) * i32(w[j, r])
  b4[i, j, k]: f32[2, 12, {N}] = sum[r:{D}] y[2*i + k // 20, r] * y[j, r]
  kk[i, j]: f32[{S}, {N}] = sum[r:{D8}, u:8] x[i, 8*r + u] * y[j, 8*r + u]
  gt[i, j]: f32[{S}, {D}] = y[ids[i], j]
  pd[i, j]: f32[{S}, {D4}] = where(j < {D}, x[i, min(j, {D1})], 0.0)
  run[i, t + 1]: f32[{S}, {Dp}] = iterate[t:{D}, init=-inf] max(run[i, t], x[i, t])
  pk[i, j]: i32[24, 32] = i32(p[i, j]) * 3
  o[b, i, j]: f32[2, {S}, {S}] = x[i, b] * x[j, b]
  out o, ss, e, s, mx, mn, an, pr, c, cx, ce, c16, c8, b4, kk, gt, pd, run, pk
"""


def kinds_module(S, D: int, N: int):
    size = "  size S hint 37" if S == "S" else ""
    text = KINDS.format(size=size, S=S, D=D, N=N, D8=D // 8, D4=D + 4, D1=D - 1, Dp=D + 1)
    return parse("\n".join(line for line in text.splitlines() if line) + "\n")


def kinds_inputs(n: int, D: int, N: int) -> dict:
    g = torch.Generator().manual_seed(n)
    ints = lambda lo, hi, shape, dtype: torch.randint(lo, hi, shape, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=torch.randn(n, D, generator=g), y=torch.randn(N, D, generator=g), m=torch.rand(n, generator=g) + 0.5,
                h=torch.randn(n, D, generator=g).bfloat16(), g=torch.randn(24, D, generator=g).bfloat16(),
                q=ints(-128, 128, (n, 32), torch.int8), w=ints(-128, 128, (24, 32), torch.int8),
                ids=ints(0, N, (n,), torch.int64), p=ints(0, 256, (24, 16), torch.uint8))


@pytest.mark.parametrize("S, D, N, rows", [("S", 48, 40, (37, 5)), (64, 64, 64, (64,))],
                         ids=["ragged-symbolic", "aligned-static"])
def test_every_kernel_kind_matches_the_reference(S, D, N, rows):
    """map, reduce (sum/max/min/any/prod), dot (f32, computed operands nonzero past the end of K, an
    epilogue, bf16, int8, batched output ranks, two K ranks), gather, padding guard, iterate and packed i4,
    outputs with two symbolic dimensions (S**2 in the index arithmetic); tiles that run past the end
    (masks) and tiles that fit exactly (masks dropped at generation time)."""
    m = kinds_module(S, D, N)
    verify(m)
    triton, reference = backends.build("triton", m), backends.build("reference", m)
    specs = {s.statements[0]: s for s in triton.specs}
    assert {specs[n].mapping.kind for n in ("c", "cx", "c16", "c8", "b4", "kk")} == {"dot"}
    assert {specs[n].mapping.kind for n in ("s", "mx", "mn", "an", "pr")} == {"rows"}
    assert specs["run"].mapping.kind == "iterate" and specs["e"].mapping.kind == "map"
    if S != "S":  # everything fits its tiles: no mask on the elementwise kernel
        assert "mask" not in specs["e"].source.split("source:")[1]
    for n in rows:
        inputs = kinds_inputs(n, D, N)
        got = triton(inputs)
        want = reference(inputs)
        for name, w in want.items():
            tol = BF16_TOL if w.dtype == torch.bfloat16 else 1e-5
            err = max_rel_error(got[name].float() if w.is_floating_point() else got[name],
                                w.float() if w.is_floating_point() else w)
            assert err <= tol, f"{name} at {n} rows: max relative error {err:.3g}\n{specs[name].source}"


VIEW_FROM_TORCH = """\
module alias
  in x: f32[3, 4]
  a[i, j]: f32[3, 4] = x[i, j] * 2.0
  t: f32[4, 3] = opaque aten.t.default(a)
  b[i, j]: f32[4, 3] = t[i, j] + 1.0
  c[i, j]: f32[3, 4] = x[i, j] * 3.0
  d[i, j]: f32[4, 3] = t[i, j] + c[j, i]
  out b, d
"""


def test_opaque_call_returning_a_view():
    """`t` is a transposed view of `a`: kernels must read it by its logical layout, and `c` may take the
    pool buffer `a` leaves (a's last reader is the opaque call) without changing `t`."""
    m = parse(VIEW_FROM_TORCH)
    x = torch.randn(3, 4)
    got, want = backends.build("triton", m)({"x": x}), backends.build("reference", m)({"x": x})
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


# ------------------------------------------------------------------ models against eager

@pytest.mark.parametrize("name", ["llama", "mixtral", "gpt2", "minilm", "llama_bf16"])
def test_model_matches_eager(name, zoo, on_triton, record_property):
    case, cm = zoo[name], on_triton[name]
    assert cm.variant.fallback is None, cm.variant.fallback
    assert cm.variant.backend == "triton" and isinstance(cm.variant.run, TritonRunner)
    steps = cm.variant.run.steps
    assert sum(s.spec is not None for s in steps) >= 10  # kernels, not torch, did the work
    assert all(s.spec is not None or s.skip for s in steps if isinstance(s.op, Statement))
    errors = errors_against_eager(case, cm, tm.fresh_inputs(case))
    record_property("max_rel_error", errors)
    print(f"{name}: max relative error {errors}")
    tol = BF16_TOL if name.endswith("bf16") else F32_TOL
    assert max(errors.values()) <= tol, errors


# ------------------------------------------------------------------ memory plan

def test_buffers_are_reused_and_outputs_are_not_pool_buffers(zoo, on_triton):
    case, cm = zoo["llama"], on_triton["llama"]
    runner: TritonRunner = cm.variant.run
    first_inputs, second_inputs = tm.fresh_inputs(case, 1), tm.fresh_inputs(case, 2)
    first = cm(**first_inputs).logits
    kept = first.clone()
    log = list(runner.allocations)
    second = cm(**second_inputs).logits
    assert torch.equal(first, kept), "the second call overwrote the first call's output"
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()

    module = runner.module
    assert log and not {a.name for a in log} & set(module.outputs), "an output lives in a pool buffer"
    total = sum(a.nbytes for a in log)
    assert runner.peak_bytes == sum(a.nbytes for a in log if not a.reused)
    assert runner.peak_bytes < total / 2, (runner.peak_bytes, total)
    print(f"llama: {len(log)} intermediates, {total:,} bytes in all, pool peak {runner.peak_bytes:,} bytes "
          f"in {len({a.buffer for a in log})} buffers")

    # no buffer holds two tensors that are live at the same time
    position = {op.outputs[0]: n for n, op in enumerate(module.body) if len(op.outputs) == 1}
    death = {name: n for n, names in module.last_uses().items() for name in names}
    by_buffer: dict = {}
    for a in log:
        by_buffer.setdefault(a.buffer, []).append(a.name)
    for names in by_buffer.values():
        for before, after in zip(names, names[1:]):
            assert death[before] < position[after], f"{after} reuses {before}'s buffer while {before} is live"


# ------------------------------------------------------------------ symbolic sizes

def test_torch_compile_symbolic_sizes_become_kernel_arguments(zoo, monkeypatch):
    """dynamo compiles the first length statically and the second symbolically; the symbolic graph's
    kernels take the sequence length as an argument and serve a third length without recompiling."""
    monkeypatch.setenv("EINFUSE_BACKEND", "triton")
    launches = []
    launch = TritonRunner._launch

    def spy(self, step, env, pool, holders, outputs, sizes, device):
        by_name = {str(k): v for k, v in sizes.items()}
        launches.append({a.ref: by_name[a.ref] for a in step.spec.args if a.kind == "size"})
        return launch(self, step, env, pool, holders, outputs, sizes, device)

    monkeypatch.setattr(TritonRunner, "_launch", spy)
    case = zoo["llama"]
    model = torch.compile(case.model, backend="einfuse", fullgraph=True)
    graphs = len(COMPILED)
    seen = {}
    for seq in (8, 12, 5):
        kwargs = tm._token_inputs(seq, seq=seq)
        del launches[:]
        with torch.no_grad():
            got = model(**kwargs).logits
        want = tm.eager(case, kwargs).logits
        assert max_rel_error(got, want) <= F32_TOL, seq
        assert launches, "no Triton kernel ran"
        seen[seq] = {v for sizes in launches for v in sizes.values()}
    assert len(COMPILED) == graphs + 2, "expected a static graph, then one symbolic graph for both other lengths"
    symbolic = COMPILED[-1].ir
    assert symbolic.sizes, "the second graph has no symbolic size"
    assert not seen[8] and 12 in seen[12] and 5 in seen[5]


# ------------------------------------------------------------------ GPU ahead-of-time sweep

def sweep_inputs(name: str) -> dict:
    if name == "minilm":
        from einfuse.models import minilm

        _, tok = minilm()
        return dict(tok(tm.SENTENCES[0], padding="max_length", max_length=SWEEP_TOKENS, return_tensors="pt"))
    return tm._token_inputs(0, seq=SWEEP_TOKENS)


# llama (f32 and bf16) by default; the other models' sweeps (~1 min each) with -m slow (test_architectures checks
# a dozen more decoder families' kernels by default)
@pytest.mark.parametrize("name", ["llama", "llama_bf16"] + [pytest.param(n, marks=pytest.mark.slow)
                                                          for n in ("gpt2", "mixtral", "minilm")])
def test_kernels_compile_for_gpus(name, zoo, record_property):
    """Every kernel compiles for sm_80 and sm_90a with zero spills; every contraction with 64x64 output
    tiles runs on tensor cores (tf32 for f32: compiled under float32 matmul precision "high")."""
    with float32_matmul_precision("high"):
        cm = einfuse.compile(zoo[name].model, (), sweep_inputs(name), backend="triton")
    assert cm.variant.fallback is None
    specs = {s.name: s for s in cm.variant.run.specs}
    checks = cm.check_gpu(archs=(80, 90))
    assert len(checks) == 2 * len(specs)
    for c in checks:
        assert c.ok, f"{c.name} on sm_{c.arch}:\n{c.error}"
        assert c.spills == 0, c
    big_dots = {s.name for s in specs.values() if s.mapping.kind == "dot"
                and min(dict(s.mapping.tiles)["BLOCK_M"], dict(s.mapping.tiles)["BLOCK_N"]) >= 64}
    assert big_dots, "no contraction reached 64x64 tiles"
    for c in checks:
        if c.name in big_dots:
            assert c.tensor_core, f"{c.name} ({specs[c.name].mapping.text()}) is not on tensor cores on sm_{c.arch}"
    summary = {arch: {"kernels": len(specs), "dots_64x64": len(big_dots),
                      "max_registers": max(c.registers for c in checks if c.arch == arch),
                      "max_shared_bytes": max(c.shared_bytes for c in checks if c.arch == arch),
                      "max_dot_registers": max(c.registers for c in checks if c.arch == arch and c.name in big_dots),
                      "spills": sum(c.spills for c in checks if c.arch == arch)} for arch in (80, 90)}
    record_property("gpu", summary)
    print(f"{name}: {summary}")

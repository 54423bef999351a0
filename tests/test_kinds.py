"""Kernel kinds: every kind's autotuning candidates compute the whole kernel's outputs (run on CPU under
Triton's interpreter with the timer replaced), the old failure (candidates built from a group's first
statement) is caught, CUDA-graph replay's bookkeeping runs with the CUDA calls replaced, the kernel
builder drops dead code by liveness, and kernel lines name their members' roles."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from einfuse.codegen import candidates, generate
from einfuse.codegen.cache import Cache
from einfuse.ir import parse
from einfuse.ir.evaluator import evaluate, max_rel_error, random_inputs
from einfuse.kinds import KINDS, Group, KernelBuilder, ModuleInfo, kind_named, single
from einfuse.passes import default_pipeline, run_pipeline
from einfuse.runtime import backends
from einfuse.runtime.graphs import GraphReplay

# One module per kind, each with a kernel group (or statement) of that kind; fusion forms the groups.
MODULES = {
    "dot": """\
module epilogue
  in x: f32[48, 40]
  param w: f32[24, 40]
  param bias: f32[24]
  in res: f32[48, 24]
  mm[i, j]: f32[48, 24] = sum[r:40] x[i, r] * w[j, r]
  act[i, j]: f32[48, 24] = silu(mm[i, j] + bias[j]) + res[i, j]
  out act
""",
    "rows": """\
module norm
  in x: f32[37, 50]
  mu[i]: f32[37] = sum[r:50] x[i, r] / 50
  var[i]: f32[37] = sum[r:50] (x[i, r] - mu[i]) * (x[i, r] - mu[i]) / 50
  y[i, j]: f32[37, 50] = (x[i, j] - mu[i]) * rsqrt(var[i] + 1e-05)
  out y
""",
    "map": """\
module ew
  in x: f32[300]
  y[i]: f32[300] = exp(x[i]) * 0.5 + x[i]
  out y
""",
    "iterate": """\
module scan
  in x: f32[300, 12]
  c[i, t + 1]: f32[300, 13] = iterate[t:12, init=0.0] c[i, t] + x[i, t]
  out c
""",
}


def attention_module():
    """A causal attention (SDPA lowered and fused into one attention kernel) as an IR module."""
    import einfuse
    import torch.nn.functional as F

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    return einfuse.compile(Attn(), (q, k, v), backend="reference").ir


@pytest.fixture(scope="module")
def fused():
    out = {name: run_pipeline(parse(text), default_pipeline()) for name, text in MODULES.items()}
    out["attention"] = attention_module()
    return out


def fake_timer():
    """Deterministic 'timings': each later candidate looks faster, so the last valid one is chosen."""
    t = itertools.count()
    return lambda launch: (launch(), 100.0 - next(t))[1]


@pytest.mark.parametrize("kind", ["dot", "rows", "map", "iterate", "attention"])
def test_autotune_candidates_compute_the_whole_kernel(kind, fused, fresh_einfuse_cache):
    m = fused[kind]
    runner = backends.build("triton", m, autotune=True)
    runner.autotuner.timer = fake_timer()
    runner.autotuner.device = "cpu"
    spec = next(s for s in runner.specs if s.kind == kind)
    options = candidates(m, spec)
    assert len(options) >= 2, f"{kind}: a single candidate leaves nothing to tune"
    group_outputs = spec.outputs
    assert all(o.outputs == group_outputs and o.statements == spec.statements for o in options)
    inputs = random_inputs(m, seed=3)
    want = evaluate(m, inputs)
    got = runner(inputs)
    for name in m.outputs:
        assert max_rel_error(got[name], want[name]) <= 1e-5, name
    trials = runner.autotuner.trials[spec.name]
    assert len(trials) == len(options) and all(t.ms is not None and t.error <= 1e-4 for t in trials), trials
    chosen = next(s.spec for s in runner.steps if s.spec is not None and s.spec.statements == spec.statements)
    assert chosen.mapping == options[-1].mapping  # the fake timer made the last candidate the fastest
    # every candidate alone computes the group's outputs (as the evaluator does)
    for option in options:
        alone = backends.build("triton", m, autotune=False)
        step = next(s for s in alone.steps if s.spec is not None and s.spec.statements == spec.statements)
        step.spec, step.fn = option, alone.load(option)
        out = alone(inputs)
        assert all(max_rel_error(out[n], want[n]) <= 1e-5 for n in m.outputs), option.mapping.text()
    # a second runner reads the choice from the cache: no trials, the same kernel
    again = backends.build("triton", m, autotune=True)
    again.autotuner.timer = lambda launch: pytest.fail("timed again despite the cached choice")
    again.autotuner.device = "cpu"
    again(inputs)
    assert spec.name not in again.autotuner.trials


def test_candidates_of_the_first_statement_alone_are_rejected(fused, fresh_einfuse_cache, tmp_path):
    """The old autotuner built candidates from a fused group's first statement (the GEMM alone): they
    store `mm`, not the group's output, with other arguments. The tuner launches each candidate and
    compares what it stores with the kernel's own outputs, so such a candidate can never be chosen."""
    m = fused["dot"]
    (k,) = [k for k in m.kernels if k.kind == "dot"]
    assert set(k.members) == {"mm", "act"} and k.role_of("mm") == "acc" and k.role_of("act") == "epilogue"
    runner = backends.build("triton", m, autotune=True)
    runner.autotuner.device = "cpu"
    runner.autotuner.cache = Cache("autotune", str(tmp_path))  # no choice remembered from another test
    spec = next(s for s in runner.specs if s.kind == "dot")
    info = ModuleInfo(m)
    mm = info.producers["mm"]
    dot = kind_named("dot")
    first_alone = dot.emit(Group(info, single(m, mm, dot), spec.name), dot.mapping(Group(info, single(m, mm, dot),
                                                                                          spec.name)))
    assert first_alone.outputs == ("mm",) != spec.outputs
    import einfuse.runtime.autotune as autotune

    real = autotune.candidates
    autotune.candidates = lambda module, s: real(module, s) + [first_alone]  # timed last: it would look fastest
    try:
        runner.autotuner.timer = fake_timer()
        inputs = random_inputs(m, seed=5)
        got = runner(inputs)
    finally:
        autotune.candidates = real
    trials = runner.autotuner.trials[spec.name]
    bad = [t for t in trials if t.spec is first_alone]
    assert bad and bad[0].ms is None and bad[0].error == float("inf")
    chosen = next(s.spec for s in runner.steps if s.spec is not None and "act" in s.spec.outputs)
    assert chosen is not first_alone and chosen.outputs == ("act",)
    want = evaluate(m, inputs)
    assert max_rel_error(got["act"], want["act"]) <= 1e-5


def test_cuda_graph_replay_bookkeeping_on_cpu(fused):
    """GraphReplay with the graph calls replaced: captured once, user inputs copied into the static
    buffers, weights never copied, a replaced weight captures again; results equal a plain run."""
    m = fused["dot"]
    runner = backends.build("triton", m, autotune=False)
    replay: GraphReplay

    class FakeGraph:  # replay() recomputes into the captured output buffers, as a CUDA graph does
        def __init__(self):
            self.replays = 0

        def replay(self):
            self.replays += 1
            for k, v in runner._run(replay.static).items():
                replay.static_out[k].copy_(v)

    captured = []

    @contextlib.contextmanager
    def capture(graph):
        captured.append(graph)
        yield

    stable = [i.name for i in m.inputs if i.kind != "in"]
    replay = GraphReplay(runner._run, stable, new_graph=FakeGraph, capture=capture)
    first = random_inputs(m, seed=1)
    for seed in (1, 2, 3):
        inputs = {**first, **{k: v for k, v in random_inputs(m, seed=seed).items() if k not in stable}}
        got = replay(inputs)
        assert max_rel_error(got["act"], evaluate(m, inputs)["act"]) <= 1e-5
    assert len(captured) == 1 and captured[0].replays == 3
    assert all(replay.static[k] is first[k] for k in stable), "weights were copied into the graph"
    new_w = {**inputs, "w": torch.randn_like(inputs["w"])}
    got = replay(new_w)
    assert len(captured) == 2, "a replaced weight must be captured again"
    assert max_rel_error(got["act"], evaluate(m, new_w)["act"]) <= 1e-5


def test_cuda_graphs_on_cpu_is_a_clear_error():
    import einfuse

    lin = torch.nn.Linear(8, 8).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="einfuse: cuda_graphs=True"):
        einfuse.compile(lin, (torch.randn(2, 8),), backend="triton", cuda_graphs=True)(torch.randn(2, 8))


def test_builder_drops_dead_code_by_liveness():
    kb = KernelBuilder()
    x = kb.let("x_val", "tl.load(p)")
    kb.let("dead", f"{x} * 2")  # read by nothing
    acc = kb.let("acc", "0.0")
    with kb.loop("k", "0, 8"):
        t = kb.let("t", f"{x} + k")
        kb.let("also_dead", f"{t} * t")
        kb.assign(acc, f"{acc} + {t}")
    kb.store("out_ptr", "0", acc)
    lines = [ln.strip() for ln in kb.render()]
    assert not any(ln.startswith(("dead", "also_dead")) for ln in lines), lines
    assert lines[:2] == ["x_val = tl.load(p)", "acc = 0.0"] and lines[-1] == "tl.store(out_ptr + 0, acc)"
    assert kb.fresh("x_val") == "x_val_2" and kb.fresh("for") == "for_2"


def test_kernel_lines_name_roles_and_parse_back(fused):
    m = fused["attention"]
    (k,) = m.kernels
    text = str(m)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("kernel "))
    assert "qk=" in line and "rm=" in line and "out=" in line
    back = parse(text)
    assert back == m and back.kernels[0].roles == k.roles
    for role in ("qk", "lm", "rm", "sln", "prm", "sld", "rd", "slnv", "rnv", "out"):
        assert k.member(role) in k.members
    with pytest.raises(KeyError, match="role 'nope'"):
        k.member("nope")


def test_every_builtin_kind_is_registered_and_emits():
    assert {"map", "rows", "iterate", "dot", "attention"} <= set(KINDS)
    m = parse(MODULES["map"])
    (spec,) = generate(m)
    assert spec.kind == "map" and "exp" in spec.source


def test_custom_kernel_kind_example():
    """examples/custom_kernel_kind.py (under 80 lines): a kind from user code, chosen by a fusion rule,
    emitted, matching eager, compiled for sm_80/sm_90a without spills."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "custom_kernel_kind.py"
    assert len(path.read_text().splitlines()) < 80
    run = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "kernels: ['row_in_registers']" in out, out
    assert float(re.search(r"max abs error vs eager: (\S+)", out)[1]) <= 1e-5, out
    checks = re.findall(r"sm_(\d+): ok=(\w+) spills=(\d+)", out)
    assert {a for a, _, _ in checks} == {"80", "90"} and all(ok == "True" and s == "0" for _, ok, s in checks), out

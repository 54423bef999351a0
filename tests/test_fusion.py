"""The fusion passes on small hand-written IR: FuseElementwise inlines elementwise chains but keeps a
contraction's epilogue; FuseKernels forms `dot` groups (contraction + bias + activation + residual; two
contractions sharing an operand, never three) and `rows` groups (layernorm statistics); a custom Rule
changes the kernel groups; FuseMax's pass count (`passes_over`) is 3, 2 and 1 where it should be; and the
per-pass numeric check passes every fusion pass on small Llama and GPT-2 models.

Hand-written modules run through the reference evaluator and the Triton backend: every group is one
kernel and computes what the unfused module computes (max relative error <= 1e-5).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import einfuse
from einfuse.ir import parse
from einfuse.ir.evaluator import evaluate, random_inputs
from einfuse.ir.verify import verify
from einfuse.passes import (DCE, RULES, FuseAttention, FuseElementwise, FuseKernels, Rule, cleanup_passes,
                            fusion_passes, run_pipeline)
from einfuse.passes.attention import find, one_pass_from_group, one_pass_key_ranks
from einfuse.passes.attention import report as attention_report
from einfuse.passes.cascade import passes_over
from einfuse.passes.fusion import MAX_ACCUMULATORS, flat_identity
from einfuse.passes.instruments import max_rel_error
from einfuse.runtime import backends

pytestmark = pytest.mark.usefixtures("fresh_einfuse_cache")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def groups(m) -> dict:
    """kernel name -> (kind, set of members)."""
    return {k.name: (k.kind, set(k.members)) for k in m.kernels}


def group_of(m, name: str):
    return next(((k.kind, set(k.members)) for k in m.kernels if name in k.members), None)


def same_results(before, after, seed: int = 0) -> float:
    """Reference evaluator on both modules, and the Triton backend on `after`: the worst relative error."""
    inputs = random_inputs(before, seed=seed)
    want = evaluate(before, inputs)
    got_ref = evaluate(after, inputs)
    got_triton = backends.build("triton", after)(inputs)
    return max(max_rel_error(g[o].float(), want[o].float()) for o in before.outputs for g in (got_ref, got_triton))


# ------------------------------------------------------------------ FuseElementwise

CHAIN = """\
module chain
  in x: f32[32, 64]
  in w: f32[48, 64]
  in b: f32[48]
  a[i, j]: f32[32, 64] = x[i, j] * 2.0
  e[i, j]: f32[32, 64] = exp(a[i, j] - 1.0)
  s[i]: f32[32] = sum[j:64] e[i, j]
  c[i, j]: f32[32, 48] = sum[r:64] x[i, r] * w[j, r]
  y[i, j]: f32[32, 48] = c[i, j] + b[j]
  z[i, j]: f32[32, 48] = relu(y[i, j])
  out s, z
"""


def test_fuse_elementwise_inlines_chains_and_keeps_epilogues():
    m = parse(CHAIN)
    out = FuseElementwise().run(m)
    verify(out)
    names = {s.name for s in out.statements}
    assert not names & {"a", "e"}, "the elementwise chain feeding the row sum should be inlined"
    assert str(out.producers()["s"].expr) == str(parse(CHAIN.replace(
        "s[i]: f32[32] = sum[j:64] e[i, j]", "s[i]: f32[32] = sum[j:64] exp(x[i, j] * 2.0 - 1.0)")).producers()["s"].expr)
    assert {"c", "y", "z"} <= names, "bias and activation read the contraction in place: they stay as its epilogue"
    assert same_results(m, out) <= TOL


# ------------------------------------------------------------------ FuseKernels: dot groups

EPILOGUE = """\
module epilogue
  in x: f32[64, 64]
  in w: f32[64, 64]
  in b: f32[64]
  c[i, j]: f32[64, 64] = sum[r:64] x[i, r] * w[j, r]
  y[i, j]: f32[64, 64] = c[i, j] + b[j]
  g[i, j]: f32[64, 64] = gelu(y[i, j])
  o[i, j]: f32[64, 64] = g[i, j] + x[i, j]
  out o
"""


def test_dot_group_takes_bias_activation_and_residual():
    m = parse(EPILOGUE)
    out = run_pipeline(m, fusion_passes())
    assert list(groups(out).values()) == [("dot", {"c", "y", "g", "o"})]
    runner = backends.build("triton", out)
    assert [s.mapping.kind for s in runner.specs] == ["dot"]
    assert runner.specs[0].outputs == ("o",), "only the residual sum leaves the kernel"
    assert same_results(m, out) <= TOL


SHARED = """\
module shared
  in x: f32[64, 64]
  in wg: f32[128, 64]
  in wu: f32[128, 64]
  in wt: f32[128, 64]
  g[i, j]: f32[64, 128] = sum[r:64] x[i, r] * wg[j, r]
  u[i, j]: f32[64, 128] = sum[r:64] x[i, r] * wu[j, r]
  h[i, j]: f32[64, 128] = silu(g[i, j]) * u[i, j]
  out h
"""
THIRD = SHARED.replace("  out h", """\
  t[i, j]: f32[64, 128] = sum[r:64] x[i, r] * wt[j, r]
  o[i, j]: f32[64, 128] = h[i, j] + t[i, j]
  out o""")


def test_two_contractions_sharing_an_operand_share_a_kernel():
    """gate and up projections read the same activation tile: one kernel, two accumulators."""
    m = parse(SHARED)
    out = run_pipeline(m, fusion_passes())
    assert list(groups(out).values()) == [("dot", {"g", "u", "h"})]
    runner = backends.build("triton", out)
    assert len(runner.specs) == 1 and runner.specs[0].outputs == ("h",)
    assert same_results(m, out) <= TOL


def test_a_third_accumulator_is_refused():
    m = parse(THIRD)
    out = run_pipeline(m, fusion_passes())
    dots = [members for kind, members in groups(out).values() if kind == "dot"]
    for members in dots:
        assert len(members & {"g", "u", "t"}) <= MAX_ACCUMULATORS == 2, dots
    assert group_of(out, "t") != group_of(out, "g"), "three 64x64 f32 accumulators in one kernel would spill"
    assert same_results(m, out) <= TOL


# ------------------------------------------------------------------ FuseKernels: rows groups

LAYERNORM = """\
module layernorm
  in x: f32[64, 256]
  in gamma: f32[256]
  in beta: f32[256]
  s[i]: f32[64] = sum[j:256] x[i, j]
  mu[i]: f32[64] = s[i] / 256.0
  var[i]: f32[64] = sum[j:256] (x[i, j] - mu[i]) * (x[i, j] - mu[i])
  rstd[i]: f32[64] = rsqrt(var[i] / 256.0 + 1e-05)
  y[i, j]: f32[64, 256] = (x[i, j] - mu[i]) * rstd[i] * gamma[j] + beta[j]
  out y
"""


def test_layernorm_statistics_form_a_rows_group():
    """The mean and rstd maps are inlined (FuseElementwise), so the two row reductions meet: the sum and
    the sum of squared deviations run in one kernel over each row block, the normalization in another."""
    m = parse(LAYERNORM)
    out = run_pipeline(m, fusion_passes())
    assert list(groups(out).values()) == [("rows", {"s", "var"})]
    assert group_of(out, "y") is None
    runner = backends.build("triton", out)
    assert [s.mapping.kind for s in runner.specs] == ["rows", "map"], [s.name for s in runner.specs]
    assert same_results(m, out) <= TOL


# ------------------------------------------------------------------ a custom Rule

def no_residual(m, producer, reader, access):
    """The epilogue rule, except a map that also reads a full activation (a residual add)."""
    types = m.types()
    wide = [a for a in reader.reads() if a in types and types[a].rank > 1 and a != producer.name]
    return reader.reduce is None and flat_identity(types, access, reader) and not wide


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


def kernel_lines(dump_dir) -> list[str]:
    last = sorted(f for f in os.listdir(dump_dir) if re.match(r"\d\d_.*\.ir$", f))[-1]
    return [line.strip() for line in open(os.path.join(dump_dir, last)) if line.lstrip().startswith("kernel ")]


def test_custom_rule_changes_the_kernel_lines(tmp_path):
    rules = [r for r in RULES if r.kind != "dot"] + [Rule("epilogue without residual", "dot", no_residual)]
    custom = cleanup_passes() + [FuseKernels(rules) if isinstance(p, FuseKernels) else p for p in fusion_passes()]
    assert FuseKernels(rules).fingerprint() != FuseKernels().fingerprint()
    x = torch.randn(32, 64)
    lines, kernels = {}, {}
    for label, passes in (("default", None), ("custom", custom)):
        cm = einfuse.compile(Block(), (x,), passes=passes, dump_dir=str(tmp_path / label), backend="triton")
        lines[label] = kernel_lines(tmp_path / label)
        kernels[label] = len(cm.variant.run.specs)
        with torch.no_grad():
            assert max_rel_error(cm(x), Block()(x)) <= TOL
    print(lines, kernels)
    assert lines["default"] != lines["custom"]
    default_dot = [line for line in lines["default"] if " dot " in line]
    custom_dot = [line for line in lines["custom"] if " dot " in line]
    assert len(default_dot) == 1 and len(custom_dot) == 1
    assert len(custom_dot[0].split("{")[1].split(",")) < len(default_dot[0].split("{")[1].split(",")), \
        "the custom rule keeps the residual add out of the contraction's kernel"
    assert kernels["custom"] == kernels["default"] + 1


def test_custom_fusion_rule_example_runs():
    """examples/custom_fusion_rule.py prints the kernel lines under the default rules and its own."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EINFUSE_BACKEND": "triton"}  # it prints the Triton kernels
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_fusion_rule.py")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "default rules" in out and "custom rule" in out, out
    default, custom = out.split("custom rule", 1)
    pick = lambda text: sorted(line.strip() for line in text.splitlines() if line.strip().startswith("kernel "))  # noqa: E731
    assert pick(default) and pick(custom), out
    assert pick(default) != pick(custom), out


# ------------------------------------------------------------------ FuseMax's pass count

THREE_PASS = """\
module attention
  in q: f32[32, 16]
  in k: f32[128, 16]
  in v: f32[128, 16]
  qk[p, m]: f32[32, 128] = sum[e:16] q[p, e] * k[m, e]
  mx[p]: f32[32] = max[m:128] qk[p, m]
  ex[p, m]: f32[32, 128] = exp(qk[p, m] - mx[p])
  sm[p]: f32[32] = sum[m:128] ex[p, m]
  av[p, f]: f32[32, 16] = sum[m:128] ex[p, m] * v[m, f] / sm[p]
  out av
"""
TWO_PASS = """\
module attention
  in q: f32[32, 16]
  in k: f32[128, 16]
  in v: f32[128, 16]
  qk[p, m]: f32[32, 128] = sum[e:16] q[p, e] * k[m, e]
  mx[p]: f32[32] = max[m:128] qk[p, m]
  sd[p]: f32[32] = sum[m:128] exp(qk[p, m] - mx[p])
  snv[p, f]: f32[32, 16] = sum[m:128] exp(qk[p, m] - mx[p]) * v[m, f]
  av[p, f]: f32[32, 16] = snv[p, f] / sd[p]
  out av
"""
# the 3-pass cascade the way transformers writes it: scale and softmax's division are maps in between
THREE_PASS_WITH_MAPS = """\
module attention
  in q: f32[32, 16]
  in k: f32[128, 16]
  in v: f32[128, 16]
  qk[p, m]: f32[32, 128] = sum[e:16] q[p, e] * k[m, e]
  sc[p, m]: f32[32, 128] = qk[p, m] * 0.25
  mx[p]: f32[32] = max[m:128] sc[p, m]
  ex[p, m]: f32[32, 128] = exp(sc[p, m] - mx[p])
  sm[p]: f32[32] = sum[m:128] ex[p, m]
  pr[p, m]: f32[32, 128] = ex[p, m] / sm[p]
  av[p, f]: f32[32, 16] = sum[m:128] pr[p, m] * v[m, f]
  out av
"""


def key_ranks(m, key_free=()) -> dict:
    """Each statement's rank along the key axis: the reduced rank, or the last index of an N x N map."""
    out = {}
    for s in m.statements:
        if s.reduce is not None and s.reduce.ranks[0][1] == 128:
            out[s.name] = {s.reduce.ranks[0][0]}
        elif s.name in key_free:
            out[s.name] = set()
        elif s.type.shape[-1] == 128:
            out[s.name] = {s.index[-1]}
    return out


def test_pass_counts():
    three, two = parse(THREE_PASS), parse(TWO_PASS)
    assert passes_over(three, key_ranks(three)) == 3
    assert passes_over(two, key_ranks(two, key_free=("av",))) == 2
    # the cascade's own key ranks (what dump headers print) agree
    (c,) = find(three)
    assert passes_over(three, c.key_ranks()) == 3
    fused = FuseAttention().run(three)
    (g,) = [k for k in fused.kernels if k.kind == "attention"]
    assert passes_over(fused, one_pass_key_ranks(fused, one_pass_from_group(fused, g))) == 1
    assert attention_report(three) == [("av", 3)] and attention_report(fused) == [("av", 1)]
    assert same_results(three, run_pipeline(fused, [DCE()])) <= TOL


def test_pass_count_looks_through_maps_between_the_steps():
    """Only the cascade's statements are given; the scale and the division in between traverse nothing."""
    m = parse(THREE_PASS_WITH_MAPS)
    (c,) = find(m)
    assert passes_over(m, c.key_ranks()) == 3
    assert attention_report(m) == [("av", 3)]
    fused = run_pipeline(m, [FuseAttention(), DCE()])
    assert attention_report(fused) == [("av", 1)]
    assert {"sc", "ex", "pr"}.isdisjoint(s.name for s in fused.statements), "maps feeding only the cascade are gone"
    assert same_results(m, fused) <= TOL


def test_attention_whose_probabilities_are_returned_stays_three_pass():
    """output_attentions: the N x N probabilities are an output, so they must be materialized."""
    m = parse(THREE_PASS_WITH_MAPS.replace("  out av", "  out av, pr"))
    out = FuseAttention().run(m)
    assert out == m and attention_report(out) == [("av", 3)]


# ------------------------------------------------------------------ the per-pass numeric check on models

def small_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)).eval()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                                      use_cache=False)).eval()
    return {"llama": llama, "gpt2": gpt2}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_numeric_check_passes_every_fusion_pass(name, tmp_path):
    """compile(check=True): NumericCheck evaluates the IR before and after every pass on the same random
    inputs and would raise naming the pass that changed a result; fusion must change none."""
    model = small_models()[name]
    g = torch.Generator().manual_seed(0)
    kwargs = dict(input_ids=torch.randint(1, 256, (2, 16), generator=g), attention_mask=torch.ones(2, 16, dtype=torch.long))
    kwargs["attention_mask"][1, :3] = 0
    cm = einfuse.compile(model, (), kwargs, check=True, backend="reference", dump_dir=str(tmp_path))
    ran = [t["pass"] for t in cm.variant.timings]
    fusion = [p.pass_name for p in fusion_passes()]
    assert ran[-len(fusion):] == fusion and "fuse_attention" in fusion, ran
    kinds = {k.kind for k in cm.ir.kernels}
    assert {"attention", "dot"} <= kinds, kinds
    fresh = dict(input_ids=torch.randint(1, 256, (2, 16), generator=g), attention_mask=kwargs["attention_mask"])
    with torch.no_grad():
        want = model(**fresh).logits
    assert max_rel_error(cm(**fresh).logits, want) <= TOL

"""Every kernel kind over degenerate and awkward shapes (0, 1, primes, one row, one column) and every dtype
(f64, f32, bf16, f16, integers) on the Triton backend (under its interpreter), against the reference
evaluator on fresh random inputs. Tolerances per dtype as the numeric check uses them (f32 1e-5, f64
1e-9, bf16 2e-2, f16 1e-2 relative to the largest value); integers exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import einfuse
from einfuse.ir import parse
from einfuse.ir.evaluator import TOLERANCE, evaluate, max_rel_error, random_inputs
from einfuse.passes import default_pipeline, run_pipeline
from einfuse.runtime import backends

pytestmark = pytest.mark.usefixtures("fresh_einfuse_cache")

FLOATS = ["f64", "f32", "bf16", "f16"]


def check(text: str, seed: int = 0, fused: bool = True) -> dict:
    """Run the module (after the default pipeline) on Triton and the evaluator; the worst error per output."""
    m = parse(text)
    if fused:
        m = run_pipeline(m, default_pipeline())
    inputs = random_inputs(m, seed=seed)
    want = evaluate(m, inputs)
    got = backends.build("triton", m, autotune=False)(inputs)
    errors = {}
    for name in m.outputs:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        errors[name] = max_rel_error(got[name], want[name])
        tol = TOLERANCE.get(want[name].dtype, 0.0)
        assert errors[name] <= tol, (name, errors[name], text)
    return errors


@pytest.mark.parametrize("dtype", FLOATS + ["i32", "i64"])
@pytest.mark.parametrize("m, n", [(0, 3), (1, 1), (1, 7), (5, 1), (13, 17)])
def test_map(m, n, dtype):
    op = "x[i, j] * 3 + x[i, j]" if dtype.startswith("i") else "exp(x[i, j]) * 0.5 - x[i, j]"
    check(f"""module map
  in x: {dtype}[{m}, {n}]
  y[i, j]: {dtype}[{m}, {n}] = {op}
  out y
""")


@pytest.mark.parametrize("dtype", FLOATS + ["i32"])
@pytest.mark.parametrize("m, n", [(1, 1), (3, 0), (1, 17), (13, 1), (7, 37)])
def test_rows(m, n, dtype):
    red = "max" if dtype.startswith("i") and n else "sum"  # a max over nothing raises in torch too
    acc = dtype if dtype.startswith("i") or dtype == "f64" else "f32"
    check(f"""module rows
  in x: {dtype}[{m}, {n}]
  s[i]: {acc}[{m}] = {red}[r:{n}] x[i, r]
  t[i, j]: {acc}[{m}, {n}] = x[i, j] - s[i]
  out s, t
""")


DOT_SHAPES = [(1, 1, 1), (1, 5, 3), (7, 1, 4), (3, 4, 0), (0, 4, 4), (17, 19, 23)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m, n, k", DOT_SHAPES)
def test_dot_with_epilogue(m, n, k, dtype):
    check(f"""module dot
  in a: {dtype}[{m}, {k}]
  in b: {dtype}[{n}, {k}]
  in bias: {dtype}[{n}]
  mm[i, j]: {dtype}[{m}, {n}] = sum[r:{k}] a[i, r] * b[j, r]
  y[i, j]: {dtype}[{m}, {n}] = silu(mm[i, j] + bias[j])
  out y
""")


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (5, 3, 17), (16, 16, 32)])
def test_int8_dot(m, n, k):
    check(f"""module int8
  in a: i8[{m}, {k}]
  in b: i8[{k}, {n}]
  mm[i, j]: i32[{m}, {n}] = sum[r:{k}] i32(a[i, r]) * i32(b[r, j])
  out mm
""")


@pytest.mark.parametrize("dtype", ["f64", "f32"])
@pytest.mark.parametrize("m, t", [(1, 1), (5, 0), (3, 7)])
def test_iterate(m, t, dtype):
    check(f"""module scan
  in x: {dtype}[{m}, {t}]
  c[i, s + 1]: {dtype}[{m}, {t + 1}] = iterate[s:{t}, init=0.0] c[i, s] * 0.5 + x[i, s]
  out c
""")


class Attention(torch.nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=True)


ATTENTION_DTYPES = {"f32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 2e-2), "f16": (torch.float16, 1e-2),
                    "f64": (torch.float64, 1e-9)}


@pytest.mark.parametrize("dtype", list(ATTENTION_DTYPES))
@pytest.mark.parametrize("queries, keys, causal", [(1, 1, False), (1, 17, False), (5, 1, False), (7, 13, False),
                                                   (13, 13, True)])
def test_attention(queries, keys, causal, dtype):
    """One query row, one key, both, and odd lengths; 4 query heads on 2 KV heads (GQA)."""
    torch_dtype, tol = ATTENTION_DTYPES[dtype]
    g = torch.Generator().manual_seed(queries * 100 + keys)

    def qkv():
        return (torch.randn(1, 4, queries, 16, generator=g).to(torch_dtype),
                torch.randn(1, 2, keys, 16, generator=g).to(torch_dtype),
                torch.randn(1, 2, keys, 16, generator=g).to(torch_dtype))

    model = Attention(causal)
    with torch.no_grad():
        cm = einfuse.compile(model, qkv(), backend="triton")
        fresh = qkv()
        got, want = cm(*fresh), model(*fresh)
    assert cm.variant.fallback is None, cm.variant.fallback
    assert max_rel_error(got, want) <= tol
    kinds = [k.kind for k in cm.ir.kernels]
    assert ("attention" in kinds) == (dtype != "f64"), kinds  # f64 stays a cascade of ordinary kernels

"""Measured memory traffic (Triton's interpreter, counting the lanes each load and store has on) against
exact analytic counts: elementwise kernels whose size is a multiple of the block, not one, or smaller
than one block; a tiled matmul whose operands are re-read by several tiles; and the model report."""
from __future__ import annotations

import pytest
import torch

import einfuse
from einfuse.ir import parse
from einfuse.runtime import backends
from einfuse.runtime.triton_backend import TritonRunner

pytestmark = pytest.mark.usefixtures("fresh_einfuse_cache")

F32 = 4


def measured(text: str, inputs: dict):
    """Run the module's kernels once with traffic counting; (runner, outputs, {statement: KernelStats})."""
    runner: TritonRunner = backends.build("triton", parse(text))
    runner.measure, runner.stats = True, {}
    out = runner(inputs)
    return runner, out, {st.statements[0]: st for st in runner.stats.values()}


@pytest.mark.parametrize("rows, cols", [(64, 64), (50, 50), (3, 100)],
                         ids=["multiple-of-block", "ragged-last-block", "smaller-than-block"])
def test_elementwise_bytes_are_exact(rows, cols):
    text = f"""\
module ew
  in x: f32[{rows}, {cols}]
  in y: f32[{cols}]
  z[i, j]: f32[{rows}, {cols}] = x[i, j] * 2.0 + y[j]
  out z
"""
    x, y = torch.randn(rows, cols), torch.randn(cols)
    runner, out, stats = measured(text, {"x": x, "y": y})
    torch.testing.assert_close(out["z"], x * 2.0 + y, rtol=0, atol=0)
    n = rows * cols
    block = dict(runner.specs[0].mapping.tiles)["BLOCK"]
    lanes = -(-n // block) * block
    st = stats["z"]
    assert st.launches == 1
    assert st.bytes_loaded == 2 * n * F32  # x once per lane, y[j] once per lane; masked-off lanes not at all
    assert st.bytes_stored == n * F32
    assert st.unique_bytes == (n + cols + n) * F32  # every element of x, y and z, once
    if lanes != n:
        assert lanes * F32 > st.bytes_stored  # the last block really had lanes switched off


@pytest.mark.parametrize("M", [128, 100], ids=["aligned", "ragged-rows"])
def test_matmul_rereads_operands_and_touches_each_once(M):
    N, K = 128, 64
    text = f"""\
module mm
  in a: f32[{M}, {K}]
  in b: f32[{N}, {K}]
  c[i, j]: f32[{M}, {N}] = sum[r:{K}] a[i, r] * b[j, r]
  out c
"""
    a, b = torch.randn(M, K), torch.randn(N, K)
    runner, out, stats = measured(text, {"a": a, "b": b})
    torch.testing.assert_close(out["c"], a @ b.T, rtol=1e-5, atol=1e-5)
    (spec,) = runner.specs
    tiles = dict(spec.mapping.tiles)
    assert spec.mapping.kind == "dot"
    tiles_m, tiles_n = -(-M // tiles["BLOCK_M"]), -(-N // tiles["BLOCK_N"])
    assert tiles_m > 1 and tiles_n > 1  # every operand row is read by more than one tile
    st = stats["c"]
    assert st.bytes_loaded == (tiles_n * M * K + tiles_m * N * K) * F32
    assert st.bytes_stored == M * N * F32
    minimum = (M * K + N * K + M * N) * F32
    assert minimum <= st.unique_bytes < st.bytes_loaded + st.bytes_stored
    assert st.unique_bytes == minimum


class BroadcastAdd(torch.nn.Module):
    def forward(self, x, y):
        return x + y


def test_report_of_a_compiled_model():
    x, y = torch.randn(50, 50), torch.randn(50)
    cm = einfuse.compile(BroadcastAdd(), (x, y), backend="triton")
    rep = cm.report(eager=False)
    (k,) = [k for k in rep.kernels if k.measured]
    n = 50 * 50
    assert (k.bytes_loaded, k.bytes_stored, k.unique_bytes) == (2 * n * F32, n * F32, (2 * n + 50) * F32)
    assert rep.min_bytes == (2 * n + 50) * F32 == rep.unique_bytes
    assert rep.total_bytes == sum(k.total_bytes for k in rep.kernels)
    assert rep.eager_bytes is None and "kernels:" in rep.text()
    assert not cm.variant.run.measure  # measuring is switched off again
    torch.testing.assert_close(cm(x, y), x + y, rtol=0, atol=0)

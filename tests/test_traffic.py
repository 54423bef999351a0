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


# ---------------------------------------------------------------- eager PyTorch's bytes, counted by hand

def eager_count(fn, *args) -> int:
    from einfuse.runtime.report import EagerBytes

    with torch.no_grad(), EagerBytes() as counter:
        fn(*args)
    return counter.bytes


def test_eager_view_chain_moves_nothing():
    x = torch.randn(4, 8)
    assert eager_count(lambda t: t.view(8, 4).t().unsqueeze(0).expand(3, 4, 8)[:, 1:, ::2].reshape(3, 3, 4), x) == 0
    assert eager_count(lambda t: torch.ops.aten._unsafe_view(t, (32,)), x) == 0  # names no alias, shares storage
    assert eager_count(lambda t: t.detach().split(2, dim=0), x) == 0


def test_eager_elementwise_matmul_and_copies_by_hand():
    n = 1000
    a, b = torch.randn(n), torch.randn(n)
    assert eager_count(torch.add, a, b) == 3 * F32 * n  # read a, b; write the sum
    A, B = torch.randn(12, 16), torch.randn(16, 20)
    assert eager_count(torch.mm, A, B) == (12 * 16 + 16 * 20 + 12 * 20) * F32  # A, B and C once each
    t = torch.randn(30, 40).t()
    assert eager_count(lambda x: x.contiguous(), t) == 2 * 30 * 40 * F32  # read it strided, write it packed
    assert eager_count(lambda x: x.contiguous(), t.contiguous()) == 0  # already contiguous: returns itself
    row = torch.randn(40)
    assert eager_count(torch.add, torch.randn(30, 40), row) == (2 * 30 * 40 + 40) * F32  # a broadcast row, read once
    assert eager_count(lambda: torch.empty(1000)) == 0  # allocation only


def test_eager_in_place_op_counts_its_reads_and_writes():
    a, b = torch.randn(500), torch.randn(500)
    assert eager_count(lambda x, y: x.add_(y), a, b) == 3 * F32 * 500  # read a and b, write a
    assert eager_count(lambda x: x.mul_(2.0), a) == 2 * F32 * 500
    out = torch.empty(500)
    assert eager_count(lambda x, y: torch.add(x, y, out=out), a, b) == 3 * F32 * 500  # out= is written, not read


def test_eager_bytes_of_a_linear_layer():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(2, 5, 16)  # 3-D: view -> addmm -> _unsafe_view in eager
    want = (2 * 5 * 16 + 8 * 16 + 8 + 2 * 5 * 8) * F32  # input, weight, bias, output
    assert eager_count(lin, x) == want


# ---------------------------------------------------------------- the report's roofline model

class Mm(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(32, 32, dtype=dtype))

    def forward(self, x):
        return torch.relu(x @ self.w)


@pytest.mark.parametrize("dtype, precision, peak", [(torch.float32, "highest", "fp32"), (torch.float32, "high", "tf32"),
                                                    (torch.bfloat16, "highest", "bf16/fp16")])
def test_each_kernel_is_held_to_the_peak_of_its_type(dtype, precision, peak):
    from conftest import float32_matmul_precision
    from einfuse.runtime.report import H100_BYTES_PER_S, PEAKS

    x = torch.randn(32, 32, dtype=dtype)
    with float32_matmul_precision(precision):
        cm = einfuse.compile(Mm(dtype).eval(), (x,), backend="triton")
        rep = cm.report(eager=False)
    (k,) = [k for k in rep.kernels if k.flops]
    assert k.peak == peak and k.peak_flops == PEAKS[peak]
    assert k.intensity == k.flops / k.unique_bytes  # one definition: FLOPs per distinct byte, table and plot
    assert k.roofline_us == pytest.approx(max(k.unique_bytes / H100_BYTES_PER_S, k.flops / PEAKS[peak]) * 1e6)
    assert f"{k.intensity:.2f}" in rep.text() and "FLOPs per distinct byte" in rep.text()


def test_roofline_plot_names_the_kernels_with_the_most_bytes(tmp_path):
    from einfuse.runtime.report import KernelReport, Report

    kernels = [KernelReport(f"kernel_{n:02d}_with_a_long_descriptive_name", (f"s{n}",), 1000 * (n + 1), 100,
                            800 * (n + 1), 2000 * (n + 1) * (n % 5 + 1), peak=("fp32", "tf32", "bf16/fp16")[n % 3])
               for n in range(30)]
    kernels.append(KernelReport("opaque aten.topk.default", ("t",), 64, 64, 128, 0, measured=False))
    rep = Report(kernels, 1, None)
    named = rep.plot(str(tmp_path / "roofline.png"), labels=8)
    assert (tmp_path / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    biggest = sorted(kernels, key=lambda k: -k.unique_bytes)[:8]
    assert sorted(named) == sorted(k.name for k in biggest)


def test_a_tensor_listed_twice_is_touched_once():
    """Distinct bytes: a tensor passed to a launch twice (two regions at one address), or a view inside
    another listed tensor, counts its touched elements once — by hand: 10 f32 of a, 3 of its view."""
    import numpy as np

    from einfuse.runtime.traffic import Traffic
    a = torch.zeros(10)
    view = a[2:5]
    t = Traffic(regions=[(a.data_ptr(), 40, 4), (a.data_ptr(), 40, 4), (view.data_ptr(), 12, 4)])
    t.touch(a.data_ptr() + 4 * np.arange(10), 4)
    t.touch(view.data_ptr() + 4 * np.arange(3), 4)
    assert t.unique_bytes == 40

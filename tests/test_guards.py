"""Guards: every call of a compiled module matches eager PyTorch or raises what eager raises. A variant records
what it assumed (dtypes, sizes or symbolic ranges, values, train/eval mode, submodules, weights) and a call that
breaks an assumption runs another variant or compiles one; weights are read live and re-bound by name.
Calls that need autograd, and graphs that mutate or draw random numbers, run in eager PyTorch.

Every comparison is against eager PyTorch on fresh random inputs; f32 tolerance 1e-5 (one contraction of
length <= 16), exact where no arithmetic differs. The reference backend is used (explicitly) where the test
is about the runtime and not the kernels."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.export import Dim

import einfuse

pytestmark = pytest.mark.usefixtures("fresh_einfuse_cache")

TOL = dict(rtol=1e-5, atol=1e-5)


def fresh(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def compile_ref(model, args, **kw):
    return einfuse.compile(model, args, backend="reference", **kw)


class Sub(torch.nn.Module):
    def forward(self, a, b):
        return a - b


# ---------------------------------------------------------------- arguments

def test_same_tensor_passed_twice_is_captured_as_two_inputs():
    x = fresh(4, seed=0)
    cm = compile_ref(Sub(), (x, x))
    a, b = fresh(4, seed=1), fresh(4, seed=2)
    torch.testing.assert_close(cm(a, b), a - b, rtol=0, atol=0)  # was zeros: one input read twice
    torch.testing.assert_close(cm(a, a), torch.zeros(4), rtol=0, atol=0)
    assert "a[i] - b[i]" in str(cm.ir).replace("sub[i]: f32[4] = ", "")
    assert len(cm.variants) == 1  # the graph mutates nothing, so aliasing is not a guard


def test_overlapping_views_as_inputs():
    base = fresh(6, seed=3)
    cm = compile_ref(Sub(), (base[:4], base[2:]))
    torch.testing.assert_close(cm(base[:4], base[2:]), base[:4] - base[2:], rtol=0, atol=0)
    a, b = fresh(4, seed=4), fresh(4, seed=5)
    torch.testing.assert_close(cm(a, b), a - b, rtol=0, atol=0)


def test_non_contiguous_input_is_read_correctly():
    x = fresh(4, 3, seed=6)
    cm = compile_ref(Sub(), (x.t().contiguous(), x.t().contiguous()))
    a, b = fresh(4, 3, seed=7).t(), fresh(4, 3, seed=8).t()
    torch.testing.assert_close(cm(a, b), a - b, rtol=0, atol=0)


def test_new_value_of_a_symbolic_size_does_not_recompile():
    lin = torch.nn.Linear(4, 3).eval()
    with torch.no_grad():
        cm = compile_ref(lin, (fresh(3, 4, seed=0),), dynamic_shapes=({0: Dim("B", max=8)},))
        for rows in (5, 2, 1, 8):
            x = fresh(rows, 4, seed=rows)
            torch.testing.assert_close(cm(x), lin(x), **TOL)
        assert len(cm.variants) == 1
        text = cm.guards()
        assert "<= 8" in text and "[s" in text  # the size is a range, not a value
        x = fresh(9, 4, seed=9)  # outside the range: a second variant, static sizes
        torch.testing.assert_close(cm(x), lin(x), **TOL)
        assert len(cm.variants) == 2 and "outside 1..8" in cm.explain(print_it=False).text


def test_non_tensor_arguments_are_guarded_by_value():
    class Scale(torch.nn.Module):
        def forward(self, x, scale: float, flip: bool = False):
            return -x * scale if flip else x * scale

    x = fresh(3, 4, seed=0)
    cm = compile_ref(Scale(), (x, 2.0))
    torch.testing.assert_close(cm(x, 3.0), x * 3.0, rtol=0, atol=0)
    torch.testing.assert_close(cm(x, 3.0, flip=True), -x * 3.0, rtol=0, atol=0)
    torch.testing.assert_close(cm(x, 2.0), x * 2.0, rtol=0, atol=0)
    assert len(cm.variants) == 3  # 2.0, 3.0, (3.0, flip): the first is reused for the last call


def test_f64_input_to_an_f32_linear_raises_what_eager_raises():
    lin = torch.nn.Linear(4, 4).eval()
    cm = compile_ref(lin, (fresh(3, 4, seed=0),))
    x = fresh(3, 4, seed=1, dtype=torch.float64)
    with torch.no_grad():
        with pytest.raises(RuntimeError) as eager:
            lin(x)
        with pytest.raises(RuntimeError) as compiled:  # was: an f64 result
            cm(x)
    assert str(compiled.value) == str(eager.value)
    assert any("einfuse" in n for n in getattr(compiled.value, "__notes__", []))
    assert "eager PyTorch raises for these inputs" in cm.explain(print_it=False).text


def test_f64_input_to_an_f32_elementwise_model_promotes_like_eager():
    class Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Parameter(fresh(4, seed=0))

        def forward(self, x):
            return x + self.b

    m = Bias().eval()
    cm = compile_ref(m, (fresh(3, 4, seed=1),))
    x = fresh(3, 4, seed=2, dtype=torch.float64)
    with torch.no_grad():
        out = cm(x)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, m(x), rtol=0, atol=0)


def test_empty_input_at_call_time_matches_eager():
    lin = torch.nn.Linear(4, 3).eval()
    cm = compile_ref(lin, (fresh(3, 4, seed=0),), dynamic_shapes=({0: Dim("B")},))
    with torch.no_grad():
        out = cm(torch.randn(0, 4))
    assert out.shape == (0, 3)
    assert "empty" in cm.explain(print_it=False).text
    with torch.no_grad():  # and non-empty calls run the compiled variant again
        x = fresh(6, 4, seed=1)
        torch.testing.assert_close(cm(x), lin(x), **TOL)
        assert cm.variant.fallback is None


# ---------------------------------------------------------------- weights and submodules

def test_replaced_parameter_is_rebound():
    lin = torch.nn.Linear(4, 4).eval()
    cm = compile_ref(lin, (fresh(3, 4, seed=0),))
    lin.weight = torch.nn.Parameter(fresh(4, 4, seed=1))  # was: the old weight kept being used
    x = fresh(3, 4, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), lin(x), **TOL)
    assert len(cm.variants) == 1 and cm.variant.bindings["p_weight"] is lin.weight


def test_in_place_update_is_seen():
    lin = torch.nn.Linear(4, 4).eval()
    cm = compile_ref(lin, (fresh(3, 4, seed=0),))
    with torch.no_grad():
        lin.weight.mul_(2)
        lin.bias.add_(fresh(4, seed=1))
        x = fresh(3, 4, seed=2)
        torch.testing.assert_close(cm(x), lin(x), **TOL)
    assert len(cm.variants) == 1


def test_parameter_of_another_shape_recompiles():
    lin = torch.nn.Linear(4, 4).eval()
    cm = compile_ref(lin, (fresh(3, 4, seed=0),))
    lin.weight = torch.nn.Parameter(fresh(6, 4, seed=1))
    lin.bias = torch.nn.Parameter(fresh(6, seed=2))
    x = fresh(3, 4, seed=3)
    with torch.no_grad():
        out = cm(x)
        torch.testing.assert_close(out, lin(x), **TOL)
    assert out.shape == (3, 6) and len(cm.variants) == 2
    assert "weight is now float32[6, 4]" in cm.explain(print_it=False).text


def test_weight_given_new_storage_of_another_dtype_behaves_like_eager():
    lin = torch.nn.Linear(4, 4).eval()
    cm = compile_ref(lin, (fresh(3, 4, seed=0),))
    lin.weight.data = lin.weight.data.double()  # no version bump, same Parameter object
    x = fresh(3, 4, seed=1)
    with torch.no_grad():
        with pytest.raises(RuntimeError) as eager:
            lin(x)
        with pytest.raises(RuntimeError) as compiled:
            cm(x)
    assert str(compiled.value) == str(eager.value)


def test_replaced_submodule_recompiles():
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()).eval()
    x = fresh(3, 4, seed=0)
    cm = compile_ref(seq, (x,))
    seq[1] = torch.nn.ReLU()
    with torch.no_grad():
        torch.testing.assert_close(cm(x), seq(x), **TOL)
    assert len(cm.variants) == 2


def test_guards_text_lists_what_a_variant_assumed():
    lin = torch.nn.Linear(4, 3).eval()
    cm = compile_ref(lin, (fresh(2, 4, seed=0),))
    text = cm.guards()
    for part in ("argument 0: Tensor float32[2, 4] on cpu", "p_weight <- model.weight: float32[3, 4]",
                 "p_bias <- model.bias: float32[3]", "eval", "aliasing", "_version"):
        assert part in text, part
    assert repr(text) == str(text)  # readable in a REPL


# ---------------------------------------------------------------- inference only: autograd and train mode

def test_input_that_requires_grad_runs_eagerly_with_autograd():
    lin = torch.nn.Linear(4, 4).eval()
    cm = compile_ref(lin, (fresh(3, 4, seed=0),))
    x = fresh(3, 4, seed=1).requires_grad_()
    out = cm(x)
    assert out.requires_grad  # was: a silently detached output
    out.sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(3, 4).detach(), **TOL)
    assert "argument 0 requires grad" in cm.explain(print_it=False).text


def test_train_mode_with_grad_runs_eagerly():
    lin = torch.nn.Linear(4, 4)  # train mode, parameters require grad
    x = fresh(3, 4, seed=0)
    cm = compile_ref(lin, (x,))
    out = cm(x)
    assert out.grad_fn is not None
    assert "train() mode with grad enabled" in cm.explain(print_it=False).text
    with torch.no_grad():  # without grad the compiled variant runs
        torch.testing.assert_close(cm(x), lin(x), **TOL)
        assert cm.variant.fallback is None


def test_batchnorm_in_train_mode_matches_eager():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(4).train()
    twin = torch.nn.BatchNorm1d(4).train()
    x = fresh(8, 4, seed=1)
    with torch.no_grad():
        cm = compile_ref(bn, (x,))  # was: a treespec error
        y = fresh(8, 4, seed=2) * 3 + 1
        torch.testing.assert_close(cm(y), twin(y), **TOL)
    torch.testing.assert_close(bn.running_mean, twin.running_mean, **TOL)  # the statistics moved, as in eager
    assert "running_mean" in cm.explain(print_it=False).text


def test_switching_to_train_mode_respecializes_dropout():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).eval()
    x = fresh(16, 4, seed=0)
    cm = compile_ref(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), **TOL)
        model.train()
        torch.manual_seed(1)
        got = cm(x)
        torch.manual_seed(1)
        want = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got == 0).any()  # dropout really ran
    assert len(cm.variants) == 2 and "random numbers" in cm.variant.fallback


def test_model_writing_into_its_input_runs_eagerly():
    class AddInPlace(torch.nn.Module):
        def forward(self, x):
            x.add_(1.0)
            return x * 2.0

    x = fresh(4, seed=0)
    cm = compile_ref(AddInPlace(), (x.clone(),))
    y = fresh(4, seed=1)
    before = y.clone()
    out = cm(y)
    torch.testing.assert_close(y, before + 1.0, rtol=0, atol=0)  # mutated once, as eager does
    torch.testing.assert_close(out, (before + 1.0) * 2.0, rtol=0, atol=0)
    assert "in place" in cm.variant.fallback


# ---------------------------------------------------------------- quiet capture

class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2.0
        return x - 1.0


def test_failed_capture_is_quiet_and_explained(capfd):
    x = fresh(8, seed=0)
    cm = compile_ref(DataDependent(), (x,))
    out, err = capfd.readouterr()
    assert out == "" and err == "", err[:2000]  # was ~40 lines of torch's log
    assert "torch.export failed" in cm.explain(print_it=False).text
    for seed in (1, 2):
        y = fresh(8, seed=seed)
        torch.testing.assert_close(cm(y), DataDependent()(y), rtol=0, atol=0)
    import logging

    assert not logging.getLogger("torch.fx.experimental.symbolic_shapes").disabled  # restored


def test_compile_warns_nothing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = compile_ref(torch.nn.Linear(4, 4).eval(), (fresh(3, 4, seed=0),))
    assert cm.variant.fallback is None
    assert not [w for w in caught if "LeafSpec" in str(w.message)], [str(w.message) for w in caught]

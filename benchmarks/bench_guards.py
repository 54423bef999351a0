"""Guard overhead: what a call of a compiled tiny Llama (`einfuse.models.tiny_llama()`, 2 layers, 23 weights,
33 modules) spends before its kernels run — flattening the arguments and checking the most recent variant's
guards (argument dtypes, devices and sizes; every module's train/eval flag; the weights' identity, `_version`s
and device; autograd). Budget: 5 us per call. Run:
`python -m pytest benchmarks/bench_guards.py --benchmark-columns=min,median,mean,max,rounds`."""
import pytest
import torch

import einfuse
from einfuse import models

BUDGET_S = 5e-6


@pytest.fixture(scope="module")
def llama():
    net = models.tiny_llama()
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    return einfuse.compile(net, (ids,), backend="reference"), ids


def _check(benchmark, cm, ids):
    fresh = torch.randint(0, 256, ids.shape, generator=torch.Generator().manual_seed(1))
    v = benchmark.pedantic(cm.variant_for, args=(fresh,), rounds=2000, iterations=20, warmup_rounds=100)
    assert v is cm.variants[0] and len(cm.variants) == 1  # the guards held: nothing was recompiled
    median = benchmark.stats.stats.median
    benchmark.extra_info["median_us"] = median * 1e6
    print(f"\nguard check per call: median {median * 1e6:.2f} us, min {benchmark.stats.stats.min * 1e6:.2f} us")
    assert median <= BUDGET_S, f"guard check takes {median * 1e6:.2f} us per call (budget {BUDGET_S * 1e6:.0f} us)"


def test_guard_overhead_no_grad(benchmark, llama):
    cm, ids = llama
    with torch.no_grad():
        _check(benchmark, cm, ids)


def test_guard_overhead_grad_enabled_eval_model(benchmark, llama):
    """The common case of inference without torch.no_grad(): the autograd check runs too."""
    cm, ids = llama
    _check(benchmark, cm, ids)

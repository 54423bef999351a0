"""Compile time of a 2-layer Llama: einfuse (cold cache, warm cache) beside torch.compile with inductor
on CPU (cold cache, warm cache), in one run. Run: `python -m pytest benchmarks/bench_compile.py`
(add `--benchmark-json out.json` to keep the numbers); docs/PERFORMANCE.md records the ratios."""
import os
import tempfile

import pytest
import torch

import einfuse
from einfuse import models

SEQ = 32


@pytest.fixture(scope="module")
def llama():
    net = models.tiny_llama()
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return net, ids


def _fresh_dirs():
    """New, empty cache directories for einfuse and inductor: the next compile is cold."""
    os.environ["EINFUSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="einfuse-bench-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-bench-")
    torch._dynamo.reset()
    import einfuse.runtime.triton_backend as tb

    tb._loaded.clear()


def _einfuse(net, ids):
    with torch.no_grad():
        return einfuse.compile(net, (ids,))


def _inductor(net, ids):
    torch._dynamo.reset()
    fn = torch.compile(net, backend="inductor")
    with torch.no_grad():
        return fn(ids)  # torch.compile is lazy: the first call compiles


@pytest.mark.benchmark(group="compile-cold")
def test_einfuse_cold(benchmark, llama):
    benchmark.pedantic(_einfuse, args=llama, setup=_fresh_dirs, rounds=3, iterations=1)


@pytest.mark.benchmark(group="compile-cold")
def test_inductor_cold(benchmark, llama):
    benchmark.pedantic(_inductor, args=llama, setup=_fresh_dirs, rounds=3, iterations=1)


@pytest.mark.benchmark(group="compile-warm")
def test_einfuse_warm(benchmark, llama):
    _fresh_dirs()
    _einfuse(*llama)
    benchmark.pedantic(_einfuse, args=llama, rounds=3, iterations=1)


@pytest.mark.benchmark(group="compile-warm")
def test_inductor_warm(benchmark, llama):
    _fresh_dirs()
    _inductor(*llama)
    benchmark.pedantic(_inductor, args=llama, rounds=3, iterations=1)

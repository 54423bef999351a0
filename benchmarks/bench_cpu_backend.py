"""The CPU backend against eager PyTorch, per call, one thread, same process: MiniLM (real weights and
tokenizer, 16 sentences padded to the longest) and a 4-layer Llama (hidden 512, 4 x 128 tokens).

Run: `python -m pytest benchmarks/bench_cpu_backend.py` (add `--benchmark-json out.json` to keep the
numbers). Each model is compiled with einfuse's default backend, which on a machine without CUDA is the
torch backend (generated straight-line torch code; `backend="triton"` there means Triton's interpreter).
pytest-benchmark times eager and compiled calls in their own tests (group per model); the `ratio` test
interleaves eager and compiled calls (so load from other processes hits both alike), repeats that
`REPEATS` times and takes medians, records them in `extra_info`, and asserts compiled <= 1.2x eager.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

import einfuse
from einfuse import models
from einfuse.passes.instruments import max_rel_error

MAX_RATIO = 1.2
REPEATS = 5  # rounds of interleaved calls; the ratio is the median of the rounds' median ratios
CALLS = {"minilm": 15, "llama": 5}  # interleaved eager/compiled pairs per round

SENTENCES = [
    "The cat sat on the mat.", "Compilers turn programs into other programs, hopefully faster ones.",
    "Rain again.", "Paris is in France.", "A matrix product is a sum over products of pairs of numbers.",
    "Where is the station?", "Attention is a softmax over scores, then a weighted sum of values.",
    "I like trains.", "What time is it?", "The quick brown fox jumps over the lazy dog.", "Hello world.",
    "Einsum cascades describe attention in one pass over the keys.", "Short.", "Numbers: one, two, three.",
    "This sentence is long enough to pad most of the others by quite a few tokens.", "Goodbye.",
]


def _minilm():
    net, tok = models.minilm()
    kwargs = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    return net, (), kwargs, lambda out: out.last_hidden_state


def _llama():
    net = models.tiny_llama(layers=4, hidden=512, heads=4, kv_heads=4, intermediate=1376)
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    return net, (ids,), {}, lambda out: out.logits


MODELS = {"minilm": _minilm, "llama": _llama}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setups():
    """model name -> (eager call, compiled call, compiled module), built on first use."""
    made = {}

    def get(name):
        if name not in made:
            net, args, kwargs, pick = MODELS[name]()
            cm = einfuse.compile(net, args, kwargs)
            with torch.no_grad():
                want, got = pick(net(*args, **kwargs)), pick(cm(*args, **kwargs))
            assert max_rel_error(got, want) <= 1e-4

            def eager():
                with torch.no_grad():
                    return net(*args, **kwargs)

            made[name] = (eager, lambda: cm(*args, **kwargs), cm)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_eager(benchmark, setups, name):
    benchmark.group = name
    eager, _, _ = setups(name)
    benchmark.pedantic(eager, rounds=CALLS[name], iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("name", list(MODELS))
def test_einfuse_default_backend(benchmark, setups, name):
    benchmark.group = name
    _, compiled, cm = setups(name)
    if not torch.cuda.is_available():
        assert cm.variant.backend == "torch"
    benchmark.pedantic(compiled, rounds=CALLS[name], iterations=1, warmup_rounds=2)


def interleaved(eager, compiled, calls: int) -> tuple[float, float]:
    """Median ms of `calls` eager and `calls` compiled calls, alternating."""
    te, tc = [], []
    for _ in range(calls):
        t = time.perf_counter()
        eager()
        te.append(time.perf_counter() - t)
        t = time.perf_counter()
        compiled()
        tc.append(time.perf_counter() - t)
    return statistics.median(te) * 1e3, statistics.median(tc) * 1e3


@pytest.mark.parametrize("name", list(MODELS))
def test_ratio(benchmark, setups, name):
    benchmark.group = name
    eager, compiled, cm = setups(name)
    for _ in range(2):  # warm up both
        eager(), compiled()
    rounds = [interleaved(eager, compiled, CALLS[name]) for _ in range(REPEATS)]
    ratio = statistics.median(c / e for e, c in rounds)
    numbers = {"backend": cm.variant.backend, "threads": torch.get_num_threads(),
               "eager_ms": statistics.median(e for e, _ in rounds),
               "compiled_ms": statistics.median(c for _, c in rounds), "ratio": ratio,
               "rounds": [(round(e, 2), round(c, 2)) for e, c in rounds]}
    benchmark.extra_info.update(numbers)
    print(f"\n{name}: {numbers}")
    benchmark.pedantic(compiled, rounds=1, iterations=1)
    assert ratio <= MAX_RATIO, numbers

"""Compile time against depth: `einfuse.compile` of a tiny Llama (hidden 64) with 2, 8 and 32 layers on a
fresh cache, beside torch.export alone, with and without a dump folder. Repeated layers are lowered,
optimized and generated once (frontend.blocks, passes.regions, codegen), so what einfuse adds to export
should grow with the distinct work, not the layer count. Targets: einfuse's own time (compile minus
export) at 32 layers <= 2x that at 2 layers; with dumps <= 1.2x without.

Run: `python -m pytest benchmarks/bench_compile_layers.py --benchmark-json out.json`; the ratios are in each
benchmark's extra_info and printed at the end; docs/PERFORMANCE.md records them.
"""
import os
import tempfile
import time

import pytest
import torch

import einfuse
from einfuse import models
from einfuse.frontend.capture import export

SEQ = 32
LAYERS = (2, 8, 32)
ROUNDS = 3
RESULTS: dict = {}


def _fresh():
    os.environ["EINFUSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="einfuse-bench-")
    import einfuse.runtime.triton_backend as tb

    tb._loaded.clear()


def _measure(net, ids, dump: bool) -> tuple[float, float]:
    """(export seconds, einfuse.compile seconds), each the minimum of ROUNDS on a fresh cache."""
    exports, compiles = [], []
    for _ in range(ROUNDS):
        _fresh()
        t = time.perf_counter()
        export(net, (ids,), {})
        exports.append(time.perf_counter() - t)
        _fresh()
        t = time.perf_counter()
        with torch.no_grad():
            einfuse.compile(net, (ids,), backend="triton", dump_dir=tempfile.mkdtemp() if dump else None)
        compiles.append(time.perf_counter() - t)
    return min(exports), min(compiles)


@pytest.mark.parametrize("dump", [False, True], ids=["no-dump", "dump"])
@pytest.mark.parametrize("layers", LAYERS)
def test_compile_time_against_depth(benchmark, layers, dump):
    net = models.tiny_llama(layers=layers)
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
    exp, comp = benchmark.pedantic(_measure, args=(net, ids, dump), rounds=1, iterations=1)
    RESULTS[(layers, dump)] = (exp, comp)
    benchmark.extra_info.update({"layers": layers, "dump": dump, "export_s": round(exp, 3),
                                 "compile_s": round(comp, 3), "einfuse_s": round(comp - exp, 3)})
    if (2, dump) in RESULTS and layers != 2:
        base = RESULTS[(2, dump)]
        benchmark.extra_info["einfuse_vs_2_layers"] = round((comp - exp) / (base[1] - base[0]), 2)
    if dump and (layers, False) in RESULTS:
        plain = RESULTS[(layers, False)]
        benchmark.extra_info["dump_vs_no_dump"] = round((comp - exp) / (plain[1] - plain[0]), 2)
    print(f"\nlayers {layers} dump {dump}: export {exp:.2f} s, compile {comp:.2f} s, einfuse {comp - exp:.2f} s",
          {k: v for k, v in benchmark.extra_info.items() if "vs" in k})

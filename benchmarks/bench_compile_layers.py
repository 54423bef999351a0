"""Compile time against depth: `einfuse.compile` of a tiny Llama (hidden 64) with 2, 8 and 32 layers on a
fresh cache, with and without a dump folder, split into the torch.export inside the call and the rest. Repeated layers are lowered,
optimized and generated once (frontend.blocks, passes.regions, codegen), so what einfuse adds to export
should grow with the distinct work, not the layer count. Targets: einfuse's own time (compile minus
export) at 32 layers <= 2x that at 2 layers; with dumps <= 1.2x without. The ratios use CPU seconds of the
process (one torch thread): on a shared machine wall time mostly measures the neighbours.

Run: `python -m pytest benchmarks/bench_compile_layers.py --benchmark-json out.json`; the ratios are in each
benchmark's extra_info and printed at the end; docs/PERFORMANCE.md records them.
"""
import os
import tempfile
import time

import pytest
import torch

import einfuse
from einfuse import api, models

SEQ = 32
LAYERS = (2, 8, 32)
ROUNDS = 5
RESULTS: dict = {}


def _fresh():
    os.environ["EINFUSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="einfuse-bench-")
    import einfuse.runtime.triton_backend as tb
    from einfuse.ir import index

    tb._loaded.clear()
    index.to_str.cache_clear()  # printed index expressions: every round prints afresh


class _ExportClock:
    """Times the torch.export calls made inside einfuse.compile (wall and CPU), so what einfuse adds is the
    same call's total minus its own export, not the difference of two separately timed runs (which a loaded
    machine turns into noise)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._real = api.export

        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return self._real(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - w
                self.cpu += time.process_time() - c

        api.export = timed
        return self

    def __exit__(self, *exc):
        api.export = self._real


def _measure(net, ids, dump: bool) -> dict:
    """Per round on a fresh cache: einfuse.compile's wall and CPU seconds and those of the export inside it;
    the round with the least einfuse CPU time is kept (CPU time: other processes on the machine do not
    count, which wall time cannot promise)."""
    best = None
    for _ in range(ROUNDS):
        _fresh()
        with _ExportClock() as clock, torch.no_grad():
            w, c = time.perf_counter(), time.process_time()
            einfuse.compile(net, (ids,), backend="triton", dump_dir=tempfile.mkdtemp() if dump else None)
            w, c = time.perf_counter() - w, time.process_time() - c
        r = {"compile_s": w, "export_s": clock.wall, "einfuse_s": w - clock.wall,
             "compile_cpu_s": c, "export_cpu_s": clock.cpu, "einfuse_cpu_s": c - clock.cpu}
        if best is None or r["einfuse_cpu_s"] < best["einfuse_cpu_s"]:
            best = r
    return best


@pytest.mark.parametrize("dump", [False, True], ids=["no-dump", "dump"])
@pytest.mark.parametrize("layers", LAYERS)
def test_compile_time_against_depth(benchmark, layers, dump):
    torch.set_num_threads(1)  # CPU time then means one core's work
    net = models.tiny_llama(layers=layers)
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
    r = benchmark.pedantic(_measure, args=(net, ids, dump), rounds=1, iterations=1)
    RESULTS[(layers, dump)] = r
    benchmark.extra_info.update({"layers": layers, "dump": dump, **{k: round(v, 3) for k, v in r.items()}})
    if (2, dump) in RESULTS and layers != 2:
        benchmark.extra_info["einfuse_vs_2_layers"] = round(r["einfuse_cpu_s"] / RESULTS[(2, dump)]["einfuse_cpu_s"], 2)
    if dump and (layers, False) in RESULTS:
        benchmark.extra_info["dump_vs_no_dump"] = round(r["einfuse_cpu_s"] / RESULTS[(layers, False)]["einfuse_cpu_s"], 2)
    print(f"\nlayers {layers} dump {dump}: compile {r['compile_s']:.2f} s (export inside {r['export_s']:.2f} s); "
          f"CPU: compile {r['compile_cpu_s']:.2f} s, export {r['export_cpu_s']:.2f} s, einfuse {r['einfuse_cpu_s']:.2f} s",
          {k: v for k, v in benchmark.extra_info.items() if "vs" in k})

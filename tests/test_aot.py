"""Generated kernels compile for real GPUs (sm_80 and sm_90a) without one: no errors, no spills, and
the contractions reach the tensor cores; results are cached on disk."""
import dataclasses
import json
import time
from pathlib import Path

import pytest
from conftest import float32_matmul_precision

from einfuse.codegen import aot, generate
from einfuse.ir import parse

MODULE = """\
module kernels
  in a: f32[128, 128]
  in b: f32[128, 128]
  in a16: bf16[128, 128]
  in b16: bf16[128, 128]
  in h: f16[128, 128]
  in n: i64[128]
  c[i, j]: f32[128, 128] = sum[r:128] a[i, r] * b[j, r]
  c16[i, j]: bf16[128, 128] = sum[r:128] f32(a16[i, r]) * f32(b16[j, r])
  e[i, j]: f16[128, 128] = where(a[i, j] > 0.0, exp(a[i, j]), f32(h[i, j]) * f32(n[j]))
  pos[i, j]: bool[128, 128] = a[i, j] > b[i, j]
  s[i]: f32[128] = sum[j:128] a[i, j] * a[i, j]
  run[p, m + 1]: f32[128, 129] = iterate[m:128, init=-inf] max(run[p, m], a[p, m])
  out c, c16, e, pos, s, run
"""

# the f32 matmul again under other names: it compiles to the same binary as `c`
RENAMED = """\
module renamed
  in x: f32[128, 128]
  in y: f32[128, 128]
  z[p, q]: f32[128, 128] = sum[k:128] x[p, k] * y[q, k]
  out z
"""

IEEE = """\
module ieee
  in a: f32[128, 128]
  in b: f32[128, 128]
  c_ieee[i, j]: f32[128, 128] = sum[r:128] a[i, r] * b[j, r]
  out c_ieee
"""


def kernels(text: str, precision: str) -> list:
    """The module's kernels, generated under a float32 matmul precision (restored afterwards)."""
    with float32_matmul_precision(precision):
        return generate(parse(text))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("aot-cache")


@pytest.fixture(scope="module")
def specs():
    return kernels(MODULE, "high") + kernels(RENAMED, "high") + kernels(IEEE, "highest")


@pytest.fixture(scope="module")
def cold(specs, cache_dir):
    """One compile of everything into an empty cache: (checks by (name, arch), seconds, compiles run)."""
    compiled = aot.stats.compiled
    start = time.perf_counter()
    checks = aot.check_gpu(specs, archs=(80, 90), cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    return {(c.name, c.arch): c for c in checks}, seconds, aot.stats.compiled - compiled


def test_every_kernel_compiles_without_spills(cold, specs):
    checks, _, _ = cold
    assert len(checks) == 2 * len(specs)
    for c in checks.values():
        assert c.ok, f"{c.name} on sm_{c.arch}:\n{c.error}"
        assert c.spills == 0 and c.registers <= 255, c
        assert c.shared_bytes <= 227 * 1024, c


def test_contractions_use_tensor_cores(cold, specs):
    checks, _, _ = cold
    by_name = {s.name: s for s in specs}
    for name in ("k0_c", "k1_c16"):
        tiles = dict(by_name[name].mapping.tiles)
        assert by_name[name].mapping.kind == "dot" and tiles["BLOCK_M"] == tiles["BLOCK_N"] == 64
        assert checks[(name, 80)].tensor_core and checks[(name, 90)].tensor_core  # mma.sync, wgmma
    assert by_name["k0_c"].mapping.input_precision == "tf32"
    # "highest" asks for IEEE f32 products, which tensor cores do not compute
    assert by_name["k0_c_ieee"].mapping.input_precision == "ieee"
    assert not checks[("k0_c_ieee", 80)].tensor_core and not checks[("k0_c_ieee", 90)].tensor_core
    for name in ("k2_e", "k3_pos", "k4_s", "k5_run"):
        assert not checks[(name, 80)].tensor_core and not checks[(name, 90)].tensor_core


def test_kernels_differing_in_names_compile_once(cold, specs):
    checks, _, compiled = cold
    assert checks[("k0_z", 80)].key == checks[("k0_c", 80)].key
    assert checks[("k0_z", 90)].registers == checks[("k0_c", 90)].registers
    assert compiled == 2 * len({c.key for c in checks.values()}) == 2 * (len(specs) - 1)


def test_second_call_reads_the_cache(cold, specs, cache_dir):
    checks, cold_seconds, _ = cold
    hits, compiled = aot.stats.hits, aot.stats.compiled
    start = time.perf_counter()
    again = aot.check_gpu(specs, archs=(80, 90), cache_dir=cache_dir)
    warm_seconds = time.perf_counter() - start
    assert aot.stats.compiled == compiled and aot.stats.hits - hits == 2 * (len(specs) - 1)
    assert {(c.name, c.arch): c for c in again} == checks
    assert warm_seconds < min(1.0, cold_seconds / 5)


def test_corrupt_cache_file_is_recompiled(cold, specs, cache_dir):
    checks, _, _ = cold
    spec = next(s for s in specs if s.name == "k4_s")
    path = aot.result_path(cache_dir, checks[("k4_s", 80)].key, 80)
    path.write_text('{"ok": tru')
    compiled = aot.stats.compiled
    (again,) = aot.check_gpu([spec], archs=(80,), cache_dir=cache_dir)
    assert aot.stats.compiled == compiled + 1
    assert again == checks[("k4_s", 80)]
    assert json.loads(path.read_text())["ok"] is True


def test_failures_are_reported_not_raised(specs, tmp_path):
    spec = next(s for s in specs if s.name == "k4_s")
    broken = dataclasses.replace(spec, source=spec.source.replace("tl.full(", "tl.fulll("))
    crashing = dataclasses.replace(spec, source="import os\nos._exit(3)\n")
    bad, dead = aot.check_gpu([broken, crashing], archs=(80,), cache_dir=tmp_path)
    assert not bad.ok and "fulll" in bad.error and bad.registers is None
    assert not dead.ok and "exited with status 3" in dead.error
    cached = {p.name for p in Path(aot.result_cache(tmp_path).dir).iterdir()}
    assert cached == {aot.result_key(bad.key, 80)}  # a compile error is cached; a dead worker is not


LIBM = """\
module libm
  in x: f32[64]
  in y: f32[64]
  a[i]: f32[64] = tanh(x[i]) + log1p(x[i]) + expm1(y[i]) + tan(x[i])
  b[i]: f32[64] = atan2(x[i], y[i]) + pow(x[i], y[i]) + round(x[i]) + trunc(y[i])
  out a, b
"""


def test_libm_functions_compile(tmp_path):
    checks = aot.check_gpu(generate(parse(LIBM)), archs=(80, 90), cache_dir=tmp_path)
    assert all(c.ok for c in checks), "\n".join(c.error for c in checks if not c.ok)


def test_serving_kernels_compile_for_gpus(fresh_einfuse_cache):
    """The kernels serving adds — cache writes (update) and attention reading K/V through a block table —
    of a tiny Llama's prefill and decode programs compile for sm_80 and sm_90a without spills."""
    from einfuse.api import compile_cached
    from einfuse.models import tiny_llama

    programs = compile_cached(tiny_llama(seed=0), block_size=16, backend="triton")
    checks = programs.check_gpu(archs=(80, 90), kinds=("update", "attention"))
    kinds = {s.mapping.kind for s in programs.kernels()}
    assert {"update", "attention"} <= kinds
    assert len(checks) >= 2 * 3  # K and V writes and the attention, for each arch
    bad = [(c.name, c.arch, c.error or c.spills) for c in checks if not c.ok or c.spills]
    assert not bad, bad

"""The disk cache (EINFUSE_CACHE_DIR): a warm compile skips lowering, passes and kernel generation; a
corrupted entry is detected by its checksums and rebuilt; two processes compiling the same model into
the same empty cache at the same moment both succeed and agree."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import einfuse
from einfuse.codegen.cache import ENTRY, Cache
from einfuse.passes.instruments import max_rel_error


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty cache for every test: each one controls exactly what is in it."""
    path = tmp_path / "cache"
    monkeypatch.setenv("EINFUSE_CACHE_DIR", str(path))
    for var in ("EINFUSE_BACKEND", "EINFUSE_DUMP_DIR", "EINFUSE_CHECK"):
        monkeypatch.delenv(var, raising=False)
    return path


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8),
                               torch.nn.Softmax(-1)).eval()


def entries(cache_dir: Path, namespace: str) -> list[Path]:
    return sorted(p for p in (cache_dir / namespace).iterdir() if p.is_dir())


def assert_every_entry_valid(cache_dir: Path) -> None:
    for namespace in ("modules", "kernels"):
        for entry in entries(cache_dir, namespace):
            assert Cache(namespace, str(cache_dir)).get(entry.name) is not None, f"{namespace}/{entry.name} is corrupt"
    leftovers = [p for p in cache_dir.rglob(".tmp-*")]
    assert not leftovers, leftovers


def test_warm_compile_hits_both_caches(cache_dir):
    model, x, fresh = net(), torch.randn(4, 16), torch.randn(4, 16)
    cold = einfuse.compile(model, (x,), backend="triton")
    assert cold.variant.timings[0]["pass"] == "lower" and not cold.variant.run.cache_hit
    assert len(entries(cache_dir, "modules")) == 1 and len(entries(cache_dir, "kernels")) == 1
    warm = einfuse.compile(model, (x,), backend="triton")
    assert warm.variant.timings[0]["pass"] == "pipeline cache hit"
    assert warm.variant.run.cache_hit
    assert warm.ir == cold.ir
    assert [s.source for s in warm.variant.run.specs] == [s.source for s in cold.variant.run.specs]
    with torch.no_grad():
        want = model(fresh)
    assert torch.equal(warm(fresh), cold(fresh))
    assert max_rel_error(warm(fresh), want) <= 1e-5


CORRUPTIONS = {
    "kernel source": ("kernels", lambda d: sorted(d.glob("k*.py"))[0], lambda b: b.replace(b"tl.", b"tk.", 1)),
    "kernel index": ("kernels", lambda d: d / "index.json", lambda b: b[: len(b) // 2]),
    "module IR": ("modules", lambda d: d / "module.ir", lambda b: b.replace(b"=", b"+", 1)),
    "checksums": ("modules", lambda d: d / ENTRY, lambda b: b"{"),
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_corrupted_entry_is_rebuilt(cache_dir, what):
    namespace, pick, damage = CORRUPTIONS[what]
    model, x, fresh = net(), torch.randn(4, 16), torch.randn(4, 16)
    einfuse.compile(model, (x,), backend="triton")
    (entry,) = entries(cache_dir, namespace)
    target = pick(entry)
    good = target.read_bytes()
    target.write_bytes(damage(good))
    assert target.read_bytes() != good

    again = einfuse.compile(model, (x,), backend="triton")
    rebuilt_pipeline = again.variant.timings[0]["pass"] == "lower"
    rebuilt_kernels = not again.variant.run.cache_hit
    assert (rebuilt_pipeline, rebuilt_kernels) == (namespace == "modules", namespace == "kernels")
    assert target.read_bytes() == good  # written back whole
    assert_every_entry_valid(cache_dir)
    with torch.no_grad():
        want = model(fresh)
    assert max_rel_error(again(fresh), want) <= 1e-5

    third = einfuse.compile(model, (x,), backend="triton")  # and it is a hit again
    assert third.variant.timings[0]["pass"] == "pipeline cache hit" and third.variant.run.cache_hit


def test_torch_compile_goes_through_the_same_driver(cache_dir, tmp_path, monkeypatch):
    """torch.compile(backend="einfuse") honours EINFUSE_DUMP_DIR and EINFUSE_CHECK, and a warm start hits the
    pipeline and kernel caches, exactly as einfuse.compile does."""
    from einfuse.frontend.dynamo import COMPILED

    model, x, fresh = net(), torch.randn(4, 16), torch.randn(4, 16)
    dumps = tmp_path / "dumps"
    monkeypatch.setenv("EINFUSE_DUMP_DIR", str(dumps))
    monkeypatch.setenv("EINFUSE_CHECK", "1")
    monkeypatch.setenv("EINFUSE_BACKEND", "triton")  # the Triton kernels are what this test looks for
    with torch.no_grad():
        want = model(fresh)
        got = torch.compile(model, backend="einfuse")(fresh)
    assert max_rel_error(got, want) <= 1e-5
    cold = COMPILED[-1]
    graph_dir = Path(cold.dump_dir)
    assert graph_dir.parent == dumps and graph_dir.name.startswith("dynamo_")
    irs = sorted(f.name for f in graph_dir.glob("*.ir"))
    assert irs[0] == "00_lower.ir" and len(irs) == len(cold.timings), irs
    assert sorted(graph_dir.glob("kernels/*.py")), "no Triton kernels written beside the dumps"
    checked = [t for t in cold.timings[1:] if "max_rel_error" in t]
    assert len(checked) == len(cold.timings) - 1 and all(t["max_rel_error"] <= 1e-5 for t in checked), cold.timings
    assert cold.timings[0]["pass"] == "lower"

    monkeypatch.delenv("EINFUSE_DUMP_DIR")
    monkeypatch.delenv("EINFUSE_CHECK")
    torch._dynamo.reset()
    with torch.no_grad():
        again = torch.compile(model, backend="einfuse")(fresh)
    warm = COMPILED[-1]
    assert warm is not cold and warm.timings[0]["pass"] == "pipeline cache hit"
    assert warm.run.cache_hit and warm.ir == cold.ir
    assert torch.equal(again, got)


WORKER = """\
import sys, time
from pathlib import Path

import torch

import einfuse
from einfuse.models import tiny_llama

here, me = Path(sys.argv[1]), sys.argv[2]
model = tiny_llama()
g = torch.Generator().manual_seed(0)
ids, fresh = torch.randint(0, 256, (2, 8), generator=g), torch.randint(0, 256, (2, 8), generator=g)
(here / f"ready_{me}").touch()
deadline = time.time() + 120
while not (here / "go").exists():  # start compiling together with the other process
    assert time.time() < deadline, "never told to go"
    time.sleep(0.005)
cm = einfuse.compile(model, (ids,), backend="triton")
out = cm(fresh).logits
torch.save({"logits": out, "fresh": fresh, "pipeline": cm.variant.timings[0]["pass"],
            "kernels_hit": cm.variant.run.cache_hit}, here / f"out_{me}.pt")
"""


def test_two_processes_compile_the_same_model_at_once(cache_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "EINFUSE_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(n)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    try:
        deadline = time.time() + 180
        while not all((tmp_path / f"ready_{n}").exists() for n in (0, 1)):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.time() < deadline, "workers did not start"
            time.sleep(0.01)
        (tmp_path / "go").touch()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    first, second = (torch.load(tmp_path / f"out_{n}.pt") for n in (0, 1))
    assert torch.equal(first["logits"], second["logits"])
    assert_every_entry_valid(cache_dir)
    assert len(entries(cache_dir, "modules")) == 1 and len(entries(cache_dir, "kernels")) == 1
    from einfuse.models import tiny_llama

    with torch.no_grad():
        want = tiny_llama()(first["fresh"]).logits
    assert max_rel_error(first["logits"], want) <= 1e-4
    # what both wrote serves a third process from the cache (a process: its keys hash the same source)
    third = subprocess.run([sys.executable, str(script), str(tmp_path), "2"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    again = torch.load(tmp_path / "out_2.pt")
    assert (again["pipeline"], again["kernels_hit"]) == ("pipeline cache hit", True)
    assert torch.equal(again["logits"], first["logits"])
    print("two processes:", {n: (r["pipeline"], r["kernels_hit"]) for n, r in enumerate((first, second))})

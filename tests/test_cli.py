"""The `einfuse` command, run as a user runs it: `report` and `check-gpu` on a model file, and `demo`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODEL_FILE = """\
import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
example_inputs = (torch.randn(64, 16),)
"""


def einfuse_command() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("einfuse")
    return [str(script)] if script.exists() else [sys.executable, "-m", "einfuse.cli"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The three commands, started together (each is mostly its own interpreter start-up and compile)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "tiny.py").write_text(MODEL_FILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EINFUSE_")}
    env.update(EINFUSE_CACHE_DIR=str(tmp / "cache"), HF_HUB_OFFLINE="1")
    commands = {
        "report": ["report", str(tmp / "tiny.py"), "--dump-dir", str(tmp / "report_dump")],
        "check-gpu": ["check-gpu", str(tmp / "tiny.py")],
        "demo": ["demo", "--dump-dir", str(tmp / "demo_dump")],
    }
    procs = {name: subprocess.Popen(einfuse_command() + args, cwd=tmp, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, args in commands.items()}
    try:
        out = {name: (p.communicate(timeout=600), p.returncode) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return {"tmp": tmp, **{name: {"stdout": o, "stderr": e, "rc": rc} for name, ((o, e), rc) in out.items()}}


def ok(run: dict) -> str:
    assert run["rc"] == 0, f"exit {run['rc']}\n{run['stdout'][-2000:]}\n{run['stderr'][-3000:]}"
    return run["stdout"]


def test_report_prints_the_traffic_table(runs):
    out = ok(runs["report"])
    header = next(line for line in out.splitlines() if line.startswith("kernel"))
    assert header.split() == ["kernel", "loaded", "stored", "distinct", "FLOPs", "FLOP/B", "model", "us"]
    assert "minimum bytes" in out and "roofline model for H100" in out
    dump = runs["tmp"] / "report_dump"
    assert json.loads((dump / "report.json").read_text())["kernels"]
    assert (dump / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_gpu_prints_a_row_per_kernel_and_arch(runs):
    out = ok(runs["check-gpu"])
    lines = out.splitlines()
    assert lines[0].split() == ["kernel", "arch", "ok", "regs", "spills", "smem", "tensor", "core"]
    rows = [line.split() for line in lines[1:] if line.strip()]
    assert rows and {r[1] for r in rows} == {"sm_80", "sm_90a"} and len(rows) % 2 == 0
    assert all(r[2] == "yes" and r[4] == "0" for r in rows), out


def test_demo_writes_kernels_report_and_plot(runs):
    out = ok(runs["demo"])
    assert "max relative error" in out and "OK" in out
    dump = runs["tmp"] / "demo_dump"
    kernels = sorted((dump / "kernels").glob("*.py"))
    assert kernels and all("@triton.jit" in k.read_text() for k in kernels)
    report = json.loads((dump / "report.json").read_text())
    assert report["kernels"] and report["unique_bytes"] > 0
    assert (dump / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(dump.glob("*.ir"))

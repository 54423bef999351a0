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

DATA_DEPENDENT = """\
import torch


class Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # torch.export cannot capture a branch on a value
            return x * 2
        return x - 1


model = Branchy().eval()
example_inputs = (torch.randn(8),)
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
    env.update(EINFUSE_CACHE_DIR=str(tmp / "cache"), HF_HUB_OFFLINE="1", EINFUSE_BACKEND="triton")
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
    assert header.split() == ["kernel", "loaded", "stored", "distinct", "FLOPs", "FLOP/B", "peak", "model", "us"]
    assert "minimum bytes" in out and "roofline model for H100" in out and "FLOPs per distinct byte" in out
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


# ---------------------------------------------------------------- errors and messages (in this process: quick)

@pytest.fixture
def cli(tmp_path, capfd, monkeypatch, fresh_einfuse_cache):
    """Run `einfuse ARGS` in this process: (exit code, stdout, stderr) as the terminal would show them."""
    from einfuse.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(MODEL_FILE)
    (tmp_path / "branchy.py").write_text(DATA_DEPENDENT)

    def run(*args):
        capfd.readouterr()
        rc = main(list(args))
        out, err = capfd.readouterr()
        return rc, out, err

    return run


@pytest.mark.parametrize("command", ["parse", "compile", "report", "check-gpu"])
def test_missing_file_is_one_line_and_exit_code_2(cli, command):
    name = "missing.ir" if command == "parse" else "missing.py"
    rc, out, err = cli(command, name)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("einfuse: ") and name in lines[0], err[-2000:]


def test_report_of_a_model_that_runs_eagerly_says_why(cli):
    rc, out, err = cli("report", "branchy.py", "--dump-dir", "dump")
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]  # no traceback, no torch log
    assert lines[0].startswith("einfuse: no report") and "eager PyTorch" in lines[0] and "torch.export" in lines[0]


def test_compile_check_says_the_check_ran_and_passed(cli):
    rc, out, err = cli("compile", "tiny.py", "--check", "--backend", "reference", "--dump-dir", "dump")
    assert rc == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("numeric check:"))
    assert "passed" in line and "ran after each of" in line, out

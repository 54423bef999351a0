"""Pipeline instruments: timing, verification, per-pass IR dumps and the per-pass numeric check."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch

from ..ir.evaluator import TOLERANCE, evaluate, max_rel_error, random_inputs
from ..ir.module import Module
from ..ir.verify import VerifyError, verify
from .base import Instrument, Pass, PassError


@dataclass
class Timing(Instrument):
    """Collects (pass, milliseconds, statements after) for every pass."""

    records: list = field(default_factory=list)

    def after(self, p, before, after, ms, index):
        self.records.append({"index": index, "pass": p.pass_name, "ms": round(ms, 3),
                             "statements": len(after.body)})


class Verify(Instrument):
    """Runs the verifier on the input and after every pass; a failure names the pass."""

    def start(self, module):
        verify(module)

    def after(self, p, before, after, ms, index):
        try:
            verify(after, since=before)
        except VerifyError as e:
            raise PassError(p.pass_name, f"produced an invalid module: {e}") from None


DUMP_NOTES: list = []  # functions module -> [line]: what analyses add to every dump's header


def register_dump_note(fn):
    """Add `fn(module) -> list[str]` to the header of every IR dump (e.g. the attention pass's count of
    passes over the key rank). Keep it cheap: it runs after every pass when dumps are on."""
    if fn not in DUMP_NOTES:
        DUMP_NOTES.append(fn)
    return fn


def dump_header(label: str, ms: float | None, statements: int, notes: list) -> str:
    """Which pass made the dump, how long it took, its size, and what registered notes say about it."""
    timing = f" · {ms:.2f} ms" if ms is not None else ""
    lines = [f"# einfuse IR after {label}{timing} · {statements} statements"] + [f"# {line}" for line in notes]
    return "\n".join(lines) + "\n"


def module_notes(module: Module) -> list:
    return [line for note in DUMP_NOTES for line in note(module)]


class Dump(Instrument):
    """Writes `00_<first>.ir`, then `NN_<pass>.ir` after every pass, and `timings.json` at the end."""

    def __init__(self, directory: str, first: str = "lower", first_ms: float | None = None):
        self.dir, self.first, self.first_ms = directory, first, first_ms
        self.timings: list = []

    def _write(self, index: int, label: str, ms, module: Module):
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"{index:02d}_{label}.ir")
        with open(path, "w") as f:
            f.write(dump_header(f"pass {label!r}" if index else label, ms, len(module.body), module_notes(module))
                    + str(module))

    def start(self, module):
        if os.path.isdir(self.dir):  # stale dumps from an earlier pipeline would mislead
            for f in os.listdir(self.dir):
                if f.endswith(".ir") and f[:2].isdigit():
                    os.remove(os.path.join(self.dir, f))
        self._write(0, self.first, self.first_ms, module)
        self.timings.append({"index": 0, "pass": self.first, "ms": self.first_ms, "statements": len(module.body)})

    def after(self, p, before, after, ms, index):
        self._write(index, p.pass_name, ms, after)
        self.timings.append({"index": index, "pass": p.pass_name, "ms": round(ms, 3), "statements": len(after.body)})

    def finish(self, module):
        with open(os.path.join(self.dir, "timings.json"), "w") as f:
            json.dump(self.timings, f, indent=1)


class PrintAfter(Instrument):
    """Prints the module after the named passes (all when `names` is empty), like print-after-all."""

    def __init__(self, *names: str, stream=None):
        self.names, self.stream = set(names), stream or sys.stdout

    def after(self, p, before, after, ms, index):
        if not self.names or p.pass_name in self.names:
            self.stream.write(dump_header(f"pass {p.pass_name!r}", ms, len(after.body), module_notes(after)) + str(after)
                              + "\n")


class PassNumericsError(PassError):
    """A pass changed the module's results beyond tolerance."""


class NumericCheck(Instrument):
    """Runs the reference evaluator before and after every pass on the same fresh random inputs and
    names the first pass whose outputs differ beyond the tolerance of their dtype."""

    def __init__(self, like: dict | None = None, seed: int = 1234, tolerance: dict | None = None):
        self.like, self.seed = like or {}, seed
        self.tolerance = {**TOLERANCE, **(tolerance or {})}
        self.inputs: dict | None = None
        self.reference: dict | None = None
        self.errors: list = []

    def start(self, module):
        self.inputs = random_inputs(module, like=self.like, seed=self.seed)
        self.reference = self._run(module)

    def _run(self, module):
        with torch.no_grad():
            out = evaluate(module, self.inputs)
        return [out[n] for n in module.outputs]

    def after(self, p: Pass, before, after, ms, index):
        got = self._run(after)
        if len(got) != len(self.reference):
            raise PassNumericsError(p.pass_name, f"changed the number of outputs {len(self.reference)} -> {len(got)}")
        worst = 0.0
        for name, g, w in zip(after.outputs, got, self.reference):
            err = max_rel_error(g, w)
            tol = self.tolerance.get(w.dtype, 0.0)
            worst = max(worst, err)
            if err > tol:
                raise PassNumericsError(
                    p.pass_name, f"changed output {name!r} by {err:.3g} (relative to its largest value; "
                    f"tolerance for {w.dtype} is {tol:g})")
        self.errors.append({"pass": p.pass_name, "max_rel_error": worst})
        self.reference = got

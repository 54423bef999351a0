"""Codegen: one Triton kernel per kernel group (today: per statement), readable and cached."""
from __future__ import annotations

from ..ir.module import Module, Statement
from .kernel import Arg, KernelSpec, Mapping
from .mapping import choose
from .triton_gen import KernelGen


def ir_line(m: Module, index: int) -> int:
    """The line of body entry `index` in the module's printed text."""
    return 2 + len(m.sizes) + len(m.inputs) + index


def generate(m: Module, mappings: dict | None = None) -> list[KernelSpec]:
    """A kernel per statement (opaque calls stay with torch), in body order."""
    out = []
    for n, op in enumerate(m.body):
        if not isinstance(op, Statement):
            continue
        mapping = (mappings or {}).get(op.name) or choose(m, op)
        name = f"k{len(out)}_{op.name}"[:60]
        out.append(KernelGen(m, op, name, ir_line(m, n)).generate(mapping))
    return out


__all__ = ["Arg", "KernelSpec", "Mapping", "generate", "ir_line"]

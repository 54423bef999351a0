"""Codegen: one Triton kernel per kernel group (or per ungrouped statement), readable and cached."""
from __future__ import annotations

import logging

from ..ir.module import Module, Statement
from .groups import GroupGen, GroupUnsupported, group_mapping
from .kernel import Arg, KernelSpec, Mapping
from .mapping import choose
from .triton_gen import KernelGen

log = logging.getLogger("einfuse")


def ir_line(m: Module, index: int) -> int:
    """The line of body entry `index` in the module's printed text."""
    return 2 + len(m.sizes) + len(m.inputs) + index


def generate(m: Module, mappings: dict | None = None) -> list[KernelSpec]:
    """A kernel per kernel group and per statement in no group (opaque calls stay with torch), in body
    order. A group the generator cannot emit as one kernel falls back to a kernel per member."""
    out = []
    groups = m.group_of()
    done: set = set()
    for n, op in enumerate(m.body):
        if not isinstance(op, Statement) or op.name in done:
            continue
        group = groups.get(op.name)
        if group is not None:
            try:
                gen = GroupGen(m, group, f"k{len(out)}_{group.name}"[:60], ir_line(m, n))
                out.append(gen.generate_group(group_mapping(m, group, gen)))
                done |= set(group.members)
                continue
            except GroupUnsupported as why:
                log.info("einfuse: kernel group %s runs as separate kernels: %s", group.name, why)
                groups = {k: g for k, g in groups.items() if g is not group}
        mapping = (mappings or {}).get(op.name) or choose(m, op)
        name = f"k{len(out)}_{op.name}"[:60]
        out.append(KernelGen(m, op, name, ir_line(m, n)).generate(mapping))
    return out


__all__ = ["Arg", "KernelSpec", "Mapping", "generate", "ir_line"]

"""Codegen: one Triton kernel per kernel group (or per statement in no group), each emitted by its kernel
kind; opaque calls stay with torch. Kernels are readable and cached (see codegen.cache)."""
from __future__ import annotations

import logging

from ..ir.expr import Access, Call, Const, Expr
from ..ir.module import Kernel, Module, Opaque, Statement, Update
from ..kinds import Arg, Cost, Group, KernelSpec, Mapping, ModuleInfo, Unsupported, kind_named, single, statement_kind
from ..kinds.dot import float32_precision

log = logging.getLogger("einfuse")


def _units(m: Module, info: ModuleInfo) -> list:
    """The kernels of a module in body order: (Kernel, kind) per kernel group and per statement in no group."""
    groups = m.group_of()
    out, done = [], set()
    for op in m.body:
        if isinstance(op, Opaque) or op.name in done:
            continue
        k = groups.get(op.name)
        if k is not None:
            out.append(k)
            done |= set(k.members)
        else:
            out.append(single(m, op, statement_kind(m, op)))
    return out


def group_for(m: Module, kernel: Kernel, name: str, info: ModuleInfo | None = None) -> Group:
    return Group(info or ModuleInfo(m), kernel, name)


def _expr_key(e: Expr, name) -> tuple:
    """An expression as a hashable tuple with tensor names replaced by `name(tensor)`."""
    if isinstance(e, Access):
        return ("a", name(e.tensor), tuple(_expr_key(p, name) if isinstance(p, Expr) else p for p in e.indices))
    if isinstance(e, Call):
        return ("f", e.op, e.attr, tuple(_expr_key(a, name) for a in e.args))
    if isinstance(e, Const):
        return ("c", e.key())
    return ("i", e.expr)


def structure(info: ModuleInfo, k: Kernel, stored: set) -> tuple[tuple, list]:
    """What a kernel's code depends on, with tensor names replaced by their order of first appearance:
    kernels of equal structure (the same layer of a model, once per layer) are one kernel launched with
    other tensors. Returns (key, the tensor names in that order)."""
    order: dict = {}

    def name(n: str) -> int:
        return order.setdefault(n, len(order))

    for n in k.members:
        name(n)
    parts = [k.kind, k.roles, k.attrs]
    for n in k.members:
        s = info.producers[n]
        if isinstance(s, Update):
            index = tuple(_expr_key(p, name) if isinstance(p, Expr) else p for p in s.index)
            parts.append((name(s.name), name(s.target), index, s.ranks, _expr_key(s.expr, name)))
            continue
        parts.append((name(s.name), s.type, s.index, s.reduce, s.iterate, _expr_key(s.expr, name), n in stored))
    parts.append(tuple(info.types[n] for n in order))
    return tuple(parts), list(order)


def generate(m: Module, mappings: dict | None = None) -> list[KernelSpec]:
    """A kernel per kernel group and per statement in no group, in body order. `mappings` (kernel or
    statement name -> Mapping) overrides a kind's choice. A group its kind cannot emit as one kernel
    falls back to a kernel per member (logged). A kernel of the same structure as an earlier one (the
    next layer of a model) reuses its code with its own tensors."""
    info = ModuleInfo(m)
    out = []
    made: dict = {}  # structure -> (spec, tensor names in order)
    pending = _units(m, info)
    while pending:
        k = pending.pop(0)
        kind = kind_named(k.kind)
        g = Group(info, k, f"k{len(out)}_{k.name}"[:60])
        key, names = structure(info, k, g.stored) if not mappings else (None, None)
        if key is not None and key in made:
            spec, first = made[key]
            refs = dict(zip(first, names))
            out.append(spec.instance(tuple(k.members), tuple(refs[o] for o in spec.outputs), refs))
            continue
        try:
            mapping = (mappings or {}).get(k.name) or kind.mapping(g)
            spec = kind.emit(g, mapping)
        except Unsupported as why:
            if len(k.members) == 1:
                raise Unsupported(f"einfuse: kernel kind {k.kind!r} cannot emit statement {k.members[0]!r}: {why}") from why
            log.info("einfuse: kernel group %s runs as separate kernels: %s", k.name, why)
            prod = info.producers
            pending[:0] = [single(m, prod[n], statement_kind(m, prod[n])) for n in k.members]
            continue
        if key is not None:
            made[key] = (spec, names)
        out.append(spec)
    return out


def _group_of_spec(m: Module, spec: KernelSpec, info: ModuleInfo | None = None) -> Group:
    groups = m.group_of()
    first = spec.statements[0]
    k = groups.get(first)
    if k is None or list(k.members) != list(spec.statements):
        s = (info or ModuleInfo(m)).producers[first]
        k = single(m, s, kind_named(spec.kind))
    return Group(info or ModuleInfo(m), k, spec.name)


def candidates(m: Module, spec: KernelSpec) -> list[KernelSpec]:
    """Whole-kernel alternatives of `spec` (same kind, same group, other tilings) for autotuning; the first
    is `spec`'s own tiling."""
    g = _group_of_spec(m, spec)
    kind = kind_named(spec.kind)
    out = []
    for mp in kind.candidates(g):
        out.append(spec if mp == spec.mapping else kind.emit(g, mp))
    if all(c is not spec for c in out):
        out.insert(0, spec)
    return out


def cost(m: Module, spec: KernelSpec, sizes: dict | None = None, info: ModuleInfo | None = None) -> Cost:
    """What the kernel's kind says it computes and must move (FLOPs from the IR, minimum bytes)."""
    return kind_named(spec.kind).cost(_group_of_spec(m, spec, info), sizes)


def ir_line(m: Module, index: int) -> int:
    """The line of body entry `index` in the module's printed text."""
    return 2 + len(m.sizes) + len(m.inputs) + index


__all__ = ["Arg", "KernelSpec", "Mapping", "ModuleInfo", "candidates", "cost", "float32_precision", "generate",
           "group_for", "ir_line"]

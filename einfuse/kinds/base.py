"""Kernel kinds: one object per loop structure that owns which statements it may group, the named roles
of its members, its tiling and autotuning candidates, its cost for reports and its code emission.

Fusion rules ask a kind whether it can take a group (`group_roles`); codegen asks it for a mapping and
the kernel (`mapping`, `emit`); the autotuner for whole-group alternatives (`candidates`); reports for
FLOPs and bytes (`cost`); dumps for a line about a kernel (`describe`). A new kind is one module that
subclasses `KernelKind` and calls `register_kind` (see examples/custom_kernel_kind.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import sympy

from ..ir import index as ix
from ..ir.cost import statement_flops
from ..ir.expr import substitute
from ..ir.module import Iterate, Kernel, Module, Reduce, Statement
from .spec import KernelSpec, Mapping


class Unsupported(Exception):
    """A kind cannot emit this group as one kernel: codegen gives its members kernels of their own."""


@dataclass
class ModuleInfo:
    """What every kernel of a module needs about the module, computed once per module."""

    module: Module

    @cached_property
    def types(self) -> dict:
        return self.module.types()

    @cached_property
    def producers(self) -> dict:
        return self.module.producers()

    @cached_property
    def users(self) -> dict:
        return self.module.users()

    @cached_property
    def lines(self) -> dict:
        """Statement name -> its line in the module's printed text."""
        first = 2 + len(self.module.sizes) + len(self.module.inputs)
        return {op.outputs[0]: first + n for n, op in enumerate(self.module.body)}

    @cached_property
    def hints(self) -> dict:
        return {s: int(v) for s, v in self.module.size_hints}

    def dtype_of(self, name: str):
        return self.types[name].dtype

    def hint(self, e, default: int = 1024) -> int:
        """An example value of a (possibly symbolic) size expression."""
        v = sympy.sympify(e).xreplace({k: sympy.Integer(x) for k, x in self.hints.items()})
        return int(v) if v.is_Integer else default


@dataclass
class Group:
    """One kernel to emit: a kernel group, or a statement in no group (a group of one)."""

    info: ModuleInfo
    kernel: Kernel
    name: str  # the @triton.jit function's name

    @property
    def module(self) -> Module:
        return self.info.module

    @cached_property
    def statements(self) -> list[Statement]:
        return [self.info.producers[n] for n in self.kernel.members]

    @cached_property
    def stored(self) -> set:
        """Members read outside the group, or module outputs: the ones the kernel writes to memory."""
        inside = set(self.kernel.members)
        users, outputs = self.info.users, set(self.module.outputs)
        return {n for n in inside if n in outputs or any(u.outputs[0] not in inside for u in users.get(n, []))}

    @property
    def line(self) -> int:
        return self.info.lines[self.kernel.members[0]]

    def role(self, role: str) -> Statement:
        return self.info.producers[self.kernel.member(role)]

    def with_role(self, role: str) -> list[Statement]:
        return [self.info.producers[n] for n in self.kernel.with_role(role)]


@dataclass
class Cost:
    """What a kernel computes and the least it must move: FLOPs from the IR; bytes of the tensors it
    reads from outside (each once) and of the ones it stores."""

    flops: int
    min_bytes: int
    detail: dict = field(default_factory=dict)


class KernelKind:
    """Subclass, set `name` (and `roles`), implement `mapping` and `emit`; `register_kind(MyKind())`."""

    name: str = ""
    roles: tuple = ()  # the roles its members carry in the IR text
    priority: int = 0  # which kind claims a statement in no group first (higher first)

    def claims(self, m: Module, s: Statement) -> bool:
        """Whether a statement in no group runs as a kernel of this kind."""
        return False

    def group_roles(self, m: Module, members: list[str]) -> tuple | None:
        """The roles of `members` (statement names, body order) if this kind can emit them as one kernel;
        None if it cannot. Fusion rules ask this before two groups merge."""
        return None

    def mapping(self, g: Group) -> Mapping:
        raise NotImplementedError(f"kernel kind {self.name!r}: mapping")

    def candidates(self, g: Group) -> list[Mapping]:
        """Alternative tilings of the whole group for autotuning; the default mapping first."""
        return [self.mapping(g)]

    def emit(self, g: Group, mapping: Mapping) -> KernelSpec:
        raise NotImplementedError(f"kernel kind {self.name!r}: emit")

    def cost(self, g: Group, sizes: dict | None = None) -> Cost:
        """FLOPs of every member (a contraction counts 2*M*N*K) and the minimum bytes of the kernel."""
        sizes = sizes or {}
        flops = sum(statement_flops(s, sizes) for s in g.statements)
        inside = set(g.kernel.members)
        reads = {r for s in g.statements for r in s.reads()} - inside
        moved = [g.info.types[n] for n in reads] + [g.info.types[n] for n in g.stored]
        nbytes = 0
        for t in moved:
            numel = sympy.sympify(t.numel()).xreplace({k: sympy.Integer(v) for k, v in sizes.items()})
            nbytes += (int(numel) * t.dtype.bits + 7) // 8 if numel.is_Integer else 0
        return Cost(flops, nbytes)

    def single_role(self, s: Statement) -> str:
        """The role of a statement that forms a kernel of this kind by itself."""
        return self.roles[0] if self.roles else ""

    def describe(self, m: Module, kernel: Kernel) -> str | None:
        """A line about a kernel of this kind for the IR dumps' header, or None."""
        return None

    def __repr__(self) -> str:
        return f"<kernel kind {self.name}>"


KINDS: dict[str, KernelKind] = {}


def register_kind(kind: KernelKind) -> KernelKind:
    """Make a kernel kind known to fusion rules, codegen, the autotuner and reports."""
    if not kind.name:
        raise ValueError("einfuse: a kernel kind needs a name")
    KINDS[kind.name] = kind
    return kind


def kind_named(name: str) -> KernelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"einfuse: no kernel kind {name!r}; registered: {', '.join(sorted(KINDS))} "
                       "(register one with einfuse.kinds.register_kind)") from None


def statement_kind(m: Module, s: Statement) -> KernelKind:
    """The kind a statement in no group runs as: the first registered kind (by priority) that claims it."""
    for kind in sorted(KINDS.values(), key=lambda k: -k.priority):
        if kind.claims(m, s):
            return kind
    raise Unsupported(f"no kernel kind claims statement {s.name!r}")


def output_block(g: Group, s: Statement, cap: int) -> tuple[tuple, int]:
    """(the statement's output ranks, a power-of-two tile over them: at least 16, at most `cap`)."""
    out = tuple(p for p in s.index if isinstance(p, sympy.Symbol))
    numel = g.info.hint(sympy.Mul(*[s.ranks()[r] for r in out]) if out else 1)
    return out, max(16, min(cap, 1 << max(0, (numel - 1).bit_length())))


def rename_ranks(s: Statement, suffix: str) -> Statement:
    """`s` with every rank r called r<suffix>: members of one kernel must not share rank names."""
    ren = {r: ix.rank(f"{r}{suffix}") for r in s.ranks()}
    reduce = Reduce(s.reduce.op, tuple((ren[r], n) for r, n in s.reduce.ranks)) if s.reduce else None
    iterate = Iterate(ren[s.iterate.rank], s.iterate.extent, s.iterate.init) if s.iterate else None
    return s.replace(index=tuple(sympy.sympify(p).xreplace(ren) for p in s.index), expr=substitute(s.expr, ren),
                     reduce=reduce, iterate=iterate)


def single(m: Module, s: Statement, kind: KernelKind) -> Kernel:
    """The group of one a statement in no kernel group forms."""
    role = kind.single_role(s)
    return Kernel(s.name, kind.name, (s.name,), (), (role,) if role else ())

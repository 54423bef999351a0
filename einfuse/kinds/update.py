"""The update kind: a write into a state in place (`kc_1 = kc[bt[b, p // 16], p % 16, h, e] <- k[...]`), one
program per BLOCK points of the update's ranks, flat over them. Positions may be gathers (a block table
lookup); a point whose position falls outside the state (a padded table entry, -1) writes nothing."""
from __future__ import annotations

import sympy

from ..ir import index as ix
from ..ir.expr import Expr
from ..ir.module import Module, Update
from .base import Group, KernelKind, register_kind
from .emit import Emitter
from .map import flat_strip
from .spec import KernelSpec, Mapping
from .tile import TL, next_pow2


class UpdateKind(KernelKind):
    name = "update"
    roles = ("write",)
    priority = 40

    def claims(self, m: Module, s) -> bool:
        return isinstance(s, Update)

    def mapping(self, g: Group, cap: int = 1024) -> Mapping:
        (u,) = g.statements
        ranks = tuple(r for r, _ in u.ranks)
        numel = g.info.hint(sympy.Mul(*[n for _, n in u.ranks]) if ranks else 1)
        return Mapping("update", rows=ranks, tiles=(("BLOCK", max(16, min(cap, next_pow2(numel)))),))

    def candidates(self, g: Group) -> list[Mapping]:
        return list(dict.fromkeys(self.mapping(g, cap) for cap in (1024, 256)))

    def emit(self, g: Group, mp: Mapping) -> KernelSpec:
        (u,) = g.statements
        em = Emitter(g, dict(u.ranks))
        kb = em.kb
        t, ragged, grid = flat_strip(em, mp)
        value, d = t.value(u.expr, u.name)
        target = em.types[u.target]
        conds, terms = [], []
        for p, n, stride in zip(u.index, target.shape, ix.strides(target.shape)):
            code = t.value(p)[0] if isinstance(p, Expr) else f"({t.index(p)})"
            at = t.emit(f"{code} + offs * 0", "at")  # each position shaped like the tile
            conds.append(f"({at} >= 0) & ({at} < {t.index(n)})")
            terms.append(f"{at} * {t.index(stride)}")
        kb.place(t.block)
        mask = " & ".join((["valid"] if ragged else []) + conds)
        out = TL[target.dtype.name]
        cast = value if d == target.dtype else f"tl.cast({value}, {out})"
        # the state's buffer is both the target and the new version: one pointer
        kb.store(em.pointer(u.target), " + ".join(terms), cast, mask)
        return em.finish(mp, grid, meta={"aliases": {u.name: u.target}})


UPDATE = register_kind(UpdateKind())

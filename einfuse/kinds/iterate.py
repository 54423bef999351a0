"""The iterate kind: a statement over an iterative rank (`x[i, t + 1] = f(x[i, t], ...)`), BLOCK rows per
program, the running value carried in registers through a sequential loop and stored at every step."""
from __future__ import annotations

from ..ir import index as ix
from ..ir.module import Module, Statement
from .base import Group, KernelKind, output_block, register_kind
from .emit import Emitter
from .spec import KernelSpec, Mapping
from .tile import TL, Tile, compute_dtype, literal


class IterateKind(KernelKind):
    name = "iterate"
    roles = ("scan",)
    priority = 20

    def claims(self, m: Module, s: Statement) -> bool:
        return s.iterate is not None

    def mapping(self, g: Group, cap: int = 256) -> Mapping:
        (s,) = g.statements
        out, block = output_block(g, s, cap)
        return Mapping("iterate", rows=out, red=(s.iterate.rank,), tiles=(("BLOCK", block),))

    def candidates(self, g: Group) -> list[Mapping]:
        return list(dict.fromkeys(self.mapping(g, cap) for cap in (256, 64)))

    def emit(self, g: Group, mp: Mapping) -> KernelSpec:
        (s,) = g.statements
        em = Emitter(g, s.ranks())
        kb = em.kb
        rows, it = list(mp.rows), s.iterate
        names = {**em.rank_names(rows), **em.rank_names([it.rank])}
        kb.assign("pid", "tl.program_id(0)")
        em.strip("rows", "pid * BLOCK + tl.arange(0, BLOCK)", rows, names, em.ext(em.numel(rows)), "valid")
        cd = compute_dtype(s.type.dtype)
        kb.assign("carry", f"tl.full([BLOCK], {literal(it.init.value)}, {TL[cd.name]})")
        em.store(s, em.store_offset(names, s, "0"), "carry", cd, "valid")
        with kb.loop(names[it.rank], f"0, {em.ext(it.extent)}"):
            t = Tile(em, names, {r: "valid" for r in rows}, flats=em.flats("rows", rows, names), carry=(s.name, "carry"))
            code, _ = t.value(s.expr, s.name)
            kb.place(t.block)
            kb.assign("carry", f"tl.cast({code}, {TL[cd.name]})")
            em.store(s, em.store_offset(names, s, f"{names[it.rank]} + 1"), "carry", cd, "valid")
        block = dict(mp.tiles)["BLOCK"]
        return em.finish(mp, [ix.FloorDiv(em.numel(rows) + block - 1, block)])


ITERATE = register_kind(IterateKind())

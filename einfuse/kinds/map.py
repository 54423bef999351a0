"""The map kind: an elementwise statement, one program per BLOCK output elements, flat over its ranks."""
from __future__ import annotations

from ..ir import index as ix
from ..ir.contraction import is_map
from ..ir.module import Module, Statement
from .base import Group, KernelKind, output_block, register_kind
from .emit import Emitter
from .spec import KernelSpec, Mapping
from .tile import Tile


class MapKind(KernelKind):
    name = "map"
    roles = ("map",)
    priority = 0

    def claims(self, m: Module, s: Statement) -> bool:
        return is_map(s)

    def group_roles(self, m: Module, members: list) -> tuple | None:
        return ("map",) if len(members) == 1 and is_map(m.producers()[members[0]]) else None

    def mapping(self, g: Group, cap: int = 1024) -> Mapping:
        (s,) = g.statements
        out, block = output_block(g, s, cap)
        return Mapping("map", rows=out, tiles=(("BLOCK", block),))

    def candidates(self, g: Group) -> list[Mapping]:
        return list(dict.fromkeys(self.mapping(g, cap) for cap in (1024, 256)))

    def emit(self, g: Group, mp: Mapping) -> KernelSpec:
        (s,) = g.statements
        em = Emitter(g, s.ranks())
        t, ragged, grid = flat_strip(em, mp)
        code, d = t.value(s.expr, s.name)
        em.kb.place(t.block)
        em.store(s, "offs", code, d, "valid" if ragged else None)
        return em.finish(mp, grid)


def flat_strip(em: Emitter, mp: Mapping) -> tuple[Tile, bool, list]:
    """One program per BLOCK of the mapping's row ranks flattened: `offs` (masked by `valid` when BLOCK does not
    divide them) split into the ranks. (the tile over them, whether it is ragged, the grid)."""
    ranks = list(mp.rows)
    names = em.rank_names(ranks)
    block = dict(mp.tiles)["BLOCK"]
    total = em.numel(ranks)
    ragged = em.ragged(ranks, block)
    em.kb.assign("pid", "tl.program_id(0)")
    em.strip("offs", "pid * BLOCK + tl.arange(0, BLOCK)", ranks, names, em.ext(total), "valid" if ragged else None)
    t = Tile(em, names, {r: "valid" for r in ranks} if ragged else {}, flats=em.flats("offs", ranks, names))
    return t, ragged, [ix.FloorDiv(total + block - 1, block)]


MAP = register_kind(MapKind())

"""The rows kind: reductions over the columns of a row and the maps that combine them (a layer norm's
mean and variance, a softmax's max and sum), BLOCK_M rows per program. Each member in turn: a reduction
loops over its columns with an accumulator tile, a map combines row values already in registers; only
members read outside the kernel are stored. A reduction in no group is a rows kernel of one member."""
from __future__ import annotations

import sympy

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.contraction import flat_identity
from ..ir.expr import accesses
from ..ir.module import Module, Statement
from ..ir.ops import REDUCE_OPS, infer
from .base import Group, KernelKind, register_kind, rename_ranks
from .emit import Emitter
from .spec import KernelSpec, Mapping
from .tile import TL, Tile, compute_dtype, next_pow2, reduce_parts

MAX_TILE = 4096  # elements of a 2-D register tile (x 4 bytes / 128 threads = 32 registers per thread)


def _width(s: Statement):
    return sympy.Mul(*[n for _, n in s.reduce.ranks])


class RowsKind(KernelKind):
    name = "rows"
    roles = ("reduce", "map")
    priority = 10

    def claims(self, m: Module, s: Statement) -> bool:
        return s.reduce is not None and s.iterate is None

    def group_roles(self, m: Module, members: list) -> tuple | None:
        """Reductions of equal width and maps over the same rows, each reading the others in place."""
        from .dot import is_contraction

        prod, types = m.producers(), m.types()
        stmts = [prod[n] for n in members]
        reds = [s for s in stmts if s.reduce is not None]
        if not reds or any(s.iterate is not None or is_contraction(m, s) for s in stmts):
            return None
        rows, width, inside = stmts[0].type.numel(), _width(reds[0]), set(members)
        for s in stmts:
            if sympy.simplify(s.type.numel() - rows) != 0:
                return None
            if s.reduce is not None and sympy.simplify(_width(s) - width) != 0:
                return None
            if any(a.tensor in inside and not flat_identity(types, a, s) for a in accesses(s.expr)):
                return None
        return tuple("reduce" if s.reduce is not None else "map" for s in stmts)

    def mapping(self, g: Group, tile: int = MAX_TILE) -> Mapping:
        """BLOCK_R columns per step (up to 1024) and as many rows as fit a `tile`-element register tile."""
        red = next(s for s in g.statements if s.reduce is not None)
        br = max(16, min(1024, next_pow2(g.info.hint(_width(red)))))
        bm = max(1, min(next_pow2(g.info.hint(g.statements[0].type.numel(), 64)), max(1, tile // br)))
        return Mapping("rows", rows=tuple(g.statements[0].index), tiles=(("BLOCK_M", bm), ("BLOCK_R", br)))

    def candidates(self, g: Group) -> list[Mapping]:
        return list(dict.fromkeys(self.mapping(g, tile) for tile in (MAX_TILE, MAX_TILE // 4)))

    def emit(self, g: Group, mp: Mapping) -> KernelSpec:
        members = [s if n == 0 else rename_ranks(s, f"_{n}") for n, s in enumerate(g.statements)]
        extents = {}
        for s in members:
            extents.update(s.ranks())
        em = Emitter(g, extents)
        kb = em.kb
        tiles = dict(mp.tiles)
        nrows = em.numel(list(members[0].index))
        ragged = em.ragged(list(members[0].index), tiles["BLOCK_M"])
        kb.assign("pid", "tl.program_id(0)")
        kb.assign("rows", "pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]")
        if ragged:
            kb.assign("rmask", f"rows < {em.ext(nrows)}")
        kb.assign("rc", "tl.arange(0, BLOCK_R)[None, :]")
        values: dict = {}

        def held(a):
            return values[a.tensor][0] if a.tensor in values else None

        for s in members:
            own = em.rank_names(list(s.index))
            em.delinearize("rows", list(s.index), own)
            outer = {r: "rmask" for r in s.index} if ragged else {}
            flats = em.flats("rows", list(s.index), own)
            if s.reduce is None:
                t = Tile(em, own, outer, flats=flats, held=held)
                code, d = t.value(s.expr, s.name)
                kb.place(t.block)
            else:
                code, d = self._reduction(em, s, own, outer, flats, held, tiles["BLOCK_R"])
            values[s.name] = (code, d)
            if s.name in em.stored:
                em.store(s, "rows", code, d, "rmask" if ragged else None)
        return em.finish(mp, [ix.FloorDiv(nrows + tiles["BLOCK_M"] - 1, tiles["BLOCK_M"])])

    @staticmethod
    def _reduction(em: Emitter, s: Statement, own: dict, outer: dict, flats: list, held, block_r: int):
        """One reduction member: an accumulator tile over the row block and a loop over the columns;
        what does not depend on the columns is computed once before the loop."""
        kb = em.kb
        red = [r for r, _ in s.reduce.ranks]
        cols = em.rank_names(red)
        width = em.numel(red)
        c_ragged = em.ragged(red, block_r)
        op = REDUCE_OPS[s.reduce.op]
        expr_dtype = infer(s.expr, em.dtype_of)[0]
        acc_t, ident, combine, final = reduce_parts(op.name, expr_dtype, kb.require)
        pre = Tile(em, own, outer, flats=flats, held=held)
        inner = {**outer, **({r: "cmask" for r in red} if c_ragged else {})}
        body = Tile(em, {**own, **cols}, inner, hoist=pre, variant=red, flats=em.flats("cols", red, cols) + flats,
                    held=held)
        code, d = body.value(s.expr)
        conv = code if TL[compute_dtype(d).name] == acc_t else f"tl.cast({code}, {acc_t})"
        if op.name in ("any", "all"):
            conv = f"tl.cast({code} != 0, {acc_t})"
        acc = kb.fresh(f"acc_{s.name}")
        kb.place(pre.block)
        kb.assign(acc, f"tl.full([BLOCK_M, BLOCK_R], {ident}, {acc_t})")
        with kb.loop("r0", f"0, {em.ext(width)}, BLOCK_R"):
            em.strip("cols", "r0 + rc", red, cols, em.ext(width), "cmask" if c_ragged else None)
            kb.place(body.block)
            kb.assign("x", f"tl.where(cmask, {conv}, {ident})" if c_ragged else conv)
            kb.assign(acc, combine.format(acc, "x"))
        res = kb.let(s.name, final.format(acc))
        if op.name in ("any", "all"):
            return kb.let(s.name, f"{res} != 0"), dt.bool_
        return res, expr_dtype


ROWS = register_kind(RowsKind())

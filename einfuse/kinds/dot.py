"""The dot kind: contractions on tensor cores (`sum[K] A(M, K) * B(K, N)`), tiled M x N with a K loop.

Members and roles: `acc` — a contraction with its own accumulator (contractions over one operand share
a kernel, so the operand tile is loaded once: gate and up, K and V projections); `stat` — a row
statistic accumulated in the same K loop (an RMSNorm's sum of squares before the projection it
normalizes); `epilogue` — maps over the accumulators in registers (bias, activation, residual, scale,
cast). Only members read outside the kernel are stored.
"""
from __future__ import annotations

import sympy

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.contraction import contraction, flat_identity, is_map
from ..ir.expr import Expr, accesses, index_symbols, substitute
from ..ir.module import Module, Reduce, Statement
from ..ir.ops import REDUCE_OPS, infer
from .base import Group, KernelKind, Unsupported, register_kind, rename_ranks
from .emit import Emitter
from .spec import KernelSpec, Mapping
from .tile import TL, Tile, compute_dtype, next_pow2, reduce_parts

MAX_ACCUMULATORS = 2  # contractions sharing a kernel: a third 64x64 f32 accumulator spills registers


def _dtypes(m: Module):
    types = m.types()
    return lambda n: types[n].dtype


def is_contraction(m: Module, s) -> bool:
    return isinstance(s, Statement) and contraction(s, _dtypes(m)) is not None


def float32_precision() -> str:
    """tf32 tensor cores for f32 contractions only when torch allows it (as for torch.matmul)."""
    import torch

    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def stat_binding(m: Module, stat: Statement, reader: Statement) -> dict | None:
    """How a row statistic (a reduction over one rank) is computed inside the contraction `reader`
    (an RMSNorm's sum of squares feeding the projection it normalizes): its ranks in the reader's ranks
    (output ranks through the reader's access, the reduced rank as the reader's K), when the
    statistic reads only a row of what the contraction's own K loop walks over."""
    dtype = _dtypes(m)
    c = contraction(reader, dtype)
    if c is None or stat.reduce is None or stat.iterate is not None or len(stat.reduce.ranks) != 1 or len(c.k) != 1:
        return None
    if stat.reduce.op not in ("sum", "max", "min") or contraction(stat, dtype) is not None:
        return None
    uses = [a for a in accesses(reader.expr) if a.tensor == stat.name]
    if not uses or any(a.tensor == stat.name for f in (c.a, c.b) for a in accesses(f)):
        return None  # read inside an operand: not a post factor of the contraction
    pos = uses[0].indices
    if any(u.indices != pos for u in uses) or any(isinstance(p, Expr) for p in pos):
        return None
    (r, n), = stat.reduce.ranks
    if sympy.simplify(n - reader.ranks()[c.k[0]]) != 0:
        return None
    bind = {**dict(zip(stat.index, pos)), r: c.k[0]}
    if index_symbols(substitute(stat.expr, bind)) - set(c.m) - set(c.k) - set(c.batch):
        return None  # it would need the contraction's N ranks: not one row
    return bind


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(n)))


class DotKind(KernelKind):
    name = "dot"
    roles = ("acc", "stat", "epilogue")
    priority = 30

    def claims(self, m: Module, s: Statement) -> bool:
        """Contractions with M and N ranks whose operands tensor cores take (f64 ones run as rows
        kernels: a loop of multiply-adds on CUDA cores)."""
        c = contraction(s, _dtypes(m))
        return c is not None and bool(c.m) and bool(c.n) and c.operand != dt.f64

    def group_roles(self, m: Module, members: list) -> tuple | None:
        """Contractions tiling alike (at most MAX_ACCUMULATORS), their row statistics, and maps over
        their output read in place; a contraction reads only tensors from outside (or its statistics)."""
        prod, types = m.producers(), m.types()
        dtype = _dtypes(m)
        stmts = [prod[n] for n in members]
        dots = [s for s in stmts if contraction(s, dtype) is not None]
        stats = [s for s in stmts if s.reduce is not None and s not in dots]
        if not dots or not all(self.claims(m, d) for d in dots) or len(dots) > MAX_ACCUMULATORS or any(not is_map(s) for s in stmts if s not in dots + stats):
            return None
        if any(not any(stat_binding(m, st, d) for d in dots) for st in stats):
            return None
        inside = set(members)
        c0 = contraction(dots[0], dtype)

        def volume(c, s, role):
            return sympy.Mul(*[s.ranks()[r] for r in getattr(c, role)])

        for d in dots:
            c = contraction(d, dtype)
            if any(a.tensor in inside and prod[a.tensor] not in stats for a in accesses(d.expr)):
                return None
            if any(sympy.simplify(volume(c, d, x) - volume(c0, dots[0], x)) != 0 for x in ("m", "n", "k", "batch")):
                return None
        numel = dots[0].type.numel()
        for s in stmts:
            if s in stats:
                continue
            if sympy.simplify(s.type.numel() - numel) != 0:
                return None
            if s not in dots and any(a.tensor in inside and not flat_identity(types, a, s) for a in accesses(s.expr)):
                return None
        return tuple("acc" if s in dots else "stat" if s in stats else "epilogue" for s in stmts)

    # ---- tiling
    def _tiles(self, g: Group, block_mn: int = 64, block_k: int | None = None) -> Mapping:
        """A contraction's K tile is 64 for 16-bit operands (half the loop trips of 32, which the
        interpreter runs one by one), 32 for tf32 (with two accumulators it spills at 64) and 16 for IEEE
        f32, whose FMA loop on CUDA cores keeps both operand tiles in registers: at 32, 64 x 64 tiles
        spill thousands of bytes on sm_80 and sm_90a (AOT-compiled 2026-11-29; 16 uses 128 registers)."""
        s = self._anchor(g.statements, g.info.dtype_of)
        c = contraction(s, g.info.dtype_of)
        ext = s.ranks()
        red = tuple(r for r, _ in s.reduce.ranks)

        def numel(ranks):
            return g.info.hint(sympy.Mul(*[ext[r] for r in ranks]) if ranks else 1)

        bm = _clamp_pow2(numel(c.m), 16, block_mn)
        bn = _clamp_pow2(numel(c.n), 16, block_mn)
        prec = float32_precision() if c.operand == dt.f32 else ""
        bk = _clamp_pow2(numel(red), 16, block_k or (64 if c.operand.bits <= 16 else 16 if prec == "ieee" else 32))
        # IEEE f32's FMA loop with 4 warps spills at some tile shapes (64 x 32 with two accumulators on
        # sm_80); 8 warps compile every shape the sweep tried without spills
        return Mapping("dot", rows=c.m, cols=c.n, red=red, batch=c.batch,
                       tiles=(("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk)), input_precision=prec,
                       num_warps=8 if prec == "ieee" else 4)

    def mapping(self, g: Group) -> Mapping:
        return self._tiles(g)

    def candidates(self, g: Group) -> list[Mapping]:
        """The default tiling and a few variants of the whole group, for the CUDA autotuner."""
        base = self._tiles(g)
        variants = [self._tiles(g, mn, k) for mn, k in ((64, 32), (128, 32), (64, 64), (32, 32), (64, 16), (32, 16))]
        return [base] + list(dict.fromkeys(v for v in variants if v != base))

    @staticmethod
    def _anchor(stmts: list, dtype_of) -> Statement:
        """The statement the kernel is tiled by: the group's first contraction."""
        return next(s for s in stmts if contraction(s, dtype_of) is not None)

    # ---- emission
    def emit(self, g: Group, mp: Mapping) -> KernelSpec:
        anchor = self._anchor(g.statements, g.info.dtype_of)  # keeps its rank names: the mapping is in them
        members = [s if s is anchor else rename_ranks(s, f"_{n}") for n, s in enumerate(g.statements)]
        extents = {}
        for s in members:
            extents.update(s.ranks())
        em = Emitter(g, extents)
        dots = self._dots(members, anchor, em)
        stats = self._stats(g.module, members, [d for d, _ in dots], em)
        kb = em.kb
        M, N, K, B = list(mp.rows), list(mp.cols), list(mp.red), list(mp.batch)
        names = {**em.rank_names(M), **em.rank_names(N), **em.rank_names(B)}
        ka, kbn = em.rank_names(K, "_a"), em.rank_names(K, "_b")
        tiles = dict(mp.tiles)
        numM, numN, numK = (em.ext(em.numel(x)) for x in (M, N, K))
        m_rag, n_rag, k_rag = (em.ragged(x, tiles[t]) for x, t in ((M, "BLOCK_M"), (N, "BLOCK_N"), (K, "BLOCK_K")))
        kb.assign("pid", "tl.program_id(0)")
        kb.assign("pid_b", "tl.program_id(1)")
        kb.assign("num_n", f"({numN} + BLOCK_N - 1) // BLOCK_N")  # not tl.cdiv: a jit call, slow to interpret
        kb.assign("pid_m", "pid // num_n")
        kb.assign("pid_n", "pid % num_n")
        em.delinearize("pid_b", B, names)
        em.strip("rm", "pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]", M, names, numM, "mmask" if m_rag else None)
        em.strip("rn", "pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]", N, names, numN, "nmask" if n_rag else None)
        accs = [kb.fresh(f"acc_{d.name}") for d, _ in dots]
        for acc, (_, c) in zip(accs, dots):
            kb.assign(acc, f"tl.zeros([BLOCK_M, BLOCK_N], dtype={'tl.int32' if c.int8 else 'tl.float32'})")
        kb.assign("ka", "tl.arange(0, BLOCK_K)[None, :]")
        kb.assign("kb", "tl.arange(0, BLOCK_K)[:, None]")
        outer = {**{r: "mmask" for r in M if m_rag}, **{r: "nmask" for r in N if n_rag}}
        fl = em.flats("rm", M, names) + em.flats("rn", N, names) + em.flats("pid_b", B, names)
        pre = Tile(em, names, outer, flats=fl)
        ta = Tile(em, {**names, **ka}, {**outer, **{r: "kmask_a" for r in K if k_rag}}, hoist=pre, variant=K,
                  flats=em.flats("rka", K, ka) + fl)
        tb = Tile(em, {**names, **kbn}, {**outer, **{r: "kmask_b" for r in K if k_rag}}, hoist=pre, variant=K,
                  flats=em.flats("rkb", K, kbn) + fl)
        operands = [(self.operand(em, ta, c.a, "a", mp), self.operand(em, tb, c.b, "b", mp)) for _, c in dots]
        # row statistics (an RMSNorm's sum of squares) accumulate over the same K loop as the operands
        stat_accs = []
        for st, expr, _ in stats:
            acc_t, ident, combine, final = reduce_parts(REDUCE_OPS[st.reduce.op].name, infer(expr, em.dtype_of)[0])
            code, _ = ta.value(expr)
            var = kb.fresh(f"acc_{st.name}")
            stat_accs.append((st, var, acc_t, ident, combine, final, code))
        kb.place(pre.block)
        for _, var, acc_t, ident, *_ in stat_accs:
            kb.assign(var, f"tl.full([BLOCK_M, BLOCK_K], {ident}, {acc_t})")
        with kb.loop("k0", f"0, {numK}, BLOCK_K"):
            for side, names_k in (("a", ka), ("b", kbn)):  # K as A's columns and as B's rows
                em.strip(f"rk{side}", f"k0 + k{side}", K, names_k, numK, f"kmask_{side}" if k_rag else None)
            kb.place(ta.block)
            kb.place(tb.block)
            for st, var, acc_t, ident, combine, final, code in stat_accs:
                x = f"tl.where(kmask_a, tl.cast({code}, {acc_t}), {ident})" if k_rag else f"tl.cast({code}, {acc_t})"
                kb.assign(var, combine.format(var, x))
            self._dot_steps(em, dots, accs, operands, ta, tb, k_rag, mp, self._full_tiles(em, dots, M, N, K))
        # after the loop: statistics, post factors, stores, epilogue — all from registers
        values: dict = {}
        tail = Tile(em, names, outer, flats=fl, held=lambda a: values[a.tensor][0] if a.tensor in values else None)
        for st, var, acc_t, ident, combine, final, code in stat_accs:
            values[st.name] = (tail.emit(final.format(var), st.name), infer(st.expr, em.dtype_of)[0])
        for acc, (d, c) in zip(accs, dots):
            res = acc
            for op, y in c.post:
                cy, _ = tail.value(y)
                res = tail.emit(f"{res} {'*' if op == 'mul' else '/'} {cy if cy.isidentifier() else f'({cy})'}", d.name)
            values[d.name] = (res, dt.i32 if c.int8 else dt.f32)
        kb.place(tail.block)
        mask = " & ".join(["mmask"] * m_rag + ["nmask"] * n_rag) or None
        for st, _, index in stats:  # every column tile computed the same statistic: the first one stores it
            if st.name in em.stored:
                off = tail.index(ix.flat_offset(index, st.type.shape))
                smask = f"(rm < {numM}) & (tl.zeros_like(rm) + pid_n == 0)"  # a tensor mask, as the interpreter needs
                em.store(st, off, *values[st.name], smask)
        for d, _ in dots:
            if d.name in em.stored:
                em.store(d, em.store_offset(names, d), *values[d.name], mask)
        self._epilogue(em, members, names, values, mask)
        bm, bn = tiles["BLOCK_M"], tiles["BLOCK_N"]
        grid = [ix.FloorDiv(em.numel(M) + bm - 1, bm) * ix.FloorDiv(em.numel(N) + bn - 1, bn), em.numel(B)]
        return em.finish(mp, grid)

    def operand(self, em: Emitter, tile: Tile, e, side: str, mp: Mapping) -> str:
        """The code of a contraction operand's tile inside the K loop ([BLOCK_M, BLOCK_K] for side "a",
        [BLOCK_K, BLOCK_N] for "b"). A kind whose operands are stored in another format (packed 4-bit
        weights with group scales: einfuse.kinds.qdot) overrides it."""
        return tile.value(e)[0]

    @staticmethod
    def _full_tiles(em: Emitter, dots, M, N, K) -> list:
        """For each contraction, whether its A and B tiles must be broadcast to full [BLOCK_M, BLOCK_K] and
        [BLOCK_K, BLOCK_N] tiles: a rank of extent 1 is 0 in the code, so an operand that varies along no
        other M (or N, or K) rank comes out a row or a column, and tl.dot takes only full tiles."""
        def varies(e, ranks):
            return bool(index_symbols(e) & {r for r in ranks if em.extents[r] != 1})

        return [(not (varies(c.a, M) and varies(c.a, K)), not (varies(c.b, N) and varies(c.b, K))) for _, c in dots]

    @staticmethod
    def _dot_steps(em: Emitter, dots, accs, operands, ta: Tile, tb: Tile, k_rag: bool, mp: Mapping,
                   broadcast: list) -> None:
        """`acc += a @ b` for every accumulator. Past the end of K both operands must be 0 (a masked load
        gives 0; a computed operand, e.g. exp(0), may not); an operand tile two contractions share is
        prepared once. Rows past M and columns past N are never stored, so need no zeroing."""
        kb = em.kb
        ready: dict = {}
        for acc, (_, c), (ca, cb), (full_a, full_b) in zip(accs, dots, operands, broadcast):
            op_t = TL[c.operand.name]
            ab = []
            for side, value, tile, kmask, full, shape in (("a", ca, ta, "kmask_a", full_a, "BLOCK_M, BLOCK_K"),
                                                           ("b", cb, tb, "kmask_b", full_b, "BLOCK_K, BLOCK_N")):
                key = (value, op_t)
                if key not in ready:
                    zeroed = k_rag and kmask not in tile.zero_where.get(value, ())
                    code = f"tl.where({kmask}, {value}, 0)" if zeroed else value
                    if full:
                        code = f"tl.broadcast_to({code}, ({shape}))"
                    if zeroed or full or op_t != TL[compute_dtype(c.operand).name]:
                        code = f"({code}).to({op_t})" if zeroed or full else f"{code}.to({op_t})"
                    ready[key] = value if code == value else kb.let(f"{side}_tile", code)
                ab.append(ready[key])
            a, b = ab
            if c.int8:
                kb.assign(acc, f"libm.dot({a}, {b}, {acc}, out_dtype=tl.int32)")
            elif c.operand == dt.f32:
                kb.assign(acc, f'libm.dot({a}, {b}, {acc}, input_precision="{mp.input_precision or "ieee"}")')
            else:
                kb.assign(acc, f"libm.dot({a}, {b}, {acc})")

    def _dots(self, members: list, anchor: Statement, em: Emitter) -> list:
        """(statement, Contraction) of each contraction, its ranks renamed to the anchor's by role."""
        c0 = contraction(anchor, em.dtype_of)
        out = []
        for s in members:
            c = contraction(s, em.dtype_of)
            if c is None:
                continue
            ren = {}
            for role in ("m", "n", "k", "batch"):
                mine, theirs = getattr(c, role), getattr(c0, role)
                if len(mine) != len(theirs) or any(sympy.simplify(em.extents[x] - em.extents[y]) != 0
                                                   for x, y in zip(mine, theirs)):
                    raise Unsupported(f"{s.name} does not tile like {anchor.name}")
                ren.update(dict(zip(mine, theirs)))
            if ren and s is not anchor:
                s = s.replace(index=tuple(sympy.sympify(p).xreplace(ren) for p in s.index), expr=substitute(s.expr, ren),
                              reduce=Reduce(s.reduce.op, tuple((ren.get(r, r), n) for r, n in s.reduce.ranks)))
                c = contraction(s, em.dtype_of)
            out.append((s, c))
        return out

    @staticmethod
    def _stats(m: Module, members: list, dots: list, em: Emitter) -> list:
        """(statement, its expression in the anchor's ranks, its output position in them) of each row
        statistic computed in the K loop."""
        out = []
        for s in members:
            if s.reduce is None or contraction(s, em.dtype_of) is not None:
                continue
            bind = next((b for b in (stat_binding(m, s, d) for d in dots) if b), None)
            if bind is None:
                raise Unsupported(f"{s.name} is not a row statistic of the group's contraction")
            out.append((s, substitute(s.expr, bind), [sympy.sympify(p).xreplace(bind) for p in s.index]))
        return out

    @staticmethod
    def _epilogue(em: Emitter, members: list, names: dict, values: dict, mask: str | None) -> None:
        """Maps of the group over the anchor's flat output index, computed from registers."""
        maps = [s for s in members if contraction(s, em.dtype_of) is None and s.reduce is None]
        if not maps:
            return
        kb = em.kb
        anchor = next(s for s in members if contraction(s, em.dtype_of) is not None)
        kb.assign("eflat", em.store_offset(names, anchor))
        if mask:
            kb.assign("emask", mask)
        held = (lambda a: values[a.tensor][0] if a.tensor in values else None)  # noqa: E731
        for s in maps:
            own = em.rank_names(list(s.index))
            em.delinearize("eflat", list(s.index), own)
            # reads in the output's layout reuse eflat instead of re-linearizing the ranks (which, per
            # element of a 64 x 64 tile, costs registers the accumulators need)
            t = Tile(em, {**names, **own}, {r: "emask" for r in s.index} if mask else {}, held=held,
                     flats=em.flats("eflat", list(s.index), own))
            code, d = t.value(s.expr, s.name)
            kb.place(t.block)
            values[s.name] = (code, d)
            if s.name in em.stored:
                em.store(s, "eflat", code, d, "emask" if mask else None)


DOT = register_kind(DotKind())

"""The attention kind: FuseMax's 1-pass attention cascade as one kernel. A program per (batch/head,
query tile) streams K/V tiles along the iterative rank m1, carrying the running max, denominator and
numerator in registers. Each step is the IR statement of the same role, emitted with the group's
registers; key tiles that every query of the tile is masked from (causal, sliding window) are skipped,
so their K/V are never loaded.

Roles (named in the IR's `kernel` line): qk (scores), lm (a key tile's row max), rm (running max),
sln (exp of the shifted scores), prm (rescale of the previous step), sld (a tile's row sum), rd (running
denominator), slnv (a tile's P @ V), rnv (running numerator), and what the kernel writes after the loop:
out, or in split-KV decode a key chunk's part_max, part_den and part_num.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import sympy

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.contraction import contraction, mul_factors, narrow_operand, product
from ..ir.expr import Access, Call, Const, accesses, index_difference, index_symbols, map_indices, substitute
from ..ir.module import Statement
from .base import Group, KernelKind, Unsupported, register_kind, rename_ranks
from .dot import float32_precision
from .emit import Emitter
from .spec import KernelSpec, Mapping
from .tile import TL, IndexCode, Tile, compute_dtype, next_pow2

NEG_INF = Const(-math.inf)
STEP_ROLES = ("qk", "lm", "rm", "sln", "prm", "sld", "rd", "slnv", "rnv")  # the 1-pass cascade's steps, in order
CHUNK_ROLES = ("part_max", "part_den", "part_num")  # what a split-KV chunk writes for the combine step
# The per-step row max and sum over an f32 score tile: what tl.max / tl.sum expand to on a GPU, called
# directly because those are jit functions, and each jit call inside the key loop costs the interpreter
# a full re-patch of triton.language (about 1 ms, a third of an attention kernel's interpreted time).
TILE_REDUCE = {"max": "tl.standard._elementwise_max", "sum": "tl.standard._sum_combine"}
# What each step's value is called in the kernel.
VALUE_NAMES = {"lm": "tile_max", "rm": "new_max", "sln": "p_tile", "prm": "rescale", "sld": "tile_sum",
               "rd": "new_den", "rnv": "new_num"}


class Steps:
    """The group's statements by role (the scores' ranks renamed apart: only they differ)."""

    def __init__(self, g: Group):
        k = g.kernel
        renamed = {g.kernel.member("qk"): rename_ranks(g.role("qk"), "_q")}
        by_name = {s.name: renamed.get(s.name, s) for s in g.statements}
        for role in STEP_ROLES:
            setattr(self, role, by_name[k.member(role)])
        self.finals = [by_name[n] for n in k.members if k.role_of(n) not in STEP_ROLES]
        self.members = list(by_name.values())
        self.p = self.lm.index[-2]
        self.lead = list(self.lm.index[:-2])
        self.m1 = self.rm.iterate.rank
        self.m0 = self.lm.reduce.ranks[0][0]
        self.tile = int(self.lm.reduce.ranks[0][1])
        self.f = self.rnv.index[-2]

    def extents(self) -> dict:
        out = {}
        for s in self.members:
            out.update(s.ranks())
        return out


def _qk_parts(em: Emitter, r: Steps):
    """Q and K operands (and the post factors) of the score contraction, in the cascade's ranks."""
    c = contraction(r.qk, em.dtype_of)
    if c is None:
        raise Unsupported("the score statement is not a contraction")
    if len(c.k) != 1:
        raise Unsupported("the score contraction reduces more than one rank")
    use = next(a for a in accesses(r.lm.expr) if a.tensor == r.qk.name)
    sub = dict(zip(r.qk.index, use.indices))
    a, b = substitute(c.a, sub), substitute(c.b, sub)
    if r.p not in index_symbols(a):
        a, b = b, a
    post = [(op, substitute(y, sub)) for op, y in c.post]
    (qa, qt), (kb, kt) = narrow_operand(a, em.dtype_of), narrow_operand(b, em.dtype_of)
    return qa, kb, qt if qt == kt else c.operand, post, c.k[0]


# The key tile (keys per step of the iterative rank, fixed in the IR by fuse_attention) and the query
# rows per program with their warps, by operand precision and head dimension (the larger of Q/K's and
# V's, padded to a power of two): the largest query tile whose kernel AOT-compiles for sm_80 and sm_90a
# without spills (measured 2026-11-29 with Triton 3.6, causal N=1024; docs/PERFORMANCE.md). Each query
# tile re-reads every K/V tile it visits, so longer tiles move fewer bytes. IEEE f32 dots run on CUDA
# cores from registers: a short key tile leaves room for long query tiles.
KEY_TILES = {"ieee": 16, "tf32": 32, "16-bit": 64}
ROW_TILES = {  # precision -> [(largest head dimension, rows, warps)]
    "ieee": [(64, 128, 8), (128, 64, 8), (256, 16, 8)],
    "tf32": [(128, 128, 8), (256, 32, 8)],
    "16-bit": [(128, 128, 8), (256, 32, 8)],
}


def precision(op_t: dt.DType) -> str:
    """How score contractions on operands of `op_t` run: IEEE f32, tf32 (as torch allows) or 16-bit."""
    if op_t.bits == 32:
        return "ieee" if float32_precision() == "ieee" else "tf32"
    return "16-bit"


def supported(op_t: dt.DType) -> bool:
    """Score operands the attention kernel takes: f32 (IEEE or tf32) and 16-bit floats. (f64 has no
    tensor-core dot: such a cascade stays a 3-pass cascade of ordinary kernels.)"""
    return op_t in (dt.f32, dt.bf16, dt.f16)


def key_tile(op_t: dt.DType) -> int:
    """Keys per step of the 1-pass cascade for score operands of type `op_t` (fuse_attention asks)."""
    return KEY_TILES[precision(op_t)]


def row_tile(op_t: dt.DType, head: int) -> tuple[int, int]:
    """(query rows per program, warps) for score operands of type `op_t` and a head dimension `head`."""
    for largest, rows, warps in ROW_TILES[precision(op_t)]:
        if head <= largest:
            return rows, warps
    return 16, 8


def _value_expr(r: Steps):
    """V, the factors of the numerator's contraction other than the probabilities."""
    return product([x for x in mul_factors(r.slnv.expr) if r.sln.name not in {a.tensor for a in accesses(x)}])


def _head(em: Emitter, r: Steps, e) -> int:
    return max(16, next_pow2(max(em.hint(em.extents[e]), em.hint(em.extents[r.f]))))


def gqa_packing(em: Emitter, r: Steps) -> tuple | None:
    """(head rank h, group size G) when G query heads share every K/V tile (K and V read h only as
    h // G) and G times the query length fits one program's rows (decode with GQA): those heads become
    the rows of one program, so each K/V tile is loaded once per KV head, not once per query head."""
    L = sympy.sympify(em.extents[r.p])
    if not L.is_Integer:
        return None
    _, k_expr, op_t, _, e = _qk_parts(em, r)
    v_expr = _value_expr(r)
    cap = row_tile(op_t, _head(em, r, e))[0]
    for h in r.lead:
        H = sympy.sympify(em.extents[h])
        if not H.is_Integer:
            continue
        for G in sorted((d for d in sympy.divisors(int(H)) if d > 1 and d * int(L) <= cap), reverse=True):
            g, hh = sympy.Dummy("g", integer=True, nonnegative=True), sympy.Dummy("hh", integer=True, nonnegative=True)
            rng = {**em.ranges(), g: (sympy.Integer(0), H / G - 1), hh: (sympy.Integer(0), sympy.Integer(G - 1))}

            def split(pos, h=h, G=G, g=g, hh=hh, rng=rng):
                return ix.simplify(sympy.expand(sympy.sympify(pos).xreplace({h: G * g + hh})), rng)

            if all(hh not in index_symbols(map_indices(x, split)) for x in (k_expr, v_expr)):
                return h, G
    return None


def _register(r: Steps, held: dict):
    """Access -> register: iterative tensors by the step they are read at (m1: carried, m1 + 1: new)."""
    carried = {r.rm.name: r.rm, r.rd.name: r.rd, r.rnv.name: r.rnv}

    def reg(a: Access):
        if a.tensor not in held:
            return None
        v = held[a.tensor]
        if isinstance(v, dict):
            s = carried[a.tensor]
            d = next(k for k, p in enumerate(s.index) if not isinstance(p, sympy.Symbol))
            step = sympy.expand(sympy.sympify(a.indices[d]) - r.m1)
            return v["next"] if step == 1 and "next" in v else v["carry"]
        return v

    return reg


def _live(code, cond, lo_hi: dict) -> str | None:
    """Code that is False when `cond` holds for no (query, key) of the tile; None if not decidable."""
    if isinstance(cond, Call) and cond.op in ("and", "or"):
        parts = [_live(code, c, lo_hi) for c in cond.args]
        if cond.op == "and":
            parts = [p for p in parts if p is not None]
            return " & ".join(f"({p})" for p in parts) or None
        return None if None in parts else " | ".join(f"({p})" for p in parts)
    d = index_difference(cond)
    if d is None or cond.op in ("eq", "ne"):
        return None
    lo, hi = sympy.Integer(0), sympy.Integer(0)
    rest = d
    for v, (vlo, vhi) in lo_hi.items():
        c = d.coeff(v)
        if c == 0:
            continue
        if not c.is_number or d.has(ix.FloorDiv, ix.Mod):
            return None
        rest = rest - c * v
        lo += c * (vlo if c > 0 else vhi)
        hi += c * (vhi if c > 0 else vlo)
    if rest.free_symbols & set(lo_hi):
        return None
    lo, hi = code(sympy.expand(lo + rest)), code(sympy.expand(hi + rest))
    return {"lt": f"{lo} < 0", "le": f"{lo} <= 0", "gt": f"{hi} > 0", "ge": f"{hi} >= 0"}[cond.op]


def _live_conditions(e) -> list:
    """Conditions of the where(c, ..., -inf) chain wrapping the scores: a key is live only if all hold.
    masked_fill writes the chain the other way round, where(c, -inf, ...): then not(c) must hold."""
    out = []
    while isinstance(e, Call):
        if e.op == "cast" and e.attr.is_float:  # f32(where(c, bf16(-inf), s)): a cast keeps -inf
            e = e.args[0]
        elif e.op == "where" and _neg_inf(e.args[2]):
            out.append(e.args[0])
            e = e.args[1]
        elif e.op == "where" and _neg_inf(e.args[1]):
            out.append(_negate(e.args[0]))
            e = e.args[2]
        else:
            break
    return out


def _neg_inf(e) -> bool:
    return e == NEG_INF or (isinstance(e, Call) and e.op == "cast" and _neg_inf(e.args[0]))


_FLIP = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt"}


def _negate(c):
    """not(c) for index conditions (comparisons flipped, De Morgan); anything else stays not(c)."""
    if isinstance(c, Call) and c.op in _FLIP:
        return Call(_FLIP[c.op], c.args)
    if isinstance(c, Call) and c.op in ("and", "or"):
        return Call("or" if c.op == "and" else "and", tuple(_negate(x) for x in c.args))
    if isinstance(c, Call) and c.op == "not":
        return c.args[0]
    return Call("not", (c,))


# Loaders of key/value tiles stored in another format (einfuse.kinds.qattention: 4-bit codes, two per
# byte): each is called as loader(emitter, tile, expression, name, axis rank, its BLOCK constexpr, whether
# the axis runs down the tile's rows) and returns the tile's code, or None to leave it to the next.
KV_LOADERS: list = []


def kv_tile(em: Emitter, tile: Tile, expr, name: str, axis, block: str, rows: bool) -> str:
    """The code of a key tile ([BLOCK_E, BLOCK_M0], axis e down the rows) or value tile ([BLOCK_M0,
    BLOCK_F]) computing `expr`: by the first KV_LOADERS entry that takes it, else element by element."""
    for loader in KV_LOADERS:
        code = loader(em, tile, expr, name, axis, block, rows)
        if code is not None:
            return code
    return tile.value(expr, name)[0]


class AttentionKind(KernelKind):
    name = "attention"
    roles = STEP_ROLES + ("out",) + CHUNK_ROLES
    priority = -1  # formed by fuse_attention only, never claims a statement by itself

    def mapping(self, g: Group, rows: int | None = None) -> Mapping:
        """Query rows per program: the largest tile the operand type and head dimension allow without
        spills (ROW_TILES), or `rows` when the autotuner asks for fewer."""
        r = Steps(g)
        em = Emitter(g, r.extents())
        _, _, op_t, _, e = _qk_parts(em, r)
        L, E, F = (em.hint(em.extents[x]) for x in (r.p, e, r.f))
        be, bf = max(16, next_pow2(E)), max(16, next_pow2(F))
        cap, warps = row_tile(op_t, max(be, bf))
        pack = gqa_packing(em, r)
        if pack is not None:
            rows = None  # packed query heads must fit one program's rows
        bp = max(16, min(cap, rows or cap, next_pow2(L * (pack[1] if pack else 1))))
        if bp < cap and bp * max(be, bf) <= 32 * 64:
            warps = 4  # a short tile (decode, short sequences): 4 warps hold it without spills
        return Mapping("attention", rows=(r.p,), cols=(r.f,), red=(r.m1, r.m0), batch=tuple(r.lead),
                       tiles=(("BLOCK_P", bp), ("BLOCK_M0", r.tile), ("BLOCK_E", be), ("BLOCK_F", bf)),
                       num_warps=warps)

    def candidates(self, g: Group) -> list[Mapping]:
        """Shorter query tiles, and the default with the other warp count."""
        base = self.mapping(g)
        other = dataclasses.replace(base, num_warps=12 - base.num_warps)  # 4 <-> 8
        return list(dict.fromkeys([base] + [self.mapping(g, rows) for rows in (64, 32)] + [other]))

    def emit(self, g: Group, mp: Mapping) -> KernelSpec:
        r = Steps(g)
        em = Emitter(g, r.extents())
        kb = em.kb
        q_expr, k_expr, op_t, post, e = _qk_parts(em, r)
        tiles = dict(mp.tiles)
        lead, p, f, m1, m0 = r.lead, r.p, r.f, r.m1, r.m0
        names = em.rank_names(lead)
        L, E, F = em.extents[p], em.extents[e], em.extents[f]
        p_rag, e_rag, f_rag = (em.ragged([x], tiles[t]) for x, t in ((p, "BLOCK_P"), (e, "BLOCK_E"), (f, "BLOCK_F")))
        kb.assign("pid_p", "tl.program_id(0)")
        kb.assign("pid_b", "tl.program_id(1)")
        pack = gqa_packing(em, r)
        pmask = {p: "pmask"} if p_rag else {}
        kv_names = names
        if pack is None:
            em.delinearize("pid_b", lead, names)
            kb.assign("p_lo", "pid_p * BLOCK_P")
            kb.assign("p_hi", "p_lo + BLOCK_P - 1")
            kb.assign("p", "p_lo + tl.arange(0, BLOCK_P)[:, None]")
            if p_rag:
                kb.assign("pmask", f"p < {em.ext(L)}")
            programs = [ix.FloorDiv(L + tiles["BLOCK_P"] - 1, tiles["BLOCK_P"]), em.numel(lead)]
        else:  # GQA packing: program (.., g, ..) runs query heads G*g .. G*g + G - 1 as its rows
            h, G = pack
            g_rank = ix.rank(kb.fresh(f"{names[h]}_kv"))
            em.extents[g_rank] = sympy.sympify(em.extents[h]) / G
            row, hh = kb.fresh("row"), kb.fresh(f"{names[h]}_in")
            em.delinearize("pid_b", [g_rank if x == h else x for x in lead], {**names, g_rank: str(g_rank)})
            kb.assign(row, "tl.arange(0, BLOCK_P)[:, None]")
            kb.assign(hh, f"{row} // {L}")
            kb.assign("p", f"{row} % {L}")
            kb.assign("pmask", f"{row} < {G * L}")
            kb.assign("p_lo", "0")
            kb.assign("p_hi", f"{L - 1}")
            kv_names = {**names, h: f"({G}*{g_rank})"}  # K and V read h only as h // G: the same for every row
            names = {**names, h: f"({G}*{g_rank} + {hh})"}
            p_rag, pmask = True, {p: "pmask", h: "pmask"}
            programs = [sympy.Integer(1), em.numel(lead) / G]
        index_names = {**em.size_names, m1: "m1", sympy.Symbol("p_lo"): "p_lo", sympy.Symbol("p_hi"): "p_hi", **names}

        def code(x):
            em.used_sizes |= x.free_symbols & set(em.m.sizes)
            return IndexCode(index_names).doprint(x)

        kb.assign("eq", "tl.arange(0, BLOCK_E)[None, :]")
        kb.assign("ek", "tl.arange(0, BLOCK_E)[:, None]")
        kb.assign("m0k", "tl.arange(0, BLOCK_M0)[None, :]")
        kb.assign("m0v", "tl.arange(0, BLOCK_M0)[:, None]")
        kb.assign("fv", "tl.arange(0, BLOCK_F)[None, :]")
        if e_rag:
            kb.assign("emask_q", f"eq < {em.ext(E)}")
            kb.assign("emask_k", f"ek < {em.ext(E)}")
        if f_rag:
            kb.assign("fmask", f"fv < {em.ext(F)}")
        tl_op = TL[op_t.name]
        narrow = f".to({tl_op})" if tl_op != TL[compute_dtype(op_t).name] else ""
        # Q: loaded once per program
        qt = Tile(em, {**names, p: "p", e: "eq"}, {**pmask, **({e: "emask_q"} if e_rag else {})})
        qc, _ = qt.value(q_expr, "q")
        kb.place(qt.block)
        masked_q = e_rag and "emask_q" not in qt.zero_where.get(qc, ())
        kb.assign("q_tile", f"{f'tl.where(emask_q, {qc}, 0)' if masked_q else qc}{narrow}")
        kb.assign("run_max", "tl.full([BLOCK_P, 1], float('-inf'), tl.float32)")
        kb.assign("run_den", "tl.zeros([BLOCK_P, 1], dtype=tl.float32)")
        kb.assign("run_num", "tl.zeros([BLOCK_P, BLOCK_F], dtype=tl.float32)")
        lo_hi = {p: (sympy.Symbol("p_lo"), sympy.Symbol("p_hi")), m0: (sympy.Integer(0), sympy.Integer(r.tile - 1))}
        live = [c for c in (_live(code, c, lo_hi) for c in _live_conditions(r.lm.expr)) if c is not None]
        held: dict = {r.qk.name: "qk_tile", r.rm.name: {"carry": "run_max"}, r.rd.name: {"carry": "run_den"},
                      r.rnv.name: {"carry": "run_num"}}
        reg = _register(r, held)
        with kb.loop("m1", em.ext(r.rm.iterate.extent)):
            if live:
                step = kb.when(" & ".join(f"({c})" for c in live),
                               "else every query of the tile is masked from these keys")
            else:
                step = contextlib.nullcontext()
            with step:
                self._step(em, r, names, kv_names, pmask, e, e_rag, f_rag, k_expr, op_t, narrow, post, held, reg)
        masks = " & ".join(["pmask"] * p_rag + ["fmask"] * f_rag) or None
        for s in r.finals:
            ft = Tile(em, {**names, p: "p", f: "fv"}, held=reg)
            val, d = ft.value(s.expr, s.name)
            kb.place(ft.block)
            own = {x: {p: "p", f: "fv", **names}.get(x, str(x)) for x in s.index}
            if s.name in em.stored:
                em.store(s, em.store_offset(own, s), val, d, masks)
        return em.finish(mp, programs)

    @staticmethod
    def _step(em, r: Steps, names, kv_names, pmask, e, e_rag, f_rag, k_expr, op_t, narrow, post, held, reg):
        """One key tile: scores, the online-softmax update, P @ V, the running values carried on."""
        kb = em.kb
        p, f, m1, m0 = r.p, r.f, r.m1, r.m0
        kt = Tile(em, {**kv_names, m1: "m1", m0: "m0k", e: "ek"}, {e: "emask_k"} if e_rag else {})
        kc = kv_tile(em, kt, k_expr, "k_tile", e, "BLOCK_E", rows=True)
        kb.place(kt.block)
        k_tile = f"tl.where(emask_k, {kc}, 0)" if e_rag and "emask_k" not in kt.zero_where.get(kc, ()) else kc
        prec = f', input_precision="{float32_precision()}"' if op_t.name == "f32" else ""
        kb.assign("qk_tile", f"libm.dot(q_tile, {k_tile}{narrow}{prec})")
        st = Tile(em, {**names, p: "p", m1: "m1", m0: "m0k"}, pmask, held=reg)
        for opname, y in post:
            cy, _ = st.value(y)
            kb.assign("qk_tile", f"qk_tile {'*' if opname == 'mul' else '/'} ({cy})", to=st.block)
        for role, reduce_to in (("lm", "max"), ("rm", None), ("sln", None), ("prm", None), ("sld", "sum"), ("rd", None)):
            s: Statement = getattr(r, role)
            val, _ = st.value(s.expr, None if reduce_to else VALUE_NAMES[role])
            if reduce_to:
                val = st.emit(f"tl.reduce({val}, 1, {TILE_REDUCE[reduce_to]}, keep_dims=True)", VALUE_NAMES[role])
            held[s.name] = val if role not in ("rm", "rd") else {**held[s.name], "next": val}
        kb.place(st.block)
        vt = Tile(em, {**kv_names, m1: "m1", m0: "m0v", f: "fv"}, {f: "fmask"} if f_rag else {}, held=reg)
        v_inner, v_t = narrow_operand(_value_expr(r), em.dtype_of)
        vc = kv_tile(em, vt, v_inner, "v_tile", f, "BLOCK_F", rows=False)
        kb.place(vt.block)
        v_op = TL[v_t.name] if v_t.is_float and v_t.bits < 32 else "tl.float32"
        vprec = f', input_precision="{float32_precision()}"' if v_op == "tl.float32" else ""
        cast = f".to({v_op})" if v_op != "tl.float32" else ""
        kb.assign("pv_tile", f"libm.dot({held[r.sln.name]}{cast}, {vc}{cast}{vprec})")
        held[r.slnv.name] = "pv_tile"
        nt = Tile(em, {**names, p: "p", m1: "m1", f: "fv"}, held=reg)
        num, _ = nt.value(r.rnv.expr, VALUE_NAMES["rnv"])
        kb.place(nt.block)
        kb.assign("run_max", held[r.rm.name]["next"])
        kb.assign("run_den", held[r.rd.name]["next"])
        kb.assign("run_num", num)
        held[r.rm.name] = {"carry": "run_max"}
        held[r.rd.name] = {"carry": "run_den"}
        held[r.rnv.name] = {"carry": "run_num"}


ATTENTION = register_kind(AttentionKind())

"""The FuseMax 1-pass attention kernel: a program per (batch/head, query tile) streams K/V tiles along
the iterative rank m1, carrying the running max, denominator and numerator in registers. Each step is
the IR statement of the same role, emitted with the group's registers; key tiles that every query of the
tile is masked from (causal, sliding window) are skipped, so their K/V are never loaded."""
from __future__ import annotations

import math

import sympy

from ..ir import index as ix
from ..ir.contraction import _mul_factors, _narrow_operand, _product, contraction
from ..ir.expr import Access, Call, Const, accesses, index_difference, index_symbols, map_indices, substitute
from ..ir.module import Statement
from .kernel import Mapping
from .triton_gen import TL, Body, _TritonIndex, compute_dtype, next_pow2

NEG_INF = Const(-math.inf)
ROLES = ("qk", "lm", "rm", "sln", "prm", "sld", "rd", "slnv", "rnv")
# The per-step row max and sum over an f32 score tile: what tl.max / tl.sum expand to on a GPU, called
# directly because those are jit functions, and each jit call inside the key loop costs the interpreter
# a full re-patch of triton.language (about 1 ms, a third of an attention kernel's interpreted time).
TILE_REDUCE = {"max": "tl.standard._elementwise_max", "sum": "tl.standard._sum_combine"}


class Roles:
    """The group's members by the roles the kernel line names (`qk`, `lm`, ...; the rest are finals)."""

    def __init__(self, gen):
        by_name = {s.name: s for s in gen.members}
        by = {role: by_name[gen.kernel.member(role)] for role in ROLES}
        self.__dict__.update(by)
        self.finals = [s for s in gen.members if gen.kernel.role_of(s.name) not in ROLES]
        self.p = self.lm.index[-2]
        self.lead = list(self.lm.index[:-2])
        self.m1 = self.rm.iterate.rank
        self.m0 = self.lm.reduce.ranks[0][0]
        self.tile = int(self.lm.reduce.ranks[0][1])
        self.f = self.rnv.index[-2]


def _qk_parts(gen, r: Roles):
    """Q and K operands (and the post factors) of the score contraction, in the cascade's ranks."""
    c = contraction(r.qk, gen.dtype_of)
    if c is None:
        from .groups import GroupUnsupported

        raise GroupUnsupported("the score statement is not a contraction")
    use = next(a for a in accesses(r.lm.expr) if a.tensor == r.qk.name)
    sub = dict(zip(r.qk.index, use.indices))
    a, b = substitute(c.a, sub), substitute(c.b, sub)
    if r.p not in index_symbols(a):
        a, b = b, a
    post = [(op, substitute(y, sub)) for op, y in c.post]
    e = c.k[0] if len(c.k) == 1 else None
    if e is None:
        from .groups import GroupUnsupported

        raise GroupUnsupported("the score contraction reduces more than one rank")
    (qa, qt), (kb, kt) = _narrow_operand(a, gen.dtype_of), _narrow_operand(b, gen.dtype_of)
    return qa, kb, qt if qt == kt else c.operand, post, e


def _row_cap(op_t) -> int:
    """Query rows per program: each query tile re-reads all K/V it visits, so longer tiles move fewer
    bytes. 16-bit operands fit 128 rows in 8 warps unspilled; tf32 fits 64; IEEE f32 dots run on CUDA
    cores from registers and need a short tile."""
    if op_t.bits == 32:
        return 16 if _precision() == "ieee" else 64
    return 128


def _value_expr(r: Roles):
    """V, the factors of the numerator's contraction other than the probabilities."""
    return _product([x for x in _mul_factors(r.slnv.expr) if r.sln.name not in {a.tensor for a in accesses(x)}])


def gqa_packing(gen, r: Roles) -> tuple | None:
    """(head rank h, group size G) when G query heads share every K/V tile (K and V read h only as
    h // G) and G times the query length fits one program's rows (decode with GQA): those heads become
    the rows of one program, so each K/V tile is loaded once per KV head, not once per query head."""
    L = sympy.sympify(gen.extents[r.p])
    if not L.is_Integer:
        return None
    _, k_expr, op_t, _, _ = _qk_parts(gen, r)
    v_expr = _value_expr(r)
    for h in r.lead:
        H = sympy.sympify(gen.extents[h])
        if not H.is_Integer:
            continue
        for G in sorted((d for d in sympy.divisors(int(H)) if d > 1 and d * int(L) <= _row_cap(op_t)), reverse=True):
            g, hh = sympy.Dummy("g", integer=True, nonnegative=True), sympy.Dummy("hh", integer=True, nonnegative=True)
            rng = {**gen.ranges(), g: (sympy.Integer(0), H / G - 1), hh: (sympy.Integer(0), sympy.Integer(G - 1))}

            def split(pos, h=h, G=G, g=g, hh=hh, rng=rng):
                return ix.simplify(sympy.expand(sympy.sympify(pos).xreplace({h: G * g + hh})), rng)

            if all(hh not in index_symbols(map_indices(x, split)) for x in (k_expr, v_expr)):
                return h, G
    return None


def attention_mapping(gen) -> Mapping:
    r = Roles(gen)
    q_expr, _, op_t, _, e = _qk_parts(gen, r)
    L, E, F = (gen.hint(gen.extents[x]) for x in (r.p, e, r.f))
    be, bf = max(16, next_pow2(E)), max(16, next_pow2(F))
    ieee = op_t.bits == 32 and _precision() == "ieee"
    pack = gqa_packing(gen, r)
    bp = max(16, min(_row_cap(op_t), next_pow2(L * (pack[1] if pack else 1))))
    warps = 4 if ieee or (max(be, bf) <= 64 and bp <= 64) else 8
    return Mapping("attention", rows=(r.p,), cols=(r.f,), red=(r.m1, r.m0), batch=tuple(r.lead),
                   tiles=(("BLOCK_P", bp), ("BLOCK_M0", r.tile), ("BLOCK_E", be), ("BLOCK_F", bf)), num_warps=warps)


def _register(r: Roles, held: dict):
    """Access -> register: iterative tensors by the step they are read at (m1: carried, m1 + 1: new)."""

    def reg(a: Access):
        if a.tensor not in held:
            return None
        v = held[a.tensor]
        if isinstance(v, dict):
            s = {r.rm.name: r.rm, r.rd.name: r.rd, r.rnv.name: r.rnv}[a.tensor]
            d = next(k for k, p in enumerate(s.index) if not isinstance(p, sympy.Symbol))
            step = sympy.simplify(sympy.sympify(a.indices[d]) - r.m1)
            return v["next"] if step == 1 and "next" in v else v["carry"]
        return v

    return reg


def _live(gen, r: Roles, cond, lo_hi: dict) -> str | None:
    """Code that is False when `cond` holds for no (query, key) of the tile; None if not decidable."""
    if isinstance(cond, Call) and cond.op in ("and", "or"):
        parts = [_live(gen, r, c, lo_hi) for c in cond.args]
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
    lo, hi = _code(gen, sympy.expand(lo + rest)), _code(gen, sympy.expand(hi + rest))
    return {"lt": f"{lo} < 0", "le": f"{lo} <= 0", "gt": f"{hi} > 0", "ge": f"{hi} >= 0"}[cond.op]


def _code(gen, e) -> str:
    gen.used_sizes |= e.free_symbols & set(gen.m.sizes)
    return _TritonIndex({**gen.size_names, **gen.attention_names}).doprint(e)


def attention_body(gen, mp: Mapping):
    r = Roles(gen)
    q_expr, k_expr, op_t, post, e = _qk_parts(gen, r)
    tiles = dict(mp.tiles)
    lead, p, f, m1, m0 = r.lead, r.p, r.f, r.m1, r.m0
    names = gen.rank_names(lead)
    L, E, F = gen.extents[p], gen.extents[e], gen.extents[f]
    p_rag, e_rag, f_rag = gen.ragged([p], tiles["BLOCK_P"]), gen.ragged([e], tiles["BLOCK_E"]), gen.ragged([f], tiles["BLOCK_F"])
    lines = ["    pid_p = tl.program_id(0)", "    pid_b = tl.program_id(1)"]
    pack = gqa_packing(gen, r)
    pmask = {p: "pmask"} if p_rag else {}
    kv_names = names
    if pack is None:
        lines += gen.delinearize("pid_b", lead, names, "    ")
        lines += ["    p_lo = pid_p * BLOCK_P", "    p_hi = p_lo + BLOCK_P - 1",
                  "    p = p_lo + tl.arange(0, BLOCK_P)[:, None]"] + [f"    pmask = p < {gen.ext(L)}"] * p_rag
        programs = [ix.FloorDiv(L + tiles["BLOCK_P"] - 1, tiles["BLOCK_P"]), gen.numel(lead)]
    else:  # GQA packing: program (.., g, ..) runs query heads G*g .. G*g + G - 1 as its rows
        h, G = pack
        g = ix.rank(gen.fresh(f"{names[h]}_kv"))
        gen.extents[g] = sympy.sympify(gen.extents[h]) / G
        row, hh = gen.fresh("row"), gen.fresh(f"{names[h]}_in")
        lines += gen.delinearize("pid_b", [g if x == h else x for x in lead], {**names, g: str(g)}, "    ")
        lines += [f"    {row} = tl.arange(0, BLOCK_P)[:, None]", f"    {hh} = {row} // {L}", f"    p = {row} % {L}",
                  f"    pmask = {row} < {G * L}", "    p_lo = 0", f"    p_hi = {L - 1}"]
        kv_names = {**names, h: f"({G}*{g})"}  # K and V read h only as h // G: the same for every row
        names = {**names, h: f"({G}*{g} + {hh})"}
        p_rag, pmask = True, {p: "pmask", h: "pmask"}
        programs = [sympy.Integer(1), gen.numel(lead) / G]
    gen.attention_names = {m1: "m1", sympy.Symbol("p_lo"): "p_lo", sympy.Symbol("p_hi"): "p_hi", **names}
    lines += ["    eq = tl.arange(0, BLOCK_E)[None, :]", "    ek = tl.arange(0, BLOCK_E)[:, None]",
              "    m0k = tl.arange(0, BLOCK_M0)[None, :]", "    m0v = tl.arange(0, BLOCK_M0)[:, None]",
              "    fv = tl.arange(0, BLOCK_F)[None, :]"]
    lines += [f"    emask_q = eq < {gen.ext(E)}", f"    emask_k = ek < {gen.ext(E)}"] * e_rag
    lines += [f"    fmask = fv < {gen.ext(F)}"] * f_rag
    rng = gen.ranges()
    # Q: loaded once per program
    qb = Body(gen, {**names, p: "p", e: "eq"}, {**pmask, **({e: "emask_q"} if e_rag else {})}, rng, "    ")
    qc, _ = qb.value(q_expr)
    lines += qb.lines
    tl_op = TL[op_t.name]
    lines.append(f"    q_tile = {f'tl.where(emask_q, {qc}, 0)' if e_rag and 'emask_q' not in qb.zero_where.get(qc, ()) else qc}"
                 f"{'.to(' + tl_op + ')' if tl_op != TL[compute_dtype(op_t).name] else ''}")
    lines += ["    run_max = tl.full([BLOCK_P, 1], float('-inf'), tl.float32)",
              "    run_den = tl.zeros([BLOCK_P, 1], dtype=tl.float32)",
              "    run_num = tl.zeros([BLOCK_P, BLOCK_F], dtype=tl.float32)",
              f"    for m1 in range({gen.ext(r.rm.iterate.extent)}):"]
    lo_hi = {p: (sympy.Symbol("p_lo"), sympy.Symbol("p_hi")), m0: (sympy.Integer(0), sympy.Integer(r.tile - 1))}
    conds = _live_conditions(r.lm.expr)
    live = [c for c in (_live(gen, r, c, lo_hi) for c in conds) if c is not None]
    ind = "        "
    if live:
        lines.append(f"{ind}if {' & '.join(f'({c})' for c in live)}:  # else every query of the tile is masked from these keys")
        ind += "    "
    held: dict = {r.qk.name: "qk_t", r.rm.name: {"carry": "run_max"}, r.rd.name: {"carry": "run_den"},
                  r.rnv.name: {"carry": "run_num"}}
    reg = _register(r, held)
    kb = Body(gen, {**kv_names, m1: "m1", m0: "m0k", e: "ek"}, {e: "emask_k"} if e_rag else {}, rng, ind)
    kc, _ = kb.value(k_expr)
    lines += kb.lines
    k_tile = f"tl.where(emask_k, {kc}, 0)" if e_rag and "emask_k" not in kb.zero_where.get(kc, ()) else kc
    prec = f', input_precision="{_precision()}"' if op_t.name == "f32" else ""
    lines.append(f"{ind}qk_t = libm.dot(q_tile, {k_tile}{'.to(' + tl_op + ')' if tl_op != TL[compute_dtype(op_t).name] else ''}{prec})")
    sb = Body(gen, {**names, p: "p", m1: "m1", m0: "m0k"}, pmask, rng, ind)
    sb.reg = reg
    for opname, y in post:
        cy, _ = sb.value(y)
        sb.lines.append(f"{ind}qk_t = qk_t {'*' if opname == 'mul' else '/'} ({cy})")
    for role, reduce_to in (("lm", "max"), ("rm", None), ("sln", None), ("prm", None), ("sld", "sum"), ("rd", None)):
        s: Statement = getattr(r, role)
        code, _ = sb.value(s.expr)
        if reduce_to:
            code = sb.emit(f"tl.reduce({code}, 1, {TILE_REDUCE[reduce_to]}, keep_dims=True)", role)
        held[s.name] = code if role not in ("rm", "rd") else {**held[s.name], "next": code}
    lines += sb.lines
    vb = Body(gen, {**kv_names, m1: "m1", m0: "m0v", f: "fv"}, {f: "fmask"} if f_rag else {}, rng, ind)
    vb.reg = reg
    (v_inner, v_t) = _narrow_operand(_value_expr(r), gen.dtype_of)
    vc, _ = vb.value(v_inner)
    lines += vb.lines
    v_op = TL[v_t.name] if v_t.is_float and v_t.bits < 32 else "tl.float32"
    vprec = f', input_precision="{_precision()}"' if v_op == "tl.float32" else ""
    sln = held[r.sln.name]
    lines.append(f"{ind}slnv_t = libm.dot({sln}{'.to(' + v_op + ')' if v_op != 'tl.float32' else ''}, "
                 f"{vc}{'.to(' + v_op + ')' if v_op != 'tl.float32' else ''}{vprec})")
    held[r.slnv.name] = "slnv_t"
    nb = Body(gen, {**names, p: "p", m1: "m1", f: "fv"}, {}, rng, ind)
    nb.reg = reg
    num, _ = nb.value(r.rnv.expr)
    lines += nb.lines
    lines += [f"{ind}run_max = {held[r.rm.name]['next']}", f"{ind}run_den = {held[r.rd.name]['next']}",
              f"{ind}run_num = {num}"]
    held[r.rm.name] = {"carry": "run_max"}
    held[r.rd.name] = {"carry": "run_den"}
    held[r.rnv.name] = {"carry": "run_num"}
    masks = " & ".join(["pmask"] * p_rag + ["fmask"] * f_rag)
    for s in r.finals:
        fb = Body(gen, {**names, p: "p", f: "fv"}, {}, rng, "    ")
        fb.reg = reg
        code, d = fb.value(s.expr)
        lines += fb.lines
        own = {x: {p: "p", f: "fv", **names}.get(x, str(x)) for x in s.index}
        if s.name in gen.stored:
            lines.append(f"    tl.store({gen.pointer(s.name)} + {gen.store_offset(own, stmt=s)}, "
                         f"{gen.store_cast(code, d, s)}{f', mask={masks}' if masks else ''})")
    return lines, programs


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


def _precision() -> str:
    from .mapping import float32_precision

    return float32_precision()
